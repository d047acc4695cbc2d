"""Parametrized and weight-dropped recurrent weights, LBFGS, and optimizers that move the weights before the
measurement: every measurement is made at the weights the recorded forward used and checked against exact
Jacobians (torch.func.jacrev + matrix_norm(ord=2)) written out here from the PyTorch formulas."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrizations, parametrize

import gradwatch
from gradwatch.policy.alerts import GradWatchWarning
from gradwatch.records import ErrorRecord, Measurement

BATCH, STEPS, INPUTS, HIDDEN = 3, 5, 3, 4
EXACT = gradwatch.EstimatorSettings(
    mode="full", rtol=1e-12
)  # iterate to convergence: compared with exact norms


pytestmark = pytest.mark.usefixtures("one_thread")


# --- an independent reference: the cells from the PyTorch docs, Jacobians by jacrev ------------------------


def lstm_step(w: dict[str, Tensor], x: Tensor, s: Tensor) -> Tensor:
    """One LSTM step on s = [h; c] (torch.nn.LSTM gate order i, f, g, o)."""
    h, c = s[..., :HIDDEN], s[..., HIDDEN:]
    gates = x @ w["weight_ih"].T + w["bias_ih"] + h @ w["weight_hh"].T + w["bias_hh"]
    i, f, g, o = gates.chunk(4, dim=-1)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.cat([torch.sigmoid(o) * torch.tanh(c_new), c_new], dim=-1)


def rnn_step(w: dict[str, Tensor], x: Tensor, s: Tensor) -> Tensor:
    return torch.tanh(x @ w["weight_ih"].T + w["bias_ih"] + s @ w["weight_hh"].T + w["bias_hh"])


def exact_sigmas(step: Callable[..., Tensor], w: dict[str, Tensor], x: Tensor, s0: Tensor) -> Tensor:
    """||J_t||_2 for every step and sequence of the chain s_t = step(x_t, s_{t-1}), shape (T, B)."""
    sigmas = []
    s = s0
    for t in range(x.shape[0]):
        rows = []
        for b in range(x.shape[1]):
            jac = torch.func.jacrev(lambda state, b=b, t=t: step(w, x[t, b], state))(s[b])
            rows.append(torch.linalg.matrix_norm(jac, ord=2))
        sigmas.append(torch.stack(rows))
        s = step(w, x[t], s)
    return torch.stack(sigmas)


def assert_matches(record: Measurement, sigmas: Tensor) -> None:
    m = record.metrics
    assert m.jacobian_sigma_max_mean == pytest.approx(float(sigmas.mean()), rel=1e-6)
    assert m.jacobian_sigma_max_max == pytest.approx(float(sigmas.max()), rel=1e-6)
    assert m.jacobian_sigma_max_min == pytest.approx(float(sigmas.min()), rel=1e-6)


def layer0(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k.removesuffix("_l0"): v.detach().clone() for k, v in weights.items()}


# --- models -------------------------------------------------------------------------------------------------


class FusedModel(nn.Module):
    """An LSTM whose weights may be parametrized; keeps the effective weights its forward used."""

    def __init__(self, parametrization: str | None) -> None:
        super().__init__()
        self.rnn = nn.LSTM(INPUTS, HIDDEN).double()
        self.head = nn.Linear(HIDDEN, 1).double()
        if parametrization == "orthogonal":
            parametrizations.orthogonal(self.rnn, "weight_hh_l0")
        elif parametrization == "spectral_norm":
            parametrizations.spectral_norm(self.rnn, "weight_hh_l0")
        elif parametrization == "weight_norm":
            parametrizations.weight_norm(self.rnn, "weight_hh_l0")
        self.used: dict[str, Tensor] = {}

    def forward(self, x: Tensor) -> Tensor:
        with parametrize.cached():  # the LSTM's forward reads these very tensors
            self.used = {n: getattr(self.rnn, n) for n in self.rnn._flat_weights_names}
            out, _ = self.rnn(x)
        return self.head(out).pow(2).mean()


class SalesforceWeightDrop(nn.Module):
    """AWD-LSTM's WeightDrop (salesforce/awd-lstm-lm): the raw weight lives on the wrapped module."""

    def __init__(self, p: float = 0.3) -> None:
        super().__init__()
        self.rnn = nn.LSTM(INPUTS, HIDDEN).double()
        self.head = nn.Linear(HIDDEN, 1).double()
        self.p = p
        w = self.rnn.weight_hh_l0
        del self.rnn._parameters["weight_hh_l0"]
        self.rnn.register_parameter("weight_hh_l0_raw", nn.Parameter(w.data))
        self.used: dict[str, Tensor] = {}

    def forward(self, x: Tensor) -> Tensor:
        raw = self.rnn.weight_hh_l0_raw
        self.rnn.weight_hh_l0 = F.dropout(raw, self.p, training=self.training)
        self.used = dict(zip(self.rnn._flat_weights_names, self.rnn._flat_weights, strict=True))
        out, _ = self.rnn(x)
        return self.head(out).pow(2).mean()


class FastaiWeightDropout(nn.Module):
    """fastai's WeightDropout: the raw weight lives on the wrapper, the LSTM is its child ``module``."""

    def __init__(self, p: float = 0.3) -> None:
        super().__init__()
        self.module = nn.LSTM(INPUTS, HIDDEN).double()
        self.p = p
        w = self.module.weight_hh_l0
        delattr(self.module, "weight_hh_l0")
        self.register_parameter("weight_hh_l0_raw", nn.Parameter(w.data))
        self.module.weight_hh_l0 = w.data.clone()

    def forward(self, x: Tensor) -> Tensor:
        self.module.weight_hh_l0 = F.dropout(self.weight_hh_l0_raw, self.p, training=self.training)
        return self.module(x)[0]


class FastaiModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = FastaiWeightDropout()
        self.head = nn.Linear(HIDDEN, 1).double()
        self.used: dict[str, Tensor] = {}

    def forward(self, x: Tensor) -> Tensor:
        out = self.rnn(x)
        lstm = self.rnn.module
        self.used = dict(zip(lstm._flat_weights_names, lstm._flat_weights, strict=True))
        return self.head(out).pow(2).mean()


class CellModel(nn.Module):
    """A parametrized LSTMCell or RNNCell unrolled by hand."""

    def __init__(self, cell: str, parametrization: str) -> None:
        super().__init__()
        self.cell = (nn.LSTMCell if cell == "lstm" else nn.RNNCell)(INPUTS, HIDDEN).double()
        getattr(parametrizations, parametrization)(self.cell, "weight_hh")
        self.head = nn.Linear(HIDDEN, 1).double()
        self.is_lstm = cell == "lstm"
        self.used: dict[str, Tensor] = {}

    def forward(self, x: Tensor) -> Tensor:
        h = x.new_zeros(x.shape[1], HIDDEN)
        state: Tensor | tuple[Tensor, Tensor] = (h, h.clone()) if self.is_lstm else h
        with parametrize.cached():
            self.used = {n: getattr(self.cell, n) for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
            for t in range(x.shape[0]):
                state = self.cell(x[t], state)
        h = state[0] if isinstance(state, tuple) else state
        return self.head(h).pow(2).mean()


def batches(n: int) -> list[Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(STEPS, BATCH, INPUTS, generator=g, dtype=torch.float64) for _ in range(n)]


def train(make: Callable[[], nn.Module], steps: int, watched: bool, **watch_kwargs: object):
    """Adam training; per step: the loss, the effective weights used and the leaves' gradient norms."""
    torch.manual_seed(0)
    model = make()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    monitor = gradwatch.watch(model, optimizer, every=1, estimator=EXACT, **watch_kwargs) if watched else None
    losses, used, grads = [], [], []
    for x in batches(steps):
        optimizer.zero_grad()
        loss = model(x)
        loss.backward()
        losses.append(loss.item())
        used.append({n: t.detach().clone() for n, t in model.used.items()})
        grads.append({n: float(p.grad.norm()) for n, p in model.named_parameters() if p.grad is not None})
        optimizer.step()
    params = [p.detach().clone() for p in model.parameters()]
    records = [r for r in monitor.history if isinstance(r, Measurement)] if monitor else []
    errors = [r for r in monitor.history if isinstance(r, ErrorRecord)] if monitor else []
    if monitor:
        monitor.close()
    return losses, params, used, grads, records, errors


FUSED_CASES: dict[str, tuple[Callable[[], nn.Module], str, list[str]]] = {
    "orthogonal": (
        lambda: FusedModel("orthogonal"),
        "rnn",
        ["parametrizations.weight_hh_l0.original"],
    ),
    "spectral_norm": (
        lambda: FusedModel("spectral_norm"),
        "rnn",
        ["parametrizations.weight_hh_l0.original"],
    ),
    "weight_norm": (
        lambda: FusedModel("weight_norm"),
        "rnn",
        ["parametrizations.weight_hh_l0.original0", "parametrizations.weight_hh_l0.original1"],
    ),
    "weight_drop_salesforce": (SalesforceWeightDrop, "rnn", ["weight_hh_l0_raw"]),
    "weight_drop_fastai": (FastaiModel, "rnn.module", ["rnn.weight_hh_l0_raw"]),
}


@pytest.mark.parametrize("probe", ["live", "fixed"])
@pytest.mark.parametrize("case", list(FUSED_CASES))
def test_parametrized_and_dropped_fused_weights_are_measured_exactly(case: str, probe: str) -> None:
    """live: each step's batch at the weights its forward used; fixed: the first batch re-run at the current
    weights, which are those the step's own forward used (the optimizer has not stepped yet)."""
    make, module, hh_leaves = FUSED_CASES[case]
    steps = 3
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradWatchWarning)  # no replay warning, no fault
        losses, params, used, grads, records, errors = train(make, steps, watched=True, probe=probe)
    assert not errors
    assert [r.step for r in records] == list(range(steps))  # one measurement per measured step
    for record, weights, grad in zip(records, used, grads, strict=True):
        x = batches(steps)[record.step if probe == "live" else 0]
        sigmas = exact_sigmas(lstm_step, layer0(weights), x, x.new_zeros(BATCH, 2 * HIDDEN))
        assert_matches(record, sigmas)
        # gradient norms under the leaves' real names, relative to the module (a parent's: to the model)
        expected = sorted(["weight_ih_l0", "bias_ih_l0", "bias_hh_l0", *hh_leaves])
        assert sorted(record.metrics.grad_norm) == expected
        for local, value in record.metrics.grad_norm.items():
            qualified = local if local.startswith("rnn.") else f"{module}.{local}"
            assert value == pytest.approx(grad[qualified], rel=1e-6)

    bare_losses, bare_params, *_ = train(make, steps, watched=False)
    assert losses == bare_losses  # bit for bit
    assert all(torch.equal(a, b) for a, b in zip(params, bare_params, strict=True))


@pytest.mark.parametrize(
    ("cell", "parametrization"),
    [("lstm", "orthogonal"), ("lstm", "weight_norm"), ("lstm", "spectral_norm"), ("rnn", "orthogonal")],
)
def test_parametrized_cells_are_measured_exactly(cell: str, parametrization: str) -> None:
    steps = 3
    make = lambda: CellModel(cell, parametrization)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradWatchWarning)
        losses, params, used, grads, records, errors = train(make, steps, watched=True, probe="live")
    assert not errors
    assert [r.step for r in records] == list(range(steps))
    step = lstm_step if cell == "lstm" else rnn_step
    width = 2 * HIDDEN if cell == "lstm" else HIDDEN
    for record, weights, grad in zip(records, used, grads, strict=True):
        x = batches(steps)[record.step]
        assert_matches(record, exact_sigmas(step, weights, x, x.new_zeros(BATCH, width)))
        prefix = "parametrizations.weight_hh."
        leaves = [prefix + ("original0" if parametrization == "weight_norm" else "original")]
        if parametrization == "weight_norm":
            leaves.append(prefix + "original1")
        assert sorted(record.metrics.grad_norm) == sorted(["weight_ih", "bias_ih", "bias_hh", *leaves])
        for local, value in record.metrics.grad_norm.items():
            assert value == pytest.approx(grad[f"cell.{local}"], rel=1e-6)
    bare_losses, bare_params, *_ = train(make, steps, watched=False)
    assert losses == bare_losses
    assert all(torch.equal(a, b) for a, b in zip(params, bare_params, strict=True))


def test_header_names_the_leaves_behind_derived_weights() -> None:
    model = FusedModel("weight_norm")
    with gradwatch.watch(model, every=1) as monitor:
        (module,) = monitor.history[0].modules  # type: ignore[union-attr]
    assert module["weight_leaves"] == {
        "weight_hh_l0": ["parametrizations.weight_hh_l0.original0", "parametrizations.weight_hh_l0.original1"]
    }


def test_a_weight_without_a_leaf_is_named_once() -> None:
    """A forward-computed weight gradwatch cannot trace to a parameter: measured, but said so."""
    model = SalesforceWeightDrop()
    raw = model.rnn._parameters.pop("weight_hh_l0_raw")
    model.raw_elsewhere = raw  # type: ignore[assignment]  # under a name gradwatch does not know
    with pytest.warns(GradWatchWarning, match="weight_hh_l0 in its forward from no parameter"):
        monitor = gradwatch.watch(model, every=1)
    assert monitor.history[0].modules[0]["unattributed_weights"] == ["weight_hh_l0"]  # type: ignore[union-attr]
    monitor.close()


# --- LBFGS and optimizers that move the weights before the measurement --------------------------------------


class LBFGSCellModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.LSTMCell(INPUTS, HIDDEN).double()
        self.head = nn.Linear(HIDDEN, 1).double()

    def forward(self, x: Tensor) -> Tensor:
        h = x.new_zeros(x.shape[1], HIDDEN)
        state = (h, h.clone())
        for t in range(x.shape[0]):
            state = self.cell(x[t], state)
        return (self.head(state[0]) - 1).pow(2).mean()


def train_lbfgs(steps: int, watched: bool, line_search: str | None):
    torch.manual_seed(0)
    model = LBFGSCellModel()
    optimizer = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=20, line_search_fn=line_search)
    monitor = gradwatch.watch(model, optimizer, every=1, probe="live", estimator=EXACT) if watched else None
    x = batches(1)[0]
    losses: list[float] = []
    last_weights: list[dict[str, Tensor]] = []  # per step: the weights of its last closure

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = model(x)
        loss.backward()
        losses.append(loss.item())
        weights = {n: p.detach().clone() for n, p in model.cell.named_parameters()}
        if len(last_weights) == len(step_losses):
            last_weights.append(weights)
        else:
            last_weights[-1] = weights
        return loss

    step_losses = []
    for _ in range(steps):
        step_losses.append(float(optimizer.step(closure)))
    records = [r for r in monitor.history if isinstance(r, Measurement)] if monitor else []
    if monitor:
        monitor.close()
    return losses, step_losses, last_weights, records, x


@pytest.mark.parametrize("line_search", [None, "strong_wolfe"])
def test_lbfgs_is_measured_at_the_weights_of_the_captured_closure(line_search: str | None) -> None:
    steps = 4
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradWatchWarning)
        losses, step_losses, last_weights, records, x = train_lbfgs(steps, True, line_search)
    # Step k's closures run inside optimizer.step(closure), after the step pre-hook; the monitor measures
    # the step from the step post-hook, on the last closure of step k at the weights it used: one
    # measurement per measured step, step 0 included.
    assert [r.step for r in records] == list(range(steps))
    for record in records:
        weights = last_weights[record.step]
        assert_matches(record, exact_sigmas(lstm_step, weights, x[:, :8], x.new_zeros(BATCH, 2 * HIDDEN)))
    bare_losses, bare_step_losses, *_ = train_lbfgs(steps, False, line_search)
    assert losses == bare_losses and step_losses == bare_step_losses  # bit for bit


def test_a_closure_step_of_any_optimizer_measures_its_own_forward() -> None:
    """optimizer.step(closure) with SGD: the closure's forward (inside step()) is the measured one, with the
    gradients it produced, and the unwatched run's losses are reproduced bit for bit."""

    def run(watched: bool) -> tuple[list[float], list[Measurement], list[dict[str, Tensor]], list[Tensor]]:
        torch.manual_seed(0)
        model = FusedModel(None)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
        monitor = (
            gradwatch.watch(model, optimizer, every=2, probe="live", estimator=EXACT) if watched else None
        )
        losses: list[float] = []
        used: list[dict[str, Tensor]] = []
        xs = batches(4)
        for x in xs:

            def closure(x: Tensor = x) -> Tensor:
                optimizer.zero_grad()
                loss = model(x)
                loss.backward()
                used.append(layer0(model.used))
                return loss

            losses.append(float(optimizer.step(closure)))
        records = [r for r in monitor.history if isinstance(r, Measurement)] if monitor else []
        grads = [p.grad.clone() for p in model.parameters()]
        if monitor:
            monitor.close()
        return losses, records, used, grads

    losses, records, used, grads = run(True)
    bare_losses, _, _, bare_grads = run(False)
    assert losses == bare_losses and all(torch.equal(a, b) for a, b in zip(grads, bare_grads, strict=True))
    assert [r.step for r in records] == [0, 2]
    for record in records:
        x = batches(4)[record.step]
        assert_matches(record, exact_sigmas(lstm_step, used[record.step], x, x.new_zeros(BATCH, 2 * HIDDEN)))


def test_weights_moved_before_monitor_step_are_not_a_replay_failure() -> None:
    """optimizer=None and monitor.step() after optimizer.step() (or another optimizer stepping first): the
    measurement is made at the weights the recorded forward used, not dropped with a replay warning."""
    torch.manual_seed(0)
    model = FusedModel(None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    monitor = gradwatch.watch(model, every=1, probe="live", estimator=EXACT)
    used = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradWatchWarning)
        for x in batches(3):
            optimizer.zero_grad()
            model(x).backward()
            used.append(layer0(model.used))
            optimizer.step()
            monitor.step()
    records = [r for r in monitor.history if isinstance(r, Measurement)]
    monitor.close()
    assert [r.step for r in records] == [0, 1, 2]
    for record, weights in zip(records, used, strict=True):
        x = batches(3)[record.step]
        assert_matches(record, exact_sigmas(lstm_step, weights, x, x.new_zeros(BATCH, 2 * HIDDEN)))


def test_an_optimizer_without_the_watched_parameters_is_refused() -> None:
    model = FusedModel(None)
    opt_head = torch.optim.SGD(model.head.parameters(), lr=0.1)
    with pytest.raises(
        ValueError, match=r"holds none of the watched parameters \(rnn\.bias_hh_l0.*optimizer=None"
    ):
        gradwatch.watch(model, opt_head)
    opt_rnn = torch.optim.SGD(model.rnn.parameters(), lr=0.1)
    gradwatch.watch(model, opt_rnn).close()


def test_an_optimizer_holding_only_the_leaf_of_a_dropped_weight_is_accepted() -> None:
    model = SalesforceWeightDrop()
    gradwatch.watch(model, torch.optim.SGD([model.rnn.weight_hh_l0_raw], lr=0.1)).close()


# --- user cells called as cell(state, x) --------------------------------------------------------------------


class StateFirstCell(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w_in = nn.Linear(INPUTS, HIDDEN).double()
        self.w_rec = nn.Linear(HIDDEN, HIDDEN).double()

    def forward(self, state: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(self.w_in(x) + self.w_rec(state))


class StateFirstModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cell = StateFirstCell()

    def forward(self, x: Tensor) -> Tensor:
        h = x.new_zeros(x.shape[1], HIDDEN)
        for t in range(x.shape[0]):
            h = self.cell(h, x[t])
        return h.pow(2).mean()


def run_state_first(**register: object) -> tuple[list[Measurement], list[ErrorRecord], nn.Module]:
    torch.manual_seed(0)
    model = StateFirstModel()
    gradwatch.register_cell(model.cell, **register)  # type: ignore[arg-type]
    try:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        monitor = gradwatch.watch(model, optimizer, every=1, estimator=EXACT)
        x = batches(1)[0]
        optimizer.zero_grad()
        model(x).backward()
        optimizer.step()
        history = list(monitor.history)
        monitor.close()
    finally:
        gradwatch.unregister_cell(model.cell)
    return (
        [r for r in history if isinstance(r, Measurement)],
        [r for r in history if isinstance(r, ErrorRecord)],
        model,
    )


def test_a_cell_called_state_first_is_told_how_to_register() -> None:
    with pytest.warns(GradWatchWarning, match="state_first=True"):
        records, errors, _ = run_state_first()
    assert not records
    (error,) = errors
    assert "register_cell(StateFirstCell, state_first=True)" in error.message
    assert "stack expects" not in error.message


def test_a_cell_registered_state_first_is_measured_exactly() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradWatchWarning)
        records, errors, _model = run_state_first(state_first=True)
    assert not errors
    (record,) = records
    # the measured step's weights are the initial ones; SGD moved them after the measurement
    torch.manual_seed(0)
    initial = StateFirstModel().cell
    w = {
        "weight_ih": initial.w_in.weight.detach(),
        "bias_ih": initial.w_in.bias.detach(),
        "weight_hh": initial.w_rec.weight.detach(),
        "bias_hh": initial.w_rec.bias.detach(),
    }
    x = batches(1)[0]
    assert_matches(record, exact_sigmas(rnn_step, w, x, x.new_zeros(BATCH, HIDDEN)))


def test_a_user_cell_is_measured_at_the_weights_of_its_recorded_calls() -> None:
    """SGD moves the cell's parameters before monitor.step(): the step function runs at the recorded ones."""
    torch.manual_seed(0)
    model = StateFirstModel()
    gradwatch.register_cell(model.cell, state_first=True)
    try:
        optimizer = torch.optim.SGD(model.parameters(), lr=2.0)
        monitor = gradwatch.watch(model, every=1, probe="live", estimator=EXACT)
        used = []
        for x in batches(2):
            optimizer.zero_grad()
            model(x).backward()
            cell = model.cell
            used.append(
                {
                    "weight_ih": cell.w_in.weight.detach().clone(),
                    "bias_ih": cell.w_in.bias.detach().clone(),
                    "weight_hh": cell.w_rec.weight.detach().clone(),
                    "bias_hh": cell.w_rec.bias.detach().clone(),
                }
            )
            optimizer.step()
            monitor.step()
        records = [r for r in monitor.history if isinstance(r, Measurement)]
        monitor.close()
    finally:
        gradwatch.unregister_cell(model.cell)
    assert [r.step for r in records] == [0, 1]
    for record, w in zip(records, used, strict=True):
        x = batches(2)[record.step]
        assert_matches(record, exact_sigmas(rnn_step, w, x, x.new_zeros(BATCH, HIDDEN)))

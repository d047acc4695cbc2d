"""The monitor end to end: schedule, invisibility to training, hooks, run log, faults."""

from __future__ import annotations

import copy
import io
import json
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.records import Measurement, RunHeader, record_from_json


class SeqModel(nn.Module):
    """An embedding -> RNN -> linear model of the kind people train, with dropout."""

    def __init__(self, rnn: nn.Module, hidden: int) -> None:
        super().__init__()
        self.rnn = rnn
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor, state: object = None) -> tuple[torch.Tensor, object]:
        out, state = self.rnn(x, state)
        return self.head(self.drop(out)).squeeze(-1), state


class CellLoop(nn.Module):
    """A hand-written loop over an nn.LSTMCell."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.LSTMCell(3, 6)
        self.head = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor, state: object = None) -> tuple[torch.Tensor, object]:
        outs = []
        for t in range(x.shape[0]):
            state = self.cell(x[t], state)
            outs.append(self.head(state[0]))
        return torch.stack(outs).squeeze(-1), state


@gradwatch.register_cell
class MinimalGatedCell(nn.Module):
    """A user-written cell: h' = (1 - z) h + z tanh(W x + U h)."""

    def __init__(self, n_in: int = 3, n_hidden: int = 5) -> None:
        super().__init__()
        self.inp = nn.Linear(n_in, 2 * n_hidden)
        self.rec = nn.Linear(n_hidden, 2 * n_hidden, bias=False)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        a, z = (self.inp(x) + self.rec(h)).chunk(2, dim=-1)
        z = torch.sigmoid(z)
        return (1 - z) * h + z * torch.tanh(a)


class CustomLoop(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cell = MinimalGatedCell()
        self.head = nn.Linear(5, 1)

    def forward(self, x: torch.Tensor, state: object = None) -> tuple[torch.Tensor, object]:
        h = torch.zeros(x.shape[1], 5) if state is None else state
        outs = []
        for t in range(x.shape[0]):
            h = self.cell(x[t], h)
            outs.append(self.head(h))
        return torch.stack(outs).squeeze(-1), h


MODELS: dict[str, Callable[[], nn.Module]] = {
    "lstm-2layer-dropout": lambda: SeqModel(nn.LSTM(3, 6, num_layers=2, dropout=0.3), 6),
    "gru-bidirectional": lambda: SeqModel(nn.GRU(3, 6, bidirectional=True), 12),
    "rnn-relu": lambda: SeqModel(nn.RNN(3, 6, nonlinearity="relu"), 6),
    "lstm-proj": lambda: SeqModel(nn.LSTM(3, 6, proj_size=4), 4),
    "lstmcell-loop": CellLoop,
    "custom-cell": CustomLoop,
}


def _train(model: nn.Module, steps: int, monitor_kwargs: dict | None, carry_state: bool = True):
    """A realistic loop: hidden state carried (detached) between batches, Adam, clipping by the user."""
    torch.manual_seed(1)
    data = [(torch.randn(9, 4, 3), torch.randn(9, 4)) for _ in range(steps)]
    torch.manual_seed(2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    monitor = gradwatch.watch(model, optimizer, **monitor_kwargs) if monitor_kwargs is not None else None
    losses, state = [], None
    for x, y in data:
        optimizer.zero_grad()
        out, state = model(x, state if carry_state else None)
        state = tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()
        loss = nn.functional.mse_loss(out, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.detach())
    return losses, monitor


@pytest.mark.parametrize("name", list(MODELS))
def test_training_is_bit_identical_with_the_monitor(name, tmp_path):
    torch.manual_seed(0)
    reference = MODELS[name]()
    watched = copy.deepcopy(reference)
    losses_ref, _ = _train(reference, 4, None)
    losses, monitor = _train(watched, 4, {"every": 1, "log": tmp_path / "run.jsonl"})
    monitor.close()
    assert all(torch.equal(a, b) for a, b in zip(losses_ref, losses, strict=True))
    for (n, p_ref), (_, p) in zip(reference.named_parameters(), watched.named_parameters(), strict=True):
        assert torch.equal(p_ref, p), n
    measurements = [r for r in monitor.history if isinstance(r, Measurement)]
    assert {r.step for r in measurements} == {0, 1, 2, 3}


@pytest.mark.parametrize("name", list(MODELS))
def test_every_kind_is_measured_with_finite_metrics(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    _, monitor = _train(model, 1, {"every": 1})
    monitor.close()
    records = [r for r in monitor.history if isinstance(r, Measurement)]
    assert records, "no measurement"
    for r in records:
        m = r.metrics
        assert m.jacobian_sigma_max_mean is not None and m.jacobian_sigma_max_mean > 0
        assert m.jacobian_sigma_max_min <= m.jacobian_sigma_max_mean <= m.jacobian_sigma_max_max
        assert m.lyapunov_max is not None
        assert m.lag_norm and all(v is None or v >= 0 for v in m.lag_norm.values())
        assert m.grad_norm and all(v is not None and v >= 0 for v in m.grad_norm.values())
        assert m.grad_nonfinite == 0


def test_layers_and_directions_each_get_a_record():
    model = SeqModel(nn.GRU(3, 6, num_layers=2, bidirectional=True), 12)
    _, monitor = _train(model, 1, {"every": 1})
    keys = {(r.layer, r.direction) for r in monitor.history if isinstance(r, Measurement)}
    assert keys == {(0, "forward"), (0, "reverse"), (1, "forward"), (1, "reverse")}
    grads = next(
        r for r in monitor.history if isinstance(r, Measurement) and r.layer == 1 and r.direction == "reverse"
    )
    assert set(grads.metrics.grad_norm) == {
        "weight_ih_l1_reverse",
        "weight_hh_l1_reverse",
        "bias_ih_l1_reverse",
        "bias_hh_l1_reverse",
    }


def test_schedule_measures_step_zero_and_every_n():
    model = SeqModel(nn.RNN(3, 6), 6)
    _, monitor = _train(model, 7, {"every": 3})
    assert sorted({r.step for r in monitor.history if isinstance(r, Measurement)}) == [0, 3, 6]
    assert monitor.current_step == 7


def test_close_removes_every_hook():
    """Nothing is registered on the model or the optimizer; the global hooks go when the monitor closes."""
    from gradwatch.capture import hooks

    model = CellLoop()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = (dict(model.cell._forward_hooks), dict(optimizer._optimizer_step_pre_hooks))
    with gradwatch.watch(model, optimizer) as monitor:
        assert dict(model.cell._forward_hooks) == before[0]
        assert dict(optimizer._optimizer_step_pre_hooks) == before[1]
        assert hooks.attached_owner(model.cell) is not None
    assert dict(model.cell._forward_hooks) == before[0]
    assert dict(optimizer._optimizer_step_pre_hooks) == before[1]
    assert hooks.attached_owner(model.cell) is None
    monitor.close()  # idempotent


def test_run_log_is_the_history(tmp_path):
    path = tmp_path / "logs" / "exp.jsonl"
    _, monitor = _train(SeqModel(nn.LSTM(3, 6), 6), 3, {"every": 2, "log": path})
    monitor.close()
    lines = path.read_text().splitlines()
    parsed = [record_from_json(json.loads(line)) for line in lines]
    assert parsed == list(monitor.history)
    header = parsed[0]
    assert isinstance(header, RunHeader) and header.config["every"] == 2
    assert header.modules[0]["name"] == "rnn" and header.modules[0]["type"] == "LSTM"
    assert all(r.run_id == header.run_id for r in parsed[1:])


def test_without_optimizer_the_user_calls_step():
    model = SeqModel(nn.GRU(3, 4), 4)
    monitor = gradwatch.watch(model, every=1)
    for _ in range(2):
        out, _ = model(torch.randn(5, 2, 3))
        out.sum().backward()
        monitor.step()
    assert {r.step for r in monitor.history if isinstance(r, Measurement)} == {0, 1}
    monitor.close()
    with_opt = gradwatch.watch(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match="twice"):
        with_opt.step()
    with_opt.close()


def test_eval_under_no_grad_is_not_recorded():
    model = SeqModel(nn.LSTM(3, 6), 6)
    monitor = gradwatch.watch(model, every=1, probe="live")
    with torch.no_grad():
        model.eval()
        model(torch.randn(5, 2, 3))
    monitor.step()  # nothing recorded this step: no measurement, no error
    assert not [r for r in monitor.history if isinstance(r, Measurement)]
    monitor.close()


def test_deepcopy_and_save_of_a_watched_model(tmp_path):
    model = SeqModel(nn.LSTM(3, 6), 6)
    optimizer = torch.optim.Adam(model.parameters())
    monitor = gradwatch.watch(model, optimizer, every=1, probe="live")
    clone = copy.deepcopy(model)  # e.g. an EMA / teacher copy
    clone(torch.randn(5, 2, 3))  # must not be recorded as the watched model
    optimizer.step()  # closes a measured step on which only the clone ran: nothing to measure
    assert not [r for r in monitor.history if isinstance(r, Measurement)]
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    out, _ = loaded(torch.randn(5, 2, 3))
    assert out.shape == (5, 2)
    copy.deepcopy(optimizer)
    monitor.close()


@pytest.mark.parametrize("background", [False, True], ids=["inline", "background"])
def test_a_fault_in_an_estimator_degrades_to_one_warning(monkeypatch, background):
    import gradwatch.measure as measure_module

    def broken(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(measure_module, "estimate_layer", broken)
    model = SeqModel(nn.GRU(3, 4), 4)
    with pytest.warns(gradwatch.GradWatchWarning, match="injected"):
        losses, monitor = _train(model, 3, {"every": 1, "background": background})
        monitor.wait()
    assert len(losses) == 3
    errors = [r for r in monitor.history if r.kind == "error"]
    assert len(errors) == 1 and errors[0].module == "rnn" and errors[0].step == 0
    # Strict mode raises in the step itself, or (background) when the result is taken back.
    with pytest.raises(gradwatch.GradWatchFault, match="injected"):
        _, strict = _train(
            SeqModel(nn.GRU(3, 4), 4), 1, {"every": 1, "strict": True, "background": background}
        )
        strict.wait()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every": 0}, "every must be a positive integer"),
        ({"probe": "sometimes"}, "probe must be"),
        ({"max_sequences": -1}, "max_sequences"),
    ],
)
def test_bad_options_are_reported_at_watch_time(kwargs, message):
    with pytest.raises(ValueError, match=message):
        gradwatch.watch(SeqModel(nn.RNN(3, 4), 4), **kwargs)


def test_model_without_rnn_is_a_clear_error():
    with pytest.raises(ValueError, match="register_cell"):
        gradwatch.watch(nn.Linear(3, 3))


def test_unwritable_log_path_is_reported_at_watch_time(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="cannot open log file"):
        gradwatch.watch(SeqModel(nn.RNN(3, 4), 4), log=blocker / "sub" / "run.jsonl")


def test_probe_fixed_remeasures_the_first_batch():
    model = SeqModel(nn.LSTM(3, 6), 6)
    _, monitor = _train(model, 3, {"every": 1, "probe": "fixed"})
    records = [r for r in monitor.history if isinstance(r, Measurement)]
    assert [r.metrics.sequences for r in records] == [4, 4, 4]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monitor.close()


class DriftingGRU(nn.GRU):
    """A GRU whose forward stops matching its weights once `drift` is set (the replay cannot copy it)."""

    drift = False

    def forward(self, x, hx=None):
        out, h = super().forward(x, hx)
        return (out + 0.5, h + 0.5) if self.drift else (out, h)


@pytest.mark.parametrize("probe", ["fixed", "live"])
def test_replay_is_checked_on_every_measurement(probe):
    model = SeqModel(DriftingGRU(3, 6), 6)
    _, monitor = _train(model, 2, {"every": 1, "probe": probe})
    assert sum(isinstance(r, Measurement) for r in monitor.history) == 2
    model.rnn.drift = True
    with pytest.warns(gradwatch.GradWatchWarning, match="did not reproduce"):
        out, _ = model(torch.randn(9, 4, 3))
        out.sum().backward()
        monitor.optimizer.step()
    assert sum(isinstance(r, Measurement) for r in monitor.history) == 2  # the mismatching step is skipped
    monitor.close()


def test_fixed_probe_cell_is_checked_against_the_module():
    model = CellLoop()
    _, monitor = _train(model, 2, {"every": 1})
    original = model.cell.forward
    model.cell.forward = lambda x, hx=None: tuple(t + 0.5 for t in original(x, hx))
    with pytest.warns(gradwatch.GradWatchWarning, match="did not reproduce"):
        out, _ = model(torch.randn(9, 4, 3))
        out.sum().backward()
        monitor.optimizer.step()
    assert sum(isinstance(r, Measurement) for r in monitor.history) == 2
    monitor.close()


def test_fixed_probe_with_unchanged_weights_reads_the_same_lyapunov_exponent_every_time() -> None:
    """lr = 0 and probe="fixed": every measurement sees the same Jacobians, so lambda (and not only sigma
    and the lag norms) must read the same each time; it used to move by ~0.05 at T = 10 with the random
    start vector of each measurement."""
    torch.manual_seed(0)
    model = SeqModel(nn.GRU(3, 16), 16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    x, y = torch.randn(10, 4, 3), torch.randn(10, 4)
    with gradwatch.watch(model, optimizer, every=1, background=False) as monitor:
        for _ in range(6):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x)[0], y).backward()
            optimizer.step()
        lyapunov = [r.metrics.lyapunov_max for r in monitor.history if isinstance(r, Measurement)]
    assert len(lyapunov) == 6 and lyapunov[0] is not None
    assert lyapunov == [lyapunov[0]] * 6


def _train_on_lengths(monitor_options: dict, lengths: list[int]) -> tuple[list[Measurement], list[str]]:
    """One optimizer step per entry of ``lengths`` (that many time steps), every step measured."""
    torch.manual_seed(0)
    model = SeqModel(nn.GRU(3, 6), 6)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradwatch.watch(model, optimizer, every=1, background=False, **monitor_options) as monitor:
            for steps in lengths:
                x, y = torch.randn(steps, 4, 3), torch.randn(steps, 4)
                optimizer.zero_grad()
                nn.functional.mse_loss(model(x)[0], y).backward()
                optimizer.step()
            records = [r for r in monitor.history if isinstance(r, Measurement)]
    messages = [str(w.message) for w in caught if issubclass(w.category, gradwatch.GradWatchWarning)]
    return records, messages


def test_a_fixed_probe_too_short_to_judge_is_renewed_by_a_longer_batch_and_warned_about_once() -> None:
    """A first batch of T = 1 has no lag norm and no Lyapunov verdict; it used to be kept for good."""
    records, messages = _train_on_lengths({}, [1, 1, 5, 12, 12, 30])
    # 1 (kept, warned), 1 (kept), 5 (longer: renewed), 12 (renewed, now long enough), then kept for good.
    assert [r.metrics.time_steps for r in records] == [1, 1, 5, 12, 12, 12]
    assert records[0].metrics.lag_norm == {}
    assert records[-1].metrics.lag_norm.keys() == {"1", "2", "4", "8", "12"}
    short = [m for m in messages if "verdict is unknown" in m]
    assert len(short) == 1 and "has 1 time step(s)" in short[0] and "8 steps" in short[0]
    assert "SeqModel (run " in short[0]  # names the model: two monitors' modules may share a name


def test_a_fixed_probe_of_enough_steps_is_kept_whatever_comes_later() -> None:
    records, messages = _train_on_lengths({}, [9, 30, 4, 30])
    assert [r.metrics.time_steps for r in records] == [9, 9, 9, 9]
    short, quiet = _train_on_lengths({}, [5, 3, 6])  # short, but each carries a verdict: renewed silently
    assert [r.metrics.time_steps for r in short] == [5, 5, 6]
    assert not [m for m in messages + quiet if "verdict is unknown" in m]
    live, _ = _train_on_lengths({"probe": "live"}, [1, 30, 4])
    assert [r.metrics.time_steps for r in live] == [1, 30, 4]


def test_the_short_probe_notice_never_fails_a_measurement(caplog: pytest.LogCaptureFixture) -> None:
    """With GradWatchWarning turned into an error the notice goes to the log and the run measures on."""
    torch.manual_seed(0)
    model = SeqModel(nn.GRU(3, 6), 6)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", gradwatch.GradWatchWarning)
        with gradwatch.watch(model, optimizer, every=1, background=False, strict=True) as monitor:
            for steps in (1, 12):
                optimizer.zero_grad()
                nn.functional.mse_loss(model(torch.randn(steps, 4, 3))[0], torch.randn(steps, 4)).backward()
                optimizer.step()
            records = [r for r in monitor.history if isinstance(r, Measurement)]
    assert [r.metrics.time_steps for r in records] == [1, 12]
    assert any("rnn (GRU) of SeqModel" in r.getMessage() for r in caplog.records)

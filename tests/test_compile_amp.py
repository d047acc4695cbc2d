"""torch.compile, torch.autocast / GradScaler and CUDA: the monitor measures what it measures in eager fp32.

torch.compile tests use ``backend="eager"`` (Dynamo tracing, hooks and graph breaks are what matter here;
inductor's code generation takes minutes on 2 CPU cores and does not change when hooks run).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.records import Alert, Measurement

STEPS = 3


class SeqModel(nn.Module):
    """A fused RNN module -> linear head."""

    def __init__(self, rnn: nn.Module, hidden: int) -> None:
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out).squeeze(-1)


class CellLoop(nn.Module):
    """A hand-written loop over a built-in cell (Dynamo traces it whole: no graph break)."""

    def __init__(self, cell: nn.Module, hidden: int) -> None:
        super().__init__()
        self.cell = cell
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = None
        outputs = []
        for t in range(x.shape[0]):
            state = self.cell(x[t], state)
            h = state[0] if isinstance(state, tuple) else state
            outputs.append(self.head(h))
        return torch.stack(outputs).squeeze(-1)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "lstm-2layer": lambda: SeqModel(nn.LSTM(3, 6, num_layers=2), 6),
    "gru": lambda: SeqModel(nn.GRU(3, 6), 6),
    "rnn-tanh": lambda: SeqModel(nn.RNN(3, 6), 6),
    "lstmcell-loop": lambda: CellLoop(nn.LSTMCell(3, 6), 6),
    "grucell-loop": lambda: CellLoop(nn.GRUCell(3, 6), 6),
}


def _data(steps: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(6, 4, 3, generator=generator), torch.randn(6, 4, generator=generator))
        for _ in range(steps)
    ]


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name]()


def _metrics(monitor: gradwatch.Monitor) -> list[tuple[int, int, float, float]]:
    return [
        (r.step, r.layer, r.metrics.jacobian_sigma_max_mean, r.metrics.lyapunov_max)  # type: ignore[misc]
        for r in monitor.history
        if isinstance(r, Measurement)
    ]


def _train(
    model: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], monitor_model: nn.Module | None
):
    """SGD steps; returns the losses and the monitor (None when ``monitor_model`` is None)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = gradwatch.watch(monitor_model, optimizer, every=1) if monitor_model is not None else None
    losses = []
    for x, y in _data():
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(forward(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, monitor


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch._dynamo.reset()


# --- torch.compile --------------------------------------------------------------------------------------


COMPILE_CASES = ["lstm-2layer", "grucell-loop"]


@pytest.mark.parametrize("order", ["compile-then-watch", "watch-then-compile"])
@pytest.mark.parametrize("name", COMPILE_CASES)
def test_compiled_training_is_measured_like_eager_training(name: str, order: str) -> None:
    eager_model = _model(name)
    eager_losses, eager_monitor = _train(eager_model, eager_model, eager_model)

    model = _model(name)
    if order == "compile-then-watch":
        compiled = torch.compile(model, backend="eager")
        losses, monitor = _train(model, compiled, compiled)  # watch() is given the compiled module
    else:
        optimizer_model = model
        optimizer = torch.optim.SGD(optimizer_model.parameters(), lr=0.1)
        monitor = gradwatch.watch(model, optimizer, every=1)
        compiled = torch.compile(model, backend="eager")
        losses = []
        for x, y in _data():
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(compiled(x), y)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())

    assert losses == pytest.approx(eager_losses, rel=1e-5)
    assert monitor is not None and eager_monitor is not None
    compiled_metrics, eager_metrics = _metrics(monitor), _metrics(eager_monitor)
    assert [m[:2] for m in compiled_metrics] == [m[:2] for m in eager_metrics] and compiled_metrics
    for got, expected in zip(compiled_metrics, eager_metrics, strict=True):
        assert got[2:] == pytest.approx(expected[2:], rel=1e-4, abs=1e-6)


def test_training_with_the_monitor_is_identical_to_compiled_training_without_it() -> None:
    plain = _model("grucell-loop")
    plain_losses, _ = _train(plain, torch.compile(plain, backend="eager"), None)
    torch._dynamo.reset()
    watched = _model("grucell-loop")
    compiled = torch.compile(watched, backend="eager")
    losses, monitor = _train(watched, compiled, compiled)
    assert losses == plain_losses  # bit for bit: the hooks only read
    assert monitor is not None and len(_metrics(monitor)) == STEPS


def test_fullgraph_compile_of_a_cell_loop_keeps_working_and_is_measured() -> None:
    """The hook adds no graph break: fullgraph=True (which forbids them) still compiles."""
    model = _model("lstmcell-loop")
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    _, monitor = _train(model, compiled, compiled)
    assert monitor is not None and [m[0] for m in _metrics(monitor)] == list(range(STEPS))


def _gradwatch_global_hooks() -> list[str]:
    """Every entry of torch's global module-hook dicts that belongs to gradwatch (hook or its flags)."""
    module = torch.nn.modules.module
    dicts = {
        name: getattr(module, name)
        for name in dir(module)
        if name.startswith("_global_") and isinstance(getattr(module, name), dict)
    }
    gradwatch_ids = {
        key for hooks in dicts.values() for key, hook in hooks.items() if "gradwatch" in repr(hook)
    }
    found = [f"{name}[{key}]" for name, hooks in dicts.items() for key in hooks if key in gradwatch_ids]
    # flags whose hook is gone (the with_kwargs leak: a True left behind under a removed hook's id)
    hook_ids = set(module._global_forward_hooks)
    found += [
        f"_global_forward_hooks_with_kwargs[{key}] (orphan)"
        for key in module._global_forward_hooks_with_kwargs
        if key not in hook_ids
    ]
    return found


@pytest.mark.parametrize("compiled_model", [False, True], ids=["eager", "compiled"])
def test_nothing_of_gradwatch_stays_in_torch_global_hooks_after_close(compiled_model: bool) -> None:
    """close() removes the global forward hook and its with_kwargs flag; a module compiled afterwards,
    unrelated to the monitor, then runs without torch.compile's "global hooks" warning."""
    model = _model("lstm-2layer")
    runner = torch.compile(model, backend="eager") if compiled_model else model
    _, monitor = _train(model, runner, runner)
    assert monitor is not None and _metrics(monitor)
    monitor.close()
    assert _gradwatch_global_hooks() == []
    assert not torch.nn.modules.module._has_any_global_hook()
    unrelated = torch.compile(nn.Linear(3, 2), backend="eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        unrelated(torch.randn(4, 3))
        unrelated(torch.randn(4, 3))
    assert [str(w.message) for w in caught if "global hooks" in str(w.message)] == []


# --- autocast -------------------------------------------------------------------------------------------


def _one_measurement(
    name: str, *, autocast: bool, step_inside_autocast: bool = False
) -> tuple[list[tuple[int, int, float, float]], list[warnings.WarningMessage]]:
    model = _model(name)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    monitor = gradwatch.watch(model, optimizer, every=1)
    x, y = _data(1)[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = nn.functional.mse_loss(model(x).float(), y)
            if step_inside_autocast:
                loss.backward()
                optimizer.step()
        if not step_inside_autocast:
            loss.backward()
            optimizer.step()
    return _metrics(monitor), [w for w in caught if issubclass(w.category, gradwatch.GradWatchWarning)]


# Fused modules are replayed in float32 from the recorded float32 inputs: the bfloat16 forward only enters
# the replay check, so the measurement equals the float32 one. Cells are traced from the states the bfloat16
# forward produced: measured differences up to ~1e-4 relative; bfloat16 has 8 significant bits (~4e-3).
AUTOCAST_TOLERANCE = {
    "lstm-2layer": 1e-6,
    "gru": 1e-6,
    "rnn-tanh": 1e-6,
    "lstmcell-loop": 1e-2,
    "grucell-loop": 1e-2,
}


@pytest.mark.parametrize(
    "step_inside_autocast", [False, True], ids=["step-after-autocast", "step-inside-autocast"]
)
@pytest.mark.parametrize("name", list(MODELS))
def test_autocast_bfloat16_measures_like_float32(name: str, step_inside_autocast: bool) -> None:
    expected, _ = _one_measurement(name, autocast=False)
    got, gradwatch_warnings = _one_measurement(name, autocast=True, step_inside_autocast=step_inside_autocast)
    assert not gradwatch_warnings, [str(w.message) for w in gradwatch_warnings]  # the replay check passed
    assert [m[:2] for m in got] == [m[:2] for m in expected] and got
    tolerance = AUTOCAST_TOLERANCE[name]
    for g, e in zip(got, expected, strict=True):
        assert g[2] == pytest.approx(e[2], rel=tolerance)
        assert g[3] == pytest.approx(e[3], rel=tolerance, abs=tolerance)


def test_grad_scaler_skipped_steps_are_neither_steps_nor_nonfinite_alerts() -> None:
    """GradScaler skips optimizer.step() on inf/NaN gradients, so the monitor's step pre-hook never runs."""
    model = _model("rnn-tanh")  # CPU float16 autocast runs nn.RNN in float16
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    monitor = gradwatch.watch(model, optimizer, every=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", gradwatch.NonFiniteGradientWarning)
        for index, (x, y) in enumerate(_data(4)):
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = nn.functional.mse_loss(model(x).float(), y)
            if index == 1:
                loss = loss * float("inf")  # an overflowing loss scale, as fp16 training meets it
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
    assert monitor.current_step == 3  # 4 iterations, one skipped by the scaler
    assert [m[0] for m in _metrics(monitor)] == [0, 1, 2]
    assert not [r for r in monitor.history if isinstance(r, Alert)]


# --- CUDA -----------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available())"
)


@needs_cuda
@pytest.mark.parametrize("name", list(MODELS))
def test_cuda_measurement_matches_cpu(name: str) -> None:
    cpu, _ = _one_measurement(name, autocast=False)
    model = _model(name).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    monitor = gradwatch.watch(model, optimizer, every=1)
    x, y = (t.cuda() for t in _data(1)[0])
    nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()
    records = [r for r in monitor.history if isinstance(r, Measurement)]
    assert records
    got = _metrics(monitor)
    assert [m[:2] for m in got] == [m[:2] for m in cpu]
    for g, e in zip(got, cpu, strict=True):  # cuDNN and CPU kernels round differently
        assert g[2:] == pytest.approx(e[2:], rel=1e-3, abs=1e-5)


@needs_cuda
def test_cuda_float16_autocast_with_grad_scaler_is_measured() -> None:
    model = _model("lstm-2layer").cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cuda")
    monitor = gradwatch.watch(model, optimizer, every=1)
    x, y = (t.cuda() for t in _data(1)[0])
    with torch.autocast("cuda", dtype=torch.float16):
        loss = nn.functional.mse_loss(model(x).float(), y)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    expected, _ = _one_measurement("lstm-2layer", autocast=False)
    got = _metrics(monitor)
    assert [m[:2] for m in got] == [m[:2] for m in expected]
    for g, e in zip(got, expected, strict=True):
        assert g[2:] == pytest.approx(e[2:], rel=1e-3, abs=1e-5)

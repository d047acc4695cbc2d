"""Faults injected at every place inside the monitor: training goes on bit for bit, one warning, one record.

Each case makes one part of gradwatch raise from its second call on (so the fault hits a run in progress):
the forward hook (fused and cell), the replay, the estimator, the detector, the gradient check, clipping, a
sink's write and a sink's per-step callback. The run must match a run without gradwatch bit for bit (loss
and every parameter), emit exactly one GradWatchWarning, and write one ``error`` record to the sinks that
still work. With ``strict=True`` the same fault raises GradWatchFault instead.
"""

from __future__ import annotations

import copy
import errno
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import gradwatch
import gradwatch.capture.hooks as hooks_module
import gradwatch.measure as measure_module
import gradwatch.monitor as monitor_module
import gradwatch.policy.step as step_module
from gradwatch.policy.trends import TrendDetector
from gradwatch.records import ErrorRecord, Measurement, Record, record_from_json

STEPS = 5


class FusedModel(nn.Module):
    """LSTM -> dropout -> linear (dropout makes any stray use of the global RNG visible)."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(3, 6)
        self.drop = nn.Dropout(0.25)
        self.head = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.rnn(x)[0])).squeeze(-1)


class CellModel(nn.Module):
    """A hand-written loop over nn.GRUCell."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.GRUCell(3, 6)
        self.head = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(x.shape[1], 6)
        outs = []
        for t in range(x.shape[0]):
            h = self.cell(x[t], h)
            outs.append(self.head(h))
        return torch.stack(outs).squeeze(-1)


class ListSink:
    """A sink that keeps what it receives (the 'remaining sink' of each case)."""

    def __init__(self) -> None:
        self.records: list[Record] = []

    def write(self, record: Record) -> None:
        self.records.append(record)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class FailingSink(ListSink):
    """A sink whose write (or per-step callback) raises from its second call on."""

    def __init__(self, exc: Exception, method: str = "write") -> None:
        super().__init__()
        self.exc = exc
        self.method = method
        self.calls = 0

    def write(self, record: Record) -> None:
        if self.method == "write":
            self._maybe_fail()
        super().write(record)

    def observe_step(self, step: int) -> None:
        if self.method == "observe_step":
            self._maybe_fail()

    def _maybe_fail(self) -> None:
        self.calls += 1
        if self.calls >= 2:
            raise self.exc

    def __repr__(self) -> str:
        return f"FailingSink({self.method})"


class FailingLiveSink(FailingSink):
    """A LiveSink whose write_live (called on gradwatch's worker thread) raises from its second call on."""

    def write_live(self, record: Record) -> None:
        if self.method == "write_live":
            self._maybe_fail()


def _failing_from_second_call(original: Callable[..., Any]) -> Callable[..., Any]:
    calls = {"n": 0}

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] >= 2:
            raise RuntimeError("injected fault")
        return original(*args, **kwargs)

    return wrapper


@dataclass(frozen=True)
class FaultCase:
    """Where to inject, on which model, and what the error record must say."""

    where: str
    model: Callable[[], nn.Module]
    target: tuple[object, str] | None  # (module or class, attribute) to wrap with a failing version
    module: str  # the module the error record names ("" for monitor-wide parts)
    watch: dict[str, Any]
    sink: FailingSink | None = None
    step: int = 1  # the step of the injected part's second call


CASES = [
    # probe="live": the hooks record on every measured step (a fixed probe is recorded once).
    FaultCase("capture", FusedModel, (hooks_module, "record_fused_call"), "rnn", {"probe": "live"}),
    # A cell is called once per time step: its second call is still on step 0.
    FaultCase(
        "capture", CellModel, (hooks_module.CallRecorder, "_record_cell"), "cell", {"probe": "live"}, step=0
    ),
    FaultCase("estimator", FusedModel, (measure_module, "replay_fused"), "rnn", {"probe": "live"}),
    FaultCase("estimator", FusedModel, (measure_module, "estimate_layer"), "rnn", {}),
    FaultCase("estimator", CellModel, (measure_module, "builtin_step_jacobians"), "cell", {}),
    FaultCase("detector", FusedModel, (TrendDetector, "update"), "rnn", {}),
    FaultCase("gradients", FusedModel, (monitor_module, "gradient_norms"), "", {}),
    FaultCase("clip", FusedModel, (step_module, "apply_clip"), "", {"clip": 1e9}),
    # The header is the sink's first write, the step-0 measurement its second.
    FaultCase("sink", FusedModel, None, "", {}, FailingSink(RuntimeError("injected fault")), step=0),
    FaultCase("sink", FusedModel, None, "", {}, FailingSink(RuntimeError("injected fault"), "observe_step")),
    # Background (the default here): step 1's measurement is the second given live, on the worker thread;
    # the fault is reported on the training thread when that measurement is published.
    FaultCase(
        "sink",
        FusedModel,
        None,
        "",
        {},
        FailingLiveSink(RuntimeError("injected fault"), "write_live"),
        step=1,
    ),
]
CASE_IDS = [
    "hook-fused",
    "hook-cell",
    "replay",
    "estimator",
    "estimator-cell",
    "detector",
    "gradient-check",
    "clipping",
    "sink-write",
    "sink-observe-step",
    "sink-write-live",
]


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    return [
        (torch.randn(6, 4, 3, generator=generator), torch.randn(6, 4, generator=generator))
        for _ in range(STEPS)
    ]


def _train(model: nn.Module, watch_kwargs: dict[str, Any] | None) -> tuple[list[torch.Tensor], Any]:
    torch.manual_seed(11)  # dropout masks: must be the same with and without gradwatch
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    monitor = gradwatch.watch(model, optimizer, **watch_kwargs) if watch_kwargs is not None else None
    losses = []
    for x, y in _data():
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    if monitor is not None:
        monitor.close()
    return losses, monitor


def _inject(monkeypatch: pytest.MonkeyPatch, case: FaultCase) -> None:
    if case.target is not None:
        owner, name = case.target
        monkeypatch.setattr(owner, name, _failing_from_second_call(getattr(owner, name)))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_a_fault_leaves_training_bit_identical_with_one_warning_and_one_error_record(
    case: FaultCase, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    reference = case.model()
    watched = copy.deepcopy(reference)
    losses_ref, _ = _train(reference, None)

    _inject(monkeypatch, case)
    remaining = ListSink()
    sinks = [remaining] + ([copy.copy(case.sink)] if case.sink is not None else [])
    log = tmp_path / "run.jsonl"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses, monitor = _train(watched, {"every": 1, "log": log, "sinks": sinks, **case.watch})

    assert all(torch.equal(a, b) for a, b in zip(losses_ref, losses, strict=True))
    for (name, p_ref), (_, p) in zip(reference.named_parameters(), watched.named_parameters(), strict=True):
        assert torch.equal(p_ref, p), name

    ours = [w for w in caught if issubclass(w.category, gradwatch.GradWatchWarning)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    assert "injected fault" in str(ours[0].message)

    errors = [r for r in remaining.records if isinstance(r, ErrorRecord)]
    assert len(errors) == 1
    assert errors[0].where.startswith(case.where)
    assert errors[0].module == case.module
    assert "injected fault" in errors[0].message
    assert errors[0].step == case.step
    logged = [record_from_json(json.loads(line)) for line in log.read_text().splitlines()]
    assert [r for r in logged if isinstance(r, ErrorRecord)] == errors
    assert sum(monitor.fault_counts.values()) >= 1


def test_a_disabled_module_is_not_measured_again_but_the_run_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        hooks_module, "record_fused_call", _failing_from_second_call(hooks_module.record_fused_call)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradwatch.GradWatchWarning)
        _, monitor = _train(FusedModel(), {"every": 1, "probe": "live"})
    measured_steps = sorted({r.step for r in monitor.history if isinstance(r, Measurement)})
    assert measured_steps == [0]  # step 0 measured; the hook failed on step 1 and the module stayed off
    assert monitor.current_step == STEPS


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_strict_mode_raises_gradwatch_fault(case: FaultCase, monkeypatch: pytest.MonkeyPatch) -> None:
    _inject(monkeypatch, case)
    sinks = [copy.copy(case.sink)] if case.sink is not None else []
    with pytest.raises(gradwatch.GradWatchFault, match="injected fault") as info:
        _train(case.model(), {"every": 1, "strict": True, "sinks": sinks, **case.watch})
    assert isinstance(info.value.__cause__, RuntimeError)


@pytest.mark.parametrize(
    "exc",
    [OSError(errno.ENOSPC, "No space left on device"), BrokenPipeError(errno.EPIPE, "Broken pipe")],
    ids=["disk-full", "broken-pipe"],
)
def test_a_sink_with_io_errors_stays_attached_warns_once_and_counts(exc: OSError) -> None:
    failing = FailingSink(exc)
    remaining = ListSink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, monitor = _train(FusedModel(), {"every": 1, "sinks": [remaining, failing]})
    ours = [w for w in caught if issubclass(w.category, gradwatch.GradWatchWarning)]
    assert len(ours) == 1 and "I/O error" in str(ours[0].message)
    delivered = [r for r in remaining.records if not isinstance(r, ErrorRecord)]
    # The failing sink took its first record, then every later write raised and was counted.
    assert monitor.fault_counts["sink:FailingSink(write)"] == failing.calls - 1
    assert failing.calls == len(delivered)  # still offered every record: an I/O error may be transient
    errors = [r for r in remaining.records if isinstance(r, ErrorRecord)]
    assert len(errors) == 1 and errors[0].where == "sink:FailingSink(write)"


def test_a_sink_with_a_bug_is_closed_and_dropped() -> None:
    class BuggySink(FailingSink):
        closed = False

        def close(self) -> None:
            self.closed = True

    buggy = BuggySink(KeyError("bug"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradwatch.GradWatchWarning)
        _, monitor = _train(FusedModel(), {"every": 1, "sinks": [buggy]})
    assert buggy.closed and buggy not in monitor.sinks
    assert buggy.calls == 2  # never called again after the failure

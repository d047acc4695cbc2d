"""The sink fan-out and the fault policy on their own, without a monitor."""

from __future__ import annotations

import pytest

from gradwatch.faults import FaultPolicy, GradWatchFault
from gradwatch.policy.alerts import GradWatchWarning
from gradwatch.records import ErrorRecord, Record
from gradwatch.sinks.base import HasUrl, LiveSink, Sink, StepObserver
from gradwatch.sinks.fanout import SinkFanOut


class ListSink:
    def __init__(self) -> None:
        self.records: list[Record] = []
        self.closed = False

    def write(self, record: Record) -> None:
        self.records.append(record)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class ObservingSink(ListSink):
    def __init__(self) -> None:
        super().__init__()
        self.steps: list[int] = []

    def observe_step(self, step: int) -> None:
        self.steps.append(step)

    @property
    def url(self) -> str | None:
        return "http://127.0.0.1:1/metrics"


class FailingSink(ListSink):
    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    def write(self, record: Record) -> None:
        raise self.error


def _policy(strict: bool = False) -> FaultPolicy:
    return FaultPolicy(strict=strict, rank=0, run_id="r", current_step=lambda: 7)


def test_optional_hooks_are_declared_protocols() -> None:
    plain, observing = ListSink(), ObservingSink()
    assert isinstance(plain, Sink) and isinstance(observing, Sink)
    assert not isinstance(plain, StepObserver) and isinstance(observing, StepObserver)
    assert not isinstance(plain, HasUrl) and isinstance(observing, HasUrl)
    assert not isinstance(plain, LiveSink)
    out = SinkFanOut([plain, observing], _policy(), history_size=0)
    out.observe_step(3)
    assert observing.steps == [3]
    assert out.url == "http://127.0.0.1:1/metrics"
    assert SinkFanOut([plain], _policy(), history_size=0).url is None


def test_io_error_keeps_the_sink_and_reports_once() -> None:
    faults = _policy()
    good, flaky = ListSink(), FailingSink(OSError("disk full"))
    out = SinkFanOut([good, flaky], faults, history_size=0)
    record = ErrorRecord(1, 0.0, "x", "y")
    with pytest.warns(GradWatchWarning, match="I/O error"):
        out.emit(record)
    out.emit(record)
    assert out.sinks == [good, flaky]  # still tried
    assert faults.counts == {f"sink:{flaky!r}": 2}
    errors = [r for r in good.records if isinstance(r, ErrorRecord) and r.where.startswith("sink:")]
    assert len(errors) == 1 and errors[0].step == 1


def test_other_error_disables_and_closes_the_sink() -> None:
    good, broken = ListSink(), FailingSink(ValueError("bad"))
    out = SinkFanOut([good, broken], _policy(), history_size=0)
    with pytest.warns(GradWatchWarning, match="disabled"):
        out.emit(ErrorRecord(1, 0.0, "x", "y"))
    assert out.sinks == [good] and broken.closed


def test_strict_policy_reraises_as_gradwatch_fault() -> None:
    with pytest.raises(GradWatchFault, match="estimator failed for rnn") as info:
        _policy(strict=True).fault("estimator", "rnn", RuntimeError("boom"))
    assert isinstance(info.value.__cause__, RuntimeError)


def test_module_fault_disables_the_module_and_reports_at_the_current_step() -> None:
    reported: list[Record] = []
    disabled: list[str] = []
    faults = FaultPolicy(
        strict=False,
        rank=0,
        run_id="r",
        current_step=lambda: 7,
        report=reported.append,
        on_module_disabled=disabled.append,
    )
    with pytest.warns(GradWatchWarning, match="no longer measured"):
        faults.fault("estimator", "rnn", RuntimeError("boom"))
    faults.fault("estimator", "rnn", RuntimeError("again"))  # counted, not reported again
    assert disabled == ["rnn", "rnn"] and faults.is_disabled("rnn")
    assert faults.counts == {"estimator:rnn": 2}
    assert [(r.step, r.module) for r in reported if isinstance(r, ErrorRecord)] == [(7, "rnn")]

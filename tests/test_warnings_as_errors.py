"""Warnings turned into errors (``-W error``, pytest ``filterwarnings = error``) never make gradwatch's own
warnings escape from the user's ``optimizer.step()`` (issue #30 item 7): a raised warning is caught, logged
and recorded as an error record. Only ``strict=True`` lets a gradwatch fault out (as GradWatchFault)."""

from __future__ import annotations

import errno
import socket
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import gradwatch
from gradwatch.records import ErrorRecord, Record
from gradwatch.sinks.jsonl import JsonlSink
from tests.tiny_gru import SeqModel
from tests.tiny_gru import train_steps as _train


@pytest.fixture
def warnings_are_errors() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


class FileTooLarge:
    """The log's raw file once the process hit RLIMIT_FSIZE (SIGXFSZ ignored): every write is EFBIG."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw

    def write(self, data: bytes) -> int:
        raise OSError(errno.EFBIG, "File too large")

    def flush(self) -> None:
        self.raw.flush()

    def fileno(self) -> int:
        return self.raw.fileno()

    def close(self) -> None:
        self.raw.close()


def _errors(records: Any) -> list[ErrorRecord]:
    return [r for r in records if isinstance(r, ErrorRecord)]


@pytest.mark.usefixtures("warnings_are_errors")
@pytest.mark.parametrize("background", [False, True], ids=["inline", "background"])
def test_a_log_at_its_size_limit_never_raises_out_of_the_step(tmp_path: Path, background: bool) -> None:
    model = SeqModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = gradwatch.watch(model, optimizer, every=1, log=tmp_path / "run.jsonl", background=background)
    log = next(s for s in monitor.sinks if isinstance(s, JsonlSink))
    log._file = FileTooLarge(log._file)  # type: ignore[assignment]
    _train(model, optimizer, 4)  # must not raise GradWatchWarning
    monitor.close()
    errors = _errors(monitor._history)
    assert [e.where for e in errors] == [f"sink:{log!r}"]
    assert "File too large" in errors[0].message
    assert monitor.fault_counts[f"sink:{log!r}"] >= 4
    assert log in monitor.sinks  # an I/O error keeps the log: it is tried again


@pytest.mark.usefixtures("warnings_are_errors")
def test_an_eval_mode_only_step_never_raises_out_of_the_step_and_is_recorded() -> None:
    model = SeqModel()
    model.eval()  # deliberate: trains with the RNN in eval mode
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = gradwatch.watch(model, optimizer, every=1, background=False)
    _train(model, optimizer, 2)
    monitor.close()
    notices = [e for e in _errors(monitor._history) if e.where == "warning"]
    assert len(notices) == 1
    assert "ran only in eval mode" in notices[0].message
    assert notices[0].step == 0
    assert any(r.kind == "measurement" for r in monitor._history)  # it was still measured


def test_strict_mode_lets_the_fault_out(tmp_path: Path) -> None:
    model = SeqModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = gradwatch.watch(
        model, optimizer, every=1, log=tmp_path / "run.jsonl", strict=True, background=False
    )
    log = next(s for s in monitor.sinks if isinstance(s, JsonlSink))
    log._file = FileTooLarge(log._file)  # type: ignore[assignment]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(gradwatch.GradWatchFault, match="File too large"):
            _train(model, optimizer, 1)


class BrokenOnClose:
    def __init__(self) -> None:
        self.records: list[Record] = []

    def write(self, record: Record) -> None:
        self.records.append(record)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        raise RuntimeError("cannot close")


class Closes:
    def __init__(self) -> None:
        self.closed = False

    def write(self, record: Record) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


@pytest.mark.usefixtures("warnings_are_errors")
def test_a_sink_failing_to_close_does_not_stop_the_others_from_closing() -> None:
    model = SeqModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    after = Closes()
    monitor = gradwatch.watch(model, optimizer, every=1, sinks=[BrokenOnClose(), after])
    _train(model, optimizer, 1)
    monitor.close()  # the RuntimeWarning about the failed close is logged, not raised
    assert after.closed


@pytest.mark.usefixtures("warnings_are_errors")
def test_a_failing_pushgateway_keeps_the_sink_and_never_raises_out_of_the_step() -> None:
    with socket.socket() as unused:  # a port nobody listens on: every push is refused
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    model = SeqModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = gradwatch.watch(model, optimizer, every=1, prometheus=f"push://127.0.0.1:{port}")
    sink = monitor.sinks[-1]
    _train(model, optimizer, 3)
    monitor.close()
    assert sink in monitor.sinks  # not disabled by its own warning turned into an error
    assert getattr(sink, "push_failures", 0) >= 1
    assert not monitor.fault_counts

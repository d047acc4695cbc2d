"""The monitor's lifecycle under attack (issue #30 items 5, 6, 8, 9): a watch() that fails half way, Ctrl-C
during close(), os.fork() mid-run, and a process that ends without close()."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import gradwatch
from gradwatch.capture import hooks as hooks_module
from gradwatch.capture import optimizer_steps
from gradwatch.records import Record
from tests.tiny_gru import SeqModel
from tests.tiny_gru import train_steps as _train

REPO = Path(__file__).resolve().parents[1]


def _nothing_left_on(model: SeqModel, optimizer: torch.optim.Optimizer) -> bool:
    """No recorder attached to the module, no monitor attached to the optimizer."""
    return hooks_module.attached_owner(model.rnn) is None and not optimizer_steps._listeners.get(optimizer)


def _log_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- item 6: a watch() that fails while writing its run header undoes everything -------------------------


class FullDevice:
    """A sink on a full device: every write raises ENOSPC."""

    def __init__(self) -> None:
        self.closed = False

    def write(self, record: Record) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def test_a_watch_failing_on_its_run_header_leaves_nothing_behind(tmp_path: Path) -> None:
    model = SeqModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(gradwatch.GradWatchFault, match="No space left on device"):
        gradwatch.watch(model, optimizer, strict=True, sinks=[FullDevice()], log=tmp_path / "a.jsonl")
    assert _nothing_left_on(model, optimizer)
    _train(model, optimizer, 2)  # a plain step raises nothing
    with gradwatch.watch(model, optimizer, every=1, log=tmp_path / "b.jsonl", background=False):
        _train(model, optimizer, 1)  # and the model can be watched again
    assert [r["kind"] for r in _log_records(tmp_path / "b.jsonl")][:2] == ["run", "measurement"]


def test_a_watch_under_warnings_as_errors_with_a_full_device_starts_with_an_error_record(
    tmp_path: Path,
) -> None:
    model = SeqModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monitor = gradwatch.watch(model, optimizer, every=1, sinks=[FullDevice()], log=tmp_path / "a.jsonl")
        _train(model, optimizer, 2)
    monitor.close()
    kinds = [r["kind"] for r in _log_records(tmp_path / "a.jsonl")]
    assert kinds[:2] == ["run", "error"]
    assert _nothing_left_on(model, optimizer)


# --- item 5: Ctrl-C during close() -------------------------------------------------------------------------


def _interrupt_main_thread_in(seconds: float) -> threading.Thread:
    """Ctrl-C as the terminal sends it: SIGINT delivered to the main thread, which is blocked in close()."""
    main = threading.main_thread().ident
    assert main is not None and threading.current_thread() is threading.main_thread()

    def interrupt() -> None:
        time.sleep(seconds)
        signal.pthread_kill(main, signal.SIGINT)

    thread = threading.Thread(target=interrupt)
    thread.start()
    return thread


@pytest.fixture
def slow_background_measurement(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Background measurements wait for the returned event before estimating (set at teardown)."""
    import gradwatch.monitor as monitor_module

    release = threading.Event()
    original = monitor_module.estimate

    def held_estimate(job: Any) -> Any:
        release.wait(30)
        return original(job)

    monkeypatch.setattr(monitor_module, "estimate", held_estimate)
    yield release
    release.set()


def test_ctrl_c_during_close_with_a_measurement_in_flight_still_closes(
    tmp_path: Path, slow_background_measurement: threading.Event
) -> None:
    model = SeqModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    log = tmp_path / "run.jsonl"
    monitor = gradwatch.watch(model, optimizer, every=2, background=True, log=log)
    slow_background_measurement.set()
    _train(model, optimizer, 3)  # steps 0 (measured, published at step 2) .. 2 (measured, in flight)
    monitor.wait()
    slow_background_measurement.clear()
    _train(model, optimizer, 1)
    _train(model, optimizer, 1)  # step 4: measured, held on the worker
    assert monitor._background is not None and monitor._background.busy
    interrupter = _interrupt_main_thread_in(0.3)
    with pytest.raises(KeyboardInterrupt):
        monitor.close()
    interrupter.join()
    # Nothing half-closed: no hook, no attachment, the log closed with an error record saying what was lost.
    assert _nothing_left_on(model, optimizer)
    assert all(getattr(sink, "_file", None) is None for sink in monitor.sinks if hasattr(sink, "_file"))
    records = _log_records(log)
    assert [r["step"] for r in records if r["kind"] == "measurement"] == [0, 2]
    lost = [r for r in records if r["kind"] == "error"]
    assert len(lost) == 1 and lost[0]["where"] == "close" and lost[0]["step"] == 4
    assert "step 4" in lost[0]["message"] and "lost" in lost[0]["message"]
    slow_background_measurement.set()  # the abandoned job finishes on its thread: nothing is written
    monitor.close()  # completes what remains (nothing here), and raises nothing
    assert monitor.closed
    time.sleep(0.2)
    assert _log_records(log) == records
    _train(model, optimizer, 1)  # plain training goes on
    with gradwatch.watch(model, optimizer, every=1, background=False, log=tmp_path / "again.jsonl"):
        _train(model, optimizer, 1)  # and the model can be watched again
    assert "measurement" in [r["kind"] for r in _log_records(tmp_path / "again.jsonl")]


class InterruptedOnce:
    """A sink whose first close() is interrupted (Ctrl-C while its file was fsynced)."""

    def __init__(self) -> None:
        self.close_calls = 0
        self.closed = False

    def write(self, record: Record) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.close_calls += 1
        if self.close_calls == 1:
            raise KeyboardInterrupt
        self.closed = True


def test_a_second_close_completes_a_close_interrupted_in_a_sink(tmp_path: Path) -> None:
    model = SeqModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    interrupted, after = InterruptedOnce(), InterruptedOnce()
    after.close_calls = 1  # closes at once
    log = tmp_path / "run.jsonl"
    monitor = gradwatch.watch(model, optimizer, every=1, log=log, sinks=[interrupted, after])
    _train(model, optimizer, 2)
    with pytest.raises(KeyboardInterrupt):
        monitor.close()
    assert _nothing_left_on(model, optimizer)
    assert after.closed and not interrupted.closed  # the sinks after the interrupted one were closed
    assert all(getattr(sink, "_file", None) is None for sink in monitor.sinks if hasattr(sink, "_file"))
    monitor.close()
    assert interrupted.closed and after.close_calls == 2  # each sink closed once


# --- item 9: a process that ends without close() keeps its last background measurement ---------------------

EXIT_SCRIPT = """
import sys, torch
from torch import nn
import gradwatch

class SeqModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(3, 16)
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        return self.head(self.rnn(x)[0]).squeeze(-1)

torch.manual_seed(0)
model = SeqModel()
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
monitor = gradwatch.watch(model, optimizer, every=5, background=True, log=sys.argv[1])
for step in range(21):  # steps 0..20: step 20's measurement is on the worker when the loop ends
    optimizer.zero_grad()
    model(torch.randn(12, 4, 3)).pow(2).mean().backward()
    optimizer.step()
assert monitor._background.busy
if sys.argv[2] == "sys.exit":
    sys.exit(3)
if sys.argv[2] == "exception":
    raise RuntimeError("training crashed")
"""


@pytest.mark.parametrize(
    ("ending", "status"),
    [("normal", 0), ("sys.exit", 3), ("exception", 1)],
    ids=["normal", "sys-exit", "raise"],
)
def test_the_last_background_measurement_is_written_when_the_process_ends_without_close(
    tmp_path: Path, ending: str, status: int
) -> None:
    log = tmp_path / "run.jsonl"
    done = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT, str(log), ending],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == status, done.stderr
    measured = sorted({r["step"] for r in _log_records(log) if r["kind"] == "measurement"})
    assert measured == [0, 5, 10, 15, 20]
    if ending == "exception":
        assert "training crashed" in done.stderr


# --- item 8: os.fork() mid-run ---------------------------------------------------------------------------

needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork() does not exist on this platform")


def _in_forked_child(child: Any, timeout: float = 60.0) -> dict[str, Any]:
    """Run ``child()`` (returns a JSON-able dict) in a forked child; its result, or a failure when it raised
    or did not end within ``timeout`` (then it is killed: the hang the test guards against)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        status = 0
        try:
            os.close(read)
            result = child()
        except BaseException as exc:
            result, status = {"error": repr(exc)}, 1
        with os.fdopen(write, "w") as out:
            json.dump(result, out)
        os._exit(status)
    os.close(write)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ended, status = os.waitpid(pid, os.WNOHANG)
        if ended:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail(f"the forked child hung for {timeout:.0f} s")
    with os.fdopen(read) as got:
        result = json.loads(got.read() or "{}")
    assert os.waitstatus_to_exitcode(status) == 0, result
    return result


@needs_fork
@pytest.mark.parametrize("background", [False, True], ids=["inline", "background"])
def test_a_forked_child_gets_a_monitor_that_is_off_with_one_warning(tmp_path: Path, background: bool) -> None:
    model = SeqModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    log = tmp_path / "run.jsonl"
    monitor = gradwatch.watch(model, optimizer, every=2, background=background, log=log)
    _train(model, optimizer, 3)  # step 2's measurement may be in flight at the fork

    def child() -> dict[str, Any]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _train(model, optimizer, 6)  # would hang at the next measured step with the parent's worker
            monitor.close()  # would hang on the parent's threads
            with gradwatch.watch(
                model, optimizer, every=2, log=tmp_path / "child.jsonl", background=background
            ):
                _train(model, optimizer, 3)  # the child can watch the model under its own run id
        fork_warnings = [str(w.message) for w in caught if "forked" in str(w.message)]
        return {"warnings": fork_warnings, "history": len(monitor._history)}

    history_at_fork = len(monitor._history)
    got = _in_forked_child(child)
    assert len(got["warnings"]) == 1 and monitor.run_id in got["warnings"][0]
    assert got["history"] <= history_at_fork + 2  # nothing measured in the child (in-flight results aside)
    _train(model, optimizer, 3)  # the parent goes on: steps 3..5
    monitor.close()
    records = _log_records(log)
    steps = [r["step"] for r in records if r["kind"] == "measurement"]
    assert steps == [0, 2, 4]  # the parent's run only, each step once: the child wrote nothing
    assert {r["run_id"] for r in records} == {monitor.run_id}
    child_records = _log_records(tmp_path / "child.jsonl")
    assert child_records[0]["kind"] == "run" and child_records[0]["run_id"] != monitor.run_id
    assert [r["step"] for r in child_records if r["kind"] == "measurement"] == [0, 2]


@needs_fork
def test_a_forked_child_neither_hangs_on_the_exporter_nor_keeps_its_port(tmp_path: Path) -> None:
    model = SeqModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = gradwatch.watch(model, optimizer, every=1, prometheus="127.0.0.1:0", background=True)
    port = monitor.sinks[-1].port  # type: ignore[attr-defined]
    _train(model, optimizer, 2)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # a persistent DataLoader worker: outlives the parent's close(), never touches the monitor
        os.close(read)
        os.close(write)
        time.sleep(5)
        os._exit(0)
    try:
        os.close(write)
        got = _in_forked_child(lambda: (monitor.close(), {"closed": monitor.closed})[1], timeout=20)
        assert got == {"closed": True}
        monitor.close()
        with socket.socket() as again:  # the port is free although the worker child still lives
            again.bind(("127.0.0.1", port))
    finally:
        os.close(read)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def _socket_inodes() -> set[int]:
    """The inode numbers of the sockets this process holds open (from /proc/self/fd)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:[") : -1]))
    return inodes


@needs_fork
@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd to list descriptors")
def test_a_forked_child_closes_the_scrape_connection_open_at_the_fork(tmp_path: Path) -> None:
    model = SeqModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = gradwatch.watch(model, optimizer, every=1, prometheus="127.0.0.1:0")
    sink = monitor.sinks[-1]
    _train(model, optimizer, 2)
    before = _socket_inodes()
    with socket.create_connection(("127.0.0.1", sink.port), timeout=10) as scraper:  # type: ignore[attr-defined]
        scraper.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # a scrape half sent: held open
        mine = os.fstat(scraper.fileno()).st_ino
        served: set[int] = set()
        deadline = time.monotonic() + 10
        while not served and time.monotonic() < deadline:  # the exporter's end of the connection
            served = _socket_inodes() - before - {mine}
            time.sleep(0.01)
        assert len(served) == 1
        (inode,) = served

        def child() -> dict[str, Any]:
            return {"still_open": inode in _socket_inodes()}

        got = _in_forked_child(child, timeout=20)
        assert got == {"still_open": False}
        assert inode in _socket_inodes()  # the parent's copy is untouched...
        scraper.sendall(b"Connection: close\r\n\r\n")
        answer = b""
        while chunk := scraper.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.0 200") and b"gradwatch_" in answer  # ...and that scrape is answered
    with urllib.request.urlopen(sink.url, timeout=10) as again:  # type: ignore[attr-defined]
        assert again.status == 200  # so is the next one
    monitor.close()


@needs_fork
def test_persistent_dataloader_workers_keep_neither_the_port_nor_the_run(tmp_path: Path) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    model = SeqModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    log = tmp_path / "run.jsonl"
    monitor = gradwatch.watch(model, optimizer, every=2, log=log, prometheus="127.0.0.1:0", background=True)
    port = monitor.sinks[-1].port  # type: ignore[attr-defined]
    data = TensorDataset(torch.randn(16, 6, 3))
    loader = DataLoader(
        data, batch_size=4, num_workers=2, multiprocessing_context="fork", persistent_workers=True
    )
    for _ in range(2):  # two epochs through the same (persistent) workers
        for (batch,) in loader:
            optimizer.zero_grad()
            model(batch.transpose(0, 1)).pow(2).mean().backward()
            optimizer.step()
    monitor.close()
    alive = loader._iterator  # the persistent workers still run
    assert alive is not None and all(w.is_alive() for w in alive._workers)
    with socket.socket() as again:
        again.bind(("127.0.0.1", port))  # the port is free all the same
    steps = [r["step"] for r in _log_records(log) if r["kind"] == "measurement"]
    assert steps == [0, 2, 4, 6]  # the parent's 8 steps, each measured step once
    del loader, alive

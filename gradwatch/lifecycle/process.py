"""What the process does to the monitors still open: close them at interpreter exit (a background
measurement still in flight is written, not lost), and switch them off in a child made by ``os.fork()``.

A forked child gets a copy of every open monitor, but not its threads (the background worker, the
exporter's server, the Pushgateway pusher) and only shared copies of its files and sockets. Using that copy
would hang (a job submitted to a worker that does not exist) or write the parent's run a second time under
the same run id. So in the child each open monitor is closed without touching what belongs to the parent:
its hooks are taken off the modules, the sinks drop their inherited file descriptors and listening sockets
(a DataLoader worker then does not keep the exporter's port bound after the parent closes), and the first
step the child takes with it gives one warning and detaches it from the optimizer.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import os
import weakref
from collections.abc import Callable, Iterable
from typing import Protocol

from gradwatch.faults import warn_or_log

logger = logging.getLogger("gradwatch")


class OpenMonitor(Protocol):
    def close(self) -> None: ...

    def _disable_in_forked_child(self, parent_pid: int) -> None: ...


_open: weakref.WeakValueDictionary[int, OpenMonitor] = weakref.WeakValueDictionary()
_order = itertools.count()
_installed = False


def register(monitor: OpenMonitor) -> None:
    """Close ``monitor`` at exit unless it was closed before; switch it off in forked children."""
    global _installed
    if not _installed:
        atexit.register(_close_open_monitors)
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=_disable_in_child)
        _installed = True
    _open[next(_order)] = monitor


def unregister(monitor: OpenMonitor) -> None:
    for key, value in list(_open.items()):
        if value is monitor:
            _open.pop(key, None)


def _close_open_monitors() -> None:
    """At interpreter exit (normal end, ``sys.exit``, an uncaught exception): close what is still open, so
    a background measurement in flight reaches the log and every sink is flushed."""
    for monitor in list(_open.values()):
        try:
            monitor.close()
        except BaseException as exc:  # exiting anyway: say it, do not mask the exit status
            logger.warning("gradwatch: closing a monitor at exit failed: %r", exc)


def _disable_in_child() -> None:
    parent = os.getppid()
    monitors = list(_open.values())
    _open.clear()
    for monitor in monitors:
        with contextlib.suppress(Exception):
            monitor._disable_in_forked_child(parent)


def release_after_fork(sinks: Iterable[object]) -> None:
    """Let each sink that can drop what it inherited from the parent (``release_after_fork()``) do so;
    the others (user sinks, TensorBoard) are left untouched: the child never writes to or closes them."""
    for sink in sinks:
        release = getattr(sink, "release_after_fork", None)
        if callable(release):
            with contextlib.suppress(Exception):
                release()


class ForkedCopy:
    """A monitor's copy in a forked child: its first step there warns once and detaches it."""

    def __init__(self, run_id: str, parent_pid: int, detach: Callable[[], None]) -> None:
        self.run_id = run_id
        self.parent_pid = parent_pid
        self._detach: Callable[[], None] | None = detach

    def stepped(self) -> None:
        if self._detach is None:
            return
        detach, self._detach = self._detach, None
        with contextlib.suppress(Exception):
            detach()
        warn_or_log(
            f"gradwatch: this process (pid {os.getpid()}) was forked from pid {self.parent_pid} while the "
            f"monitor of run {self.run_id} was open; that monitor is off here (it measures and writes "
            "nothing, so the parent's run is not written twice). Call gradwatch.watch() in this process "
            "to watch the model here under its own run id.",
            stacklevel=4,
        )

"""One measurement at a time on a private thread, so the estimators can run beside the training step.

Only pure tensor work goes there (the estimators on snapshots taken at the measured step), plus handing
the finished records to the sinks declared safe for it (:class:`~gradwatch.sinks.base.LiveSink`, e.g. the
Prometheus exporter). Everything else that talks to the user (the other sinks, warnings, callbacks,
detectors, fault reports) stays on the training thread, which takes finished results back at its next step
boundary.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

Result = TypeVar("Result")


def _load_malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None elsewhere (musl, macOS, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_MALLOC_TRIM = _load_malloc_trim()


def release_free_memory() -> None:
    """Give memory freed by a finished job back to the OS. glibc serves each thread from its own arena
    and keeps what the worker freed there (measured: +50 MB RSS on an LSTM H=256 run) unless trimmed."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _adopt_torch_threads() -> None:
    """Give the worker thread torch's configured intra-op thread count (``torch.set_num_threads``).

    torch applies that setting to a new thread lazily, at its first call that asks for it; BLAS calls do
    not ask, so without this a worker's matmuls ran with the library default (every core) and, on a
    2-core machine training with 1 thread, slowed the training thread by 50% instead of using the spare
    core. Reading the setting triggers the per-thread initialisation and changes nothing global.
    """
    import torch

    torch.get_num_threads()


WORKER_NICENESS = 10
"""How much lower the worker's OS scheduling priority is than the training thread's (Linux ``nice``)."""


def available_cores(cpu_max: str = "/sys/fs/cgroup/cpu.max") -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota (a container's
    ``--cpus``, read from ``cpu_max``), which affinity does not show."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        with open(cpu_max, encoding="ascii") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def worker_fits(cores: int, training_threads: int) -> bool:
    """Whether a worker using ``training_threads`` threads (it adopts torch's setting) finds that many
    cores left idle by training: otherwise its threads compete with the training threads for the same
    cores, and a measurement costs several training steps instead of none (issue #14: +117% at every=50
    with torch's default of every core)."""
    return cores - training_threads >= training_threads


def spare_core_for_worker() -> bool:
    """The rule ``watch(background=None)`` uses on the CPU: a worker only where its threads fit on idle
    cores (see :func:`worker_fits`), with torch's intra-op thread count as the training threads."""
    import torch

    return worker_fits(available_cores(), torch.get_num_threads())


def _lower_priority() -> None:
    """Run the worker thread (and the OpenMP threads it starts, which inherit it) at a lower OS priority, so
    that when a core is contended after all the training thread wins. Linux only; a no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + WORKER_NICENESS)
    except (AttributeError, OSError):
        pass


def _start_worker_thread() -> None:
    _adopt_torch_threads()
    _lower_priority()


def run_and_release(job: Callable[[], Result]) -> Result:
    """Run a measurement job, then give the memory it freed back to the OS: on the worker (its own arena)
    and inline too, where glibc otherwise keeps the freed blocks scattered through the heap (measured:
    LSTM H=256, peak RSS of the next training steps +4.5% over the bare loop instead of +1.6%)."""
    try:
        return job()
    finally:
        release_free_memory()


class BackgroundWorker(Generic[Result]):
    """Runs submitted jobs one after another on a single daemon-free worker thread (started lazily)."""

    def __init__(self, name: str = "gradwatch-measure") -> None:
        self._name = name
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future[Result] | None = None
        self.pending_tag: object = None
        """What the submitter said the job in flight is (the monitor: its step), for messages."""

    @property
    def busy(self) -> bool:
        """True while a submitted job has not been taken back."""
        return self._pending is not None

    def submit(self, job: Callable[[], Result], *, tag: object = None) -> None:
        """Start ``job``; the previous one must have been taken back first (one job at a time)."""
        if self._pending is not None:
            raise RuntimeError("a background measurement is still pending: take() it before submitting")
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=self._name, initializer=_start_worker_thread
            )
        self._pending = self._executor.submit(run_and_release, job)
        self.pending_tag = tag

    def take(self, *, wait: bool) -> tuple[bool, Result | None]:
        """(True, result) for a finished job (waiting for it if ``wait``), else (False, None).

        An exception raised by the job is re-raised here, on the caller's thread. An interrupt of the wait
        (Ctrl-C) leaves the job pending, to be taken or abandoned later.
        """
        pending = self._pending
        if pending is None or (not wait and not pending.done()):
            return False, None
        try:
            result = pending.result()
        except BaseException:
            if pending.done():  # the job's own exception; an interrupted wait leaves the job pending
                self._pending = None
            raise
        self._pending = None
        return True, result

    def abandon(self) -> None:
        """Drop the job in flight without waiting for it (its result is lost) and let the thread end when
        it is done with it."""
        self._pending = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def forget(self) -> None:
        """In a forked child: the worker thread does not exist here; drop everything without joining."""
        self._pending = None
        self._executor = None

    def shutdown(self) -> None:
        """Stop the thread (after the job in flight, whose result is dropped unless taken before)."""
        self._pending = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

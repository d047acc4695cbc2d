"""One measurement at a time on a private thread, so the estimators can run beside the training step.

Only pure tensor work goes there (the estimators on snapshots taken at the measured step). Everything
that talks to the user (sinks, warnings, callbacks, detectors) stays on the training thread, which takes
finished results back at its next step boundary.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

Result = TypeVar("Result")


class BackgroundWorker(Generic[Result]):
    """Runs submitted jobs one after another on a single daemon-free worker thread (started lazily)."""

    def __init__(self, name: str = "gradwatch-measure") -> None:
        self._name = name
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future[Result] | None = None

    @property
    def busy(self) -> bool:
        """True while a submitted job has not been taken back."""
        return self._pending is not None

    def submit(self, job: Callable[[], Result]) -> None:
        """Start ``job``; the previous one must have been taken back first (one job at a time)."""
        if self._pending is not None:
            raise RuntimeError("a background measurement is still pending: take() it before submitting")
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self._name)
        self._pending = self._executor.submit(job)

    def take(self, *, wait: bool) -> tuple[bool, Result | None]:
        """(True, result) for a finished job (waiting for it if ``wait``), else (False, None).

        An exception raised by the job is re-raised here, on the caller's thread.
        """
        pending = self._pending
        if pending is None or (not wait and not pending.done()):
            return False, None
        self._pending = None
        return True, pending.result()

    def shutdown(self) -> None:
        """Stop the thread (after the job in flight, whose result is dropped unless taken before)."""
        self._pending = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

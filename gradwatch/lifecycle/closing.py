"""Closing a monitor in steps that survive an interrupt: Ctrl-C in the middle of ``close()`` must not leave
a half-closed monitor behind (hooks still on the model, the log open)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from gradwatch.records import ErrorRecord


class CloseSequence:
    """Named steps, run in order, each to completion once.

    Every step runs even when an earlier one raised; the first exception is re-raised at the end. A step
    that raised an ``Exception`` failed for good and is not run again; a step stopped by an interrupt
    (KeyboardInterrupt, SystemExit: not an ``Exception``) runs again at the next :meth:`run`, so a second
    ``close()`` completes what remains.
    """

    def __init__(self, steps: Sequence[tuple[str, Callable[[], None]]]) -> None:
        self._steps = list(steps)
        self._done: set[str] = set()

    @property
    def finished(self) -> bool:
        """Every step ran to completion (or failed for good)."""
        return len(self._done) == len(self._steps)

    def run(self) -> None:
        first: BaseException | None = None
        for name, step in self._steps:
            if name in self._done:
                continue
            try:
                step()
            except Exception as exc:
                self._done.add(name)
                first = first or exc
            except BaseException as exc:  # an interrupt: run this step again next time
                first = first or exc
            else:
                self._done.add(name)
        if first is not None:
            raise first

    def skip_all(self) -> None:
        """Mark every step done without running it (a forked child must not close its parent's sinks)."""
        self._done.update(name for name, _ in self._steps)


def lost_measurement(step: object, *, rank: int, run_id: str) -> ErrorRecord:
    """The error record that says a background measurement was given up when close() was interrupted."""
    return ErrorRecord(
        step if isinstance(step, int) else -1,
        time.time(),
        "close",
        f"close() was interrupted while the measurement of step {step} ran in the background; its records "
        "are lost (the log is complete up to the measurement before it)",
        rank=rank,
        run_id=run_id,
    )

"""One monitor's life: attached all or nothing, closed in steps an interrupt cannot leave half done,
closed at exit if still open, switched off in a forked child. The monitor owns the parts; this object
owns the order in which they are taken down."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from gradwatch.background import BackgroundWorker
from gradwatch.capture.optimizer_steps import StepListener
from gradwatch.lifecycle import process
from gradwatch.lifecycle.attachment import Attachment, undone_on_failure
from gradwatch.lifecycle.closing import CloseSequence, lost_measurement
from gradwatch.measure import MeasurementPipeline
from gradwatch.records import Record
from gradwatch.sinks.fanout import SinkFanOut


class MonitorLifecycle:
    """``start`` attaches and announces the run (undone on any failure); ``close`` publishes the last
    measurement, stops the worker, detaches, closes the sinks (see :class:`CloseSequence`)."""

    def __init__(
        self,
        monitor: StepListener,
        *,
        pipeline: MeasurementPipeline,
        background: BackgroundWorker[Any] | None,
        out: SinkFanOut,
        publish: Callable[[], None],
        emit: Callable[[Record], None],
        last_step: Callable[[], int],
        rank: int,
    ) -> None:
        self.closed = False
        """True once close() started (steps are no longer counted), or in a forked child."""
        self._monitor = monitor
        self._pipeline = pipeline
        self._background = background
        self._out = out
        self._emit = emit
        self._rank = rank
        self._attachment = Attachment(pipeline, monitor)
        self._forked: process.ForkedCopy | None = None
        self._closing = CloseSequence(
            [
                ("publish", publish),  # the last measurement's records go out before the sinks close
                ("worker", self._stop_worker),
                ("never-recorded", lambda: self._tell_never_recorded(last_step())),
                ("detach", self._attachment.detach),
                ("recorded", pipeline.reset),
                ("probes", pipeline.probes.clear),
                ("sinks", out.close),
                ("process", lambda: process.unregister(self)),
            ]
        )

    def start(self, owner: str, announce: Callable[[], None]) -> None:
        """Attach, then ``announce`` the run (arm, run header); on any failure nothing stays attached."""
        with undone_on_failure(self._attachment.detach):
            self._attachment.attach(owner)
            announce()
        process.register(self)

    def close(self) -> None:
        self.closed = True
        self._closing.run()

    def stepped_after_close(self) -> None:
        """A step reached a closed monitor: in a forked child, its one warning (and detach)."""
        if self._forked is not None:
            self._forked.stepped()

    def _stop_worker(self) -> None:
        """Stop the background thread; a measurement still in flight here (close() was interrupted while
        waiting for it) is given up, and an error record says so."""
        if self._background is None:
            return
        if self._background.busy:
            self._emit(lost_measurement(self._background.pending_tag, rank=self._rank, run_id=self._run_id))
            self._background.abandon()
        self._background.shutdown()

    def _tell_never_recorded(self, step: int) -> None:
        with contextlib.suppress(Exception):  # a module never recorded in a short run is told too
            self._pipeline.tell_never_recorded(step, closing=True)

    @property
    def _run_id(self) -> str:
        return self._monitor.run_id

    def _disable_in_forked_child(self, parent_pid: int) -> None:
        """In a child made by os.fork(): off, without touching the parent's threads, files or sockets."""
        self.closed = True
        self._closing.skip_all()
        self._forked = process.ForkedCopy(self._run_id, parent_pid, self._attachment.detach)
        self._pipeline.detach()
        if self._background is not None:
            self._background.forget()
        process.release_after_fork(self._out.sinks)

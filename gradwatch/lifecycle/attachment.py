"""What a monitor puts on the user's objects, put on all at once or not at all, and taken off again."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from gradwatch.capture.optimizer_steps import StepListener, attach_optimizer, detach_optimizer
from gradwatch.measure import MeasurementPipeline


class Attachment:
    """The recorders of the watched modules (through the pipeline) and the step dispatch of the monitor's
    optimizer (the current one: a followed replacement too). :meth:`detach` is idempotent and leaves
    nothing behind, whatever part :meth:`attach` got to."""

    def __init__(self, pipeline: MeasurementPipeline, monitor: StepListener) -> None:
        self._pipeline = pipeline
        self._monitor = monitor

    def attach(self, owner: str) -> None:
        """Route the modules' forward calls and the optimizer's steps to the monitor; undone on failure."""
        with undone_on_failure(self.detach):
            self._pipeline.attach(owner)
            if self._monitor.optimizer is not None:
                attach_optimizer(self._monitor.optimizer, self._monitor)

    def detach(self) -> None:
        """Stop routing the model's forward calls and the optimizer's steps to the monitor."""
        self._pipeline.detach()
        if self._monitor.optimizer is not None:
            detach_optimizer(self._monitor.optimizer, self._monitor)


@contextlib.contextmanager
def undone_on_failure(undo: Callable[[], None]) -> Iterator[None]:
    """Run ``undo`` when the block raises anything (a KeyboardInterrupt too), then re-raise."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            undo()
        raise

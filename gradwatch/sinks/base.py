"""The one small interface every sink implements."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from gradwatch.records import Record


@runtime_checkable
class Sink(Protocol):
    """Receives every record the monitor produces, in order.

    ``write`` must be quick (it runs inside the training step); ``flush`` makes everything written so far
    durable or visible; ``close`` releases resources and is idempotent.
    """

    def write(self, record: Record) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...

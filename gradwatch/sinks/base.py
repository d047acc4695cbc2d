"""The one small interface every sink implements, and the optional live extension."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from gradwatch.records import Measurement, Record


@runtime_checkable
class Sink(Protocol):
    """Receives every record the monitor produces, in order.

    ``write`` must be quick (it runs inside the training step); ``flush`` makes everything written so far
    durable or visible; ``close`` releases resources and is idempotent.
    """

    def write(self, record: Record) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class LiveSink(Sink, Protocol):
    """A sink that also takes background measurements the moment they finish, from gradwatch's worker.

    With ``background=True`` the estimators run on a worker thread, and the records reach ``write`` only
    at the next training-step boundary (or ``wait()``/``close()``), on the training thread, in step order.
    A sink implementing ``write_live`` gets each :class:`Measurement` of a finished background measurement
    on the worker thread first, without waiting for a step (a dashboard then shows it during a long
    evaluation or checkpoint). The contract:

    - ``write_live`` runs on the worker thread, concurrently with ``write``/``flush`` on the training
      thread: the sink guards its own state. It must be quick; an exception is caught and reported on the
      training thread at publication as a fault of this sink (``strict=True`` re-raises it there).
    - The same record object is given to ``write`` later, at publication: ``write`` must then not apply it
      a second time in a way that changes what the sink shows (a counter must not count it twice).
    - A closed sink ignores ``write_live`` (the monitor may close a failing sink while the worker
      delivers).

    Alerts, error records and everything else arrive through ``write`` only.
    """

    def write_live(self, record: Measurement) -> None: ...


@runtime_checkable
class StepObserver(Protocol):
    """Optional sink hook: told the index of every step as it closes, measured or not (the Prometheus sink
    exports it as the current step). Called on the training thread before the step's records."""

    def observe_step(self, step: int) -> None: ...


@runtime_checkable
class HasUrl(Protocol):
    """Optional sink hook: the address where the sink serves what it got (the Prometheus exporter's scrape
    URL, with the real port when it was started on port 0), or None when it serves nothing."""

    @property
    def url(self) -> str | None: ...


@runtime_checkable
class FaultSource(Protocol):
    """Optional sink hook: faults the sink caught on its own threads (the Prometheus exporter's scrape
    threads), as ``(where, exception)``. The fan-out takes them on the training thread at every step and
    gives them to the fault policy, so they are faults like any other (warning, error record, counts)."""

    def take_faults(self) -> list[tuple[str, Exception]]: ...

"""The sink fan-out: every record to every sink, in order, and what happens when a sink fails.

The monitor hands each record to :meth:`SinkFanOut.emit` once; the fan-out keeps the in-memory history,
writes the record to every sink, flushes, closes, tells :class:`~gradwatch.sinks.base.StepObserver` sinks
about each step and gives :class:`~gradwatch.sinks.base.LiveSink` sinks background measurements from the
worker thread. Whether a failing sink is retried or disabled is decided by the
:class:`~gradwatch.faults.FaultPolicy`; the fan-out carries it out.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Sequence

from gradwatch.faults import FaultPolicy, warn_or_log
from gradwatch.records import Measurement, Record
from gradwatch.sinks.base import FaultSource, HasUrl, LiveSink, Sink, StepObserver


class SinkFanOut:
    """Writes every record to every sink still enabled, and keeps the last ``history_size`` of them."""

    def __init__(self, sinks: Sequence[Sink], faults: FaultPolicy, *, history_size: int) -> None:
        self._sinks: list[Sink] = list(sinks)
        self._faults = faults
        self._closed: list[Sink] = []  # closed by close(), in order
        self.history: deque[Record] = deque(maxlen=history_size or None)
        """Every record emitted, oldest first (the last ``history_size`` of them; all when it is 0)."""

    @property
    def sinks(self) -> list[Sink]:
        """The sinks still enabled (a copy)."""
        return list(self._sinks)

    @property
    def url(self) -> str | None:
        """The first http(s) URL a sink serves (the Prometheus exporter's scrape URL), if any."""
        for sink in self._sinks:
            if isinstance(sink, HasUrl):
                url = sink.url
                if isinstance(url, str) and url.startswith("http"):
                    return url
        return None

    def live_sinks(self) -> list[LiveSink]:
        """The sinks that take background measurements on the worker thread (chosen on the training
        thread, at submission)."""
        return [sink for sink in self._sinks if isinstance(sink, LiveSink)]

    def emit(self, record: Record, *, skip: Sink | None = None) -> None:
        self.history.append(record)
        for sink in list(self._sinks):
            if sink is skip:
                continue
            try:
                sink.write(record)
            except Exception as exc:
                self.sink_failed(sink, exc, step=getattr(record, "step", None))

    def flush(self) -> None:
        for sink in list(self._sinks):
            try:
                sink.flush()
            except Exception as exc:
                self.sink_failed(sink, exc)

    def observe_step(self, step: int) -> None:
        """Tell every :class:`StepObserver` sink that ``step`` is closing; report the faults each
        :class:`FaultSource` sink caught on its own threads since the last step."""
        for sink in list(self._sinks):
            if isinstance(sink, StepObserver):
                try:
                    sink.observe_step(step)
                except Exception as exc:
                    self.sink_failed(sink, exc)
            if isinstance(sink, FaultSource):
                for where, fault in sink.take_faults():
                    self._faults.fault(where, "", fault, step=step)

    def report_live_faults(self, faults: Sequence[tuple[Sink, Exception]], step: int) -> None:
        """Faults that ``write_live`` raised on the worker thread, reported on the training thread."""
        for sink, exc in faults:
            if sink in self._sinks:  # not a sink that failed and was disabled meanwhile
                self.sink_failed(sink, exc, step=step)

    def sink_failed(self, sink: Sink, exc: Exception, *, step: int | None = None) -> None:
        """Apply the fault policy's decision: disable (and close) the sink or keep trying it; the error record
        goes to the other sinks."""
        failure = self._faults.sink_failed(sink, exc, step=step)
        if failure.disable:
            with contextlib.suppress(ValueError):
                self._sinks.remove(sink)
            with contextlib.suppress(Exception):
                sink.close()
        if failure.error is not None:
            self.emit(failure.error, skip=sink)

    def close(self) -> None:
        """Flush and close every sink; a sink failing to close is a RuntimeWarning, never an error. An
        interrupt (Ctrl-C) in one sink's close still closes the others, then propagates; calling close()
        again closes the sink it stopped."""
        interrupt: BaseException | None = None
        for sink in self._sinks:
            if any(sink is done for done in self._closed):
                continue
            try:
                with contextlib.suppress(Exception):
                    sink.flush()
                sink.close()
            except Exception as exc:  # closing must not fail the user's run
                warn_or_log(f"gradwatch: closing sink {sink!r} failed: {exc!r}", RuntimeWarning, stacklevel=3)
            except BaseException as exc:
                interrupt = interrupt or exc
                continue
            self._closed.append(sink)
        if interrupt is not None:
            raise interrupt

    def flush_quietly(self) -> None:
        """Best effort at interpreter exit: flush every sink, ignore what fails."""
        for sink in self._sinks:
            with contextlib.suppress(Exception):
                sink.flush()


def write_live(sinks: Sequence[LiveSink], records: Sequence[Measurement]) -> list[tuple[Sink, Exception]]:
    """On the worker thread: give the records at once to the live sinks. A sink that raises gets no more of
    them; its fault is returned, to be reported on the training thread at publication."""
    faults: list[tuple[Sink, Exception]] = []
    for sink in sinks:
        for record in records:
            try:
                sink.write_live(record)
            except Exception as exc:
                faults.append((sink, exc))
                break
    return faults

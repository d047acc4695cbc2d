"""The fault policy: the one place that decides what a failure inside gradwatch does to the user's run.

gradwatch must never break a training run. A fault (an exception raised by gradwatch's own code, not a
deliberate error such as ``nonfinite="raise"``) is re-raised as :class:`GradWatchFault` in strict mode;
otherwise it disables what failed (a module, clipping, a sink) or skips that part on the step, warns once
and reports the first fault of each place as an :class:`~gradwatch.records.ErrorRecord`.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from gradwatch.policy.alerts import GradWatchWarning, NonFiniteGradientError
from gradwatch.records import ErrorRecord, Record

logger = logging.getLogger("gradwatch")


class GradWatchFault(RuntimeError):
    """Raised in strict mode when something inside gradwatch fails (the cause is chained)."""


def warn_or_log(message: str, category: type[Warning] = GradWatchWarning, *, stacklevel: int = 2) -> bool:
    """``warnings.warn``, except that a filter turning it into an error (``-W error``) does not raise into
    the user's training step: the message then goes to the ``gradwatch`` logger. True when it was caught."""
    try:
        warnings.warn(message, category, stacklevel=stacklevel + 1)
    except Warning:
        logger.warning("%s", message)
        return True
    return False


#: Monitor-wide parts that a fault turns off for the rest of the run, with the warning's wording.
DISABLED_ON_FAULT: dict[str, str] = {"clip": "gradient clipping is off from now on"}


@dataclass(frozen=True)
class SinkFailure:
    """What to do with a sink that raised: ``disable`` it (drop it and close it) or keep trying it, and the
    error record to give the other sinks (None after the first I/O error: one report is enough)."""

    disable: bool
    error: ErrorRecord | None


class FaultPolicy:
    """Counts, warns, disables and reports the faults of one monitor.

    ``current_step`` stamps error records; ``report`` delivers them (the sink fan-out);
    ``on_module_disabled`` / ``on_part_disabled`` let the owner stop the part that failed.
    """

    def __init__(
        self,
        *,
        strict: bool,
        rank: int,
        run_id: str,
        current_step: Callable[[], int],
        report: Callable[[Record], None] | None = None,
        on_module_disabled: Callable[[str], None] | None = None,
        on_part_disabled: Callable[[str], None] | None = None,
    ) -> None:
        self.strict = strict
        self.rank = rank
        self.run_id = run_id
        self._current_step = current_step
        self.report = report
        self._on_module_disabled = on_module_disabled
        self._on_part_disabled = on_part_disabled
        self.counts: dict[str, int] = {}
        """How often each part of gradwatch failed ("capture:rnn", "sink:JsonlSink(...)", "clip", ...)."""
        self.disabled_modules: dict[str, str] = {}  # module name -> repr of the fault that disabled it
        self._warned: set[str] = set()

    def is_disabled(self, module: str) -> bool:
        return module in self.disabled_modules

    def fault(self, where: str, module: str, exc: Exception, *, step: int | None = None) -> None:
        """A fault inside gradwatch: re-raise in strict mode, else disable the module (or the part: clipping)
        and warn once; the first fault of each place also goes to the sinks as an error record, stamped
        with ``step`` (the measured step, for a background measurement) or the current one."""
        if self.strict:
            raise GradWatchFault(f"gradwatch {where} failed for {module or 'the monitor'}: {exc!r}") from exc
        key = f"{where}:{module}" if module else where
        failures = self.counts[key] = self.counts.get(key, 0) + 1
        if module:
            self.disabled_modules[module] = repr(exc)
            if self._on_module_disabled is not None:
                self._on_module_disabled(module)
            consequence = "that module is no longer measured"
        elif where in DISABLED_ON_FAULT:
            if self._on_part_disabled is not None:
                self._on_part_disabled(where)
            consequence = DISABLED_ON_FAULT[where]
        else:
            consequence = "gradwatch skips it on every step where it fails"
        if failures > 1:
            return
        self._warn(f"gradwatch: {where} failed for {module or 'the monitor'} and {consequence}: {exc!r}")
        if self.report is not None:
            self.report(self._error(where, exc, step, module=module))

    def sink_failed(self, sink: object, exc: Exception, *, step: int | None = None) -> SinkFailure:
        """A sink raised. I/O errors (disk full, broken pipe) degrade: the record is dropped, later ones are
        tried again, one warning. Any other error disables the sink. Both report one error record to the
        other sinks, at the first failure only."""
        if self.strict:
            raise GradWatchFault(f"sink {sink!r} failed: {exc!r}") from exc
        where = f"sink:{sink!r}"
        failures = self.counts[where] = self.counts.get(where, 0) + 1
        if isinstance(exc, OSError):
            if failures > 1:
                return SinkFailure(disable=False, error=None)
            self._warn(
                f"gradwatch: sink {sink!r} failed with an I/O error ({exc!r}); records it cannot take are "
                "dropped and counted in monitor.fault_counts, later ones are tried again"
            )
            return SinkFailure(disable=False, error=self._error(where, exc, step))
        self._warn(f"gradwatch: sink {sink!r} failed and is disabled: {exc!r}")
        return SinkFailure(disable=True, error=self._error(where, exc, step))

    @contextlib.contextmanager
    def guard(self, where: str) -> Iterator[None]:
        """Run one monitor-wide part of the step (gradient check, clipping) so a fault in it is a gradwatch
        fault; deliberate errors (GradWatchFault, nonfinite='raise') pass through."""
        try:
            yield
        except (GradWatchFault, NonFiniteGradientError):
            raise
        except Exception as exc:
            self.fault(where, "", exc)

    def warn(self, message: str) -> None:
        """A notice (not a fault). Turned into an error by a warnings filter it escapes only in strict
        mode; otherwise it is logged and written as an error record with ``where="warning"``."""
        if self._warn(message) and self.report is not None:
            self.report(self._error("warning", None, None, message=message))

    def _warn(self, message: str) -> bool:
        """Warn; True when a warnings filter raised it and it was logged instead (never in strict mode)."""
        if self.strict:
            warnings.warn(message, GradWatchWarning, stacklevel=4)
            return False
        return warn_or_log(message, stacklevel=4)

    def notice(self, key: str, where: str, module: str, message: str, *, step: int | None = None) -> None:
        """Once per ``key``: warn (to the log instead when warnings are errors: a notice never stops the
        run) and give the sinks an error record with ``message``; nothing is disabled."""
        if key in self._warned:
            return
        self._warned.add(key)
        try:
            self.warn(message)
        except Warning:
            logging.getLogger("gradwatch").warning(message)
        if self.report is not None:
            self.report(
                ErrorRecord(
                    self._current_step() if step is None else step,
                    time.time(),
                    where,
                    message,
                    module=module,
                    rank=self.rank,
                    run_id=self.run_id,
                )
            )

    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.warn(message)

    def _error(
        self, where: str, exc: Exception | None, step: int | None, *, module: str = "", message: str = ""
    ) -> ErrorRecord:
        return ErrorRecord(
            self._current_step() if step is None else step,
            time.time(),
            where,
            repr(exc) if exc is not None else message,
            module=module,
            rank=self.rank,
            run_id=self.run_id,
        )

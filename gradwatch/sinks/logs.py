"""A sink that writes a one-line summary of each record to the ``gradwatch`` logger."""

from __future__ import annotations

import logging

from gradwatch.records import Alert, ClipEvent, ErrorRecord, Measurement, Record


class LoggingSink:
    """Measurements at DEBUG, clips at INFO, errors at WARNING (alerts are logged where they are raised)."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger or logging.getLogger("gradwatch")

    def write(self, record: Record) -> None:
        if isinstance(record, Measurement):
            if self.logger.isEnabledFor(logging.DEBUG):
                m = record.metrics
                self.logger.debug(
                    "step %d %s layer %d %s: sigma_max(J) mean %s p95 %s, lyapunov %s, |W_hh| %s",
                    record.step, record.module, record.layer, record.direction,
                    _fmt(m.jacobian_sigma_max_mean), _fmt(m.jacobian_sigma_max_p95),
                    _fmt(m.lyapunov_max), _fmt(m.weight_hh_sigma_max),
                )  # fmt: skip
        elif isinstance(record, ClipEvent):
            self.logger.info(
                "step %d: clipped gradients from norm %s to %s (scale %.3g)",
                record.step, _fmt(record.norm_before), _fmt(record.max_norm), record.scale,
            )  # fmt: skip
        elif isinstance(record, ErrorRecord):
            self.logger.warning(
                "step %d: gradwatch fault in %s: %s", record.step, record.where, record.message
            )
        elif isinstance(record, Alert):
            pass  # emitted (and logged) by the alert path itself

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"

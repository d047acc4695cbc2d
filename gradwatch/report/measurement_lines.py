"""Measurement lines decoded and type-checked in one C call (msgspec), for the report's bulk path.

Nearly every line of a run log is a measurement, and building a :class:`~gradwatch.records.Measurement`
from a parsed dict is most of what reading one costs. :data:`decode_measurement_line` instead decodes a
line of the usual shape straight into a :class:`MeasurementLine` struct, checking every field's JSON type as
:meth:`~gradwatch.records.Measurement.from_json` does; the streaming summary folds these structs a
batch at a time. Any other line (another kind, an unknown field, a wrong type, bad JSON) raises one of
:data:`DECODE_ERRORS`, and the reader gives it to the generic path, which finds the same record or problem.

This module needs ``msgspec`` (a dependency; on a platform without its wheel importing this raises
``ImportError``, and the reader then reads every line through the generic path).
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from gradwatch.records import Measurement, SigmaHistogram, checked_measurement

# The generic path reads integers of up to 64 bits as ints and refuses larger ones where an integer is
# required (orjson makes them floats); int64 here, so this decoder never takes a line the generic path
# refuses (the few between 2**63 and 2**64 go to the generic path, which decides as always).
_JsonInt = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


class HistogramLine(msgspec.Struct, gc=False):
    """``metrics.jacobian_sigma_max_histogram`` (other keys are ignored, as :class:`SigmaHistogram` does)."""

    edges: list[float]
    counts: list[_JsonInt]
    sum: float
    sum_squares: float

    def __post_init__(self) -> None:
        if len(self.edges) != len(self.counts) + 1 or not self.counts:
            raise ValueError("a histogram needs len(edges) == len(counts) + 1 >= 2")  # -> ValidationError

    def record(self) -> SigmaHistogram:
        return SigmaHistogram(tuple(self.edges), tuple(self.counts), self.sum, self.sum_squares)


class MetricsLine(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """The ``metrics`` object of a measurement line (the fields of :class:`MeasurementMetrics`).
    A missing number reads as null, a missing mapping as empty, as the record reads them."""

    jacobian_sigma_max_mean: float | None = None
    jacobian_sigma_max_min: float | None = None
    jacobian_sigma_max_max: float | None = None
    jacobian_sigma_max_p95: float | None = None
    jacobian_frac_above_one: float | None = None
    weight_hh_sigma_max: float | None = None
    activation_derivative_mean: float | None = None
    activation_saturation_ratio: float | None = None
    lyapunov_max: float | None = None
    lag_norm: dict[str, float | None] = {}
    grad_norm: dict[str, float | None] = {}
    grad_nonfinite: _JsonInt | None = 0
    """null reads as 0, as in the record (use ``grad_nonfinite or 0``)."""
    gate_mean: float | None = None
    jacobian_converged_ratio: float | None = None
    jacobian_iterations: _JsonInt | None = None
    sequences: _JsonInt | None = None
    time_steps: _JsonInt | None = None
    jacobian_sigma_max_histogram: HistogramLine | None = None
    step_sample: _JsonInt | None = None
    lag_sequences: _JsonInt | None = None
    lyapunov_spectrum: dict[str, float | None] = {}
    lyapunov_log10_condition: float | None = None
    gradient_reach: float | None = None
    horizon: _JsonInt | None = None


class MeasurementLine(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """A measurement line of the usual shape; ``run_id`` is filled in from the run header when empty."""

    kind: Literal["measurement"]
    step: _JsonInt
    time: float
    module: str
    layer: _JsonInt
    direction: Literal["forward", "reverse"]
    metrics: MetricsLine
    run_id: str = ""
    rank: _JsonInt = 0


decode_measurement_line = msgspec.json.Decoder(MeasurementLine).decode
"""``bytes -> MeasurementLine``; raises one of :data:`DECODE_ERRORS` for any other line."""
DECODE_ERRORS: tuple[type[Exception], ...] = (msgspec.DecodeError, msgspec.ValidationError)

_METRIC_NAMES = tuple(MetricsLine.__struct_fields__)


def measurement_from_line(line: MeasurementLine) -> Measurement:
    """The :class:`Measurement` record of a decoded line (what the generic reader builds from it)."""
    metrics_line = line.metrics
    fields = {name: getattr(metrics_line, name) for name in _METRIC_NAMES}
    fields["grad_nonfinite"] = fields["grad_nonfinite"] or 0
    fields["lag_norm"] = dict(metrics_line.lag_norm)
    fields["grad_norm"] = dict(metrics_line.grad_norm)
    fields["lyapunov_spectrum"] = dict(metrics_line.lyapunov_spectrum)
    histogram = metrics_line.jacobian_sigma_max_histogram
    fields["jacobian_sigma_max_histogram"] = None if histogram is None else histogram.record()
    return checked_measurement(  # the decoder checked every type
        fields, line.step, line.time, line.module, line.layer, line.direction, line.rank, line.run_id
    )

"""Records: the plain-value types that cross from the estimators to everything after them.

Every record is a frozen dataclass of floats, ints and strings (never tensors). Its JSON form,
``record.to_json()``, is one line of the run log; ``record_from_json`` reads it back. The schema is
documented in ``docs/log-schema.md``; bump :data:`SCHEMA_VERSION` on any incompatible change.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar, Literal, TypeAlias, cast

from gradwatch.metric_table import fields_of_kind

SCHEMA_VERSION = 1
# How each field of MeasurementMetrics is read back, by its kind in the metric table.
_MAPPING_FIELDS = fields_of_kind("mapping")
_HISTOGRAM_FIELDS = fields_of_kind("histogram")
_INT_FIELDS = fields_of_kind("int")
_WRITTEN_WHEN_MEASURED = frozenset({"lyapunov_spectrum", "lyapunov_log10_condition"})
GLOBAL_RANK = -1
"""The ``rank`` of a record that combines all ranks' measurements (``watch(..., global_view=True)``)."""

Direction = Literal["forward", "reverse"]
DIRECTIONS: tuple[Direction, ...] = ("forward", "reverse")


class RecordError(ValueError):
    """A run-log object that does not follow the schema (wrong type or missing field)."""


class AlertKind(str, Enum):
    """What an alert says about a layer."""

    VANISHING = "vanishing"
    EXPLODING = "exploding"
    NONFINITE = "nonfinite"
    RECOVERED = "recovered"


def _finite_or_none(value: float | None) -> float | None:
    """JSON has no NaN/Inf: non-finite floats are written as null."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class SigmaHistogram:
    """A fixed-bin histogram of the per-step values sigma_max(J_t) of one measurement.

    ``edges`` are the ``len(counts) + 1`` bucket edges: equal-width buckets from the smallest to the largest
    measured value (so the record stays a few hundred bytes however many steps were measured); bucket i
    holds ``edges[i] <= value < edges[i+1]``, the last bucket also its right edge. ``total`` and
    ``sum_squares`` are the sum of the values and of their squares (what a TensorBoard histogram carries).
    """

    edges: tuple[float, ...]
    counts: tuple[int, ...]
    total: float
    sum_squares: float

    def __post_init__(self) -> None:
        if len(self.edges) != len(self.counts) + 1 or not self.counts:
            raise RecordError(
                f"a histogram needs len(edges) == len(counts) + 1 >= 2, got {len(self.edges)} edges and "
                f"{len(self.counts)} counts"
            )

    def to_json(self) -> dict[str, Any]:
        return {
            "edges": [float(e) for e in self.edges],
            "counts": [int(c) for c in self.counts],
            "sum": float(self.total),
            "sum_squares": float(self.sum_squares),
        }

    @classmethod
    def from_json(cls, data: Any, name: str = "metrics.jacobian_sigma_max_histogram") -> SigmaHistogram:
        if not isinstance(data, Mapping):
            raise RecordError(f"'{name}' must be an object or null, got {type(data).__name__}")
        edges, counts = data.get("edges"), data.get("counts")
        if not isinstance(edges, list) or not isinstance(counts, list):
            raise RecordError(f"'{name}' needs lists 'edges' and 'counts'")
        return cls(
            edges=tuple(_as_float(e, f"{name}.edges") for e in edges),
            counts=tuple(_as_int(c, f"{name}.counts") for c in counts),
            total=_as_float(data.get("sum"), f"{name}.sum"),
            sum_squares=_as_float(data.get("sum_squares"), f"{name}.sum_squares"),
        )


@dataclass(frozen=True)
class MeasurementMetrics:
    """What one measurement says about one layer and direction of one module.

    ``jacobian_*`` summarise sigma_max(J_t), J_t = ds_t/ds_{t-1}, over the measured (t, sequence) pairs.
    ``lag_norm[str(tau)]`` is the mean over sequences of ||ds_T/ds_{T-tau}||_2 (product of tau Jacobians);
    ``lyapunov_max`` the mean log growth per step of that product. ``gradient_reach`` is the lag at which
    those lag norms first fall below the reach floor (1e-4); ``horizon`` the lag the vanishing verdict is
    judged at. ``None`` means "not measurable here" (for example a sequence too short for any lag).
    """

    jacobian_sigma_max_mean: float | None
    jacobian_sigma_max_min: float | None
    jacobian_sigma_max_max: float | None
    jacobian_sigma_max_p95: float | None
    jacobian_frac_above_one: float | None
    weight_hh_sigma_max: float | None
    activation_derivative_mean: float | None
    activation_saturation_ratio: float | None
    lyapunov_max: float | None
    lag_norm: Mapping[str, float | None] = field(default_factory=dict)
    grad_norm: Mapping[str, float | None] = field(default_factory=dict)
    grad_nonfinite: int = 0
    # Diagnostics of the estimate itself (optional in the schema).
    gate_mean: float | None = None
    jacobian_converged_ratio: float | None = None
    jacobian_iterations: int | None = None
    sequences: int | None = None
    time_steps: int | None = None
    # Optional (absent in older logs): the distribution behind the jacobian_sigma_max_* summaries.
    jacobian_sigma_max_histogram: SigmaHistogram | None = None
    # Optional (absent in older logs): what the estimator measured. The economy estimator (the default)
    # summarises sigma_max(J_t) over a stratified sample of step_sample (t, sequence) pairs and takes the
    # lag norms and lyapunov_max over lag_sequences sequences; "full" measures all (docs/estimators.md).
    step_sample: int | None = None
    lag_sequences: int | None = None
    # Optional, written only when measured (EstimatorSettings(lyapunov_spectrum=k)): the top-k Lyapunov
    # exponents by index ("1" the largest) and log10 of the condition number sigma_1 / sigma_k they imply.
    lyapunov_spectrum: Mapping[str, float | None] = field(default_factory=dict)
    lyapunov_log10_condition: float | None = None
    # Optional (absent in older logs): how many steps back the gradient survives (estimators/reach.py) and
    # the dependency range it is judged against (watch(horizon=), else the measured sequence length).
    gradient_reach: float | None = None
    horizon: int | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _WRITTEN_WHEN_MEASURED and not value and value != 0:
                continue  # the spectrum is off: the line stays as it was without it
            if isinstance(value, Mapping):
                out[f.name] = {str(k): _finite_or_none(v) for k, v in value.items()}
            elif isinstance(value, float):
                out[f.name] = _finite_or_none(value)
            elif isinstance(value, SigmaHistogram):
                out[f.name] = value.to_json()
            else:
                out[f.name] = value
        return out

    @classmethod
    def from_json(cls, data: object) -> MeasurementMetrics:
        """Read a record's ``metrics`` object; anything else is a RecordError naming what it got."""
        if not isinstance(data, Mapping):
            raise RecordError(f"'metrics' must be an object, got {type(data).__name__}")
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in data:
                continue
            value = data[f.name]
            if f.name in _MAPPING_FIELDS:
                if not isinstance(value, Mapping):
                    raise RecordError(f"metrics.{f.name} must be an object, got {type(value).__name__}")
                kwargs[f.name] = {
                    str(k): _as_optional_float(v, f"metrics.{f.name}.{k}") for k, v in value.items()
                }
            elif f.name in _HISTOGRAM_FIELDS:
                kwargs[f.name] = None if value is None else SigmaHistogram.from_json(value)
            elif f.name in _INT_FIELDS:
                kwargs[f.name] = _as_optional_int(value, f"metrics.{f.name}")
            else:
                kwargs[f.name] = _as_optional_float(value, f"metrics.{f.name}")
        for f in dataclasses.fields(cls):
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                kwargs.setdefault(f.name, None)
        if kwargs.get("grad_nonfinite") is None:
            kwargs["grad_nonfinite"] = 0
        return cls(**kwargs)


@dataclass(frozen=True)
class RunHeader:
    """First line of a run log: who wrote it, with which settings, watching which modules."""

    kind: ClassVar[str] = "run"
    run_id: str
    started: float
    gradwatch: str
    torch: str
    config: Mapping[str, Any]
    modules: tuple[Mapping[str, Any], ...]
    rank: int = 0
    world_size: int = 1
    schema: int = SCHEMA_VERSION
    name: str | None = None
    """The name the user gave the run (``watch(..., name=...)``), to tell runs apart; absent when none."""

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "kind": self.kind,
            "schema": self.schema,
            "run_id": self.run_id,
            "started": self.started,
            "gradwatch": self.gradwatch,
            "torch": self.torch,
            "rank": self.rank,
            "world_size": self.world_size,
            "config": dict(self.config),
            "modules": [dict(m) for m in self.modules],
        }
        if self.name is not None:
            data["name"] = self.name
        return data

    def watched_layers(self) -> list[tuple[str, str | None, int, Direction]]:
        """(module, type, layer, direction) of every layer the header lists, as far as it says (a module
        without a layer count has one layer; without directions, forward), at most 1024 layers a module."""
        out: list[tuple[str, str | None, int, Direction]] = []
        for entry in self.modules:
            name, kind = entry.get("name"), entry.get("type")
            if not isinstance(name, str):
                continue
            layers = entry.get("layers", entry.get("num_layers", 1))
            if not isinstance(layers, int) or isinstance(layers, bool) or not 0 < layers <= 1024:
                layers = 1
            directions = entry.get("directions")
            if not isinstance(directions, list):
                directions = ["forward", "reverse"] if entry.get("bidirectional") is True else ["forward"]
            for layer in range(layers):
                for direction in ("forward", "reverse"):
                    if direction in directions:
                        out.append((name, kind if isinstance(kind, str) else None, layer, direction))
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunHeader:
        modules = data.get("modules", [])
        config = data.get("config", {})
        if not isinstance(modules, list) or not all(isinstance(m, Mapping) for m in modules):
            raise RecordError("'modules' must be a list of objects")
        if not isinstance(config, Mapping):
            raise RecordError("'config' must be an object")
        return cls(
            run_id=_as_str(data.get("run_id"), "run_id"),
            started=_as_float(data.get("started"), "started"),
            gradwatch=str(data.get("gradwatch", "")),
            torch=str(data.get("torch", "")),
            config=dict(config),
            modules=tuple(dict(m) for m in modules),
            rank=_as_int(data.get("rank", 0), "rank"),
            world_size=_as_int(data.get("world_size", 1), "world_size"),
            schema=_as_int(data.get("schema"), "schema"),
            name=None if data.get("name") is None else _as_str(data.get("name"), "name"),
        )


@dataclass(frozen=True)
class Measurement:
    """One measured step of one module, layer and direction."""

    kind: ClassVar[str] = "measurement"
    step: int
    time: float
    module: str
    layer: int
    direction: Direction
    metrics: MeasurementMetrics
    rank: int = 0
    run_id: str = ""

    def to_json(self) -> dict[str, Any]:
        return {**_envelope_json(self), **_layer_json(self), "metrics": self.metrics.to_json()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Measurement:
        return cls(
            **_envelope_fields(data),
            **_layer_fields(data),
            metrics=MeasurementMetrics.from_json(data.get("metrics")),
        )


@dataclass(frozen=True)
class Alert:
    """A verdict change for one layer: an episode of vanishing/exploding/non-finite starts, or ends."""

    kind: ClassVar[str] = "alert"
    step: int
    time: float
    module: str
    layer: int
    direction: Direction
    alert: AlertKind
    metric: str
    value: float | None
    threshold: float | None
    message: str
    rank: int = 0
    run_id: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            **_envelope_json(self),
            **_layer_json(self),
            "alert": AlertKind(self.alert).value,
            "metric": self.metric,
            "value": _finite_or_none(self.value),
            "threshold": _finite_or_none(self.threshold),
            "message": self.message,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Alert:
        try:
            alert = AlertKind(data.get("alert"))
        except ValueError as exc:
            raise RecordError(
                f"'alert' must be one of {[k.value for k in AlertKind]}, got {_describe(data.get('alert'))}"
            ) from exc
        return cls(
            **_envelope_fields(data),
            **_layer_fields(data),
            alert=alert,
            metric=_as_str(data.get("metric"), "metric"),
            value=_as_optional_float(data.get("value"), "value"),
            threshold=_as_optional_float(data.get("threshold"), "threshold"),
            message=_as_str(data.get("message", ""), "message"),
        )


@dataclass(frozen=True)
class ClipEvent:
    """Gradients were rescaled by ``scale = max_norm / norm_before`` before the optimizer step."""

    kind: ClassVar[str] = "clip"
    step: int
    time: float
    norm_before: float | None
    max_norm: float
    scale: float
    rank: int = 0
    run_id: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            **_envelope_json(self),
            "norm_before": _finite_or_none(self.norm_before),
            "max_norm": _finite_or_none(self.max_norm),
            "scale": _finite_or_none(self.scale),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ClipEvent:
        return cls(
            **_envelope_fields(data),
            norm_before=_as_optional_float(data.get("norm_before"), "norm_before"),
            max_norm=_as_float(data.get("max_norm"), "max_norm"),
            scale=_as_float(data.get("scale"), "scale"),
        )


@dataclass(frozen=True)
class ErrorRecord:
    """A fault inside gradwatch that disabled one module or sink; training went on."""

    kind: ClassVar[str] = "error"
    step: int
    time: float
    where: str
    message: str
    module: str = ""
    rank: int = 0
    run_id: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            **_envelope_json(self),
            "where": self.where,
            "module": self.module,
            "message": self.message,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ErrorRecord:
        return cls(
            **_envelope_fields(data),
            where=_as_str(data.get("where"), "where"),
            message=_as_str(data.get("message", ""), "message"),
            module=str(data.get("module", "")),
        )


Record: TypeAlias = RunHeader | Measurement | Alert | ClipEvent | ErrorRecord

RECORD_TYPES: dict[str, type[Record]] = {
    cls.kind: cls for cls in (RunHeader, Measurement, Alert, ClipEvent, ErrorRecord)
}


def record_from_json(data: Any) -> Record | None:
    """Parse one decoded log line; ``None`` for a record kind this version does not know (skip it).

    Raises :class:`RecordError` naming the offending field when a known kind is malformed.
    """
    if not isinstance(data, Mapping):
        raise RecordError(f"a log line must be a JSON object, got {type(data).__name__}")
    kind = data.get("kind")
    if not isinstance(kind, str):
        raise RecordError("a log line needs a string field 'kind'")
    cls = RECORD_TYPES.get(kind)
    if cls is None:
        return None
    if cls is RunHeader:
        schema = data.get("schema")
        if schema != SCHEMA_VERSION:
            raise RecordError(
                f"unsupported run-log schema {_describe(schema)}; "
                f"this gradwatch reads schema {SCHEMA_VERSION}"
            )
    return cls.from_json(data)


# --- the fields every step record shares -------------------------------------------------------------


def _envelope_json(record: Measurement | Alert | ClipEvent | ErrorRecord) -> dict[str, Any]:
    return {
        "kind": record.kind,
        "run_id": record.run_id,
        "step": record.step,
        "time": record.time,
        "rank": record.rank,
    }


def _envelope_fields(data: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "step": _as_int(data.get("step"), "step"),
        "time": _as_float(data.get("time"), "time"),
        "rank": _as_int(data.get("rank", 0), "rank"),
        "run_id": str(data.get("run_id", "")),
    }


def _layer_json(record: Measurement | Alert) -> dict[str, Any]:
    return {"module": record.module, "layer": record.layer, "direction": record.direction}


def _layer_fields(data: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "module": _as_str(data.get("module"), "module"),
        "layer": _as_int(data.get("layer"), "layer"),
        "direction": _as_direction(data.get("direction")),
    }


# --- field validation -------------------------------------------------------------------------------


INT_MIN, INT_MAX = -(2**63), 2**63 - 1
"""Integers in a run log are 64-bit (what gradwatch writes and what every consumer can store)."""
FLOAT_INT_MAX = 2**1024 - 2**970 - 1
"""An integer whose magnitude is at most this converts to a finite float (larger ones overflow)."""


def _describe(value: Any, limit: int = 60) -> str:
    """A short, printable description of a log-supplied value for a message (never a 4,000-digit repr)."""
    if isinstance(value, int) and not isinstance(value, bool) and not INT_MIN <= value <= INT_MAX:
        digits = math.floor(math.log10(abs(value))) + 1  # str() of a huge int may raise or take seconds
        return f"an integer of {digits} digits"
    return f"{value!r:.{limit}}"


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RecordError(f"'{name}' must be an integer, got {_describe(value)}")
    if not INT_MIN <= value <= INT_MAX:
        raise RecordError(f"'{name}' must be a 64-bit integer (-2**63 to 2**63-1), got {_describe(value)}")
    return value


def _as_optional_int(value: Any, name: str) -> int | None:
    return None if value is None else _as_int(value, name)


def _as_float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecordError(f"'{name}' must be a number, got {_describe(value)}")
    if type(value) is not float and not -FLOAT_INT_MAX <= value <= FLOAT_INT_MAX:
        raise RecordError(
            f"'{name}' must be a number within the range of a double (about ±1.8e308), got {_describe(value)}"
        )
    return float(value)


def _as_optional_float(value: Any, name: str) -> float | None:
    return None if value is None else _as_float(value, name)


def _as_str(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise RecordError(f"'{name}' must be a string, got {_describe(value)}")
    return value


def _as_direction(value: Any) -> Direction:
    if value not in DIRECTIONS:
        raise RecordError(f"'direction' must be 'forward' or 'reverse', got {_describe(value)}")
    return value


# --- fast path for the bulk of a run log -------------------------------------------------------------

# The scalar fields of MeasurementMetrics by kind (grad_nonfinite, never null, is read on its own).
_FAST_FLOAT_FIELDS = fields_of_kind("float")
_FAST_INT_FIELDS = tuple(name for name in _INT_FIELDS if name != "grad_nonfinite")
_FAST_METRIC_KEYS = frozenset((*_FAST_FLOAT_FIELDS, *_FAST_INT_FIELDS, *_MAPPING_FIELDS, "grad_nonfinite"))
_MEASUREMENT_KEYS = frozenset(
    ("kind", "run_id", "step", "time", "rank", "module", "layer", "direction", "metrics")
)


def _fast_float_map(value: Any) -> dict[str, float | None] | None:
    """A ``{name: number | null}`` object as floats, or None when anything is unusual (slow path decides)."""
    if type(value) is not dict:
        return None
    out: dict[str, float | None] = {}
    for key, number in value.items():
        kind = type(number)
        if kind is float or number is None:
            out[key] = number
        elif kind is int and -FLOAT_INT_MAX <= number <= FLOAT_INT_MAX:
            out[key] = float(number)
        else:
            return None
    return out


def fast_measurement_from_json(data: dict[str, Any]) -> Measurement | None:
    """The :class:`Measurement` of a decoded measurement line, built without the generic validation.

    Exactly what ``Measurement.from_json`` returns for the common shape (every field of the expected
    JSON type, no histogram); ``None`` for anything else, which the caller then gives to
    :func:`record_from_json` so that unusual and malformed lines get the same result and messages.
    Used by the report, where building records is most of the time per line.
    """
    metrics_json = data.get("metrics")
    if type(metrics_json) is not dict or not _MEASUREMENT_KEYS.issuperset(data):
        return None
    if not _FAST_METRIC_KEYS.issuperset(metrics_json):
        return None  # a histogram, or keys the slow path ignores: let it decide
    step, time, rank, module, layer = (
        data.get("step"),
        data.get("time"),
        data.get("rank", 0),
        data.get("module"),
        data.get("layer"),
    )
    run_id = data.get("run_id", "")
    if (
        type(step) is not int
        or type(rank) is not int
        or type(layer) is not int
        or not (INT_MIN <= step <= INT_MAX and INT_MIN <= rank <= INT_MAX and INT_MIN <= layer <= INT_MAX)
        or type(module) is not str
        or type(run_id) is not str
        or data.get("direction") not in DIRECTIONS
    ):
        return None
    time_kind = type(time)
    if time_kind is int and -FLOAT_INT_MAX <= cast(int, time) <= FLOAT_INT_MAX:
        time = float(cast(int, time))
    elif time_kind is not float:
        return None
    fields: dict[str, Any] = {}
    get = metrics_json.get
    for name in _FAST_FLOAT_FIELDS:
        value = get(name)
        kind = type(value)
        if kind is int and -FLOAT_INT_MAX <= cast(int, value) <= FLOAT_INT_MAX:
            value = float(cast(int, value))
        elif kind is not float and value is not None:
            return None
        fields[name] = value
    for name in _FAST_INT_FIELDS:
        value = get(name)
        if value is not None and (type(value) is not int or not INT_MIN <= value <= INT_MAX):
            return None
        fields[name] = value
    nonfinite = get("grad_nonfinite")
    if nonfinite is None:
        nonfinite = 0
    elif type(nonfinite) is not int or not INT_MIN <= nonfinite <= INT_MAX:
        return None
    fields["grad_nonfinite"] = nonfinite
    for name in _MAPPING_FIELDS:
        if name in metrics_json:
            mapping = _fast_float_map(metrics_json[name])
            if mapping is None:
                return None
            fields[name] = mapping
        else:
            fields[name] = {}
    fields["jacobian_sigma_max_histogram"] = None
    return checked_measurement(
        fields, step, cast(float, time), module, layer, data["direction"], rank, run_id
    )


def checked_measurement(
    metric_fields: dict[str, Any],
    step: int,
    time: float,
    module: str,
    layer: int,
    direction: Direction,
    rank: int,
    run_id: str,
) -> Measurement:
    """A :class:`Measurement` from values whose types the caller already checked (every metric field).

    Frozen dataclasses: the instance dicts are filled directly, without the generic validation; the bulk
    readers of the report (:func:`fast_measurement_from_json`, the msgspec measurement lines) use it.
    """
    metrics = object.__new__(MeasurementMetrics)
    metrics.__dict__.update(metric_fields)
    measurement = object.__new__(Measurement)
    measurement.__dict__.update(
        step=step,
        time=time,
        module=module,
        layer=layer,
        direction=direction,
        metrics=metrics,
        rank=rank,
        run_id=run_id,
    )
    return measurement

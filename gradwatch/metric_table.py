"""The one table of metrics: every field of a measurement with what it means and where it shows.

The record (:class:`gradwatch.records.MeasurementMetrics`, one field per row), the
Prometheus families and their help texts, the report's metric columns and chart reference lines, the
run log's fast parser and the estimators' host-copy packing are all built from :data:`METRIC_TABLE`, so a
new metric is one row here plus its field on the record (tests/test_metric_table.py checks the two agree).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["float", "int", "mapping", "histogram"]
Scale = Literal["log", "linear"]
Source = Literal["estimate", "derived", "gradients"]
Combine = Literal["mean", "min", "max", "sum", "largest", "drop"]


@dataclass(frozen=True)
class Metric:
    """One field of a measurement and how every consumer reads it."""

    field: str
    kind: Kind
    help: str
    """What it measures, in one sentence (the Prometheus HELP text)."""
    source: Source = "estimate"
    """``estimate``: a 0-d tensor of the same name on the layer estimate, copied to the host as is;
    ``derived``: computed from per-sequence tensors (a median, a count) or a histogram; ``gradients``: from
    the gradients the monitor measured, not from the estimators."""
    prometheus: str | None = None
    """The Prometheus family (without the ``gradwatch_`` prefix); None: not exported to Prometheus."""
    stat: str | None = None
    """For rows sharing one family (the sigma_max(J_t) summaries): the value of its ``stat`` label."""
    key_label: str | None = None
    """For mappings: the label that names the key (``lag``, ``param``)."""
    report_label: str | None = None
    """The report's column label; None: the report does not show this metric."""
    scale: Scale = "linear"
    """The report trends norms on a log scale (their growth is exponential in the lecture's picture);
    quantities that can be zero or negative (exponents, fractions) on a linear one."""
    neutral: float | None = None
    """Where gradients neither grow nor shrink (a norm of 1, an exponent of 0): the charts' reference line."""
    combine: Combine = "mean"
    """How the global view (rank -1) combines the ranks' values: ``mean`` over the ranks that have one,
    ``min``/``max`` of them, ``sum`` of counts, ``largest`` present count, or ``drop`` (no common form)."""


_SIGMA_HELP = (
    "Spectral norm of the step Jacobians J_t = ds_t/ds_{t-1} over the measured steps "
    "(stat: mean, min, max, p95)."
)

# In the order the report shows them.
METRIC_TABLE: tuple[Metric, ...] = (
    Metric("jacobian_sigma_max_mean", "float", _SIGMA_HELP, prometheus="jacobian_sigma_max", stat="mean",
           report_label="mean σmax(J_t)", scale="log", neutral=1.0),
    Metric("jacobian_sigma_max_min", "float", _SIGMA_HELP, prometheus="jacobian_sigma_max", stat="min",
           combine="min"),
    Metric("jacobian_sigma_max_max", "float", _SIGMA_HELP, prometheus="jacobian_sigma_max", stat="max",
           combine="max"),
    Metric("jacobian_sigma_max_p95", "float", _SIGMA_HELP, prometheus="jacobian_sigma_max", stat="p95",
           report_label="p95 σmax(J_t)", scale="log", neutral=1.0),
    Metric("jacobian_frac_above_one", "float",
           "Share of measured step Jacobians J_t = ds_t/ds_{t-1} with spectral norm above 1.",
           prometheus="jacobian_above_one_ratio", report_label="frac σmax(J_t)>1"),
    Metric("lyapunov_max", "float",
           "Top Lyapunov exponent: mean log growth per time step of the Jacobian product norm "
           "(<0 vanishing).",
           source="derived", prometheus="lyapunov_max", report_label="top Lyapunov exp.", neutral=0.0),
    Metric("lag_norm", "mapping",
           "Median over sequences of the spectral norm of ds_T/ds_{T-lag} (a product of lag Jacobians).",
           source="derived", prometheus="lag_norm", key_label="lag", report_label="lag norm (longest lag)",
           scale="log", neutral=1.0),
    Metric("gradient_reach", "float",
           "Gradient reach: how many steps back the gradient survives, the lag at which "
           "||ds_T/ds_{T-lag}|| first falls below the reach floor (DetectionConfig.vanishing_lag_norm).",
           source="derived", prometheus="gradient_reach_steps", report_label="reach (steps)", combine="min"),
    Metric("horizon", "int",
           "Dependency range in steps the vanishing verdict is judged at: watch(horizon=), else the measured "
           "sequence length (at most the longest measured lag).",
           source="derived", prometheus="horizon_steps", combine="largest"),
    Metric("weight_hh_sigma_max", "float", "Spectral norm (largest singular value) of W_hh.",
           prometheus="weight_hh_sigma_max", report_label="σmax(W_hh)", scale="log", neutral=1.0,
           combine="max"),  # the same W_hh on every rank: its max is that value exactly
    Metric("activation_derivative_mean", "float",
           "Mean derivative of the recurrent nonlinearity over the measured steps.",
           prometheus="activation_derivative_mean", report_label="mean f'(a)", scale="log"),
    Metric("activation_saturation_ratio", "float",
           "Share of hidden units whose nonlinearity is saturated (derivative near 0).",
           prometheus="activation_saturation_ratio", report_label="saturation ratio"),
    Metric("grad_norm", "mapping", "L2 norm of the gradient of one parameter at the measured step.",
           source="gradients", prometheus="grad_norm", key_label="param",
           report_label="gradient norm (total)", scale="log"),
    Metric("grad_nonfinite", "int",
           "Number of non-finite (NaN/Inf) gradient values of this layer at the measured step.",
           source="gradients", prometheus="grad_nonfinite", combine="sum"),
    Metric("gate_mean", "float", "Mean gate activation (forget gate for LSTM, update gate for GRU).",
           prometheus="gate_mean", report_label="mean gate (f / z)"),
    Metric("jacobian_converged_ratio", "float",
           "Share of the sigma_max(J_t) estimates (Lanczos or power iteration) that met rtol "
           "within max_iter.",
           prometheus="jacobian_converged_ratio"),
    Metric("jacobian_iterations", "int",
           "Iterations (Lanczos steps or power iterations) the Jacobian spectral norms took.",
           source="derived", prometheus="jacobian_iterations", combine="largest"),
    Metric("sequences", "int", "Sequences of the batch used for this measurement.", source="derived",
           prometheus="measured_sequences", combine="sum"),
    Metric("time_steps", "int", "Time steps of the sequences used for this measurement.", source="derived",
           prometheus="measured_time_steps", combine="largest"),
    Metric("step_sample", "int",
           "(t, sequence) pairs whose sigma_max(J_t) was estimated (the economy estimator's stratified "
           "sample, or every real pair with estimator='full').", source="derived",
           prometheus="step_sample_pairs", combine="sum"),
    Metric("lag_sequences", "int",
           "Sequences whose lag products and Lyapunov exponent were estimated (economy: the longest).",
           source="derived", prometheus="lag_sequences", combine="sum"),
    Metric("jacobian_sigma_max_histogram", "histogram",
           "Distribution of sigma_max(J_t) over the measured (t, sequence) pairs.", source="derived",
           combine="drop"),  # each rank's buckets span its own min..max: no common bucket edges
    # The top-k Lyapunov spectrum (issue #33): only with EstimatorSettings(lyapunov_spectrum=k), k >= 1.
    Metric("lyapunov_spectrum", "mapping",
           "Top-k Lyapunov exponents log sigma_i(P) / T of the whole Jacobian product P, median over "
           "sequences (index 1 is the largest).",
           source="derived", prometheus="lyapunov_spectrum", key_label="index",
           report_label="k-th Lyapunov exp."),
    Metric("lyapunov_log10_condition", "float",
           "log10 of sigma_1 / sigma_k of the whole Jacobian product, T (lambda_1 - lambda_k) / ln 10, "
           "median over sequences.",
           source="derived", prometheus="lyapunov_log10_condition", report_label="log10 cond. top-k"),
)  # fmt: skip

METRICS_BY_FIELD: dict[str, Metric] = {metric.field: metric for metric in METRIC_TABLE}


def fields_of_kind(kind: Kind) -> tuple[str, ...]:
    """The fields of ``kind`` in table order (the run log's fast parser validates each kind its own way)."""
    return tuple(metric.field for metric in METRIC_TABLE if metric.kind == kind)


def estimated_scalars() -> tuple[str, ...]:
    """The float fields the layer estimate holds as 0-d tensors of the same name, copied to the host as is."""
    return tuple(m.field for m in METRIC_TABLE if m.kind == "float" and m.source == "estimate")


def layer_gauges() -> tuple[Metric, ...]:
    """The scalars exported as one per-layer Prometheus gauge each (no ``stat`` or key label)."""
    return tuple(m for m in METRIC_TABLE if m.prometheus and m.kind in ("float", "int") and m.stat is None)


def jacobian_stats() -> tuple[tuple[str, str], ...]:
    """(``stat`` label value, field) of the rows that share the sigma_max(J_t) family."""
    return tuple((m.stat, m.field) for m in METRIC_TABLE if m.stat is not None)


def reference_lines() -> dict[str, float]:
    """Field -> the value where gradients neither grow nor shrink, for the metrics that have one."""
    return {m.field: m.neutral for m in METRIC_TABLE if m.neutral is not None}

"""Pre-flight diagnosis: one measurement of a freshly built model, judged by the same rules as training.

``gradwatch.diagnose(model, example_input)`` lets a user compare initialisations and sequence lengths before
spending compute: it runs one forward pass (no backward, no optimizer), measures every recurrent layer and
returns a verdict per layer with the alert message the monitor would give.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text
from torch import nn

from gradwatch.capture.modules import NO_RNN_MESSAGE, find_rnn_modules
from gradwatch.distributed import distributed_rank
from gradwatch.estimators.layer import EstimatorSettings, estimator_settings
from gradwatch.faults import FaultPolicy
from gradwatch.measure import MeasurementPipeline
from gradwatch.monitor import WatchConfig, new_run_id
from gradwatch.policy.config import DetectionConfig
from gradwatch.policy.evidence import longest_lag_norm
from gradwatch.policy.judge import Verdict
from gradwatch.policy.trends import TrendDetector, classify_jacobian_products
from gradwatch.records import Alert, Measurement, MeasurementMetrics


@dataclass(frozen=True)
class LayerDiagnosis:
    """The verdict on one layer and direction, with the evidence and advice."""

    module: str
    layer: int
    direction: str
    verdict: Verdict
    message: str
    metrics: MeasurementMetrics


@dataclass(frozen=True)
class Diagnosis:
    """Verdicts for every recurrent layer of a model."""

    layers: tuple[LayerDiagnosis, ...]

    @property
    def healthy(self) -> bool:
        """Every layer healthy (an unknown one is not)."""
        return all(d.verdict is Verdict.HEALTHY for d in self.layers)

    def verdict(self, module: str, layer: int = 0, direction: str = "forward") -> Verdict:
        for d in self.layers:
            if (d.module, d.layer, d.direction) == (module, layer, direction):
                return d.verdict
        raise KeyError(f"no diagnosis for {module} layer {layer} ({direction}); have {self._keys()}")

    def _keys(self) -> list[str]:
        return [f"{d.module}[{d.layer},{d.direction}]" for d in self.layers]

    def table(self) -> Table:
        table = Table(title="gradwatch pre-flight diagnosis", show_lines=True)
        for column in (
            "layer",
            "verdict",
            "reach / horizon",
            "lyapunov_max",
            "longest lag norm",
            "sigma_max(W_hh)",
            "mean |f'|",
        ):
            table.add_column(column)
        table.add_column("why / what to do", ratio=1)
        for d in self.layers:
            m = d.metrics
            lag = longest_lag_norm(m.lag_norm)
            colour = {"healthy": "green", "vanishing": "yellow", "exploding": "red"}.get(d.verdict.value, "")
            table.add_row(  # Text cells: a message's "[sigma_max(W_hh) = ...]" is shown, not read as markup
                Text(f"{d.module} {d.layer} {d.direction}"),
                Text(d.verdict.value, style=colour),
                Text(f"{_fmt(m.gradient_reach)} / {m.horizon if m.horizon is not None else 'n/a'} steps"),
                _fmt(m.lyapunov_max),
                "n/a" if lag is None else f"{_fmt(lag[1])} (tau={lag[0]})",
                _fmt(m.weight_hh_sigma_max),
                _fmt(m.activation_derivative_mean),
                Text(d.message, overflow="fold"),  # a long word (a torch call) folds, never cut
            )
        return table

    def __str__(self) -> str:
        console = Console(width=140, no_color=True, record=True, file=io.StringIO())
        console.print(self.table())
        return console.export_text()


def diagnose(
    model: nn.Module,
    example_input: Any,
    *,
    max_sequences: int = 8,
    detection: DetectionConfig | None = None,
    estimator: EstimatorSettings | str | None = None,
    print_report: bool = True,
    console: Console | None = None,
    horizon: int | None = None,
) -> Diagnosis:
    """Measure every recurrent layer of ``model`` on ``example_input`` once and judge it.

    ``example_input`` is what the model's forward takes: a tensor, or a tuple of positional arguments.
    ``horizon``: the dependency range of the task in steps, where vanishing is judged (as in
    ``watch(horizon=)``); default the sequence length of ``example_input``. The model's parameters,
    gradients and the global random state are left exactly as they were.
    """
    modules = find_rnn_modules(model)
    if not modules:
        raise ValueError(NO_RNN_MESSAGE)
    config = WatchConfig(
        every=1,
        max_sequences=max_sequences,
        probe="live",
        history_size=0,
        horizon=horizon,
        estimator=estimator_settings("full" if estimator is None else estimator),
        detection=detection or DetectionConfig.for_diagnosis(),
    )
    rank, _ = distributed_rank()
    run_id = new_run_id()
    faults = FaultPolicy(strict=False, rank=rank, run_id=run_id, current_step=lambda: 0)
    pipeline = MeasurementPipeline(
        modules,
        faults,
        probe=config.probe,
        max_sequences=config.max_sequences,
        seed=config.seed,
        estimator=config.estimator,
        horizon=config.horizon,
        reach_floor=config.detection.vanishing_lag_norm,
    )
    detector = TrendDetector(config.detection)
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    measurements: list[Measurement] = []
    alerts: list[Alert] = []
    with pipeline.capturing(owner="gradwatch.diagnose"):
        with _invisible(model), torch.enable_grad():
            model(*args)
            result = pipeline.measure(0, rank=rank, run_id=run_id)
        for module, exc in result.faults:
            faults.fault("estimator", module, exc, step=0)
        for measurement in result.records:
            measurements.append(measurement)
            alerts += detector.update(measurement)
    if not measurements:
        raise RuntimeError(
            "gradwatch.diagnose: the model's forward did not run any recurrent module with this input "
            f"(watched: {[m.name for m in modules]})"
        )
    by_key = {(a.module, a.layer, a.direction): a for a in alerts}
    needed = config.detection.measurements_needed
    gated = {w.name for w in modules if w.cell_kind in ("lstm", "gru")}
    layers = []
    for m in measurements:
        key = (m.module, m.layer, m.direction)
        judgement = detector.judgement(m.module, m.layer, m.direction)
        verdict = judgement.verdict
        alert = by_key.get(key)
        if alert is not None:
            message = alert.message
            if needed > 1:  # the rule wants more readings: only an extreme one decides at once
                message = f"decided on one measurement, an extreme case that needs no patience: {message}"
        elif verdict is Verdict.UNKNOWN and not _unmeasurable(m.metrics):
            counts = detector.reading_counts(*key)
            if counts.judged + counts.in_warmup == 0:  # the reading itself could not be judged
                text = _reading_text(m, config.detection)
                message = f"unknown: {judgement.reason}. {text[:1].upper()}{text[1:]}"
            else:
                message = (
                    f"unknown: {judgement.reason} (DetectionConfig: patience, vanishing_patience, "
                    "vanishing_warmup_steps); only an extreme reading decides on one. This one: "
                    f"{_reading_text(m, config.detection)}"
                )
        else:
            message = _healthy_message(m.metrics, verdict)
        if verdict is Verdict.VANISHING and m.module in gated:
            message += f" {GATED_NOTE}"
        layers.append(LayerDiagnosis(m.module, m.layer, m.direction, verdict, message, m.metrics))
    diagnosis = Diagnosis(tuple(layers))
    if print_report:
        (console or Console()).print(diagnosis.table())
    return diagnosis


GATED_NOTE = (
    "Note: this is the fresh model. Gated cells (LSTM, GRU) often lengthen their reach while they learn; "
    "watch it during training (gradwatch.watch reports the reach and says 'recovered' once it covers the "
    "horizon)."
)


def _unmeasurable(metrics: MeasurementMetrics) -> bool:
    return metrics.lyapunov_max is None or longest_lag_norm(metrics.lag_norm) is None


def _reading_text(measurement: Measurement, detection: DetectionConfig) -> str:
    """What one reading says on its own (its raw verdict), for an ``unknown`` layer it did not decide."""
    metrics = measurement.metrics
    raw = classify_jacobian_products(measurement, detection).verdict
    if raw is Verdict.HEALTHY:
        return _healthy_message(metrics, raw).partition(": ")[2]
    if raw is Verdict.VANISHING:
        return (
            f"the gradient reaches back about {_fmt(metrics.gradient_reach)} of the {metrics.horizon} steps "
            "of the horizon (short of it: a vanishing reading)"
        )
    if raw is Verdict.EXPLODING:
        longest = longest_lag_norm(metrics.lag_norm)
        norm = None if longest is None else longest[1]
        return (
            f"the Jacobian product grows (lyapunov_max = {_fmt(metrics.lyapunov_max)} > "
            f"{detection.exploding_growth_rate:g}, longest lag norm {_fmt(norm)} > "
            f"{detection.exploding_lag_norm:g}), below the extreme bound "
            f"{detection.exploding_extreme_lag_norm:g}"
        )
    return (
        f"the gradient reach could not be measured at the horizon of {metrics.horizon} steps: a lag norm "
        "before it is missing, NaN or overflowed, or the product drops to 0 between the measured lags "
        "around it"
    )


def _healthy_message(metrics: MeasurementMetrics, verdict: Verdict) -> str:
    if verdict is Verdict.UNKNOWN:
        return "not measurable: the sequence is too short for any product of Jacobians (use T >= 2)"
    return (
        f"healthy: the gradient reaches back {_fmt(metrics.gradient_reach)} steps, the whole horizon of "
        f"{metrics.horizon} steps, and the Jacobian product does not explode "
        f"(lyapunov_max = {_fmt(metrics.lyapunov_max)})"
    )


@contextlib.contextmanager
def _invisible(model: nn.Module) -> Iterator[None]:
    """Keep the user's random stream and gradients untouched by the diagnostic forward pass."""
    grads = {p: p.grad for p in model.parameters()}
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            for p, g in grads.items():
                p.grad = g


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.3g}"

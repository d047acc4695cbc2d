"""Realistic run logs for the report tests, built from gradwatch.records types (never hand-typed JSON).

``make_run(kind)`` simulates what a watched RNN writes over training: a run header, measurements every
``every`` steps whose metrics drift the way the lecture describes for each failure, the detectors' alerts
where a threshold is crossed, and clip events once gradients grow. Fixtures: tests/report_fixtures.py.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Literal

import pytest

from gradwatch.records import (
    Alert,
    AlertKind,
    ClipEvent,
    ErrorRecord,
    Measurement,
    MeasurementMetrics,
    Record,
    RunHeader,
)
from gradwatch.report import command
from gradwatch.sinks.jsonl import JsonlSink

RunKind = Literal["healthy", "vanishing", "exploding", "nonfinite", "recovered"]
RUN_KINDS: tuple[RunKind, ...] = ("healthy", "vanishing", "exploding", "nonfinite", "recovered")

ONSET = 0.4
"""Fraction of training after which a failing run starts to drift."""
CLIP_MAX_NORM = 5.0
EXPLODING_THRESHOLD = 0.05
VANISHING_THRESHOLD = -0.7


def _mix(start: float, end: float, progress: float, *, log: bool = False) -> float:
    """Interpolate start -> end (geometrically when ``log``) at ``progress`` in [0, 1]."""
    if log:
        return math.exp(math.log(start) + (math.log(end) - math.log(start)) * progress)
    return start + (end - start) * progress


def _metrics(kind: RunKind, progress: float, noise: random.Random, nonfinite: bool) -> MeasurementMetrics:
    """Metrics of one layer ``progress`` (0 healthy .. 1 fully failed) into its failure."""
    jitter = 1.0 + 0.02 * (noise.random() - 0.5)
    p = progress
    if kind == "vanishing":
        sigma, lyapunov, lag32 = _mix(0.95, 0.2, p), _mix(-0.05, -1.5, p), _mix(0.2, 1e-8, p, log=True)
        weight, derivative, saturation, grad = _mix(1.0, 0.5, p), _mix(0.65, 0.1, p), _mix(0.05, 0.8, p), 0.5
    elif kind in ("exploding", "nonfinite", "recovered"):
        sigma, lyapunov, lag32 = _mix(0.95, 3.0, p), _mix(-0.05, 0.6, p), _mix(0.2, 1e6, p, log=True)
        weight, derivative, saturation = _mix(1.0, 2.5, p), _mix(0.65, 0.85, p), 0.05
        grad = _mix(0.5, 500.0, p, log=True)
    else:
        sigma, lyapunov, lag32, weight, derivative, saturation, grad = 0.95, -0.05, 0.2, 1.0, 0.65, 0.05, 0.5
    grads: dict[str, float | None] = {
        "weight_hh_l0": grad * 0.8 * jitter,
        "weight_ih_l0": grad * 0.6 * jitter,
        "bias_hh_l0": grad * 0.1,
    }
    if nonfinite:
        grads["weight_hh_l0"] = math.nan
    return MeasurementMetrics(
        jacobian_sigma_max_mean=sigma * jitter,
        jacobian_sigma_max_min=sigma * 0.6,
        jacobian_sigma_max_max=sigma * 1.3,
        jacobian_sigma_max_p95=sigma * 1.2 * jitter,
        jacobian_frac_above_one=min(1.0, max(0.0, (sigma - 0.7) / 1.5)),
        weight_hh_sigma_max=weight * jitter,
        activation_derivative_mean=derivative,
        activation_saturation_ratio=saturation,
        lyapunov_max=math.inf if nonfinite else lyapunov * jitter,
        lag_norm={"1": sigma, "8": sigma**8, "32": lag32},
        grad_norm=grads,
        grad_nonfinite=1 if nonfinite else 0,
        sequences=8,
        time_steps=64,
    )


def make_run(
    kind: RunKind,
    *,
    run_id: str | None = None,
    rank: int = 0,
    world_size: int = 1,
    measurements: int = 20,
    every: int = 50,
    module: str = "encoder.rnn",
    module_type: str = "RNN",
    with_alerts: bool = True,
    seed: int = 0,
    first_step: int = 0,
) -> list[Record]:
    """The records one rank of a ``kind`` run writes, in log order, at steps ``first_step`` + k ``every``."""
    run_id = run_id or f"run-{kind}"
    noise = random.Random(seed * 1000 + rank)
    records: list[Record] = [
        RunHeader(
            run_id=run_id,
            started=1_700_000_000.0,
            gradwatch="0.1.0",
            torch="2.13.0",
            config={"every": every, "lags": [1, 8, 32]},
            modules=({"name": module, "type": module_type, "layers": 1, "bidirectional": False},),
            rank=rank,
            world_size=world_size,
        )
    ]
    open_alert: AlertKind | None = None
    for index in range(measurements):
        step = first_step + index * every
        time = 1_700_000_000.0 + step
        fraction = index / max(1, measurements - 1)
        progress = max(0.0, (fraction - ONSET) / (1 - ONSET)) if kind != "healthy" else 0.0
        if kind == "recovered" and fraction > 0.7:
            progress = 0.0
        nonfinite = kind == "nonfinite" and index >= measurements - 3
        metrics = _metrics(kind, progress, noise, nonfinite)
        records.append(Measurement(step, time, module, 0, "forward", metrics, rank=rank, run_id=run_id))
        grad = math.sqrt(sum(v * v for v in metrics.grad_norm.values() if v is not None and math.isfinite(v)))
        if grad > CLIP_MAX_NORM:
            records.append(
                ClipEvent(step, time, grad, CLIP_MAX_NORM, CLIP_MAX_NORM / grad, rank=rank, run_id=run_id)
            )
        if not with_alerts:
            continue
        lyapunov = metrics.lyapunov_max
        new_alert: AlertKind | None = None
        if nonfinite:
            new_alert = AlertKind.NONFINITE
        elif lyapunov is not None and lyapunov > EXPLODING_THRESHOLD:
            new_alert = AlertKind.EXPLODING
        elif lyapunov is not None and lyapunov < VANISHING_THRESHOLD:
            new_alert = AlertKind.VANISHING
        elif open_alert is not None:
            new_alert = AlertKind.RECOVERED
        if new_alert is not None and new_alert != open_alert:
            threshold = {AlertKind.EXPLODING: EXPLODING_THRESHOLD, AlertKind.VANISHING: VANISHING_THRESHOLD}
            records.append(
                Alert(
                    step,
                    time,
                    module,
                    0,
                    "forward",
                    new_alert,
                    "lyapunov_max",
                    lyapunov,
                    threshold.get(new_alert),
                    f"{new_alert.value}: lyapunov_max = {lyapunov}",
                    rank=rank,
                    run_id=run_id,
                )
            )
            open_alert = None if new_alert == AlertKind.RECOVERED else new_alert
    if kind == "nonfinite":
        last = records[-1]
        records.append(
            ErrorRecord(last.step, 0.0, "estimator:lyapunov", "non-finite state", module, rank, run_id)
        )
    return records


def write_log(path: Path, records: list[Record], *, crash_mid_line: bool = False) -> Path:
    """Write ``records`` through the real JSONL sink; ``crash_mid_line`` appends half of one more line."""
    sink = JsonlSink(path, fsync="never")
    for record in records:
        sink.write(record)
    sink.close()
    if crash_mid_line:
        whole = json.dumps(records[-1].to_json())
        with open(path, "ab") as handle:
            handle.write(whole[: len(whole) // 2].encode())
    return path


def spy_on_parallel_reports(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Let files of any size take the worker processes, and record whether each report took them."""
    used: list[bool] = []
    real = command._summarize_in_parallel

    def spy(*args: object) -> object:
        result = real(*args)  # type: ignore[arg-type]
        used.append(result is not None)
        return result

    monkeypatch.setattr(command, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(command, "_summarize_in_parallel", spy)
    return used

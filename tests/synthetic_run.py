"""A realistic short run log, built from gradwatch.records, to drive sinks without a monitor.

A 2-layer bidirectional LSTM ``encoder.rnn`` trained for 20 steps and measured every 5: layer 0 forward
drifts towards vanishing (Lyapunov exponent falling), layer 1 reverse explodes at step 15 and recovers at
step 20 after two clipped steps. Some values are ``None`` (a lag longer than the sequences measured at the
first step), as the real estimators report them.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from gradwatch.records import (
    Alert,
    AlertKind,
    ClipEvent,
    Direction,
    ErrorRecord,
    Measurement,
    MeasurementMetrics,
    Record,
    RunHeader,
)

MODULE = "encoder.rnn"
LAYERS = (0, 1)
DIRECTIONS: tuple[Direction, ...] = ("forward", "reverse")
LAGS = (1, 5, 10)
MEASURE_EVERY = 5
STEPS = 20
START_TIME = 1_700_000_000.0


@dataclass(frozen=True)
class SyntheticRun:
    """The records of one run, in the order a monitor would write them, and the step of each."""

    run_id: str
    rank: int
    records: tuple[Record, ...]

    @property
    def measurements(self) -> tuple[Measurement, ...]:
        return tuple(r for r in self.records if isinstance(r, Measurement))

    def latest_measurements(self) -> dict[tuple[str, int, str], Measurement]:
        """The last measurement of each (module, layer, direction): what a scrape shows at the end."""
        latest: dict[tuple[str, int, str], Measurement] = {}
        for record in self.measurements:
            latest[(record.module, record.layer, record.direction)] = record
        return latest


def _grad_param_names(layer: int, direction: Direction) -> tuple[str, ...]:
    suffix = f"_l{layer}" + ("_reverse" if direction == "reverse" else "")
    return tuple(name + suffix for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))


def _metrics(step: int, layer: int, direction: Direction, rng: random.Random) -> MeasurementMetrics:
    """Plausible values: layer 0 forward contracts over time, layer 1 reverse expands at step 15."""
    exploding = layer == 1 and direction == "reverse" and step == 15
    lyapunov = 0.12 if exploding else -0.02 - 0.01 * step * (layer == 0 and direction == "forward")
    sigma_mean = math.exp(lyapunov) * (1.0 + 0.05 * rng.random())
    time_steps = 6 if step == 0 else 12
    lag_norm: dict[str, float | None] = {
        str(lag): (math.exp(lyapunov * lag) if lag < time_steps else None) for lag in LAGS
    }
    grad_scale = 40.0 if exploding else 0.5
    return MeasurementMetrics(
        jacobian_sigma_max_mean=sigma_mean,
        jacobian_sigma_max_min=sigma_mean * 0.8,
        jacobian_sigma_max_max=sigma_mean * 1.3,
        jacobian_sigma_max_p95=sigma_mean * 1.2,
        jacobian_frac_above_one=0.6 if exploding else round(0.1 + 0.1 * rng.random(), 3),
        weight_hh_sigma_max=1.4 + 0.01 * step + 0.1 * layer,
        activation_derivative_mean=0.55 - 0.01 * step * (layer == 0),
        activation_saturation_ratio=0.02 + 0.005 * step,
        lyapunov_max=None if step == 0 else lyapunov,
        lag_norm=lag_norm,
        grad_norm={name: grad_scale * (1 + rng.random()) for name in _grad_param_names(layer, direction)},
        grad_nonfinite=0,
        gate_mean=0.7 - 0.01 * layer,
        jacobian_converged_ratio=1.0 if step else 0.875,
        jacobian_iterations=20,
        sequences=8,
        time_steps=time_steps,
    )


def synthetic_run(run_id: str = "run-a", rank: int = 0, seed: int = 0) -> SyntheticRun:
    """Header, measurements for every layer and direction every 5 steps, alerts, clips and one error."""
    rng = random.Random(seed)
    records: list[Record] = [
        RunHeader(
            run_id=run_id,
            started=START_TIME,
            gradwatch="0.1.0",
            torch="2.13.0",
            config={"every": MEASURE_EVERY, "lags": list(LAGS)},
            modules=({"name": MODULE, "type": "LSTM", "num_layers": 2, "bidirectional": True},),
            rank=rank,
        )
    ]
    for step in range(0, STEPS + 1, MEASURE_EVERY):
        now = START_TIME + 10.0 * step
        for layer in LAYERS:
            for direction in DIRECTIONS:
                metrics = _metrics(step, layer, direction, rng)
                records.append(Measurement(step, now, MODULE, layer, direction, metrics, rank, run_id))
        if step == 10:
            records.append(
                Alert(step, now, MODULE, 0, "forward", AlertKind.VANISHING, "lyapunov_max", -0.12, -0.1,
                      "lag norm shrinks by 0.89x per step", rank, run_id)
            )  # fmt: skip
        if step == 15:
            records.append(
                Alert(step, now, MODULE, 1, "reverse", AlertKind.EXPLODING, "lyapunov_max", 0.12, 0.05,
                      "lag norm grows by 1.13x per step", rank, run_id)
            )  # fmt: skip
            records.append(ClipEvent(step, now + 0.5, 163.0, 5.0, 5.0 / 163.0, rank, run_id))
            records.append(ClipEvent(step + 1, now + 1.0, 41.0, 5.0, 5.0 / 41.0, rank, run_id))
            records.append(
                ErrorRecord(step, now, "estimator:lag_norm", "did not converge", MODULE, rank, run_id)
            )
        if step == 20:
            records.append(
                Alert(step, now, MODULE, 1, "reverse", AlertKind.RECOVERED, "lyapunov_max", -0.02, 0.05,
                      "back below threshold", rank, run_id)
            )  # fmt: skip
    return SyntheticRun(run_id=run_id, rank=rank, records=tuple(records))

"""The vanishing rule on recorded measurements of real trainability runs (benchmarks/trainability.py).

Each tests/data/trainability_*.jsonl holds the lag norms, exponents and gradient norms of every measurement
of one run of the adding problem (H = 64, batch 64, Adam 1e-3, clip 1, every=10) and whether and when it
learned (held-out MSE below half the 0.167 baseline). The long runs stay a benchmark; these extracts pin
the rule's behaviour on them: vanishing opens after the warm-up and stays open for the runs that never
learn, and is over before a run has learned.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from gradwatch.estimators.reach import gradient_reach
from gradwatch.policy.config import DetectionConfig
from gradwatch.policy.trends import TrendDetector
from gradwatch.records import Alert, AlertKind, Measurement, MeasurementMetrics

DATA = Path(__file__).parent / "data"


@dataclass(frozen=True)
class RecordedRun:
    name: str
    learned_at: int | None
    diverged_at: int | None
    measurements: tuple[Measurement, ...]


def recorded(name: str) -> RecordedRun:
    lines = (DATA / f"trainability_{name}.jsonl").read_text().splitlines()
    header = json.loads(lines[0])
    measurements = []
    for line in lines[1:]:
        row = json.loads(line)
        metrics = MeasurementMetrics(
            None, None, None, None, None, None, None, None, row["lyapunov_max"], row["lag_norm"],
            {"total": row["grad_total"]},
        )  # fmt: skip
        measurements.append(Measurement(row["step"], float(row["step"]), "rnn", 0, "forward", metrics))
    return RecordedRun(name, header["learned_at"], header["diverged_at"], tuple(measurements))


def replay(run: RecordedRun, config: DetectionConfig | None = None) -> tuple[list[Alert], TrendDetector]:
    detector = TrendDetector(config)
    alerts = [alert for m in run.measurements for alert in detector.update(m)]
    return alerts, detector


def kinds(alerts: list[Alert]) -> list[tuple[AlertKind, int]]:
    return [(a.alert, a.step) for a in alerts]


WARMUP_END = 140  # the warm-up (100 steps) and then 5 measurements of a short reach, every=10


@pytest.mark.parametrize("name", ["tanh_default-T50-s0", "tanh_orth_0.5-T50-s1", "tanh_orth_0.2-T150-s0"])
def test_a_run_that_never_learns_is_vanishing_from_the_warm_up_on_and_stays_so(name: str) -> None:
    run = recorded(name)
    assert run.learned_at is None and run.diverged_at is None
    alerts, detector = replay(run)
    assert kinds(alerts) == [(AlertKind.VANISHING, WARMUP_END)]
    assert detector.verdict("rnn").value == "vanishing"
    horizon = max(int(k) for k in run.measurements[0].metrics.lag_norm) - 1  # T - 1 by default
    assert f"of the {horizon} steps" in alerts[0].message and "cannot be learned now" in alerts[0].message


def test_a_reach_that_touches_the_horizon_now_and_then_is_not_a_recovery() -> None:
    """tanh, W_hh = 0.5 x orthogonal, seed 1: the product at lag 50 spikes above the floor a few times."""
    run = recorded("tanh_orth_0.5-T50-s1")
    config = DetectionConfig()
    reaches = [gradient_reach(m.metrics.lag_norm, config.vanishing_lag_norm) for m in run.measurements]
    touching = [m.step for m, r in zip(run.measurements, reaches, strict=True) if r is not None and r >= 49]
    assert len(touching) >= 3  # it does reach the horizon at times ...
    alerts, _ = replay(run)
    assert kinds(alerts) == [(AlertKind.VANISHING, WARMUP_END)]  # ... and is not "recovered" by that
    # with the exploding side's recovery patience (3) instead it would flap: the longer patience is needed
    flapping, _ = replay(run, replace(config, vanishing_recovery_patience=config.recovery_patience))
    assert AlertKind.RECOVERED in [a.alert for a in flapping]


@pytest.mark.parametrize("name", ["relu_default-T50-s0", "gru_default-T50-s0", "relu_default-T150-s0"])
def test_a_run_that_learns_has_recovered_before_it_learned_and_stays_healthy(name: str) -> None:
    """relu_default-T150-s0 is recorded with lag norms as means over sequences and fresh start vectors
    after a zero product: with the median, or stuck at 0, it stayed vanishing although it learned."""
    run = recorded(name)
    assert run.learned_at is not None
    alerts, detector = replay(run)
    assert kinds(alerts)[0] == (AlertKind.VANISHING, WARMUP_END)  # its reach was short at first: truthfully
    assert alerts[-1].alert is AlertKind.RECOVERED and alerts[-1].step < run.learned_at
    assert detector.verdict("rnn").value == "healthy"
    assert "reach has grown" in alerts[-1].message
    horizon = max(int(k) for k in run.measurements[0].metrics.lag_norm) - 1
    assert alerts[-1].value is not None and alerts[-1].value >= horizon


def test_nothing_is_counted_within_the_warm_up() -> None:
    run = recorded("tanh_default-T50-s0")
    early = replace(run, measurements=tuple(m for m in run.measurements if m.step < 100))
    assert len(early.measurements) == 10
    assert replay(early)[0] == []
    # the same readings count without a warm-up (a pre-flight diagnosis judges the model as it is)
    assert kinds(replay(early, DetectionConfig(vanishing_warmup_steps=0))[0]) == [(AlertKind.VANISHING, 40)]


def test_a_zero_or_tiny_product_is_never_a_recovery() -> None:
    """tanh, W_hh = 0.2 x orthogonal, T = 150: products of 1e-38 down to exactly 0 (float32 underflow)."""
    run = recorded("tanh_orth_0.2-T150-s0")
    at_horizon = [m.metrics.lag_norm["150"] for m in run.measurements]
    assert 0.0 in at_horizon and max(v for v in at_horizon if v is not None) < 1e-20
    alerts, detector = replay(run)
    assert AlertKind.RECOVERED not in [a.alert for a in alerts]
    assert detector.verdict("rnn").value == "vanishing"


def test_an_overflowed_product_never_counts_towards_a_recovery() -> None:
    run = recorded("tanh_default-T50-s0")
    opened = run.measurements[:20]  # vanishing from step 140 on
    overflowed = [
        replace(m, step=200 + 10 * i, metrics=replace(m.metrics, lag_norm={"1": 3.0, "32": 1e30, "50": None}))
        for i, m in enumerate(run.measurements[20:40])
    ]
    alerts, detector = replay(replace(run, measurements=(*opened, *overflowed)))
    assert kinds(alerts) == [(AlertKind.VANISHING, WARMUP_END)]
    assert detector.verdict("rnn").value == "vanishing"


def test_a_diverged_run_is_exploding_and_never_recovered() -> None:
    run = recorded("relu_orth_2.0-T150-s0")
    assert run.diverged_at is not None
    alerts, detector = replay(run)
    assert kinds(alerts) == [(AlertKind.EXPLODING, 0)]
    assert detector.verdict("rnn").value == "exploding"

"""The benchmark training worker and the scaling probe, on tiny models (fast, in-process)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.scaling import Size, time_measurements
from benchmarks.training import LanguageModel, WorkerSettings, run_worker


def tiny(instrument: str, every: int = 1, timed_steps: int = 4) -> WorkerSettings:
    return WorkerSettings(
        kind="gru",
        hidden=8,
        steps=6,
        batch=3,
        vocabulary=11,
        instrument=instrument,
        every=every,
        timed_steps=timed_steps,
        warmup_steps=1,
    )


def test_language_model_shapes_and_bad_kind() -> None:
    model = LanguageModel("lstm", vocabulary=11, hidden=4)
    assert model(torch.zeros(5, 2, dtype=torch.long)).shape == (5, 2, 11)
    with pytest.raises(ValueError, match="kind must be one of"):
        LanguageModel("transformer", vocabulary=11, hidden=4)


def test_bare_worker_times_every_step_and_reports_memory() -> None:
    result = run_worker(tiny("bare"))
    assert len(result.step_seconds) == 4
    assert all(s > 0 for s in result.step_seconds)
    assert result.total_seconds >= sum(result.step_seconds)
    assert result.peak_rss_bytes is None or result.peak_rss_bytes > 0
    assert result.live_tensors > 0
    assert result.detail == {}


@pytest.mark.parametrize(
    ("every", "expected"), [(1, 5), (2, 3), (10**9, 1)], ids=["every1", "every2", "never"]
)
def test_gradwatch_worker_measures_on_its_schedule(every: int, expected: int) -> None:
    # Step 0 (untimed) is always measured; timed steps 1..4 add the multiples of ``every``.
    result = run_worker(tiny("gradwatch", every=every))
    assert result.detail["measurements"] == expected
    assert len(result.step_seconds) == 4


def test_scaling_probe_times_a_cold_and_a_warm_measurement() -> None:
    torch.set_num_threads(1)
    cold, warm = time_measurements("gru", Size(hidden=6, steps=5, batch=2, layers=2), seed=0)
    assert cold > 0 and warm > 0


def test_a_schedule_block_is_one_whole_interval_holding_one_measurement() -> None:
    """The default variant's block: from a measured step to the step before the next measured one."""
    settings = WorkerSettings(
        kind="gru",
        hidden=8,
        steps=6,
        batch=3,
        vocabulary=11,
        instrument="gradwatch",
        every=3,
        timed_steps=1,
        warmup_steps=1,
        measured_intervals=1,
    )
    result = run_worker(settings)
    assert len(result.step_seconds) == 3  # no budget with an explicit every: the interval is every
    # step 0 and the lead-in's warm measurement (step 3), then the block's own (step 6)
    assert result.detail["measurements"] == 3


def test_default_schedule_benchmark_reports_its_measurements() -> None:
    from benchmarks.default_schedule import train

    result = train("gru", hidden=8, steps=3, threads=1, watched=True)
    assert result["measured_steps"][0] == 0
    assert len(result["measurement_seconds"]) == len(result["measured_steps"])
    assert all(seconds > 0 for seconds in result["measurement_seconds"])
    assert train("gru", hidden=8, steps=3, threads=1, watched=False)["measured_steps"] == []


def test_drift_accuracy_matches_exact_products_on_a_small_run() -> None:
    """The benchmark's own exact references agree with the estimators on a tiny real run."""
    from benchmarks.drift_accuracy import capture_run, evaluate, exact_metrics

    torch.set_num_threads(1)
    captured = capture_run("gru", hidden=6, measurements=1, estimator="full")
    assert len(captured) == 2  # the cold step 0 and one warm measurement at step 50
    assert captured[1].warm_start is not None
    result = evaluate(captured[1], exact_metrics(captured[1]))
    assert result["step_p99"] < 0.01
    assert max(result["lag_max_per_lag"]) < 0.05
    assert result["lyapunov_abs"] < 1e-4
    # the economy default: its looser lag tolerance within #32's 10%, lambda within 0.02
    economy = capture_run("gru", hidden=6, measurements=1, estimator="economy")[1]
    result = evaluate(economy, exact_metrics(economy))
    assert result["step_sample"] == 64 < 8 * 64  # a sample of the 8 x 64 pairs
    assert max(result["lag_max_per_lag"]) < 0.10 and result["record_reach"] < 0.10
    assert result["lyapunov_abs"] < 0.02 and result["record_lyapunov"] < 0.02

"""One layer measurement end to end: accuracy target, metrics contract, warm starts, robustness."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from gradwatch.estimators.jacobian import builtin_step_jacobians
from gradwatch.estimators.layer import (
    EstimatorSettings,
    WarmStart,
    estimate_layer,
    estimate_step_norms,
    layer_metrics,
)
from gradwatch.estimators.spectrum import lyapunov_spectrum
from gradwatch.records import MeasurementMetrics
from tests._estimator_cases import (
    CellCase,
    dense_step_jacobians,
    exact_sigma_max,
    random_cell_weights,
    random_sequences,
)

TARGET_CASES = [
    CellCase(kind, hidden, proj_size=proj)
    for hidden in (16, 128)
    for kind, proj in (("rnn_tanh", 0), ("rnn_relu", 0), ("lstm", 0), ("lstm", hidden // 2), ("gru", 0))
]


@pytest.mark.parametrize("seed", [0, 1], ids=["seed0", "seed1"])
@pytest.mark.parametrize("case", TARGET_CASES, ids=[c.case_id for c in TARGET_CASES])
def test_accuracy_target_p99_relative_error_below_one_percent(case: CellCase, seed: int) -> None:
    """Default settings, cold start, float32: p99 over (t, sequence) of the relative error <= 1%.

    8 sequences (the default max_sequences) x 16 steps = 128 pairs, so the 99th percentile is a percentile
    and not the single worst pair: Lanczos, like any Krylov method, can stop on sigma_2 for an operator
    whose start vector barely touches the top singular direction (docs/estimators.md measures how often).
    """
    generator = torch.Generator().manual_seed(seed)
    weights = random_cell_weights(case, generator, dtype=torch.float32)
    steps, batch = 16, 8
    x, s_prev = random_sequences(case, weights, steps=steps, batch=batch, generator=generator)
    exact = exact_sigma_max(dense_step_jacobians(weights.to(torch.float64), x.double(), s_prev.double()))
    jac = builtin_step_jacobians(weights, x, s_prev)
    mask = torch.ones(steps, batch, dtype=torch.bool)
    settings = EstimatorSettings(mode="full", lags=(), lyapunov=False)  # only the step Jacobians matter here
    estimate = estimate_layer(jac, mask, None, settings, generator=generator)
    relative_error = (estimate.jacobian_sigma.double() - exact).abs() / exact
    assert float(torch.quantile(relative_error.flatten(), 0.99)) <= 0.01
    # A lower bound up to float32 rounding.
    assert bool((estimate.jacobian_sigma.double() <= exact * (1 + 1e-4)).all())


def ragged_gru_layer(seed: int = 1):
    case = CellCase("gru", 16)
    generator = torch.Generator().manual_seed(seed)
    weights = random_cell_weights(case, generator)
    x, s_prev = random_sequences(case, weights, steps=10, batch=4, generator=generator)
    mask = torch.ones(10, 4, dtype=torch.bool)
    mask[6:, 1] = False
    mask[2:, 3] = False
    return weights, x, s_prev, mask


def test_metrics_match_exact_summaries_over_real_steps_and_fill_the_record() -> None:
    weights, x, s_prev, mask = ragged_gru_layer()
    jac = builtin_step_jacobians(weights, x, s_prev)
    estimate = estimate_layer(
        jac,
        mask,
        weights.weight_hh,
        EstimatorSettings(mode="full"),
        generator=torch.Generator().manual_seed(2),
    )
    metrics = layer_metrics(estimate)

    # The typed record, every field filled but the gradients (the monitor adds those).
    assert isinstance(metrics, MeasurementMetrics)
    assert metrics.grad_norm == {} and metrics.grad_nonfinite == 0
    unset = {f.name for f in dataclasses.fields(MeasurementMetrics) if getattr(metrics, f.name) is None}
    # the spectrum is off by default; the pipeline adds the reach and horizon (the monitor knows the horizon)
    assert unset == {"lyapunov_log10_condition", "gradient_reach", "horizon"}
    assert metrics.lyapunov_spectrum == {}
    record = metrics
    assert MeasurementMetrics.from_json(record.to_json()) == record

    exact = exact_sigma_max(dense_step_jacobians(weights, x, s_prev))[mask]
    assert metrics.jacobian_sigma_max_mean == pytest.approx(float(exact.mean()), rel=1e-3)
    assert metrics.jacobian_sigma_max_min == pytest.approx(float(exact.min()), rel=1e-3)
    assert metrics.jacobian_sigma_max_max == pytest.approx(float(exact.max()), rel=1e-3)
    assert metrics.jacobian_sigma_max_p95 == pytest.approx(float(torch.quantile(exact, 0.95)), rel=1e-3)
    assert metrics.jacobian_frac_above_one == pytest.approx(
        float((exact > 1).double().mean()), abs=1 / exact.numel()
    )
    assert metrics.weight_hh_sigma_max == pytest.approx(
        float(torch.linalg.matrix_norm(weights.weight_hh, ord=2)), rel=1e-6
    )
    real_gates = jac.gate_values()[mask]
    assert metrics.gate_mean == pytest.approx(float(real_gates.mean()), rel=1e-9)
    assert metrics.activation_derivative_mean == pytest.approx(
        float(jac.activation_derivatives()[mask].mean()), rel=1e-9
    )
    assert metrics.sequences == 4
    assert metrics.time_steps == 10
    assert metrics.jacobian_converged_ratio == 1.0
    assert set(metrics.lag_norm) == {"1", "2", "4", "8", "10"}  # default_lags(10)
    # Only sequences 0 and 2 (10 real steps) reach lag 10: the mean of those two (padded ones are left out).
    lag10 = estimate.lag_norm_per_sequence[-1]
    assert math.isnan(float(lag10[1])) and math.isnan(float(lag10[3]))
    assert metrics.lag_norm["10"] == pytest.approx(float((lag10[0] + lag10[2]) / 2))
    assert metrics.lyapunov_max is not None and math.isfinite(metrics.lyapunov_max)


def test_warm_start_reuses_vectors_and_a_misfit_one_is_ignored() -> None:
    weights, x, s_prev, mask = ragged_gru_layer(seed=3)
    jac = builtin_step_jacobians(weights, x, s_prev)
    settings = EstimatorSettings(mode="full", rtol=1e-6, max_iter=32)
    cold = estimate_layer(jac, mask, weights.weight_hh, settings, generator=torch.Generator().manual_seed(4))
    warm = estimate_layer(jac, mask, weights.weight_hh, settings, warm_start=cold.warm_start)
    assert warm.jacobian_iterations < cold.jacobian_iterations
    torch.testing.assert_close(warm.jacobian_sigma, cold.jacobian_sigma, rtol=1e-5, atol=0, equal_nan=True)

    misfit = WarmStart(step_vectors=torch.full((3, 4, 16), float("nan")), weight_vector=torch.ones(5))
    ignored = estimate_layer(
        jac, mask, weights.weight_hh, settings, warm_start=misfit, generator=torch.Generator().manual_seed(4)
    )
    torch.testing.assert_close(ignored.jacobian_sigma, cold.jacobian_sigma, rtol=1e-5, atol=0, equal_nan=True)


def test_a_warm_start_rebuilt_from_plain_values_keeps_its_lag_vectors() -> None:
    """A checkpoint stores ``lags`` as a list; WarmStart(**state) must still match the measurement's lags
    (a tuple), or the lag products silently restart cold after a resume."""
    weights, x, s_prev, mask = ragged_gru_layer(seed=3)
    jac = builtin_step_jacobians(weights, x, s_prev)
    settings = EstimatorSettings(mode="full")
    first = estimate_layer(jac, mask, weights.weight_hh, settings, generator=torch.Generator().manual_seed(4))
    plain = {f.name: getattr(first.warm_start, f.name) for f in dataclasses.fields(WarmStart)}
    plain["lags"] = list(plain["lags"])
    rebuilt = WarmStart(**plain)
    assert rebuilt.lags == first.warm_start.lags and isinstance(rebuilt.lags, tuple)

    def again(warm: WarmStart) -> torch.Tensor:
        generator = torch.Generator().manual_seed(9)
        return estimate_layer(jac, mask, weights.weight_hh, settings, warm, generator).lag_norm_per_sequence

    assert torch.equal(again(rebuilt).nan_to_num(), again(first.warm_start).nan_to_num())


def test_same_generator_seed_gives_identical_results_and_global_rng_is_untouched() -> None:
    weights, x, s_prev, mask = ragged_gru_layer(seed=5)
    jac = builtin_step_jacobians(weights, x, s_prev)
    before = torch.get_rng_state()
    first = layer_metrics(
        estimate_layer(
            jac,
            mask,
            weights.weight_hh,
            EstimatorSettings(mode="full"),
            generator=torch.Generator().manual_seed(6),
        )
    )
    second = layer_metrics(
        estimate_layer(
            jac,
            mask,
            weights.weight_hh,
            EstimatorSettings(mode="full"),
            generator=torch.Generator().manual_seed(6),
        )
    )
    assert torch.equal(torch.get_rng_state(), before)
    assert first == second


@pytest.mark.parametrize(
    "state_value", [0.0, 1e30, float("nan"), float("inf")], ids=["zero", "huge", "nan", "inf"]
)
@pytest.mark.parametrize("kind", ["rnn_tanh", "lstm", "gru"])
def test_extreme_states_do_not_crash(kind: str, state_value: float) -> None:
    case = CellCase(kind, 8)  # type: ignore[arg-type]
    weights = random_cell_weights(case, torch.Generator().manual_seed(7), dtype=torch.float32)
    x = torch.randn(5, 2, case.input_size)
    s_prev = torch.full((5, 2, weights.state_size), state_value)
    jac = builtin_step_jacobians(weights, x, s_prev)
    metrics = layer_metrics(
        estimate_layer(
            jac, torch.ones(5, 2, dtype=torch.bool), weights.weight_hh, EstimatorSettings(mode="full")
        )
    )
    if math.isnan(state_value):
        assert metrics.jacobian_sigma_max_mean is None  # not measurable, reported as such
    elif state_value == 0.0:
        assert metrics.jacobian_sigma_max_mean is not None and metrics.jacobian_sigma_max_mean > 0
    metrics.to_json()


def test_empty_mask_gives_not_measurable_metrics() -> None:
    weights, x, s_prev, _ = ragged_gru_layer(seed=8)
    jac = builtin_step_jacobians(weights, x, s_prev)
    metrics = layer_metrics(
        estimate_layer(jac, torch.zeros(10, 4, dtype=torch.bool), None, EstimatorSettings(mode="full"))
    )
    assert metrics.jacobian_sigma_max_mean is None
    assert metrics.lyapunov_max is None
    assert all(value is None for value in metrics.lag_norm.values())
    assert metrics.weight_hh_sigma_max is None
    assert metrics.sequences == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "svd"}, "method"),
        ({"max_iter": 0}, "max_iter"),
        ({"rtol": 0.0}, "rtol"),
        ({"saturation_threshold": -0.1}, "saturation_threshold"),
        ({"lags": (0, 2)}, "lags"),
        ({"lag_max_iter": 1.5}, "lag_max_iter"),
    ],
    ids=["method", "max-iter", "rtol", "threshold", "lags", "lag-max-iter"],
)
def test_settings_reject_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EstimatorSettings(**kwargs)


def test_settings_and_power_method_work_end_to_end() -> None:
    weights, x, s_prev, mask = ragged_gru_layer(seed=9)
    jac = builtin_step_jacobians(weights, x, s_prev)
    settings = EstimatorSettings(mode="full", method="power", max_iter=200, rtol=1e-7, lags=[1, 3])  # type: ignore[arg-type]
    assert settings.lags == (1, 3)
    metrics = layer_metrics(estimate_layer(jac, mask, weights.weight_hh, settings))
    exact = exact_sigma_max(dense_step_jacobians(weights, x, s_prev))[mask]
    assert metrics.jacobian_sigma_max_max == pytest.approx(float(exact.max()), rel=1e-2)
    assert set(metrics.lag_norm) == {"1", "3"}
    with pytest.raises(TypeError, match="EstimatorSettings"):
        estimate_layer(jac, mask, None, {"method": "power"})  # type: ignore[arg-type]


def test_step_norms_in_memory_bounded_chunks_match_one_batch() -> None:
    weights, x, s_prev, mask = ragged_gru_layer(seed=3)
    jac = builtin_step_jacobians(weights, x, s_prev)
    start = torch.randn(s_prev.shape, generator=torch.Generator().manual_seed(4), dtype=s_prev.dtype)
    whole = estimate_step_norms(jac, mask, EstimatorSettings(mode="full", rtol=1e-7, max_iter=16), start)
    # 16 entries per chunk = one operator of size 16 at a time: 40 Lanczos runs.
    chunked = estimate_step_norms(
        jac, mask, EstimatorSettings(mode="full", rtol=1e-7, max_iter=16, chunk_entries=16), start
    )
    assert chunked.sigma.shape == whole.sigma.shape == mask.shape
    assert chunked.right_vectors.shape == s_prev.shape
    torch.testing.assert_close(chunked.sigma[mask], whole.sigma[mask], rtol=1e-5, atol=0)
    assert chunked.element_iterations is not None
    assert bool((chunked.element_iterations[~mask] == 0).all())  # padded steps never iterate
    exact = exact_sigma_max(dense_step_jacobians(weights.to(torch.float64), x.double(), s_prev.double()))
    torch.testing.assert_close(chunked.sigma[mask].double(), exact[mask], rtol=1e-4, atol=0)


def test_chunk_entries_must_be_a_positive_integer() -> None:
    with pytest.raises(ValueError, match="chunk_entries must be a positive integer"):
        EstimatorSettings(mode="full", chunk_entries=0)


def test_lyapunov_of_estimate_layer_is_exact_and_steady_across_warm_started_measurements() -> None:
    """estimate_layer's lambda (shared with the lag sweeps, warm-started from the previous measurement's
    vectors) equals the rescaled lyapunov_max within its 1e-4 per step bound, and re-measuring the same
    Jacobians moves it by no more than float32 rounding: the detector sees no estimator noise."""
    from gradwatch.estimators.products import lyapunov_max

    case = CellCase("lstm", 32)
    generator = torch.Generator().manual_seed(5)
    weights = random_cell_weights(case, generator)
    x, s_prev = random_sequences(case, weights, steps=40, batch=4, generator=generator)
    jac = builtin_step_jacobians(weights, x, s_prev)
    mask = torch.ones(40, 4, dtype=torch.bool)
    mask[25:, 3] = False
    exact = lyapunov_max(jac, mask)
    warm: WarmStart | None = None
    readings = []
    for _ in range(4):
        estimate = estimate_layer(
            jac, mask, weights.weight_hh, EstimatorSettings(mode="full"), warm_start=warm
        )
        warm = estimate.warm_start
        assert estimate.lyapunov_per_sequence is not None
        readings.append(estimate.lyapunov_per_sequence)
        torch.testing.assert_close(estimate.lyapunov_per_sequence, exact, rtol=0.0, atol=1e-4)
    spread = torch.stack(readings).amax(0) - torch.stack(readings).amin(0)
    assert float(spread.max()) <= 1e-6


def _lower_median(values: list[float]) -> float:
    ordered = sorted(v for v in values if not math.isnan(v))
    return ordered[(len(ordered) - 1) // 2]


def test_the_spectrum_is_off_by_default_and_when_asked_is_the_estimators_median_per_exponent() -> None:
    weights, x, s_prev, mask = ragged_gru_layer()
    jac = builtin_step_jacobians(weights, x, s_prev)
    off = layer_metrics(estimate_layer(jac, mask, weights.weight_hh, EstimatorSettings()))
    assert off.lyapunov_spectrum == {} and off.lyapunov_log10_condition is None
    assert not {"lyapunov_spectrum", "lyapunov_log10_condition"} & set(off.to_json())  # log lines unchanged
    on = layer_metrics(estimate_layer(jac, mask, weights.weight_hh, EstimatorSettings(lyapunov_spectrum=3)))
    spectrum = lyapunov_spectrum(jac, mask, 3)
    assert list(on.lyapunov_spectrum) == ["1", "2", "3"]
    for i in range(3):
        expected = _lower_median(spectrum.exponents[:, i].double().tolist())
        assert on.lyapunov_spectrum[str(i + 1)] == pytest.approx(expected, abs=1e-7)
    assert on.lyapunov_spectrum["1"] == pytest.approx(on.lyapunov_max, abs=1e-4)
    expected_condition = _lower_median(spectrum.log_condition.double().tolist()) / math.log(10)
    assert on.lyapunov_log10_condition == pytest.approx(expected_condition, abs=1e-7)
    assert MeasurementMetrics.from_json(on.to_json()) == on
    with pytest.raises(ValueError, match="lyapunov_spectrum must be 0"):
        EstimatorSettings(lyapunov_spectrum=-1)

"""The economy estimator (the default) against the full one and exact dense Jacobians: the sampled
sigma_max(J_t), its summaries within the stated sampling bounds, lambda and the lag norms."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

import gradwatch.estimators.products as products_module
from gradwatch.estimators.jacobian import builtin_step_jacobians
from gradwatch.estimators.layer import (
    ECONOMY_STEP_SAMPLE,
    EstimatorSettings,
    estimate_layer,
    estimator_settings,
    layer_metrics,
)
from gradwatch.estimators.power_iteration import random_start_vectors
from gradwatch.estimators.products import (
    WARM_LONG_LAG,
    WARM_POWER_MIN_LAG,
    default_lags,
    estimate_lag_norms,
)
from gradwatch.estimators.reach import gradient_reach
from gradwatch.estimators.sampling import mean_error_bound, quantile_rank_error, stratum_ranges
from tests._estimator_cases import (
    CellCase,
    dense_step_jacobians,
    exact_lag_norm,
    exact_sigma_max,
    random_cell_weights,
    random_sequences,
    run_cell,
)

CASES = [CellCase("rnn_tanh", 16), CellCase("lstm", 16), CellCase("gru", 16)]
STEPS, BATCH = 40, 6  # 240 real pairs > the 64 sampled
DELTA = 1e-3  # the bounds asserted hold with probability >= 1 - DELTA for any population


def _layer(case: CellCase, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    weights = random_cell_weights(case, generator, dtype=torch.float64)
    x, s_prev = random_sequences(case, weights, steps=STEPS, batch=BATCH, generator=generator)
    return weights, x, s_prev, torch.ones(STEPS, BATCH, dtype=torch.bool)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.case_id)
def test_economy_summaries_lie_within_the_stated_bounds_of_the_exact_population(case: CellCase) -> None:
    weights, x, s_prev, mask = _layer(case)
    dense = dense_step_jacobians(weights, x, s_prev)
    exact = exact_sigma_max(dense)  # (T, B): the population, every real pair
    jac = builtin_step_jacobians(weights, x, s_prev)
    estimate = estimate_layer(
        jac, mask, weights.weight_hh, EstimatorSettings(), generator=torch.Generator().manual_seed(3)
    )
    sampled = torch.isfinite(estimate.jacobian_sigma)
    assert int(sampled.sum()) == estimate.step_sample == ECONOMY_STEP_SAMPLE
    # every sampled operator is measured to the economy tolerance (a lower bound, as Lanczos gives)
    relative = (estimate.jacobian_sigma[sampled] - exact[sampled]) / exact[sampled]
    assert float(relative.abs().max()) <= 1e-2 and float(relative.max()) <= 1e-9
    # the strata: 64 contiguous time-major blocks of the 240 pairs; the sample's weights N_i / N
    population = exact.reshape(-1)
    bounds = torch.arange(ECONOMY_STEP_SAMPLE + 1) * population.numel() // ECONOMY_STEP_SAMPLE
    weights_ = (bounds[1:] - bounds[:-1]).double() / population.numel()
    ranges = stratum_ranges(population, ECONOMY_STEP_SAMPLE)
    estimator_error = 1e-2 * float(population.max())  # the Lanczos tolerance on top of the sampling error
    mean_bound = mean_error_bound(weights_, ranges, DELTA) + estimator_error
    assert abs(float(estimate.jacobian_sigma_max_mean) - float(population.mean())) <= mean_bound
    epsilon = quantile_rank_error(weights_, DELTA)
    ordered = torch.sort(population).values
    low = float(ordered[max(0, math.ceil((0.95 - epsilon) * len(ordered)) - 1)]) * (1 - 1e-2)
    high = float(ordered[min(len(ordered) - 1, math.ceil((0.95 + epsilon) * len(ordered)) - 1)])
    assert low <= float(estimate.jacobian_sigma_max_p95) <= high
    # max is the max of the sample: never above the population's
    assert float(estimate.jacobian_sigma_max_max) <= float(population.max()) * (1 + 1e-9)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.case_id)
def test_economy_lambda_and_lag_norms_match_full_and_exact_products(case: CellCase) -> None:
    weights, x, s_prev, mask = _layer(case, seed=1)
    dense = dense_step_jacobians(weights, x, s_prev)
    jac = builtin_step_jacobians(weights, x, s_prev)
    records = {
        mode: layer_metrics(
            estimate_layer(
                jac,
                mask,
                weights.weight_hh,
                EstimatorSettings(mode=mode),
                generator=torch.Generator().manual_seed(4),
            )
        )
        for mode in ("economy", "full")
    }
    lags = default_lags(STEPS)
    exact_lag_means = {
        tau: float(torch.tensor([exact_lag_norm(dense, b, STEPS, tau) for b in range(BATCH)]).mean())
        for tau in lags
    }
    # lambda: log of the whole product's norm per step, median over the sequences (lower middle)
    exact_lambda = float(
        torch.tensor(
            [math.log(exact_lag_norm(dense, b, STEPS, STEPS)) / STEPS for b in range(BATCH)]
        ).median()
    )
    economy, full = records["economy"], records["full"]
    assert economy.lyapunov_max is not None and full.lyapunov_max is not None
    assert abs(economy.lyapunov_max - full.lyapunov_max) <= 0.02
    assert abs(economy.lyapunov_max - exact_lambda) <= 0.02
    for tau in lags:  # every lag within 10% (0.04 in log10), the longest (the reach) included
        value = economy.lag_norm[str(tau)]
        assert value is not None
        assert abs(value / exact_lag_means[tau] - 1) <= 0.10
        assert abs(value / (full.lag_norm[str(tau)] or math.nan) - 1) <= 0.10
    longest = math.log10(economy.lag_norm[str(lags[-1])] or math.nan)
    assert abs(longest / math.log10(exact_lag_means[lags[-1]]) - 1) <= 0.10
    assert (economy.step_sample, economy.lag_sequences) == (ECONOMY_STEP_SAMPLE, BATCH)
    assert (full.step_sample, full.lag_sequences) == (STEPS * BATCH, BATCH)


def test_a_population_no_larger_than_the_sample_is_measured_whole_like_full() -> None:
    case = CellCase("gru", 8)
    generator = torch.Generator().manual_seed(5)
    weights = random_cell_weights(case, generator, dtype=torch.float64)
    x, s_prev = random_sequences(case, weights, steps=10, batch=4, generator=generator)
    mask = torch.ones(10, 4, dtype=torch.bool)
    jac = builtin_step_jacobians(weights, x, s_prev)
    economy, full = (
        estimate_layer(
            jac,
            mask,
            weights.weight_hh,
            EstimatorSettings(mode=m),
            generator=torch.Generator().manual_seed(6),
        )
        for m in ("economy", "full")
    )
    torch.testing.assert_close(economy.jacobian_sigma, full.jacobian_sigma)
    assert economy.step_sample == full.step_sample == 40


def test_lag_sequences_measures_the_longest_sequences_and_warm_starts_carry_over() -> None:
    case = CellCase("lstm", 8)
    generator = torch.Generator().manual_seed(7)
    weights = random_cell_weights(case, generator, dtype=torch.float64)
    x, s_prev = random_sequences(case, weights, steps=24, batch=5, generator=generator)
    lengths = [24, 10, 24, 17, 24]
    mask = torch.arange(24).unsqueeze(1) < torch.tensor(lengths).unsqueeze(0)
    dense = dense_step_jacobians(weights, x, s_prev)
    jac = builtin_step_jacobians(weights, x, s_prev)
    settings = EstimatorSettings(lag_sequences=3, lags=(1, 4, 16))
    first = estimate_layer(jac, mask, weights.weight_hh, settings, generator=torch.Generator().manual_seed(8))
    assert first.lag_sequences == 3 and first.lag_norm_per_sequence.shape == (3, 3)
    for k, tau in enumerate((1, 4, 16)):
        for column, b in enumerate((0, 2, 4)):  # the three of length 24
            exact = exact_lag_norm(dense, b, 24, tau)
            assert abs(float(first.lag_norm_per_sequence[k, column]) / exact - 1) <= 0.05
    # the sampled step vectors are kept (NaN rows never measured), and the next estimate reuses them
    vectors = first.warm_start.step_vectors
    measured_rows = torch.isfinite(vectors).all(dim=-1)
    assert torch.equal(measured_rows, torch.isfinite(first.jacobian_sigma))
    second = estimate_layer(
        jac,
        mask,
        weights.weight_hh,
        settings,
        warm_start=first.warm_start,
        generator=torch.Generator().manual_seed(9),
    )
    assert int(torch.isfinite(second.warm_start.step_vectors).all(dim=-1).sum()) >= int(measured_rows.sum())


def test_the_estimator_option_names_what_it_accepts() -> None:
    assert estimator_settings(None).mode == "economy"
    assert estimator_settings("full") == EstimatorSettings(mode="full")
    custom = EstimatorSettings(step_sample=128)
    assert estimator_settings(custom) is custom
    with pytest.raises(ValueError, match="one of 'economy' \\(the default\\), 'full', got 'fast'"):
        estimator_settings("fast")
    with pytest.raises(ValueError, match="mode must be one of"):
        EstimatorSettings(mode="cheap")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="step_sample must be a positive integer"):
        EstimatorSettings(step_sample=0)


def _drifted(weights, generator: torch.Generator, scale: float):
    """The same cell with every weight moved by relative noise ``scale`` (training between measurements)."""
    return replace(
        weights,
        **{
            name: None
            if value is None
            else value * (1 + scale * torch.randn(value.shape, generator=generator, dtype=value.dtype))
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")
            for value in [getattr(weights, name)]
        },
    )


def _verdict_quantities(record) -> tuple[float | None, float | None]:
    return gradient_reach(record.lag_norm), record.lyapunov_max


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.case_id)
def test_warm_power_steps_on_the_long_lags_keep_reach_and_lambda_of_full_and_exact(
    case: CellCase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Measurement 2 of a run: weights moved since measurement 1, whose vectors start the long lags."""
    generator = torch.Generator().manual_seed(11)
    weights = random_cell_weights(case, generator, dtype=torch.float64)
    x, s_prev = random_sequences(case, weights, steps=STEPS, batch=BATCH, generator=generator)
    mask = torch.ones(STEPS, BATCH, dtype=torch.bool)
    first = estimate_layer(
        builtin_step_jacobians(weights, x, s_prev), mask, weights.weight_hh, EstimatorSettings()
    )
    moved = _drifted(weights, generator, 0.05)
    s_moved = run_cell(moved, x, s_prev[0])  # the same probe inputs, the states of the moved weights
    jac = builtin_step_jacobians(moved, x, s_moved)
    accepted: list[int] = []
    power_rows = products_module._warm_power_rows

    def counting(*args, **kwargs):
        result = power_rows(*args, **kwargs)
        accepted.append(int(result.settled.sum()))
        return result

    monkeypatch.setattr(products_module, "_warm_power_rows", counting)
    economy = estimate_layer(jac, mask, moved.weight_hh, EstimatorSettings(), warm_start=first.warm_start)
    lags = default_lags(STEPS)
    long_rows = [k for k, tau in enumerate(lags) if tau >= WARM_POWER_MIN_LAG]
    assert economy.lag_norm_per_sequence.shape == (len(lags), BATCH)
    # the lever ran: long rows (lags 16, 32, the whole products) were settled by one power step ...
    assert len(accepted) == 1 and accepted[0] >= BATCH
    warm_lags = economy.warm_start.lag_vectors
    assert warm_lags is not None and torch.isfinite(warm_lags).all()
    full = estimate_layer(jac, mask, moved.weight_hh, EstimatorSettings(mode="full"))
    dense = dense_step_jacobians(moved, x, s_moved)
    exact = torch.tensor(
        [[exact_lag_norm(dense, b, STEPS, tau) for b in range(BATCH)] for tau in lags], dtype=torch.float64
    )
    # ... every estimate is a lower bound of the exact norm (power steps and Lanczos both give ||P v||)
    assert bool((economy.lag_norm_per_sequence <= exact * (1 + 1e-9)).all())
    records = {"economy": layer_metrics(economy), "full": layer_metrics(full)}
    exact_means = {str(tau): float(exact[k].mean()) for k, tau in enumerate(lags)}  # lag_norm: the mean
    exact_lambda = float((exact[-1].log() / STEPS).median())
    exact_reach = gradient_reach(exact_means)
    assert exact_reach is not None
    for name, record in records.items():
        reach, lyapunov = _verdict_quantities(record)
        assert reach is not None and lyapunov is not None, name
        assert abs(reach / exact_reach - 1) <= 0.10, name  # the goals: reach within 10%
        assert abs(lyapunov - exact_lambda) <= 0.02, name  # lambda within 0.02
    for k in long_rows:  # the long lags, read on a log scale by the verdicts: within 0.1 in log10
        tau = str(lags[k])
        assert (
            abs(math.log10(records["economy"].lag_norm[tau] or math.nan) - math.log10(exact_means[tau]))
            <= 0.1
        )
    for tau in lags:  # the short lags' Lanczos (three quiet checks in economy): within 5% of exact
        if tau < WARM_LONG_LAG:
            economy_mean = records["economy"].lag_norm[str(tau)] or math.nan
            assert abs(economy_mean / exact_means[str(tau)] - 1) <= 0.05, tau


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.case_id)
def test_long_lags_whose_warm_vector_is_stale_fall_back_to_lanczos(case: CellCase) -> None:
    """Random vectors in place of a warm start (as after a large jump of the weights): the two lower
    bounds of the power step disagree, and the rows are measured by Lanczos, within 10% of exact."""
    weights, x, s_prev, mask = _layer(case, seed=12)
    jac = builtin_step_jacobians(weights, x, s_prev)
    lags = default_lags(STEPS)
    stale = random_start_vectors(
        (len(lags) + 1, BATCH, jac.state_size),
        dtype=torch.float64,
        device=torch.device("cpu"),
        generator=torch.Generator().manual_seed(13),
    )
    power_only = estimate_lag_norms(
        jac, mask, lags, v0=stale, full_products=True, warm_power_steps=1, rtol=1e-2, quiet_checks=1
    )
    dense = dense_step_jacobians(weights, x, s_prev)
    for k, tau in enumerate(lags):
        for b in range(BATCH):
            exact = exact_lag_norm(dense, b, STEPS, tau)
            assert float(power_only.norms[k, b]) <= exact * (1 + 1e-9)
            if tau >= WARM_POWER_MIN_LAG:
                assert abs(float(power_only.norms[k, b]) / exact - 1) <= 0.10, (tau, b)
    iterations = power_only.estimate.element_iterations
    assert iterations is not None
    # at least one long row failed the gap test and ran Lanczos (more than the one power step)
    long_rows = torch.tensor([tau >= WARM_POWER_MIN_LAG for tau in lags] + [True])
    assert int(iterations[long_rows].max()) > 1


def test_lag_power_steps_names_what_it_accepts() -> None:
    with pytest.raises(
        ValueError, match="lag_power_steps must be 0 \\(Lanczos for every lag\\) or a positive"
    ):
        EstimatorSettings(lag_power_steps=-1)
    assert EstimatorSettings(lag_power_steps=0).lag_power_steps == 0


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.case_id)
def test_a_warm_power_row_stops_once_its_bounds_agree_and_a_far_one_takes_the_second_step(
    case: CellCase,
) -> None:
    """Two rows on the lag-16 product of one sequence: one starts at its exact top right singular vector
    (its bounds agree after one step: it stops), the other mostly along the third (it fails the gap test
    and takes step two). Each must equal the power steps done by hand on the dense product."""
    weights, x, s_prev, _ = _layer(case, seed=21)
    jac = builtin_step_jacobians(weights, x, s_prev)
    dense = dense_step_jacobians(weights, x, s_prev)
    tau, sequence = 16, 0
    product = torch.eye(jac.state_size, dtype=torch.float64)
    for t in range(STEPS - tau, STEPS):
        product = dense[t, sequence] @ product
    _, _, right = torch.linalg.svd(product)
    top, third = right[0], right[2]
    far = third + 0.1 * top  # mostly the third singular direction: one step leaves b far above a
    starts = torch.zeros(2, BATCH, jac.state_size, dtype=torch.float64)
    starts[:, :] = torch.stack([top, far / far.norm()]).unsqueeze(1)
    window = torch.zeros(STEPS, 2, BATCH, dtype=torch.bool)
    window[STEPS - tau :, :, sequence] = True

    def by_hand(v: torch.Tensor, steps: int) -> tuple[float, float]:
        for _ in range(steps):
            image = product @ v
            a = float(image.norm())
            back = product.T @ (image / a)
            b = float(back.norm())
            v = back / b
        return a, b

    step_jvp, step_vjp = products_module.step_products(jac)
    forward_rows: list[int] = []

    def counting_jvp(v: torch.Tensor, t: int) -> torch.Tensor:
        forward_rows.append(v.shape[0])  # the lag rows this step product carries
        return step_jvp(v, t)

    result = products_module._warm_power_rows(starts, window, counting_jvp, step_vjp, 2)
    assert sum(forward_rows) == 2 * tau + 1 * tau  # step one: both rows; step two: the far row only
    assert result.steps_taken[:, sequence].tolist() == [1, 2] and result.sweeps == 2
    a_top, b_top = by_hand(top, 1)
    assert b_top - a_top <= products_module.WARM_POWER_GAP * a_top  # the top row passes after one step
    a_far_1, b_far_1 = by_hand(far / far.norm(), 1)
    assert b_far_1 - a_far_1 > products_module.WARM_POWER_GAP * a_far_1  # the far row fails after one
    _, b_far_2 = by_hand(far / far.norm(), 2)
    assert float(result.sigma[0, sequence]) == pytest.approx(b_top, rel=1e-9)
    assert float(result.sigma[1, sequence]) == pytest.approx(b_far_2, rel=1e-9)
    assert b_far_2 > b_far_1 * (1 + 1e-2)  # so the two results differ: the far row took the second step

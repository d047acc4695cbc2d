"""The economy estimator's samples and their stated error bounds (docs/estimators.md "Economy estimator")."""

from __future__ import annotations

import math

import pytest
import torch

from gradwatch.estimators.sampling import (
    lag_sequence_subset,
    mean_error_bound,
    quantile_rank_error,
    sample_summaries,
    stratified_step_sample,
    stratum_ranges,
    weighted_quantile,
)

P95 = 0.95
DELTA = 0.05


def _padded_mask(steps: int, lengths: list[int]) -> torch.Tensor:
    return torch.arange(steps).unsqueeze(1) < torch.tensor(lengths).unsqueeze(0)


def test_one_pair_per_contiguous_time_major_stratum_of_real_pairs() -> None:
    mask = _padded_mask(20, [20, 13, 7, 20, 1])
    real = mask.reshape(-1).nonzero().squeeze(1)
    sample = stratified_step_sample(mask, 9, torch.Generator().manual_seed(0))
    assert sample is not None and sample.population == int(mask.sum()) == real.numel()
    bounds = torch.arange(10) * real.numel() // 9
    for i, position in enumerate(sample.index.tolist()):
        rank = int((real == position).nonzero())  # a real pair ...
        assert int(bounds[i]) <= rank < int(bounds[i + 1])  # ... from stratum i
    torch.testing.assert_close(sample.weights, (bounds[1:] - bounds[:-1]).double() / real.numel())
    assert math.isclose(float(sample.weights.sum()), 1.0)


def test_every_pair_of_a_stratum_can_be_drawn_and_a_small_population_is_measured_whole() -> None:
    mask = torch.ones(6, 2, dtype=torch.bool)
    seen = {
        int(stratified_step_sample(mask, 3, torch.Generator().manual_seed(s)).index[1]) for s in range(60)
    }  # type: ignore[union-attr]
    assert seen == {4, 5, 6, 7}  # stratum 1 = flat positions 4..7
    assert stratified_step_sample(mask, 12) is None
    assert stratified_step_sample(torch.zeros(3, 3, dtype=torch.bool), 1) is None
    with pytest.raises(ValueError, match="size must be a positive integer"):
        stratified_step_sample(mask, 0)


def test_weighted_quantile_is_the_inverse_cdf() -> None:
    values = torch.tensor([3.0, 1.0, 2.0, 4.0])
    equal = torch.full((4,), 0.25, dtype=torch.float64)
    assert float(weighted_quantile(values, equal, 0.5)) == 2.0
    assert float(weighted_quantile(values, equal, 0.51)) == 3.0
    assert (
        float(weighted_quantile(values, torch.tensor([0.1, 0.1, 0.1, 0.7], dtype=torch.float64), 0.31)) == 4.0
    )


def test_sample_summaries_are_nan_when_a_sampled_value_is_not_finite() -> None:
    sigma = torch.tensor([0.5, float("inf"), 2.0])
    summaries = sample_summaries(sigma, torch.full((3,), 1 / 3, dtype=torch.float64), P95)
    assert all(math.isnan(float(v)) for v in summaries.values())
    finite = sample_summaries(torch.tensor([0.5, 1.5, 2.0]), torch.tensor([0.5, 0.25, 0.25]), P95)
    assert math.isclose(float(finite["jacobian_sigma_max_mean"]), 0.25 + 0.375 + 0.5)
    assert math.isclose(float(finite["jacobian_frac_above_one"]), 0.5)
    assert float(finite["jacobian_sigma_max_max"]) == 2.0 and float(finite["jacobian_sigma_max_min"]) == 0.5


def _population(seed: int, steps: int = 64, batch: int = 8) -> torch.Tensor:
    """sigma_max-like values: a trend over t, a per-sequence offset, noise and a heavy upper tail."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, steps).unsqueeze(1)
    tail = torch.distributions.Exponential(5.0).sample((steps, batch))
    return (
        0.8
        + 0.3 * t
        + 0.1 * torch.rand(1, batch, generator=g)
        + 0.05 * torch.randn(steps, batch, generator=g)
        + tail
    )


@pytest.mark.parametrize("lengths", [[64] * 8, [64, 50, 40, 64, 9, 64, 33, 64]], ids=["full", "padded"])
def test_the_stated_bounds_hold_at_their_confidence(lengths: list[int]) -> None:
    """Over 400 seeded samples, the weighted mean stays within the Hoeffding bound and the weighted p95
    between the population's (p95 -+ epsilon)-quantiles at least 1 - delta of the time (both bounds are
    conservative, so in practice they are never crossed)."""
    torch.manual_seed(0)
    sigma = _population(1)
    mask = _padded_mask(64, lengths)
    population = sigma[mask].double()  # time-major order, as the strata are cut
    population_mean = float(population.mean())
    ordered = torch.sort(population).values
    size = 64
    misses_mean = misses_p95 = 0
    for seed in range(400):
        sample = stratified_step_sample(mask, size, torch.Generator().manual_seed(seed))
        assert sample is not None
        values = sigma.reshape(-1)[sample.index].double()
        summaries = sample_summaries(values, sample.weights, P95)
        ranges = stratum_ranges(population, size)
        if abs(float(summaries["jacobian_sigma_max_mean"]) - population_mean) > mean_error_bound(
            sample.weights, ranges, DELTA
        ):
            misses_mean += 1
        epsilon = quantile_rank_error(sample.weights, DELTA)
        low = ordered[max(0, math.ceil((P95 - epsilon) * len(ordered)) - 1)]
        high = ordered[min(len(ordered) - 1, math.ceil((P95 + epsilon) * len(ordered)) - 1)]
        if not float(low) <= float(summaries["jacobian_sigma_max_p95"]) <= float(high):
            misses_p95 += 1
    assert misses_mean <= DELTA * 400 and misses_p95 <= DELTA * 400


def test_lag_sequences_are_the_longest_lower_index_first() -> None:
    lengths = torch.tensor([5, 9, 9, 0, 7, 9])
    assert lag_sequence_subset(lengths, 3).tolist() == [1, 2, 5]  # type: ignore[union-attr]
    assert lag_sequence_subset(lengths, 4).tolist() == [1, 2, 4, 5]  # type: ignore[union-attr]
    assert lag_sequence_subset(lengths, 5) is None  # five sequences have a real step: all measured

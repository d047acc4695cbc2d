"""The economy estimator's samples: which (t, sequence) step operators and which sequences are measured.

Step norms: a stratified sample of the real (t, b) pairs. The N real pairs, in time-major order, are cut
into n contiguous strata of sizes N_i = floor((i+1) N / n) - floor(i N / n) (so the strata are ranges of
time steps), and one pair is drawn uniformly from each stratum, independently, from a generator of its
own seeded once: the same probe shape draws the same sample at every measurement, so the sampled pairs
keep their warm starts. Every summary weighs the pair of stratum i by w_i = N_i / N, so the weighted
sample mean and the weighted empirical CDF are unbiased for the population's; the error bounds are in
docs/estimators.md ("Economy estimator").

Lag products and the Lyapunov exponent: the ``count`` longest sequences (ties: the lower batch index),
a deterministic choice, so a fixed probe keeps its warm starts from one measurement to the next.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from gradwatch.estimators.jacobian import StepJacobians


@dataclass(frozen=True)
class StepSample:
    """A stratified sample of real (t, b) pairs: flat positions t * B + b and the stratum weights N_i / N."""

    index: Tensor  # (n,) long, flat positions into (T, B), increasing
    weights: Tensor  # (n,) float64, sum 1
    population: int  # N, the real pairs sampled from


def stratum_bounds(population: int, size: int, device: torch.device | None = None) -> Tensor:
    """(size + 1,) boundaries floor(i N / n) of the ``size`` strata of ``population`` time-major pairs."""
    return torch.arange(size + 1, device=device, dtype=torch.long) * population // size


def stratum_ranges(values: Tensor, size: int) -> Tensor:
    """(size,) max - min of each stratum of the flat time-major ``values`` (the real pairs' sigma_max):
    what the Hoeffding bound of the mean needs (tests and benchmarks have the whole population)."""
    bounds = stratum_bounds(values.numel(), size).tolist()
    return torch.stack([values[lo:hi].max() - values[lo:hi].min() for lo, hi in itertools.pairwise(bounds)])


def stratified_step_sample(
    mask: Tensor, size: int, generator: torch.Generator | None = None
) -> StepSample | None:
    """One pair drawn uniformly from each of ``size`` contiguous time-major strata of the real pairs of
    ``mask`` (T, B); None when there are at most ``size`` real pairs (then all are measured)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    device = generator.device if generator is not None else mask.device
    real = mask.reshape(-1).to(device).nonzero().squeeze(1)  # time-major: t * B + b
    population = int(real.numel())
    if population <= size:
        return None
    bounds = stratum_bounds(population, size, device)
    sizes = bounds[1:] - bounds[:-1]
    uniform = torch.rand(size, generator=generator, device=device, dtype=torch.float64)
    offsets = torch.minimum((uniform * sizes).long(), sizes - 1)
    return StepSample(
        index=real[bounds[:-1] + offsets],
        weights=sizes.to(torch.float64) / population,
        population=population,
    )


def weighted_quantile(values: Tensor, weights: Tensor, q: float) -> Tensor:
    """The smallest value whose weighted empirical CDF reaches ``q`` (the inverse CDF, no interpolation)."""
    order = torch.argsort(values)
    cumulative = torch.cumsum(weights[order].to(torch.float64), 0)
    position = (cumulative < q - 1e-12).sum().clamp(max=values.numel() - 1)
    return values[order][position]


def sample_summaries(sigma: Tensor, weights: Tensor, quantile: float) -> dict[str, Tensor]:
    """Weighted mean, min, max, ``quantile`` and share above one of a sample (n,) of sigma_max(J_t); all
    NaN if any sampled value is non-finite (as the full summaries are when any real step is)."""
    finite = torch.isfinite(sigma)
    safe = torch.where(finite, sigma, torch.zeros_like(sigma))
    w = weights.to(sigma.dtype)
    summaries = {
        "jacobian_sigma_max_mean": (w * safe).sum(),
        "jacobian_sigma_max_min": safe.amin(),
        "jacobian_sigma_max_max": safe.amax(),
        "jacobian_sigma_max_p95": weighted_quantile(safe, weights, quantile),
        "jacobian_frac_above_one": (w * (safe > 1).to(sigma.dtype)).sum(),
    }
    nan = torch.full((), float("nan"), dtype=sigma.dtype, device=sigma.device)
    any_nonfinite = ~finite.all()
    return {name: torch.where(any_nonfinite, nan, value) for name, value in summaries.items()}


def quantile_rank_error(weights: Tensor, delta: float) -> float:
    """epsilon such that, with probability >= 1 - delta, the weighted sample p-quantile lies between the
    population's (p - epsilon)- and (p + epsilon)-quantiles: sqrt(sum w_i^2 ln(2 / delta) / 2) (two
    one-sided Hoeffding bounds on the weighted empirical CDF; docs/estimators.md)."""
    return math.sqrt(float((weights.to(torch.float64) ** 2).sum()) * math.log(2 / delta) / 2)


def mean_error_bound(weights: Tensor, stratum_ranges: Tensor, delta: float) -> float:
    """Hoeffding: with probability >= 1 - delta the weighted sample mean is within this of the population
    mean, given each stratum's range max - min of sigma_max (docs/estimators.md)."""
    spread = (weights.to(torch.float64) * stratum_ranges.to(torch.float64)) ** 2
    return math.sqrt(float(spread.sum()) * math.log(2 / delta) / 2)


def lag_sequence_subset(lengths: Tensor, count: int) -> Tensor | None:
    """Batch indices (increasing) of the ``count`` longest sequences with a real step (ties: lower index);
    None when no more than ``count`` sequences have one (then all are measured)."""
    real = int((lengths > 0).sum())
    if real <= count:
        return None
    batch = lengths.numel()
    # longest first, the lower index first among equals: sort by (-length, index)
    key = -lengths.to(torch.long) * batch + torch.arange(batch, device=lengths.device)
    return torch.sort(torch.argsort(key)[:count]).values


def select_sequences(jac: StepJacobians, sequences: Tensor) -> StepJacobians | None:
    """The step operators of the sequences ``sequences`` (all time steps), or None if ``jac`` cannot
    select them (a user's own StepJacobians class: then every sequence is measured)."""
    select = getattr(jac, "select_sequences", None)
    return select(sequences) if callable(select) else None

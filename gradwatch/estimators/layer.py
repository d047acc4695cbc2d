"""Everything the monitor measures for one layer and direction, in one call, and its one host transfer.

:func:`estimate_layer` runs every estimator on the device and returns tensors (:class:`LayerEstimate`);
:func:`layer_metrics` turns them into the plain values of :class:`gradwatch.records.MeasurementMetrics`
with a single device-to-host copy. Summaries over (t, sequence) count only real steps (mask True).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from gradwatch.estimators.factors import (
    DEFAULT_SATURATION_THRESHOLD,
    activation_statistics,
    weight_spectral_norm,
)
from gradwatch.estimators.jacobian import StepJacobians, select_operators
from gradwatch.estimators.power_iteration import (
    SPECTRAL_METHODS,
    MatVec,
    SpectralMethod,
    SpectralNormEstimate,
    spectral_norm,
    warm_or_random_start,
)
from gradwatch.estimators.products import (
    DEFAULT_LAG_MAX_ITER,
    DEFAULT_LAG_RTOL,
    default_lags,
    estimate_lag_norms,
    lyapunov_from_full_products,
    sequence_lengths,
)
from gradwatch.estimators.sampling import (
    lag_sequence_subset,
    sample_summaries,
    select_sequences,
    stratified_step_sample,
)
from gradwatch.estimators.spectrum import lyapunov_spectrum
from gradwatch.metric_table import estimated_scalars
from gradwatch.records import MeasurementMetrics, SigmaHistogram

JACOBIAN_QUANTILE = 0.95

#: Largest block of step operators one Lanczos run takes, in state entries (operators x D). The Krylov
#: basis holds one such block per iteration, so the block bounds the memory however many (t, b) pairs are
#: measured; larger blocks are faster and take more memory (figures: docs/performance.md). The default
#: (``chunk_entries=None``) is 2**18 inline; the monitor's background worker uses 2**16, because its
#: allocations cannot reuse the memory the training thread freed (glibc serves threads from separate
#: arenas) and its time is hidden behind training anyway.
DEFAULT_CHUNK_ENTRIES = 2**18
BACKGROUND_CHUNK_ENTRIES = 2**16

#: Lanczos convergence test of the step Jacobians: checks every 2 iterations; an operator started from a
#: random vector must pass 3 in a row (a window of 6 iterations, which a Ritz value stalled on sigma_2
#: rarely survives), one started from the previous measurement's vector 1 (it cannot stall on sigma_2
#: unless the top two singular values just swapped, when they are close anyway). On LSTM/GRU language
#: models measured every 50 steps this took warm starts from ~11 to ~7 iterations, p99 error < 0.01%.
STEP_CHECK_INTERVAL = 2
COLD_QUIET_CHECKS = 3
WARM_QUIET_CHECKS = 1

EstimatorMode = Literal["economy", "full"]
ESTIMATOR_MODES: tuple[EstimatorMode, ...] = ("economy", "full")

#: The economy estimator's sample sizes (docs/estimators.md "Economy estimator", docs/performance.md):
#: sigma_max(J_t) on a stratified sample of this many real (t, sequence) pairs, and the lag products and
#: the Lyapunov exponent on this many sequences (the longest). A population no larger is measured whole.
ECONOMY_STEP_SAMPLE = 64
ECONOMY_LAG_SEQUENCES = 8
#: The economy estimator's tolerances (the looser of these and the settings' own): the verdict reads the
#: lag norms on a log scale (10% is 0.04 in log10) and lambda = log(norm) / T (10% is 0.0015 at T = 64),
#: and the step-norm summaries carry a sampling error of a few percent anyway.
ECONOMY_STEP_RTOL = 1e-3
ECONOMY_LAG_RTOL = 5e-2
ECONOMY_LAG_QUIET_CHECKS = 1  # the long lags' Lanczos (cold or fallback rows)
#: The short lags' (tau < 8) Lanczos: three quiet checks, not the full estimator's five. On the warm
#: measurements of a real run (benchmarks/drift_accuracy.py, LSTM/GRU H=256) they read lags 1-4 within 5.9%
#: of exact per sequence, and the reach within 1.5% (docs/performance.md, "Issue #32, third round").
ECONOMY_SHORT_LAG_QUIET_CHECKS = 3
#: Warm-started long lags (tau >= 16) and whole products take up to this many power steps from the
#: previous measurement's vectors instead of a Lanczos run (the power iteration goes on across
#: measurements): a row stops once its two lower bounds agree within products.WARM_POWER_GAP, and only a
#: row that still fails after the last step runs Lanczos. Two, not one: after one step most LSTM rows
#: failed the test (the top singular vector of a gate-dominated product had moved in 50 Adam steps) and
#: each paid a Lanczos run of several 64-step sweeps; a second step settles most of them for one more.
ECONOMY_LAG_POWER_STEPS = 2


@dataclass(frozen=True)
class EstimatorSettings:
    """Accuracy/cost knobs of one layer measurement (defaults chosen by measurement, docs/estimators.md).

    ``mode="economy"`` (the default) estimates sigma_max(J_t) on a stratified sample of ``step_sample``
    (t, sequence) pairs and the lag products and lambda on the ``lag_sequences`` longest sequences;
    ``mode="full"`` measures every pair and sequence (``watch(estimator="full")``). ``lag_power_steps``:
    in economy mode the warm-started long lag products take this many power steps instead of a Lanczos run.
    """

    mode: EstimatorMode = "economy"
    step_sample: int = ECONOMY_STEP_SAMPLE
    lag_sequences: int = ECONOMY_LAG_SEQUENCES
    lag_power_steps: int = ECONOMY_LAG_POWER_STEPS  # economy, warm: 0 = Lanczos for every lag
    method: SpectralMethod = "lanczos"
    max_iter: int = 32
    rtol: float = 1e-4
    saturation_threshold: float = DEFAULT_SATURATION_THRESHOLD
    lags: tuple[int, ...] | None = None  # None: default_lags(T)
    lag_max_iter: int = DEFAULT_LAG_MAX_ITER
    lag_rtol: float = DEFAULT_LAG_RTOL
    weight_max_iter: int = 32
    lyapunov: bool = True
    chunk_entries: int | None = None  # None: DEFAULT_CHUNK_ENTRIES (BACKGROUND_CHUNK_ENTRIES off-thread)
    lyapunov_spectrum: int = 0  # k >= 1: also the top-k Lyapunov spectrum (issue #33; off: its cost)

    def __post_init__(self) -> None:
        if self.mode not in ESTIMATOR_MODES:
            raise ValueError(f"mode must be one of {ESTIMATOR_MODES}, got {self.mode!r}")
        if self.method not in SPECTRAL_METHODS:
            raise ValueError(f"method must be one of {SPECTRAL_METHODS}, got {self.method!r}")
        for name in (
            "max_iter",
            "lag_max_iter",
            "weight_max_iter",
            "chunk_entries",
            "step_sample",
            "lag_sequences",
        ):
            value = getattr(self, name)
            if name == "chunk_entries" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("rtol", "lag_rtol"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value < 1):
                raise ValueError(f"{name} must be a float in (0, 1), got {value!r}")
        if not (isinstance(self.saturation_threshold, (int, float)) and self.saturation_threshold >= 0):
            raise ValueError(
                f"saturation_threshold must be a non-negative float, got {self.saturation_threshold!r}"
            )
        power = self.lag_power_steps
        if isinstance(power, bool) or not isinstance(power, int) or power < 0:
            raise ValueError(
                f"lag_power_steps must be 0 (Lanczos for every lag) or a positive integer, got {power!r}"
            )
        spectrum = self.lyapunov_spectrum
        if isinstance(spectrum, bool) or not isinstance(spectrum, int) or spectrum < 0:
            raise ValueError(
                f"lyapunov_spectrum must be 0 (off) or the number k >= 1 of exponents, got {spectrum!r}"
            )
        if self.lags is not None:
            lags = tuple(self.lags)
            if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 1 for t in lags):
                raise ValueError(f"lags must be None or a tuple of positive integers, got {self.lags!r}")
            object.__setattr__(self, "lags", lags)


def estimator_settings(value: EstimatorSettings | str | None) -> EstimatorSettings:
    """``watch(estimator=...)``: None or ``"economy"`` (the default), ``"full"`` (every (t, sequence)
    pair and sequence, today's accuracy), or an EstimatorSettings as given."""
    if value is None:
        return EstimatorSettings()
    if isinstance(value, EstimatorSettings):
        return value
    if isinstance(value, str) and value in ESTIMATOR_MODES:
        return EstimatorSettings(mode=value)
    message = (
        f"estimator must be a gradwatch.EstimatorSettings or one of 'economy' (the default), 'full', "
        f"got {value!r}"
    )
    raise ValueError(message) if isinstance(value, str) else TypeError(message)


@dataclass(frozen=True)
class WarmStart:
    """Vectors from the previous measurement, reused as start vectors when the shapes still fit."""

    step_vectors: Tensor  # (T, B, D)
    weight_vector: Tensor | None = None  # (P,)
    lag_vectors: Tensor | None = None  # (K, B, D) for ``lags``
    lags: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        # Always a tuple of ints: the lag warm start is reused only when ``lags`` equals the measurement's
        # lags (a tuple), and a list from a checkpoint (``WarmStart(**state)``) would never compare equal.
        object.__setattr__(self, "lags", tuple(int(lag) for lag in self.lags))


@dataclass(frozen=True)
class LayerEstimate:
    """Device tensors for every metric of one layer measurement (0-dim unless noted)."""

    jacobian_sigma: Tensor  # (T, B) sigma_max(J_t) per step and sequence, NaN on padded steps
    jacobian_sigma_max_mean: Tensor
    jacobian_sigma_max_min: Tensor
    jacobian_sigma_max_max: Tensor
    jacobian_sigma_max_p95: Tensor
    jacobian_frac_above_one: Tensor
    jacobian_converged_ratio: Tensor
    jacobian_iterations: int
    weight_hh_sigma_max: Tensor | None
    activation_derivative_mean: Tensor | None
    activation_saturation_ratio: Tensor | None
    gate_mean: Tensor | None
    lyapunov_per_sequence: Tensor | None  # (B,)
    lags: tuple[int, ...]
    lag_norm_per_sequence: Tensor  # (K, B), NaN where tau > L_b
    sequences: Tensor  # number of sequences with at least one real step
    time_steps: int
    warm_start: WarmStart
    step_sample: int = 0  # (t, sequence) pairs whose sigma_max(J_t) was estimated
    lag_sequences: int = 0  # sequences whose lag products and lambda were estimated
    lyapunov_spectrum_per_sequence: Tensor | None = None  # (B, k), only with settings.lyapunov_spectrum
    lyapunov_log_condition_per_sequence: Tensor | None = None  # (B,) ln(sigma_1 / sigma_k)


def _masked_summaries(sigma: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Mean, min, max, p95 and share above one over real steps; all NaN if any real step is non-finite."""
    real = mask.to(sigma.device)
    count = real.sum()
    finite_real = real & torch.isfinite(sigma)
    any_nonfinite = (real & ~torch.isfinite(sigma)).any() | (count == 0)
    nan = torch.full((), float("nan"), dtype=sigma.dtype, device=sigma.device)
    zero = torch.zeros_like(sigma)
    denominator = count.clamp(min=1).to(sigma.dtype)
    summaries = {
        "jacobian_sigma_max_mean": torch.where(finite_real, sigma, zero).sum() / denominator,
        "jacobian_sigma_max_min": torch.where(finite_real, sigma, torch.full_like(sigma, math.inf)).amin(),
        "jacobian_sigma_max_max": torch.where(finite_real, sigma, torch.full_like(sigma, -math.inf)).amax(),
        "jacobian_sigma_max_p95": torch.nanquantile(
            torch.where(finite_real, sigma, torch.full_like(sigma, float("nan"))).flatten(), JACOBIAN_QUANTILE
        ),
        "jacobian_frac_above_one": (finite_real & (sigma > 1)).sum().to(sigma.dtype) / denominator,
    }
    return {name: torch.where(any_nonfinite, nan, value) for name, value in summaries.items()}


def _step_restriction(jac: StepJacobians) -> Callable[[Tensor], tuple[MatVec, MatVec]] | None:
    """Lanczos' ``restrict`` for the step Jacobians: the flat (t, b) rows still iterating, or None when
    ``jac`` cannot select operators (then every operator runs every iteration)."""
    if not callable(getattr(jac, "select", None)):
        return None

    def restrict(rows: Tensor) -> tuple[MatVec, MatVec]:
        subset = select_operators(jac, rows)
        assert subset is not None
        return (lambda v: subset.jvp(v, 0)), (lambda u: subset.vjp(u, 0))

    return restrict


@torch.no_grad()
def estimate_step_norms(
    jac: StepJacobians,
    mask: Tensor,
    settings: EstimatorSettings,
    start: Tensor,
    warm: Tensor | None = None,
) -> SpectralNormEstimate:
    """sigma_max(J_t) for every (t, b) from start vectors (T, B, D); padded steps (mask False) are skipped
    where the operators can be restricted, converged operators leave the iteration early, and blocks of
    at most ``settings.chunk_entries`` state entries run one after another to bound the memory.
    ``warm`` (T, B) bool marks start vectors that are an earlier estimate's vectors (trusted sooner)."""
    mask = mask.to(jac.device)
    restrict = _step_restriction(jac)
    steps, batch, state = jac.time_steps, jac.batch_size, jac.state_size
    quiet = torch.full((steps, batch), COLD_QUIET_CHECKS, dtype=torch.long, device=jac.device)
    if warm is not None:
        quiet = torch.where(warm.to(jac.device), WARM_QUIET_CHECKS, quiet)
    count = steps * batch
    entries = DEFAULT_CHUNK_ENTRIES if settings.chunk_entries is None else settings.chunk_entries
    per_chunk = max(1, entries // state)
    if restrict is None or settings.method != "lanczos" or per_chunk >= count:
        return spectral_norm(
            settings.method,
            jac.jvp,
            jac.vjp,
            start,
            max_iter=settings.max_iter,
            rtol=settings.rtol,
            active=mask,
            restrict=restrict,
            check_interval=STEP_CHECK_INTERVAL,
            quiet_checks=quiet,
        )
    flat_start, flat_mask, flat_quiet = start.reshape(count, state), mask.reshape(count), quiet.reshape(count)
    parts = []
    for first in range(0, count, per_chunk):
        index = torch.arange(first, min(count, first + per_chunk), device=jac.device)
        matvec, rmatvec = restrict(index)

        def restrict_chunk(rows: Tensor, index: Tensor = index) -> tuple[MatVec, MatVec]:
            assert restrict is not None
            return restrict(index[rows])

        parts.append(
            spectral_norm(
                settings.method,
                matvec,
                rmatvec,
                flat_start[index],
                max_iter=settings.max_iter,
                rtol=settings.rtol,
                active=flat_mask[index],
                restrict=restrict_chunk,
                check_interval=STEP_CHECK_INTERVAL,
                quiet_checks=flat_quiet[index],
            )
        )
    element_iterations = [p.element_iterations for p in parts]
    return SpectralNormEstimate(
        sigma=torch.cat([p.sigma for p in parts]).view(steps, batch),
        right_vectors=torch.cat([p.right_vectors for p in parts]).view(steps, batch, state),
        converged=torch.cat([p.converged for p in parts]).view(steps, batch),
        iterations=max(p.iterations for p in parts),
        element_iterations=None
        if any(e is None for e in element_iterations)
        else torch.cat([e for e in element_iterations if e is not None]).view(steps, batch),
    )


@torch.no_grad()
def estimate_layer(
    jac: StepJacobians,
    mask: Tensor,
    weight_hh: Tensor | None,
    settings: EstimatorSettings,
    warm_start: WarmStart | None = None,
    generator: torch.Generator | None = None,
) -> LayerEstimate:
    """Run every estimator of one layer and direction; host syncs only for mask and convergence checks."""
    if not isinstance(settings, EstimatorSettings):
        raise TypeError(f"settings must be an EstimatorSettings, got {type(settings).__name__}")
    steps, batch, state = jac.time_steps, jac.batch_size, jac.state_size
    lengths = sequence_lengths(mask, steps, batch)
    mask = mask.to(jac.device)

    # 1. sigma_max(J_t) for every (t, b) at once: a batch of T*B matrix-free operators.
    step_start, warm_rows = warm_or_random_start(
        warm_start.step_vectors if warm_start else None,
        (steps, batch, state),
        dtype=jac.dtype,
        device=jac.device,
        generator=generator,
    )
    sample = (
        stratified_step_sample(mask, settings.step_sample, _sample_generator(generator, jac.device))
        if settings.mode == "economy"
        else None
    )
    sampled = None if sample is None else select_operators(jac, sample.index.to(jac.device))
    if sample is None or sampled is None:
        step_estimate = estimate_step_norms(jac, mask, settings, step_start, warm=warm_rows)
        sigma = torch.where(mask, step_estimate.sigma, torch.full_like(step_estimate.sigma, float("nan")))
        summaries = _masked_summaries(step_estimate.sigma, mask)
        converged_ratio = (step_estimate.converged & mask).sum().to(jac.dtype) / mask.sum().clamp(min=1).to(
            jac.dtype
        )
        step_vectors = step_estimate.right_vectors
        step_pairs = int(mask.sum())
    else:
        sigma, summaries, converged_ratio, step_estimate, step_vectors = _sampled_step_norms(
            sampled, sample.index.to(jac.device), sample.weights, settings, step_start, warm_rows, warm_start
        )
        step_pairs = int(sample.index.numel())

    # 2. sigma_max(W_hh).
    weight_sigma: Tensor | None = None
    weight_vector: Tensor | None = None
    if weight_hh is not None:
        warm_weight = warm_start.weight_vector if warm_start else None
        weight_estimate = weight_spectral_norm(
            weight_hh,
            v0=warm_weight,
            method=settings.method,
            max_iter=settings.weight_max_iter,
            generator=generator,
        )
        weight_sigma, weight_vector = weight_estimate.sigma, weight_estimate.right_vectors

    # 3. Nonlinearity derivatives and gates.
    derivatives = jac.activation_derivatives()
    activation_mean = saturation = None
    if derivatives is not None:
        activation_mean, saturation = activation_statistics(derivatives, mask, settings.saturation_threshold)
    gates = jac.gate_values()
    gate_mean = None
    if gates is not None:
        real = mask.unsqueeze(-1)
        gate_mean = torch.where(real, gates, torch.zeros_like(gates)).sum() / (
            real.sum().clamp(min=1).to(gates.dtype) * gates.shape[-1]
        )

    # 4. Products over time: lag norms and the top Lyapunov exponent (economy: on the longest sequences).
    lags = settings.lags if settings.lags is not None else tuple(default_lags(steps))
    warm_lags = warm_start.lag_vectors if warm_start is not None and warm_start.lags == lags else None
    lag_jac, lag_mask = jac, mask
    chosen = lag_sequence_subset(lengths, settings.lag_sequences) if settings.mode == "economy" else None
    subset = None if chosen is None else select_sequences(jac, chosen.to(jac.device))
    if chosen is not None and subset is not None:
        lag_jac, lag_mask = subset, mask.index_select(1, chosen.to(mask.device))
    economy = settings.mode == "economy"
    lag_estimate = estimate_lag_norms(
        lag_jac,
        lag_mask,
        lags,
        method=settings.method,
        max_iter=settings.lag_max_iter,
        rtol=max(settings.lag_rtol, ECONOMY_LAG_RTOL) if economy else settings.lag_rtol,
        generator=generator,
        v0=warm_lags,
        full_products=settings.lyapunov,
        quiet_checks=ECONOMY_LAG_QUIET_CHECKS if economy else None,
        warm_power_steps=settings.lag_power_steps if economy else 0,
        short_lag_quiet_checks=ECONOMY_SHORT_LAG_QUIET_CHECKS if economy else None,
    )
    # lambda from the whole-product rows of the lag sweeps (their GEMMs with W_hh are shared); the rescaled
    # path of lyapunov_max only for sequences too short, not converged, or out of the dtype's range.
    lyapunov = lyapunov_from_full_products(lag_jac, lag_mask, lag_estimate) if settings.lyapunov else None
    spectrum = (
        lyapunov_spectrum(jac, mask, settings.lyapunov_spectrum) if settings.lyapunov_spectrum else None
    )

    return LayerEstimate(
        jacobian_sigma=sigma,
        jacobian_converged_ratio=converged_ratio,
        jacobian_iterations=step_estimate.iterations,
        weight_hh_sigma_max=weight_sigma,
        activation_derivative_mean=activation_mean,
        activation_saturation_ratio=saturation,
        gate_mean=gate_mean,
        lyapunov_per_sequence=lyapunov,
        lags=lag_estimate.lags,
        lag_norm_per_sequence=lag_estimate.norms,
        sequences=(lengths > 0).sum(),
        time_steps=steps,
        step_sample=step_pairs,
        lag_sequences=int((sequence_lengths(lag_mask, steps, lag_jac.batch_size) > 0).sum()),
        warm_start=WarmStart(
            step_vectors=step_vectors,
            weight_vector=weight_vector,
            lag_vectors=lag_estimate.estimate.right_vectors,
            lags=lag_estimate.lags,
        ),
        lyapunov_spectrum_per_sequence=None if spectrum is None else spectrum.exponents,
        lyapunov_log_condition_per_sequence=None if spectrum is None else spectrum.log_condition,
        **summaries,
    )


def _sample_generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator:
    """A private generator seeded with ``generator``'s seed (the monitor's ``seed``): the same probe shape
    draws the same sample at every measurement, so its pairs start from their own previous vectors
    (warm starts). The draw is still independent of the values, so each measurement's bound holds; the
    errors of successive measurements are correlated (docs/estimators.md)."""
    seed = generator.initial_seed() if generator is not None else 0
    return torch.Generator(device=device).manual_seed(seed)


def _sampled_step_norms(
    sampled: StepJacobians,
    index: Tensor,
    weights: Tensor,
    settings: EstimatorSettings,
    step_start: Tensor,
    warm_rows: Tensor,
    warm_start: WarmStart | None,
) -> tuple[Tensor, dict[str, Tensor], Tensor, SpectralNormEstimate, Tensor]:
    """sigma_max(J_t) on the sampled pairs only (flat positions ``index``): the (T, B) sigma (NaN off the
    sample), the weighted summaries, the converged share, the raw estimate and the (T, B, D) warm-start
    vectors (the sampled rows new, the others kept from before; NaN rows were never measured, so the next
    measurement starts them cold)."""
    steps, batch, state = step_start.shape
    count = int(index.numel())
    start = step_start.reshape(steps * batch, state)[index].view(1, count, state)
    warm = warm_rows.reshape(steps * batch)[index].view(1, count)
    ones = torch.ones((1, count), dtype=torch.bool, device=step_start.device)
    economy = replace(settings, rtol=max(settings.rtol, ECONOMY_STEP_RTOL))
    estimate = estimate_step_norms(sampled, ones, economy, start, warm=warm)
    values = estimate.sigma.reshape(count)
    sigma = torch.full((steps * batch,), float("nan"), dtype=values.dtype, device=values.device)
    sigma[index] = values
    summaries = sample_summaries(values, weights.to(values.device), JACOBIAN_QUANTILE)
    converged = estimate.converged.reshape(count).to(values.dtype).mean()
    previous = warm_start.step_vectors if warm_start is not None else None
    if previous is None or previous.shape != step_start.shape or previous.dtype != step_start.dtype:
        vectors = torch.full_like(step_start, float("nan"))
    else:
        vectors = previous.to(step_start.device).clone()
    vectors.view(steps * batch, state)[index] = estimate.right_vectors.reshape(count, state)
    return sigma.view(steps, batch), summaries, converged, estimate, vectors


_SCALAR_METRICS = estimated_scalars()  # the 0-d tensors of LayerEstimate copied to the host as they are


def _plain(value: float) -> float | None:
    """NaN means "not measurable" (None); +-inf is kept (a product that over/underflowed)."""
    return None if math.isnan(value) else value


def layer_metrics(estimate: LayerEstimate) -> MeasurementMetrics:
    """The MeasurementMetrics of one layer estimate, with one host copy (grad_norm and grad_nonfinite are
    left empty: the caller adds the gradients it measured, with ``dataclasses.replace``).

    lag_norm[str(tau)] is the mean over sequences: the gradient of a batch loss is a sum over its sequences,
    so the share of it that reaches tau steps back is carried by the sequences whose product survives (an
    input-gated memory keeps the product ~1 in a few sequences and ~0 in the rest; a median reads 0 there).
    lyapunov_max is the median over sequences (the lower middle value for an even
    count, so an infinite value never turns into NaN by interpolation).
    """
    reference = estimate.jacobian_sigma
    nan = torch.full((), float("nan"), dtype=torch.float64, device=reference.device)

    def scalar(value: Tensor | None) -> Tensor:
        return nan if value is None else value.detach().reshape(()).to(torch.float64)

    lyapunov = estimate.lyapunov_per_sequence
    named = {name: scalar(getattr(estimate, name)) for name in _SCALAR_METRICS}
    named["lyapunov_max"] = nan if lyapunov is None else torch.nanmedian(lyapunov.to(torch.float64))
    named["sequences"] = estimate.sequences.to(torch.float64).reshape(())
    lags = {
        str(tau): torch.nanmean(estimate.lag_norm_per_sequence[k].to(torch.float64))
        for k, tau in enumerate(estimate.lags)
    }
    spectrum = _spectrum_medians(estimate, nan)
    values = torch.stack([*named.values(), *lags.values(), *spectrum.values()]).cpu().tolist()  # one transfer
    host = dict(zip([*named, *(f"lag:{key}" for key in lags), *spectrum], values, strict=True))
    plain = {name: _plain(value) for name, value in host.items()}
    mean = plain["jacobian_sigma_max_mean"]
    return MeasurementMetrics(
        jacobian_sigma_max_mean=mean,
        jacobian_sigma_max_min=plain["jacobian_sigma_max_min"],
        jacobian_sigma_max_max=plain["jacobian_sigma_max_max"],
        jacobian_sigma_max_p95=plain["jacobian_sigma_max_p95"],
        jacobian_frac_above_one=plain["jacobian_frac_above_one"],
        weight_hh_sigma_max=plain["weight_hh_sigma_max"],
        activation_derivative_mean=plain["activation_derivative_mean"],
        activation_saturation_ratio=plain["activation_saturation_ratio"],
        gate_mean=plain["gate_mean"],
        jacobian_converged_ratio=plain["jacobian_converged_ratio"],
        lyapunov_max=plain["lyapunov_max"],
        lag_norm={key: plain[f"lag:{key}"] for key in lags},
        lyapunov_spectrum={key.split(":")[1]: plain[key] for key in spectrum if key.startswith("spectrum:")},
        lyapunov_log10_condition=plain.get("condition"),
        jacobian_iterations=estimate.jacobian_iterations,
        sequences=int(host["sequences"]),
        time_steps=estimate.time_steps,
        step_sample=estimate.step_sample,
        lag_sequences=estimate.lag_sequences,
        # None: a real step was non-finite, no distribution
        jacobian_sigma_max_histogram=None if mean is None else sigma_histogram(estimate.jacobian_sigma),
    )


def _spectrum_medians(estimate: LayerEstimate, nan: Tensor) -> dict[str, Tensor]:
    """Medians over sequences of each top-k exponent ("spectrum:<i>", i from 1) and of log10 of the
    condition number ("condition"); empty when the spectrum was not measured."""
    exponents, condition = (
        estimate.lyapunov_spectrum_per_sequence,
        estimate.lyapunov_log_condition_per_sequence,
    )
    if exponents is None or condition is None:
        return {}
    medians = {
        f"spectrum:{i + 1}": torch.nanmedian(exponents[:, i].to(torch.float64))
        for i in range(exponents.shape[1])
    }
    medians["condition"] = torch.nanmedian(condition.to(torch.float64)) / math.log(10)
    return {name: value.reshape(()) if value.numel() else nan for name, value in medians.items()}


SIGMA_HISTOGRAM_BINS = 16
"""Buckets of the per-measurement histogram of sigma_max(J_t) in the run log (equal width, min to max)."""


def sigma_histogram(sigma: Tensor, bins: int = SIGMA_HISTOGRAM_BINS) -> SigmaHistogram | None:
    """Equal-width histogram of the finite entries of ``sigma`` (padded steps are NaN) between their min
    and max, computed on the device with one host copy; ``None`` when there is no finite entry."""
    values = sigma.detach().to(torch.float64).flatten()
    finite = torch.isfinite(values)
    low = torch.where(finite, values, math.inf).amin()
    high = torch.where(finite, values, -math.inf).amax()
    width = (high - low) / bins
    # Bucket i is [low + i w, low + (i+1) w); the maximum goes into the last bucket. A zero width (all values
    # equal) puts everything into bucket 0. Non-finite entries (padding) get weight 0: no boolean indexing,
    # so nothing waits for the device before the one host copy.
    offset = torch.where(finite, values - low, 0.0)
    index = torch.where(width > 0, torch.floor(offset / width.clamp(min=1e-300)), 0.0)
    weights = finite.to(torch.float64)
    counts = torch.bincount(index.clamp(0, bins - 1).long(), weights=weights, minlength=bins)
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64, device=values.device) * (high - low) + low
    kept = torch.where(finite, values, 0.0)
    sums = torch.stack([kept.sum(), kept.square().sum()])
    host = torch.cat([edges, counts, sums, finite.sum().reshape(1).to(torch.float64)]).cpu().tolist()
    if host[-1] == 0:
        return None
    return SigmaHistogram(
        edges=tuple(host[: bins + 1]),
        counts=tuple(int(c) for c in host[bins + 1 : 2 * bins + 1]),
        total=host[-3],
        sum_squares=host[-2],
    )

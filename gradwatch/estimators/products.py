"""Products of step Jacobians: lag norms ||ds_L/ds_{L-tau}||_2 and the top finite-time Lyapunov exponent.

Index convention as in :mod:`gradwatch.estimators.jacobian`: J_t = ds_{t+1}/ds_t, sequence b has L_b real
steps (states s_0 .. s_{L_b}). The lag-tau product of sequence b is the gradient path over its *last* tau
real steps:

    P_{tau,b} = ds_{L_b}/ds_{L_b - tau} = J_{L_b - 1} ... J_{L_b - tau},    1 <= tau <= L_b.

tau = L_b is allowed: it reaches the initial state s_0 (J_0 is evaluated at (x_0, s_0) like every other
step), i.e. the gradient that flows back to the initial state. tau > L_b gives NaN.

All lags and sequences are estimated at once: a vector v of shape (K, B, D) holds one vector per
(lag, sequence), and one sweep over time applies J_t to exactly those vectors whose window covers t
(identity elsewhere), so each product matvec costs one time sweep whatever the number of lags.

Limits: lag norms are computed in the input dtype, so in float32 a product beyond ~1e38 reads inf and one
below ~1e-38 reads 0 (vanished). The Lyapunov exponent, (1/L_b) log sigma_max(J_{L_b-1} ... J_0), is found
by power iteration with renormalisation after every step and has no such limit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from gradwatch.estimators.jacobian import StepJacobians, step_products
from gradwatch.estimators.power_iteration import (
    MatVec,
    SpectralMethod,
    SpectralNormEstimate,
    random_start_vectors,
    safe_vector_norm,
    spectral_norm,
    spectral_norm_lanczos,
    warm_or_random_start,
)

DEFAULT_LAG_MAX_ITER = 12
DEFAULT_LAG_RTOL = 1e-3

#: Lanczos convergence test for the lag products. A product matvec is a whole sweep over time, so a check
#: (small eigenproblems over K * B elements and one host sync) is cheap next to it: check after every
#: iteration and ask for three quiet ones in a row. Long products' spectra spread with tau, so they usually
#: leave first (5-6 iterations, at most 9, warm after 50 Adam steps of a real run), and later sweeps shrink
#: to the steps of the short lags.
_LAG_CONVERGENCE_TEST = {"check_interval": 1, "quiet_checks": 3}

#: Quiet checks asked of a warm-started product over at least WARM_LONG_LAG steps (start vectors = the
#: previous measurement's vectors for the same lags); a cold start asks for three, the short lags for
#: SHORT_LAG_QUIET_CHECKS. Two, not one: after real training drift (50 Adam steps) the previous top vector
#: can be close to the *second* singular vector of a product whose top two are clustered (sigma_2 /
#: sigma_1 = 0.91 seen for tau = 16), and one quiet check then stopped that lag 9% short; a second
#: iteration spans both directions.
#: (Figures: docs/performance.md, "Issue #14 on real training drift"; benchmarks/drift_accuracy.py.)
WARM_LAG_QUIET_CHECKS = 2
WARM_LONG_LAG = 8

#: Quiet checks asked of the short lags (tau < WARM_LONG_LAG), warm or cold. Their products are a few
#: steps long and their top singular values cluster like one step's: with three checks, lags 2-4 stopped
#: up to 5-10% short on measurements of a real run (LSTM/GRU H=64, benchmarks/drift_accuracy.py); with five,
#: <= 0.3%. Their sweeps touch at most WARM_LONG_LAG - 1 steps, so the extra iterations cost little.
SHORT_LAG_QUIET_CHECKS = 5


def default_lags(time_steps: int) -> list[int]:
    """1, 2, 4, ... (powers of two < T) plus T itself, the gradient path back to the initial state; empty
    for T < 2 (a single step is no product).

    The longest default lag is T, not T - 1: for a sequence of T real steps its product is the whole
    product the top Lyapunov exponent needs, so :func:`estimate_lag_norms` (``full_products=True``)
    estimates it once, in the whole-product rows, instead of sweeping a second, almost equal product.
    """
    if time_steps < 2:
        return []
    lags = []
    tau = 1
    while tau < time_steps:
        lags.append(tau)
        tau *= 2
    lags.append(time_steps)
    return lags


def sequence_lengths(mask: Tensor, time_steps: int, batch_size: int) -> Tensor:
    """L_b = mask[:, b].sum() after checking that mask is (T, B) bool and left-aligned (one host sync)."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(
            f"mask must be a bool tensor (T, B), got {getattr(mask, 'dtype', type(mask).__name__)}"
        )
    if tuple(mask.shape) != (time_steps, batch_size):
        raise ValueError(f"mask must have shape (T, B) = {(time_steps, batch_size)}, got {tuple(mask.shape)}")
    lengths = mask.sum(dim=0)
    left_aligned = torch.arange(time_steps, device=mask.device).unsqueeze(1) < lengths.unsqueeze(0)
    if not bool(torch.equal(left_aligned, mask)):
        raise ValueError("mask must be left-aligned: each sequence's real steps first, then only padding")
    return lengths


@dataclass(frozen=True)
class LagNormEstimate:
    """Norms of the lag products for every (lag, sequence): ``norms`` (K, B), NaN where tau > L_b.

    With ``full_products=True`` the raw estimate has one more row, K, holding each sequence's whole
    product P_b = J_{L_b-1} ... J_0 (the Lyapunov product): ``full_product_norms`` (B,) and
    ``full_product_converged`` (B,).
    """

    lags: tuple[int, ...]
    norms: Tensor  # (K, B)
    estimate: SpectralNormEstimate  # the raw estimate over (K[+1], B); right_vectors are a warm start
    full_product_norms: Tensor | None = None  # (B,) sigma_max(P_b), NaN for empty sequences
    full_product_converged: Tensor | None = None  # (B,) bool


@dataclass(frozen=True)
class _LagIteration:
    """How the lag rows iterate (see :func:`estimate_lag_norms`' arguments of the same names)."""

    method: SpectralMethod
    max_iter: int
    rtol: float
    quiet_checks: int | None  # long lags; None: _lag_quiet_checks' rule
    warm_power_steps: int
    short_lag_quiet_checks: int | None  # None: SHORT_LAG_QUIET_CHECKS


def _check_lags(lags: Sequence[int]) -> tuple[int, ...]:
    checked = tuple(lags)
    if not all(isinstance(tau, int) and not isinstance(tau, bool) and tau >= 1 for tau in checked):
        raise ValueError(f"lags must be positive integers, got {checked!r}")
    return checked


def estimate_lag_norms(
    jac: StepJacobians,
    mask: Tensor,
    lags: Sequence[int],
    *,
    method: SpectralMethod = "lanczos",
    max_iter: int = DEFAULT_LAG_MAX_ITER,
    rtol: float = DEFAULT_LAG_RTOL,
    generator: torch.Generator | None = None,
    v0: Tensor | None = None,
    full_products: bool = False,
    quiet_checks: int | None = None,
    warm_power_steps: int = 0,
    short_lag_quiet_checks: int | None = None,
) -> LagNormEstimate:
    """Spectral norms of every lag product, all lags and sequences in one batched estimate.

    ``v0`` (K, B, D) warm start, (K + 1, B, D) with ``full_products`` (ignored unless its shape, dtype and
    device fit). ``full_products``: also estimate each sequence's whole product (tau = L_b, its own lag)
    in the same sweeps, for :func:`lyapunov_from_full_products`. Every step operator of a sweep then
    multiplies the lag rows and the whole-product rows in one GEMM with W_hh, cheaper than a separate
    Lyapunov sweep over every step of every iteration. ``quiet_checks``: the quiet checks asked of the long
    lags (tau >= WARM_LONG_LAG) instead of :func:`_lag_quiet_checks`' rule (the economy estimator asks for
    fewer); ``short_lag_quiet_checks`` likewise for the short lags (default SHORT_LAG_QUIET_CHECKS).
    ``warm_power_steps`` >= 1 (the economy estimator): when ``v0`` fits, the long lags (and whole products)
    take that many power steps from it instead of a Lanczos run
    (:func:`_warm_power_rows`); the rows whose steps leave a gap fall back to Lanczos.
    """
    checked_lags = _check_lags(lags)
    steps, batch, state = jac.time_steps, jac.batch_size, jac.state_size
    lengths = sequence_lengths(mask, steps, batch).to(jac.device)
    lag_count = len(checked_lags)
    iteration = _LagIteration(method, max_iter, rtol, quiet_checks, warm_power_steps, short_lag_quiet_checks)
    if full_products:
        return _with_full_products(jac, checked_lags, lengths, iteration, generator, v0)
    if lag_count == 0:
        empty = torch.empty((0, batch), dtype=jac.dtype, device=jac.device)
        raw = SpectralNormEstimate(
            empty,
            torch.empty((0, batch, state), dtype=jac.dtype, device=jac.device),
            torch.empty((0, batch), dtype=torch.bool, device=jac.device),
            0,
        )
        return LagNormEstimate((), empty, raw)
    tau = torch.tensor(checked_lags, device=jac.device).unsqueeze(1)  # (K, 1)
    return _estimate_windows(jac, tau, lengths, iteration, generator, v0, checked_lags)


def _estimate_windows(
    jac: StepJacobians,
    tau: Tensor,
    lengths: Tensor,
    iteration: _LagIteration,
    generator: torch.Generator | None,
    v0: Tensor | None,
    checked_lags: tuple[int, ...],
    fixed_start_rows: int = 0,
) -> LagNormEstimate:
    """Norms of the products over the last tau[k, b] real steps of each sequence b (tau (K, 1) or (K, B)),
    one batched Lanczos; the last ``fixed_start_rows`` rows start from the private seed-0 vectors when no
    warm start fits."""
    steps, batch, state = jac.time_steps, jac.batch_size, jac.state_size
    lag_count = tau.shape[0]
    valid = (tau <= lengths.unsqueeze(0)) & (tau >= 1)  # (K, B)
    start = lengths.unsqueeze(0) - tau  # first step of each window
    time = torch.arange(steps, device=jac.device).view(steps, 1, 1)
    # in_window[t, k, b]: J_t is a factor of P_{tau_k, b}.
    in_window = valid & (time >= start) & (time < lengths.unsqueeze(0))
    shape = (lag_count, batch, state)
    usable_warm_start = (
        v0 is not None and tuple(v0.shape) == shape and v0.dtype == jac.dtype and v0.device == jac.device
    )
    warm_rows: Tensor | bool = usable_warm_start
    if usable_warm_start:
        start_vectors, warm_rows = warm_or_random_start(
            v0, shape, dtype=jac.dtype, device=jac.device, generator=generator
        )
    else:
        lag_rows = lag_count - fixed_start_rows
        start_vectors = random_start_vectors(
            (lag_rows, batch, state), dtype=jac.dtype, device=jac.device, generator=generator
        )
        if fixed_start_rows:
            fixed = random_start_vectors(
                (fixed_start_rows, batch, state), dtype=jac.dtype, device=jac.device, generator=None
            )
            start_vectors = torch.cat([start_vectors, fixed])
    step_jvp, step_vjp = step_products(jac)
    quiet = _lag_quiet_checks(
        tau.expand(lag_count, batch), warm_rows, iteration.quiet_checks, iteration.short_lag_quiet_checks
    )
    warm_power_steps = iteration.warm_power_steps
    if not (warm_power_steps >= 1 and usable_warm_start and iteration.method == "lanczos"):
        return _lanczos_windows(
            jac, in_window, valid, start_vectors, step_jvp, step_vjp, iteration, quiet, checked_lags
        )
    # Economy, warm: the long rows take a few power steps from their previous vectors, checked by the gap
    # between their two lower bounds; the short rows and the long rows that failed the check run Lanczos.
    # only rows that really start warm (a zero or non-finite warm row was replaced by a random vector)
    long_rows = valid & (tau.expand(lag_count, batch) >= WARM_POWER_MIN_LAG) & torch.as_tensor(warm_rows)
    power = _warm_power_rows(
        start_vectors, in_window & long_rows.unsqueeze(0), step_jvp, step_vjp, warm_power_steps
    )
    accepted = long_rows & power.settled
    rest = valid & ~accepted
    lanczos_start = torch.where(long_rows.unsqueeze(-1), power.vectors, start_vectors)
    lanczos = _lanczos_windows(
        jac,
        in_window & rest.unsqueeze(0),
        rest,
        lanczos_start,
        step_jvp,
        step_vjp,
        iteration,
        quiet,
        checked_lags,
    )
    raw = lanczos.estimate
    element_iterations = raw.element_iterations
    merged = SpectralNormEstimate(
        sigma=torch.where(accepted, power.sigma, raw.sigma),
        right_vectors=torch.where(accepted.unsqueeze(-1), power.vectors, raw.right_vectors),
        converged=torch.where(accepted, True, raw.converged),
        iterations=max(raw.iterations, power.sweeps),
        element_iterations=None
        if element_iterations is None
        else torch.where(accepted, power.steps_taken, element_iterations),
    )
    norms = torch.where(valid, merged.sigma, torch.full_like(merged.sigma, float("nan")))
    return LagNormEstimate(checked_lags, norms, merged)


def _lanczos_windows(
    jac: StepJacobians,
    in_window: Tensor,
    valid: Tensor,
    start_vectors: Tensor,
    step_jvp: Callable[[Tensor, int], Tensor],
    step_vjp: Callable[[Tensor, int], Tensor],
    iteration: _LagIteration,
    quiet: Tensor,
    checked_lags: tuple[int, ...],
) -> LagNormEstimate:
    """One batched Lanczos (or power) run over the window products ``in_window`` (T, K, B) of the
    ``valid`` (K, B) rows; every sweep touches only the steps of the rows it carries."""
    steps = jac.time_steps
    _, lag_count, batch = in_window.shape
    in_window_vectors = in_window.unsqueeze(-1)
    # Which lags each step touches, on the host once, outside the iteration loops (one transfer).
    spans = _sweep_plan(in_window)

    def product(v: Tensor) -> Tensor:
        return _sweep(v, step_jvp, range(steps), spans, in_window_vectors)

    def adjoint_product(u: Tensor) -> Tensor:
        return _sweep(u, step_vjp, reversed(range(steps)), spans, in_window_vectors)

    def restrict(rows: Tensor) -> tuple[MatVec, MatVec]:
        # Only the (lag, sequence) pairs at flat positions rows = k * B + b still iterate: sweep the steps
        # their windows cover. Long lags usually converge first (a product's spectrum spreads out with
        # tau), and then the sweeps shrink from T steps to the few steps of the short lags.
        kept = torch.zeros(lag_count * batch, dtype=torch.bool, device=jac.device)
        kept[rows] = True
        window = in_window & kept.view(1, lag_count, batch)
        kept_spans = _sweep_plan(window)
        window_vectors = window.unsqueeze(-1)

        def embed(x: Tensor) -> Tensor:
            full = x.new_zeros((lag_count * batch, x.shape[-1]))
            full[rows] = x
            return full.view(lag_count, batch, -1)

        def restricted_product(v: Tensor) -> Tensor:
            swept = _sweep(embed(v), step_jvp, range(steps), kept_spans, window_vectors)
            return swept.reshape(lag_count * batch, -1)[rows]

        def restricted_adjoint(u: Tensor) -> Tensor:
            swept = _sweep(embed(u), step_vjp, reversed(range(steps)), kept_spans, window_vectors)
            return swept.reshape(lag_count * batch, -1)[rows]

        return restricted_product, restricted_adjoint

    raw = spectral_norm(
        iteration.method,
        product,
        adjoint_product,
        start_vectors,
        max_iter=iteration.max_iter,
        rtol=iteration.rtol,
        active=valid,
        restrict=restrict,
        check_interval=_LAG_CONVERGENCE_TEST["check_interval"],
        quiet_checks=quiet,
    )
    norms = torch.where(valid, raw.sigma, torch.full_like(raw.sigma, float("nan")))
    return LagNormEstimate(checked_lags, norms, raw)


#: The economy estimator's check of a warm power step on a long product: its two lower bounds of
#: sigma_max(P), a = ||P v|| and b = ||P^T P v|| / ||P v||, differ by more than this (b / a - 1) only when
#: v is still far from the top singular vector (training moved the product a lot since the last
#: measurement); then the row falls back to a Lanczos run from the new vector. The verdicts read the long
#: lags on a log scale (reach within 10%, lambda = log(norm) / T within 0.02), where a few percent is
#: nothing (docs/estimators.md "Economy estimator").
WARM_POWER_GAP = 0.5

#: The shortest lag whose warm start takes power steps: a product of 16 steps has a spread spectrum (sigma_2 /
#: sigma_1 well below 1), so one power step from a vector one measurement old lands near its top; lag 8
#: stopped 25% short on a tanh RNN whose weights moved by 5% (tests/test_layer_economy.py), and its
#: Lanczos run sweeps 8 steps only.
WARM_POWER_MIN_LAG = 16


@dataclass(frozen=True)
class WarmPowerRows:
    """Power steps from warm vectors on window products: the estimate b (the larger lower bound), the new
    unit vectors, whether each row's gap between its two lower bounds passed :data:`WARM_POWER_GAP`, and
    the power steps each row took."""

    sigma: Tensor  # (K, B)
    vectors: Tensor  # (K, B, D)
    settled: Tensor  # (K, B) bool
    steps_taken: Tensor  # (K, B) long
    sweeps: int  # the power steps of the longest-stepping row


def _bounds_agree(forward_norm: Tensor, backward_norm: Tensor) -> Tensor:
    """The :data:`WARM_POWER_GAP` test on a power step's two lower bounds a <= b: both finite and
    b - a <= WARM_POWER_GAP * a."""
    finite = torch.isfinite(forward_norm) & torch.isfinite(backward_norm)
    return finite & (backward_norm - forward_norm <= WARM_POWER_GAP * forward_norm)


def _warm_power_rows(
    start: Tensor,
    window: Tensor,
    step_jvp: Callable[[Tensor, int], Tensor],
    step_vjp: Callable[[Tensor, int], Tensor],
    power_steps: int,
) -> WarmPowerRows:
    """Up to ``power_steps`` power steps on P^T P from unit ``start`` (K, B, D), on the rows with a window
    in ``window`` (T, K, B): each a forward and an adjoint sweep. A row stops stepping as soon as its two
    lower bounds pass the :data:`WARM_POWER_GAP` test; the rows that never pass fall back to Lanczos."""
    steps = window.shape[0]
    v = _unit(start)[0]
    forward_norm = backward_norm = torch.zeros(start.shape[:-1], dtype=start.dtype, device=start.device)
    pending = window.any(dim=0)  # (K, B): rows still stepping
    steps_taken = torch.zeros(pending.shape, dtype=torch.long, device=start.device)
    sweeps = 0
    for index in range(power_steps):
        sweeps = index + 1
        steps_taken += pending
        stepping = window & pending.unsqueeze(0)
        spans = _sweep_plan(stepping)
        window_vectors = stepping.unsqueeze(-1)
        u = _sweep(v, step_jvp, range(steps), spans, window_vectors)
        u, new_forward = _unit(u)
        w = _sweep(u, step_vjp, reversed(range(steps)), spans, window_vectors)
        w, new_backward = _unit(w)
        forward_norm = torch.where(pending, new_forward, forward_norm)
        backward_norm = torch.where(pending, new_backward, backward_norm)
        v = torch.where((pending & (new_backward > 0)).unsqueeze(-1), w, v)
        if index + 1 < power_steps:
            pending = pending & ~_bounds_agree(forward_norm, backward_norm)
            if not bool(pending.any()):  # one host sync per extra step
                break
    finite = torch.isfinite(forward_norm) & torch.isfinite(backward_norm)
    settled = _bounds_agree(forward_norm, backward_norm)
    sigma = torch.where(finite, backward_norm, torch.full_like(backward_norm, float("nan")))
    vectors = torch.where(finite.unsqueeze(-1), v, start)  # a non-finite product keeps its old start
    return WarmPowerRows(sigma, vectors, settled, steps_taken, sweeps)


def _unit(x: Tensor) -> tuple[Tensor, Tensor]:
    """(x / ||x||, ||x||) over the last axis, zero vectors left at zero."""
    norm = safe_vector_norm(x)
    return x / torch.where(norm > 0, norm, torch.ones_like(norm)).unsqueeze(-1), norm


def _lag_quiet_checks(
    tau: Tensor, warm: Tensor | bool, long_lag_checks: int | None = None, short_lag_checks: int | None = None
) -> Tensor:
    """Quiet checks per (row, sequence): ``short_lag_checks`` (default SHORT_LAG_QUIET_CHECKS) for the
    short lags; for the long ones ``long_lag_checks`` if given, else WARM_LAG_QUIET_CHECKS where
    warm-started (``warm``: all rows, or a (rows, sequences) mask), else 3."""
    cold = _LAG_CONVERGENCE_TEST["quiet_checks"]
    long_lag = torch.where(torch.as_tensor(warm, device=tau.device), WARM_LAG_QUIET_CHECKS, cold)
    if long_lag_checks is not None:
        long_lag = torch.full_like(long_lag, long_lag_checks)
    short_lag = SHORT_LAG_QUIET_CHECKS if short_lag_checks is None else short_lag_checks
    return torch.where(tau >= WARM_LONG_LAG, long_lag, short_lag).to(torch.long)


def _with_full_products(
    jac: StepJacobians,
    checked_lags: tuple[int, ...],
    lengths: Tensor,
    iteration: _LagIteration,
    generator: torch.Generator | None,
    v0: Tensor | None,
) -> LagNormEstimate:
    """The lags plus one row per sequence with tau = L_b (the whole product), split apart again."""
    lag_count = len(checked_lags)
    batch = jac.batch_size
    lag_tau = torch.tensor(checked_lags, dtype=torch.long, device=jac.device).view(lag_count, 1)
    lag_tau = lag_tau.expand(lag_count, batch)
    # A lag equal to a sequence's length is that sequence's whole product (the default longest lag, T):
    # it is estimated once, in the whole-product row; its lag row is left out of the sweeps (tau 0 marks
    # it invalid) and copied from the whole-product row afterwards.
    whole_tau = lengths.to(torch.long).view(1, batch)
    whole_product = lag_tau == whole_tau
    tau = torch.cat([torch.where(whole_product, 0, lag_tau), whole_tau])
    both = _estimate_windows(jac, tau, lengths, iteration, generator, v0, checked_lags, fixed_start_rows=1)
    raw = both.estimate
    shared = torch.cat([whole_product, whole_product.new_zeros((1, batch))])  # (K + 1, B)

    def from_whole_row(per_row: Tensor) -> Tensor:
        """per_row (K + 1, B, ...) with the shared lag elements replaced by their whole-product element."""
        mask = shared.view(*shared.shape, *([1] * (per_row.ndim - 2)))
        return torch.where(mask, per_row[lag_count : lag_count + 1].expand_as(per_row), per_row)

    raw = SpectralNormEstimate(
        sigma=from_whole_row(raw.sigma),
        right_vectors=from_whole_row(raw.right_vectors),  # the warm start of the next measurement
        converged=from_whole_row(raw.converged),
        iterations=raw.iterations,
        element_iterations=None if raw.element_iterations is None else from_whole_row(raw.element_iterations),
    )
    norms = from_whole_row(both.norms)
    return LagNormEstimate(
        checked_lags,
        norms[:lag_count],
        raw,
        full_product_norms=norms[lag_count],
        full_product_converged=raw.converged[lag_count],
    )


#: One step of a sweep: the lag rows [lo, hi) J_t applies to, and whether every sequence of them is inside
#: its window at t (then no per-sequence select is needed).
SweepSpan = tuple[int, int, bool]


def _sweep_plan(window: Tensor) -> list[list[SweepSpan]]:
    """For each step t of ``window`` (T, K, B) bool: the runs of lag rows it touches (one host transfer)."""
    touched = window.any(dim=2)
    full = window.all(dim=2)
    both = torch.stack([touched, full]).cpu()
    full_rows = both[1].tolist()
    return [
        [(lo, hi, all(full_rows[t][lo:hi])) for lo, hi in runs]
        for t, runs in enumerate(_active_lag_spans(both[0]))
    ]


def _sweep(
    v: Tensor,
    apply: Callable[[Tensor, int], Tensor],
    order: Iterable[int],
    spans: list[list[SweepSpan]],
    window: Tensor,
) -> Tensor:
    """Apply J_t (in ``order``) to the rows of lags whose window covers t, identity elsewhere.

    ``window`` (T, K, B, 1) selects the sequences within a span; a span whose every sequence is inside
    (equal lengths, the usual case) skips the select. Lag tau touches tau steps, so a sweep costs
    sum(tau) * B row products, not K * T * B.
    """
    v = v.clone()
    for t in order:
        for lo, hi, full in spans[t]:
            rows = v[lo:hi]
            v[lo:hi] = apply(rows, t) if full else torch.where(window[t, lo:hi], apply(rows, t), rows)
    return v


def _active_lag_spans(touched: Tensor) -> list[list[tuple[int, int]]]:
    """For each step t, the maximal runs [lo, hi) of lag indices k with touched[t, k] (a (T, K) bool).

    With lags sorted ascending (the default) each step touches one run, the longest lags, so the sweep
    slices views instead of gathering rows.
    """
    spans: list[list[tuple[int, int]]] = []
    for row in touched.tolist():
        runs: list[tuple[int, int]] = []
        lo = None
        for k, hit in enumerate([*row, False]):
            if hit and lo is None:
                lo = k
            elif not hit and lo is not None:
                runs.append((lo, k))
                lo = None
        spans.append(runs)
    return spans


def lag_norms(
    jac: StepJacobians,
    mask: Tensor,
    lags: Sequence[int],
    *,
    method: SpectralMethod = "lanczos",
    max_iter: int = DEFAULT_LAG_MAX_ITER,
    rtol: float = DEFAULT_LAG_RTOL,
    generator: torch.Generator | None = None,
) -> dict[int, Tensor]:
    """For each lag tau: (B,) ||ds_{L_b}/ds_{L_b - tau}||_2 per sequence, NaN where tau > L_b."""
    estimate = estimate_lag_norms(
        jac, mask, lags, method=method, max_iter=max_iter, rtol=rtol, generator=generator
    )
    return {tau: estimate.norms[k] for k, tau in enumerate(estimate.lags)}


#: The top Lyapunov exponent: Lanczos iterations at most on the rescaled product (each one forward and one
#: adjoint sweep over time), its relative tolerance on sigma_max (lambda then moves by <= rtol / L_b per
#: step) and the quiet checks asked for. Measured against jacrev products in docs/estimators.md.
DEFAULT_LYAPUNOV_MAX_ITER = 16
DEFAULT_LYAPUNOV_RTOL = 1e-4
_LYAPUNOV_CHECK_INTERVAL, _LYAPUNOV_QUIET_CHECKS = 1, 1


def _renormalised_sweep(
    jac: StepJacobians, vector: Tensor, real_steps: Tensor, *, adjoint: bool
) -> tuple[Tensor, Tensor]:
    """Push unit vectors (B, D) through every real step (J_0 .. J_{L_b-1}, or their transposes in reverse
    with ``adjoint``), renormalising after each step; returns the final unit vectors and the growth of each
    step (T, B), 1 on padded steps. sum(log growth) = log ||P v|| without forming P (no over/underflow)."""
    growths = torch.ones((jac.time_steps, vector.shape[0]), dtype=jac.dtype, device=jac.device)
    order = reversed(range(jac.time_steps)) if adjoint else range(jac.time_steps)
    apply = jac.vjp if adjoint else jac.jvp
    for t in order:
        image = apply(vector, t)
        growth = safe_vector_norm(image)
        growths[t] = torch.where(real_steps[t], growth, growths[t])
        safe_growth = torch.where(growth > 0, growth, torch.ones_like(growth)).unsqueeze(-1)
        vector = torch.where((real_steps[t] & (growth > 0)).unsqueeze(-1), image / safe_growth, vector)
    return vector, growths


@torch.no_grad()
def lyapunov_max(
    jac: StepJacobians,
    mask: Tensor,
    *,
    generator: torch.Generator | None = None,
    max_iter: int = DEFAULT_LYAPUNOV_MAX_ITER,
    rtol: float = DEFAULT_LYAPUNOV_RTOL,
) -> Tensor:
    """(B,) finite-time top Lyapunov exponent per sequence, NaN for empty sequences:

        lambda_b = (1/L_b) log sigma_max(P_b),    P_b = J_{L_b - 1} ... J_0,

    the largest mean log growth per step over all start vectors (for a constant J it tends to the log
    spectral radius). How, without over/underflow however long the product:

    1. A start vector is pushed through P and back through P^T, renormalised after every step; the step
       growths g_t of the forward sweep are kept (log ||P v0|| = sum_t log g_t).
    2. Lanczos (Golub-Kahan) estimates sigma_max of the rescaled product P~ = prod_t (J_t / g_t), which
       stays near 1 along the directions that matter, starting from the back-swept vector;
       log sigma_max(P) = log sigma_max(P~) + sum_t log g_t.

    Every value found on the way, (1/L_b) log ||P v|| for unit v, is a lower bound; the result is the
    largest. One random vector pushed once through P (the plain QR method) is biased low by
    log|cos(v0, top right singular vector)| / L_b, about -log(D) / (2 L_b), and differs with every start.

    Without ``generator`` the start vectors come from a private generator seeded with 0, so the result is
    a deterministic function of the Jacobians: a fixed probe re-measured with unchanged weights reads the
    same lambda bit for bit. A product that reaches exactly zero gives -inf.
    """
    steps, batch, state = jac.time_steps, jac.batch_size, jac.state_size
    lengths = sequence_lengths(mask, steps, batch).to(jac.device)
    real_steps = mask.to(jac.device)
    length = lengths.to(jac.dtype).clamp(min=1)
    start = random_start_vectors((batch, state), dtype=jac.dtype, device=jac.device, generator=generator)
    image, growths = _renormalised_sweep(jac, start, real_steps, adjoint=False)
    log_scale = torch.log(growths).sum(dim=0)  # log ||P v0||
    back, back_growths = _renormalised_sweep(jac, image, real_steps, adjoint=True)
    best = torch.maximum(log_scale, torch.log(back_growths).sum(dim=0))  # log ||P^T u|| >= log ||P v0||
    # Rescale each step by the forward sweep's growth (1 where it was 0: that product is exactly zero).
    scale = torch.where(growths > 0, growths, torch.ones_like(growths)).unsqueeze(-1)
    active = lengths > 0

    def rescaled(v: Tensor, adjoint: bool) -> Tensor:
        order = reversed(range(steps)) if adjoint else range(steps)
        apply = jac.vjp if adjoint else jac.jvp
        for t in order:
            v = torch.where(real_steps[t].unsqueeze(-1), apply(v, t) / scale[t], v)
        return v

    finite = torch.isfinite(log_scale) & torch.isfinite(best)
    if bool((finite & active).any()):
        safe_back = torch.where((finite & active).unsqueeze(-1), back, start)
        estimate = spectral_norm_lanczos(
            lambda v: rescaled(v, False),
            lambda u: rescaled(u, True),
            safe_back,
            max_iter=max_iter,
            rtol=rtol,
            active=finite & active,
            check_interval=_LYAPUNOV_CHECK_INTERVAL,
            quiet_checks=_LYAPUNOV_QUIET_CHECKS,
        )
        lanczos = torch.log(estimate.sigma) + log_scale
        best = torch.where(finite & torch.isfinite(lanczos), torch.maximum(best, lanczos), best)
    # A non-finite Jacobian gives NaN; a product that vanished exactly gives -inf.
    best = torch.where(torch.isnan(log_scale) | torch.isnan(best), torch.full_like(best, math.nan), best)
    return torch.where(active, best / length, torch.full_like(best, float("nan")))


#: The shared Lyapunov estimate is used for sequences of at least this many real steps: the lag Lanczos
#: stops when sigma moved by < ``rtol`` (1e-3 by default), which moves lambda by <= rtol / L_b, inside the
#: 1e-4 per step bound from L_b = 10 on; shorter sequences (cheap) take the rescaled path.
SHARED_LYAPUNOV_MIN_STEPS = 16


def _representable(norm: Tensor) -> Tensor:
    """Norms far enough from the dtype's under/overflow limits (tiny**0.75 .. max**0.75: 1e-29 .. 1e29 in
    float32) that the unrescaled sweep, whose vectors pass through every partial product, lost nothing."""
    info = torch.finfo(norm.dtype)
    return torch.isfinite(norm) & (norm > info.tiny**0.75) & (norm < info.max**0.75)


@torch.no_grad()
def lyapunov_from_full_products(jac: StepJacobians, mask: Tensor, lag_estimate: LagNormEstimate) -> Tensor:
    """(B,) the top Lyapunov exponent as :func:`lyapunov_max` defines it, from the whole-product norms a
    ``full_products=True`` lag estimate found in its sweeps: lambda_b = log sigma_max(P_b) / L_b.

    Sequences whose whole product is not representable (under/overflow risk, see :func:`_representable`),
    did not converge, or has fewer than :data:`SHARED_LYAPUNOV_MIN_STEPS` steps fall back to
    :func:`lyapunov_max` (the rescaled path, which has no range limit); it runs only if one does.
    """
    norms, converged = lag_estimate.full_product_norms, lag_estimate.full_product_converged
    if norms is None or converged is None:
        raise ValueError("lag_estimate has no whole-product rows: use estimate_lag_norms(full_products=True)")
    steps, batch = jac.time_steps, jac.batch_size
    lengths = sequence_lengths(mask, steps, batch).to(norms.device)
    active = lengths > 0
    shared = converged & _representable(norms) & (lengths >= SHARED_LYAPUNOV_MIN_STEPS)
    exponents = torch.log(norms) / lengths.to(norms.dtype).clamp(min=1)
    exponents = torch.where(active, exponents, torch.full_like(exponents, float("nan")))
    if bool((active & ~shared).any()):  # one host sync; the rescaled path only where it is needed
        exponents = torch.where(shared, exponents, lyapunov_max(jac, mask))
    return exponents

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
below ~1e-38 reads 0 (vanished). The Lyapunov exponent renormalises every step and has no such limit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from gradwatch.estimators.jacobian import StepJacobians
from gradwatch.estimators.power_iteration import (
    MatVec,
    SpectralMethod,
    SpectralNormEstimate,
    random_start_vectors,
    safe_vector_norm,
    spectral_norm,
)

DEFAULT_LAG_MAX_ITER = 12
DEFAULT_LAG_RTOL = 1e-3

#: Lanczos convergence test for the lag products. A product matvec is a whole sweep over time, so a check
#: (small eigenproblems over K * B elements and one host sync) is cheap next to it: check after every
#: iteration and ask for three quiet ones in a row. Long products have well separated top singular values
#: (their spectrum spreads with tau) and leave after 3-4 iterations, which shrinks later sweeps to the
#: steps of the short lags.
_LAG_CONVERGENCE_TEST = {"check_interval": 1, "quiet_checks": 3}


def default_lags(time_steps: int) -> list[int]:
    """1, 2, 4, ... (powers of two <= T-1) plus T-1 itself; empty for T < 2."""
    if time_steps < 2:
        return []
    lags = []
    tau = 1
    while tau <= time_steps - 1:
        lags.append(tau)
        tau *= 2
    if lags[-1] != time_steps - 1:
        lags.append(time_steps - 1)
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
    """Norms of the lag products for every (lag, sequence): ``norms`` (K, B), NaN where tau > L_b."""

    lags: tuple[int, ...]
    norms: Tensor  # (K, B)
    estimate: SpectralNormEstimate  # the raw estimate over (K, B); right_vectors are a warm start


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
) -> LagNormEstimate:
    """Spectral norms of every lag product, all lags and sequences in one batched estimate.

    ``v0`` (K, B, D) warm start (ignored unless its shape, dtype and device fit).
    """
    checked_lags = _check_lags(lags)
    steps, batch, state = jac.time_steps, jac.batch_size, jac.state_size
    lengths = sequence_lengths(mask, steps, batch).to(jac.device)
    lag_count = len(checked_lags)
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
    valid = tau <= lengths.unsqueeze(0)  # (K, B)
    start = lengths.unsqueeze(0) - tau  # first step of each window
    time = torch.arange(steps, device=jac.device).view(steps, 1, 1)
    # in_window[t, k, b]: J_t is a factor of P_{tau_k, b}.
    in_window = valid & (time >= start) & (time < lengths.unsqueeze(0))
    in_window_vectors = in_window.unsqueeze(-1)
    # Which lags each step touches, on the host once, outside the iteration loops (one transfer).
    spans = _active_lag_spans(in_window.any(dim=2).cpu())

    def sweep(
        v: Tensor,
        apply: Callable[[Tensor, int], Tensor],
        order: Iterable[int],
        spans: list[list[tuple[int, int]]],
        window: Tensor,
    ) -> Tensor:
        # J_t is applied only to the rows of lags whose window covers t (window selects the sequences
        # within them): lag tau touches tau steps, so a sweep costs sum(tau) * B row products, not K * T * B.
        v = v.clone()
        for t in order:
            for lo, hi in spans[t]:
                rows = v[lo:hi]
                v[lo:hi] = torch.where(window[t, lo:hi], apply(rows, t), rows)
        return v

    def product(v: Tensor) -> Tensor:
        return sweep(v, jac.jvp, range(steps), spans, in_window_vectors)

    def adjoint_product(u: Tensor) -> Tensor:
        return sweep(u, jac.vjp, reversed(range(steps)), spans, in_window_vectors)

    def restrict(rows: Tensor) -> tuple[MatVec, MatVec]:
        # Only the (lag, sequence) pairs at flat positions rows = k * B + b still iterate: sweep the steps
        # their windows cover. Long lags usually converge first (a product's spectrum spreads out with
        # tau), and then the sweeps shrink from T steps to the few steps of the short lags.
        kept = torch.zeros(lag_count * batch, dtype=torch.bool, device=jac.device)
        kept[rows] = True
        window = in_window & kept.view(1, lag_count, batch)
        kept_spans = _active_lag_spans(window.any(dim=2).cpu())
        window_vectors = window.unsqueeze(-1)

        def embed(x: Tensor) -> Tensor:
            full = x.new_zeros((lag_count * batch, x.shape[-1]))
            full[rows] = x
            return full.view(lag_count, batch, -1)

        def restricted_product(v: Tensor) -> Tensor:
            swept = sweep(embed(v), jac.jvp, range(steps), kept_spans, window_vectors)
            return swept.reshape(lag_count * batch, -1)[rows]

        def restricted_adjoint(u: Tensor) -> Tensor:
            swept = sweep(embed(u), jac.vjp, reversed(range(steps)), kept_spans, window_vectors)
            return swept.reshape(lag_count * batch, -1)[rows]

        return restricted_product, restricted_adjoint

    shape = (lag_count, batch, state)
    usable_warm_start = (
        v0 is not None and tuple(v0.shape) == shape and v0.dtype == jac.dtype and v0.device == jac.device
    )
    start_vectors = (
        v0
        if usable_warm_start
        else random_start_vectors(shape, dtype=jac.dtype, device=jac.device, generator=generator)
    )
    assert start_vectors is not None
    raw = spectral_norm(
        method,
        product,
        adjoint_product,
        start_vectors,
        max_iter=max_iter,
        rtol=rtol,
        active=valid,
        restrict=restrict,
        **_LAG_CONVERGENCE_TEST,
    )
    norms = torch.where(valid, raw.sigma, torch.full_like(raw.sigma, float("nan")))
    return LagNormEstimate(checked_lags, norms, raw)


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


@torch.no_grad()
def lyapunov_max(jac: StepJacobians, mask: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """(B,) finite-time top Lyapunov exponent per sequence, NaN for empty sequences.

    A random unit vector is pushed through J_0 .. J_{L_b - 1} and renormalised after every step
    (the one-vector QR method); the exponent is the mean log growth, (1/L_b) sum_t log ||J_t v_t||, which
    tends to log of the top growth rate of the product (log spectral radius for a constant J).
    A vector that reaches exactly zero gives -inf (the product vanished).
    """
    steps, batch, state = jac.time_steps, jac.batch_size, jac.state_size
    lengths = sequence_lengths(mask, steps, batch).to(jac.device)
    vector = random_start_vectors((batch, state), dtype=jac.dtype, device=jac.device, generator=generator)
    log_growth = torch.zeros(batch, dtype=jac.dtype, device=jac.device)
    real_steps = mask.to(jac.device)
    for t in range(steps):
        image = jac.jvp(vector, t)
        growth = safe_vector_norm(image)
        log_growth = log_growth + torch.where(real_steps[t], torch.log(growth), torch.zeros_like(growth))
        safe_growth = torch.where(growth > 0, growth, torch.ones_like(growth)).unsqueeze(-1)
        vector = torch.where((real_steps[t] & (growth > 0)).unsqueeze(-1), image / safe_growth, vector)
    length = lengths.to(jac.dtype)
    return torch.where(
        lengths > 0, log_growth / length.clamp(min=1), torch.full_like(log_growth, float("nan"))
    )

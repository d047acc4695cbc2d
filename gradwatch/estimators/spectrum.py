"""The top-k Lyapunov spectrum of a layer: QR propagation of k tangent vectors through the step Jacobians.

Index convention as in :mod:`gradwatch.estimators.jacobian` (J_t = ds_{t+1}/ds_t; sequence b has L_b real
steps). The standard algorithm (Benettin et al. 1980; Vogt et al. 2022, arXiv:2006.14123; Engelken 2023,
arXiv:2312.17306) keeps an orthonormal frame Q (D x k) and re-orthonormalises it after every step,

    Q_{t+1} R_{t+1} = J_t Q_t,        lambda_i = (1/L_b) sum_t log |R_t[i, i]|,

so exponents never over- or underflow however long the product. From a random Q_0 one forward sweep gives
the sums of log |diag R| of P Q_0 (P = J_{L_b-1} ... J_0), a lower bound biased by the start frame's
misalignment, about log|cos| / L_b per exponent. :func:`lyapunov_spectrum` removes that bias with
orthogonal iteration on P: a backward sweep with J_t^T (same QR) turns the frame toward P's top right
singular vectors, and the next forward sweep reads them; passes repeat until the exponents stop moving.
The result is the finite-time spectrum lambda_i = (1/L_b) log sigma_i(P), i = 1..k, whose lambda_1 is the
:func:`~gradwatch.estimators.products.lyapunov_max` exponent.

:func:`qr_sweep` is the shared core: written with plain differentiable torch ops, it also serves
:func:`gradwatch.floss`, which backpropagates through torch.linalg.qr.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from gradwatch.estimators.jacobian import StepJacobians
from gradwatch.estimators.power_iteration import random_start_vectors
from gradwatch.estimators.products import sequence_lengths

DEFAULT_SPECTRUM_SIZE = 4
DEFAULT_SPECTRUM_MAX_PASSES = 6
#: Passes stop once no exponent's log sigma_i(P) moved by more than this between two forward sweeps
#: (a relative change of 1e-4 in sigma_i, the tolerance of lyapunov_max's Lanczos).
DEFAULT_SPECTRUM_TOLERANCE = 1e-4

#: Frame map of one step: (B, D, k) frame and step t -> (B, D, k) image J_t Q (or J_t^T Q).
FrameMap = Callable[[Tensor, int], Tensor]


def orthonormalise(frame: Tensor) -> tuple[Tensor, Tensor]:
    """QR of a batch of frames (..., D, k): the orthonormal factor with R's diagonal made positive, and
    log |diag R| (..., k), the log growth of each successive direction (-inf where one collapsed)."""
    q, r = torch.linalg.qr(frame)
    diagonal = torch.diagonal(r, dim1=-2, dim2=-1)
    sign = torch.where(diagonal < 0, -1.0, 1.0).to(frame.dtype)
    return q * sign.unsqueeze(-2), torch.log(diagonal.abs())


def qr_sweep(
    apply: FrameMap,
    frame: Tensor,
    order: Iterable[int],
    real_steps: Tensor | None = None,
    counted_from: int = 0,
) -> tuple[Tensor, Tensor]:
    """Push an orthonormal frame (B, D, k) through the steps in ``order`` with a QR after each:
    returns the final frame and the sums of log |diag R| (B, k) over the steps t >= ``counted_from``.

    ``real_steps`` (T, B) bool: on a padded step the frame is held and nothing is added. Differentiable
    (torch.linalg.qr has a backward for full-rank frames), so flossing uses it as is.
    """
    frame, total, _ = _sweep(apply, frame, order, real_steps, counted_from, accumulate=False)
    return frame, total


def _sweep(
    apply: FrameMap,
    frame: Tensor,
    order: Iterable[int],
    real_steps: Tensor | None,
    counted_from: int,
    accumulate: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """:func:`qr_sweep`, and with ``accumulate`` also log sigma_i(P Q_0) (B, k) from the product of the
    R factors, kept in float64 and rescaled after every step (NaN where its range ran out)."""
    total = frame.new_zeros((frame.shape[0], frame.shape[-1]))
    size = frame.shape[-1]
    triangular = torch.eye(size, dtype=torch.float64, device=frame.device).expand(frame.shape[0], size, size)
    log_scale = torch.zeros(frame.shape[0], dtype=torch.float64, device=frame.device)
    for t in order:
        image = apply(frame, t)
        q, r = torch.linalg.qr(image)
        diagonal = torch.diagonal(r, dim1=-2, dim2=-1)
        sign = torch.where(diagonal < 0, -1.0, 1.0).to(frame.dtype)
        q = q * sign.unsqueeze(-2)
        log_growth = torch.log(diagonal.abs())
        real = None if real_steps is None else real_steps[t]
        if real is not None:
            q = torch.where(real.view(-1, 1, 1), q, frame)
            log_growth = torch.where(real.unsqueeze(-1), log_growth, torch.zeros_like(log_growth))
        frame = q
        if t >= counted_from:
            total = total + log_growth
            if accumulate:
                step = (r * sign.unsqueeze(-1)).to(torch.float64) @ triangular
                scale = step.abs().amax(dim=(-2, -1)).clamp(min=1e-300)
                step = step / scale.view(-1, 1, 1)
                if real is not None:
                    step = torch.where(real.view(-1, 1, 1), step, triangular)
                    scale = torch.where(real, scale, torch.ones_like(scale))
                triangular, log_scale = step, log_scale + torch.log(scale)
    if not accumulate:
        return frame, total, None
    singular = torch.linalg.svdvals(triangular)  # sigma_i(P Q_0) / exp(log_scale), descending
    # Where sigma_i / sigma_1 falls below ~1e-12 float64 has no digits left for it: NaN (the caller then
    # keeps the diagonal sums, which are accurate exactly when the directions are that far apart).
    usable = singular > 1e-12 * singular[..., :1]
    ritz = torch.where(usable, torch.log(singular) + log_scale.unsqueeze(-1), torch.nan)
    return frame, total, ritz.to(frame.dtype)


def _frame_map(jac: StepJacobians, adjoint: bool) -> FrameMap:
    """J_t Q (or J_t^T Q) on frames (B, D, k) through the layer's batched matrix-free products, which take
    extra vectors as leading dimensions (k, B, D)."""
    apply = jac.vjp if adjoint else jac.jvp

    def frame_map(frame: Tensor, t: int) -> Tensor:
        return apply(frame.permute(2, 0, 1), t).permute(1, 2, 0)

    return frame_map


@dataclass(frozen=True)
class LyapunovSpectrum:
    """The top-k finite-time Lyapunov exponents of each sequence, largest first.

    ``exponents`` (B, k): lambda_i = (1/L_b) log sigma_i(J_{L_b-1} ... J_0), NaN for empty sequences;
    ``log_condition`` (B,): L_b (lambda_1 - lambda_k) = log(sigma_1 / sigma_k), the log condition number of
    the long-term Jacobian on its top-k directions (how unevenly the k directions carry gradient back);
    ``passes``: forward sweeps run; ``converged``: whether the last two agreed within the tolerance.
    """

    exponents: Tensor
    log_condition: Tensor
    passes: int
    converged: bool


@torch.no_grad()
def lyapunov_spectrum(
    jac: StepJacobians,
    mask: Tensor,
    k: int = DEFAULT_SPECTRUM_SIZE,
    *,
    generator: torch.Generator | None = None,
    max_passes: int = DEFAULT_SPECTRUM_MAX_PASSES,
    tolerance: float = DEFAULT_SPECTRUM_TOLERANCE,
    oversample: int | None = None,
) -> LyapunovSpectrum:
    """The top-k Lyapunov spectrum of every sequence (k is capped at the state size D).

    One forward QR sweep from a random orthonormal frame, then (backward sweep, forward sweep) passes of
    orthogonal iteration until no log sigma_i moves by more than ``tolerance`` or ``max_passes`` forward
    sweeps ran. Each forward sweep reads the singular values of P Q_0 (Rayleigh-Ritz on the frame's span,
    from the product of the R factors); ``oversample`` extra frame vectors (default k) speed convergence.
    Without ``generator`` the start frame comes from a private generator seeded with 0, so a fixed probe
    re-measured with unchanged weights reads the same spectrum.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if isinstance(max_passes, bool) or not isinstance(max_passes, int) or max_passes < 1:
        raise ValueError(f"max_passes must be a positive integer, got {max_passes!r}")
    steps, batch, state = jac.time_steps, jac.batch_size, jac.state_size
    lengths = sequence_lengths(mask, steps, batch).to(jac.device)
    real_steps = mask.to(jac.device)
    oversample = k if oversample is None else oversample
    size = min(k, state)
    # Extra frame vectors (oversampling): orthogonal iteration then converges for sigma_k at the rate
    # (sigma_{2k+1} / sigma_k)^2 per pass instead of (sigma_{k+1} / sigma_k)^2.
    frame_size = min(size + oversample, state)
    start = random_start_vectors(
        (batch, state, frame_size), dtype=jac.dtype, device=jac.device, generator=generator
    )
    start_frame, _ = orthonormalise(start)
    end_frame = start_frame
    forward, backward = _frame_map(jac, adjoint=False), _frame_map(jac, adjoint=True)
    log_sigma: Tensor | None = None
    passes, converged = 0, False
    while passes < max_passes:
        if passes:  # orthogonal iteration: P^T turns the frame toward P's top right singular vectors
            start_frame, _ = qr_sweep(backward, end_frame, reversed(range(steps)), real_steps)
        end_frame, diagonal_sums, ritz = _sweep(forward, start_frame, range(steps), real_steps, 0, True)
        assert ritz is not None
        # Rayleigh-Ritz on the frame's span: the singular values of P Q_0 are closer to sigma_i(P) than the
        # diagonal of R (exact once the span is P's top-k right singular subspace, whatever its order).
        sums = torch.where(torch.isnan(ritz), diagonal_sums, ritz)
        passes += 1
        if log_sigma is not None:
            change = (sums[:, :size] - log_sigma[:, :size]).abs()
            settled = ~torch.isfinite(sums[:, :size]) | (change <= tolerance)
            log_sigma = sums
            if bool(settled.all()):  # one host sync per pass
                converged = True
                break
        log_sigma = sums
    assert log_sigma is not None
    active = (lengths > 0).unsqueeze(-1)
    exponents = log_sigma[:, :size] / lengths.to(jac.dtype).clamp(min=1).unsqueeze(-1)
    exponents = torch.where(active, exponents, torch.full_like(exponents, math.nan))
    log_condition = exponents[:, 0] - exponents[:, -1]
    log_condition = log_condition * lengths.to(jac.dtype)
    return LyapunovSpectrum(exponents, log_condition, passes, converged)

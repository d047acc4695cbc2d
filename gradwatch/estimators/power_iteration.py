"""Batched, matrix-free estimates of the largest singular value sigma_max(A) of many small operators.

Both methods see A only through ``matvec: (*batch, D) -> (*batch, M)`` (v -> A v) and
``rmatvec: (*batch, M) -> (*batch, D)`` (u -> A^T u), applied to every batch element at once.

* :func:`spectral_norm_power_iteration`: power iteration on A^T A. Converges like (sigma_2/sigma_1)^(2k),
  slow for RNN step Jacobians, whose top singular values are close (sigma_2/sigma_1 ~ 0.97).
* :func:`spectral_norm_lanczos`: Golub-Kahan-Lanczos bidiagonalisation with full reorthogonalisation.
  After k steps, U_k^T A V_{k+1} = [B_k, beta_k e_k] (B_k upper bidiagonal with alpha_j on the diagonal,
  beta_j above it) is a compression of A onto orthonormal bases, so its top singular value is a lower bound
  of sigma_max(A) that converges much faster than power iteration on clustered spectra.

Both report ``sigma = ||A v||`` for the final unit vector v, which can never exceed sigma_max(A) (beyond
rounding): an estimate is always a lower bound. Zero operators give sigma = 0, non-finite ones sigma = NaN.
Convergence is checked every few iterations with one host synchronisation per check (no per-element syncs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

MatVec = Callable[[Tensor], Tensor]

#: Classical Gram-Schmidt passes per Lanczos step (1 measured as accurate as 2 on RNN Jacobians, see
#: docs/estimators.md; the reported sigma is re-measured as ||A v|| either way, so it stays a lower bound).
REORTHOGONALISATION_PASSES = 1

#: Iterations between two convergence checks (each check is one host synchronisation). An estimate has
#: converged when it moved by less than rtol (relatively) since the previous check: measuring the change
#: over several iterations, not one, guards against stopping while Lanczos stagnates for a step.
CONVERGENCE_CHECK_INTERVAL = 3


@dataclass(frozen=True)
class SpectralNormEstimate:
    """Estimates of sigma_max for a batch of operators, with the vectors that achieved them."""

    sigma: Tensor  # (*batch,) largest singular value estimates (||A v|| for the final unit v)
    right_vectors: Tensor  # (*batch, D) unit vectors, reusable as a warm start
    converged: Tensor  # (*batch,) bool: relative change below rtol since the previous check
    iterations: int  # iterations actually run (the same for the whole batch)


def safe_vector_norm(x: Tensor) -> Tensor:
    """Euclidean norm over the last axis that neither overflows nor underflows for huge or tiny entries."""
    scale = x.abs().amax(dim=-1, keepdim=True)
    safe_scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.linalg.vector_norm(x / safe_scale, dim=-1) * scale.squeeze(-1)


def random_start_vectors(
    shape: tuple[int, ...], *, dtype: torch.dtype, device: torch.device, generator: torch.Generator | None
) -> Tensor:
    """Random unit vectors along the last axis, drawn from ``generator`` (never the global RNG).

    Without a generator a private one seeded with 0 is used, so results are reproducible and the user's
    random stream is untouched. A generator on another device draws there and the result is moved.
    """
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(0)
    draw_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    vectors = torch.randn(shape, generator=generator, dtype=draw_dtype, device=generator.device)
    vectors, _ = _normalise(vectors.to(device=device, dtype=dtype))
    return vectors


def _normalise(x: Tensor) -> tuple[Tensor, Tensor]:
    """(x / ||x||, ||x||) with zero vectors left at zero instead of 0/0 = NaN."""
    norm = safe_vector_norm(x)
    safe = torch.where(norm > 0, norm, torch.ones_like(norm))
    return x / safe.unsqueeze(-1), norm


def _validate(v0: Tensor, max_iter: int, rtol: float, active: Tensor | None) -> None:
    if not isinstance(v0, Tensor) or v0.ndim < 1 or v0.shape[-1] == 0:
        raise ValueError(
            f"v0 must be a tensor of shape (*batch, D) with D >= 1, got {getattr(v0, 'shape', v0)!r}"
        )
    if not v0.is_floating_point():
        raise TypeError(f"v0 must be a floating-point tensor, got dtype {v0.dtype}")
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
    if not rtol > 0:
        raise ValueError(f"rtol must be a positive float, got {rtol!r}")
    if active is not None and active.shape != v0.shape[:-1]:
        raise ValueError(
            f"active must have the batch shape {tuple(v0.shape[:-1])} of v0, got {tuple(active.shape)}"
        )


def _changed_little(new: Tensor, old: Tensor, rtol: float) -> Tensor:
    """Relative change below rtol; exact repeats (0 -> 0 for zero operators) count as converged."""
    return (new - old).abs() <= rtol * new.abs()


def _all_settled(converged: Tensor, sigma: Tensor, active: Tensor | None) -> bool:
    """True when every active, finite estimate has converged (non-finite ones never will: don't wait)."""
    settled = converged | ~torch.isfinite(sigma)
    if active is not None:
        settled = settled | ~active
    return bool(settled.all())


@torch.no_grad()
def spectral_norm_power_iteration(
    matvec: MatVec,
    rmatvec: MatVec,
    v0: Tensor,
    *,
    max_iter: int = 100,
    rtol: float = 1e-4,
    active: Tensor | None = None,
) -> SpectralNormEstimate:
    """Power iteration on A^T A from the (warm) start v0; stops when all active estimates settled.

    ``active`` (*batch,) bool, optional: elements whose convergence decides when to stop (padded steps
    need not converge). Zero start vectors stay zero and give sigma = 0.
    """
    _validate(v0, max_iter, rtol, active)
    v, _ = _normalise(v0)
    sigma = torch.full(v.shape[:-1], float("nan"), dtype=v.dtype, device=v.device)
    converged = torch.zeros(v.shape[:-1], dtype=torch.bool, device=v.device)
    checkpoint = sigma  # the estimate at the previous convergence check
    iterations = 0
    for iterations in range(1, max_iter + 1):
        u = matvec(v)
        new_sigma = safe_vector_norm(u)
        converged = _changed_little(new_sigma, checkpoint, rtol)
        sigma = new_sigma
        if iterations == max_iter:
            break  # keep v paired with sigma = ||A v||
        v_next, w_norm = _normalise(rmatvec(u))
        # A^T A v = 0 (zero operator or v in its null space): keep v, sigma stays at its value 0.
        v = torch.where((w_norm > 0).unsqueeze(-1), v_next, v)
        if iterations % CONVERGENCE_CHECK_INTERVAL != 0:
            continue
        checkpoint = sigma
        if _all_settled(converged, sigma, active):
            # sigma = ||A v_prev||; one more product pairs the returned vector with its estimate.
            sigma = safe_vector_norm(matvec(v))
            break
    return SpectralNormEstimate(sigma, v, converged, iterations)


def _orthogonalise(w: Tensor, basis: Tensor, count: int, passes: int) -> Tensor:
    """Remove the components of w along the first ``count`` basis vectors (classical Gram-Schmidt).

    basis: (K, N, D) with orthonormal (or zero) vectors basis[k, n] for each of the N batch elements,
    w: (N, D). The basis index comes first so each new vector is one contiguous write and every basis
    vector is a contiguous block. Two passes give orthogonality to working precision ("twice is
    enough", Giraud et al. 2005); one pass on top of the three-term recurrence kept the top Ritz value as
    accurate on RNN Jacobians at half the memory traffic (docs/estimators.md).
    """
    if count == 0:
        return w
    for _ in range(passes):
        # One contiguous (N, D) block per basis vector: on CPU these per-vector loops measured 2-5x faster
        # than einsum/bmm over the (count, N, D) slice (which reshuffles it), near the memory-bandwidth floor.
        coefficients = [(basis[k] * w).sum(dim=-1, keepdim=True) for k in range(count)]
        w = w.clone()
        for k in range(count):
            w.addcmul_(basis[k], coefficients[k], value=-1)
    return w


def _breakdown_to_zero(x: Tensor, norm: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """Normalise x; a norm at rounding level relative to the operator's scale means the Krylov space is
    exhausted (an invariant subspace was found): return a zero vector so it adds nothing, instead of noise."""
    eps = torch.finfo(x.dtype).eps
    exhausted = norm <= 16 * eps * scale
    norm = torch.where(exhausted, torch.zeros_like(norm), norm)
    safe = torch.where(norm > 0, norm, torch.ones_like(norm))
    return x / safe.unsqueeze(-1), norm


def _top_singular_value(bidiagonal: Tensor) -> Tensor:
    """sigma_max of a batch of small matrices; non-finite matrices give NaN instead of a LAPACK error.

    sigma_max(B)^2 is the largest eigenvalue of the symmetric (tridiagonal) B B^T: a batched symmetric
    eigensolver is several times faster than a batched SVD here, and the top value loses no accuracy.
    """
    finite = torch.isfinite(bidiagonal).flatten(-2).all(dim=-1)
    cleaned = torch.where(finite[..., None, None], bidiagonal, torch.zeros_like(bidiagonal))
    # Scale to a largest entry of 1 first, so squaring neither overflows nor underflows.
    scale = cleaned.abs().amax(dim=(-2, -1), keepdim=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    unit = cleaned / scale
    top = torch.linalg.eigvalsh(unit @ unit.mT)[..., -1].clamp(min=0).sqrt() * scale[..., 0, 0]
    return torch.where(finite, top, torch.full_like(top, float("nan")))


def _top_right_singular_vector(bidiagonal: Tensor) -> Tensor:
    """Right singular vector of the top singular value: the top eigenvector of B^T B (0 if non-finite)."""
    finite = torch.isfinite(bidiagonal).flatten(-2).all(dim=-1)
    cleaned = torch.where(finite[..., None, None], bidiagonal, torch.zeros_like(bidiagonal))
    scale = cleaned.abs().amax(dim=(-2, -1), keepdim=True)
    unit = cleaned / torch.where(scale > 0, scale, torch.ones_like(scale))
    _, vectors = torch.linalg.eigh(unit.mT @ unit)
    return vectors[..., :, -1]


@torch.no_grad()
def spectral_norm_lanczos(
    matvec: MatVec,
    rmatvec: MatVec,
    v0: Tensor,
    *,
    max_iter: int = 24,
    rtol: float = 1e-4,
    active: Tensor | None = None,
    reorthogonalisation_passes: int = REORTHOGONALISATION_PASSES,
) -> SpectralNormEstimate:
    """Golub-Kahan-Lanczos bidiagonalisation with full reorthogonalisation, started from v0.

    Each iteration costs one matvec and one rmatvec. The Krylov bases U, V are stored for the whole batch
    ((*batch, max_iter + 1, D) and (*batch, max_iter, M)). ``active`` as in power iteration.
    """
    _validate(v0, max_iter, rtol, active)
    batch_shape = v0.shape[:-1]
    v, _ = _normalise(v0)
    first_u = matvec(v)
    elements = v[..., 0].numel()
    # Krylov basis, basis index first: right_basis[k] = v_k for all batch elements.
    # Only V is stored and reorthogonalised ("one-sided" Lanczos bidiagonalisation, Simon & Zha 2000): U
    # follows the three-term recurrence, which kept the top Ritz value as accurate on RNN Jacobians at half
    # the memory and traffic. Slots are written before they are read, so the basis needs no zeroing.
    right_basis = v.new_empty((max_iter + 1, elements, v.shape[-1]))
    # Row j holds alpha_j at column j and beta_j at column j + 1: U_k^T A V_{k+1}.
    bidiagonal = v.new_zeros((*batch_shape, max_iter, max_iter + 1))
    right_basis[0] = v.reshape(elements, -1)
    u, alpha = _normalise(first_u)
    scale = alpha.clone()  # largest alpha/beta so far: the reference for "rounding-level" breakdown
    sigma = torch.full(batch_shape, float("nan"), dtype=v.dtype, device=v.device)
    converged = torch.zeros(batch_shape, dtype=torch.bool, device=v.device)
    checkpoint = sigma  # the estimate at the previous convergence check
    steps = 0
    for j in range(max_iter):
        steps = j + 1
        bidiagonal[..., j, j] = alpha
        # beta_j v_{j+1} = A^T u_j - alpha_j v_j, then made orthogonal to all earlier v.
        w = rmatvec(u) - alpha.unsqueeze(-1) * right_basis[j].view(v.shape)
        w = _orthogonalise(w.reshape(elements, -1), right_basis, j + 1, reorthogonalisation_passes).view(
            v.shape
        )
        v_next, beta = _breakdown_to_zero(w, safe_vector_norm(w), scale)
        scale = torch.maximum(scale, beta)
        right_basis[j + 1] = v_next.reshape(elements, -1)
        bidiagonal[..., j, j + 1] = beta
        is_check = (j + 1) % CONVERGENCE_CHECK_INTERVAL == 0
        if is_check or j + 1 == max_iter:  # the small SVDs are only needed where they are looked at
            sigma = _top_singular_value(bidiagonal[..., : j + 1, : j + 2])
            converged = _changed_little(sigma, checkpoint, rtol)
            checkpoint = sigma
            if j + 1 == max_iter or _all_settled(converged, sigma, active):
                break
        # alpha_{j+1} u_{j+1} = A v_{j+1} - beta_j u_j, made orthogonal to all earlier u.
        z = matvec(v_next) - beta.unsqueeze(-1) * u
        z = z.view(first_u.shape)  # one-sided: only V is reorthogonalised (Simon & Zha 2000)
        u, alpha = _breakdown_to_zero(z, safe_vector_norm(z), scale)
        scale = torch.maximum(scale, alpha)
    # Ritz vector: V_{k+1} y for the top right singular vector y of the small matrix; re-measured as ||A v||
    # (one more matvec) so the reported sigma is a guaranteed lower bound, even after rounding in the basis.
    small = bidiagonal[..., :steps, : steps + 1]
    ritz_coefficients = _top_right_singular_vector(small)
    right_vectors, _ = _normalise(
        torch.einsum("nk,knd->nd", ritz_coefficients.reshape(elements, -1), right_basis[: steps + 1]).view(
            v.shape
        )
    )
    measured = safe_vector_norm(matvec(right_vectors))
    # Keep NaN for non-finite operators (the cleaned SVD above would otherwise report 0).
    sigma = torch.where(torch.isfinite(sigma), measured, sigma)
    return SpectralNormEstimate(sigma, right_vectors, converged, steps)


SpectralMethod = Literal["lanczos", "power"]
SPECTRAL_METHODS: tuple[SpectralMethod, ...] = ("lanczos", "power")


def spectral_norm(
    method: SpectralMethod,
    matvec: MatVec,
    rmatvec: MatVec,
    v0: Tensor,
    *,
    max_iter: int,
    rtol: float,
    active: Tensor | None = None,
) -> SpectralNormEstimate:
    """Dispatch to :func:`spectral_norm_lanczos` or :func:`spectral_norm_power_iteration` by name."""
    if method == "lanczos":
        return spectral_norm_lanczos(matvec, rmatvec, v0, max_iter=max_iter, rtol=rtol, active=active)
    if method == "power":
        return spectral_norm_power_iteration(matvec, rmatvec, v0, max_iter=max_iter, rtol=rtol, active=active)
    raise ValueError(f"unknown spectral norm method {method!r}; expected one of {SPECTRAL_METHODS}")

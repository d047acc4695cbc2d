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

from collections.abc import Callable, Sequence
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

#: Lanczos: consecutive checks an element's estimate must pass before it counts as converged. One window
#: is not enough once elements stop on their own: when the start vector barely touches the top singular
#: direction, the Ritz value first settles on sigma_2 (a relu Jacobian sat at 0.9386 for 6 iterations,
#: then rose to sigma_1 = 0.9728). Two windows caught every such case in docs/estimators.md's study.
CONSECUTIVE_CHECKS = 2


@dataclass(frozen=True)
class SpectralNormEstimate:
    """Estimates of sigma_max for a batch of operators, with the vectors that achieved them."""

    sigma: Tensor  # (*batch,) largest singular value estimates (||A v|| for the final unit v)
    right_vectors: Tensor  # (*batch, D) unit vectors, reusable as a warm start
    converged: Tensor  # (*batch,) bool: relative change below rtol since the previous check
    iterations: int  # iterations run by the slowest element
    element_iterations: Tensor | None = None  # (*batch,) iterations each element ran (Lanczos only)


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


def warm_or_random_start(
    warm: Tensor | None,
    shape: tuple[int, ...],
    *,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """Start vectors of shape ``shape``: the previous estimate's ``warm`` vectors where they fit, with every
    row that is non-finite or zero replaced by a random one; and which rows are warm (shape[:-1], bool).

    A product that was exactly 0 once (dead ReLU units at that measurement) leaves a zero right vector, and
    iterating from 0 reads 0 for ever after: such a row must start afresh."""
    fresh = random_start_vectors(shape, dtype=dtype, device=device, generator=generator)
    if warm is None or tuple(warm.shape) != shape or warm.dtype != dtype or warm.device != device:
        return fresh, torch.zeros(shape[:-1], dtype=torch.bool, device=device)
    usable = torch.isfinite(warm).all(dim=-1) & (safe_vector_norm(warm) > 0)
    return torch.where(usable.unsqueeze(-1), warm, fresh), usable


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


def _orthogonalise(w: Tensor, basis: Sequence[Tensor], count: int, passes: int) -> Tensor:
    """Remove the components of w along the first ``count`` basis vectors (classical Gram-Schmidt).

    basis: K blocks (N, D) with orthonormal (or zero) vectors basis[k][n] for each of the N batch elements,
    w: (N, D). Each basis vector is one contiguous block. Two passes give orthogonality to working
    precision ("twice is enough", Giraud et al. 2005); one pass on top of the three-term recurrence kept
    the top Ritz value as accurate on RNN Jacobians at half the memory traffic (docs/estimators.md).
    """
    if count == 0:
        return w
    for _ in range(passes):
        # One contiguous (N, D) block per basis vector: on CPU these per-vector loops beat einsum/bmm over the
        # (count, N, D) slice, which reshuffles it (docs/performance.md).
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


def _symmetric_eigenvalues(matrix: Tensor) -> Tensor:
    """Ascending eigenvalues of a batch of symmetric matrices, robust to LAPACK's rare failures.

    Bidiagonals with exact zeros (an exhausted Krylov space, e.g. relu layers with dead units) can make
    float32 ``syevd`` report "failed to converge"; float64 and then an SVD (whose squares are the
    eigenvalues of these positive semi-definite matrices) take over instead of failing the measurement.
    """
    try:
        return torch.linalg.eigvalsh(matrix)
    except torch.linalg.LinAlgError:
        pass
    try:
        return torch.linalg.eigvalsh(matrix.double()).to(matrix.dtype)
    except torch.linalg.LinAlgError:
        return torch.linalg.svdvals(matrix.double()).flip(-1).to(matrix.dtype)


def _symmetric_top_eigenvector(matrix: Tensor) -> Tensor:
    """Eigenvector of the largest eigenvalue of a batch of symmetric positive semi-definite matrices."""
    try:
        return torch.linalg.eigh(matrix)[1][..., :, -1]
    except torch.linalg.LinAlgError:
        pass
    try:
        return torch.linalg.eigh(matrix.double())[1][..., :, -1].to(matrix.dtype)
    except torch.linalg.LinAlgError:
        return torch.linalg.svd(matrix.double())[0][..., :, 0].to(matrix.dtype)


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
    top = _symmetric_eigenvalues(unit @ unit.mT)[..., -1].clamp(min=0).sqrt() * scale[..., 0, 0]
    return torch.where(finite, top, torch.full_like(top, float("nan")))


def _top_right_singular_vector(bidiagonal: Tensor) -> Tensor:
    """Right singular vector of the top singular value: the top eigenvector of B^T B (0 if non-finite)."""
    finite = torch.isfinite(bidiagonal).flatten(-2).all(dim=-1)
    cleaned = torch.where(finite[..., None, None], bidiagonal, torch.zeros_like(bidiagonal))
    scale = cleaned.abs().amax(dim=(-2, -1), keepdim=True)
    unit = cleaned / torch.where(scale > 0, scale, torch.ones_like(scale))
    return _symmetric_top_eigenvector(unit.mT @ unit)


Restrict = Callable[[Tensor], tuple[MatVec, MatVec]]
"""``restrict(rows)``: the operator restricted to the flat batch elements ``rows`` (a 1-D index into the
flattened batch), as (matvec, rmatvec) on (len(rows), D) / (len(rows), M) tensors."""


@dataclass
class _LanczosState:
    """The Krylov state of the elements still iterating (row r belongs to flat batch element rows[r])."""

    rows: Tensor  # (n,) flat batch indices
    # v_0 .. v_k, one (n, D) block per basis vector: allocated as the iteration goes, so the memory follows
    # the iterations actually run (a warm start needs a third of max_iter), not max_iter.
    right_basis: list[Tensor]
    bidiagonal: Tensor  # (n, max_iter, max_iter + 1): row j holds alpha_j at column j, beta_j at j + 1
    u: Tensor  # (n, M) current left vector
    alpha: Tensor  # (n,)
    scale: Tensor  # (n,) largest alpha/beta so far: the reference for "rounding-level" breakdown
    checkpoint: Tensor  # (n,) the estimate at the previous convergence check
    streak: Tensor  # (n,) consecutive checks passed so far
    required: Tensor  # (n,) consecutive checks each element needs

    def keep(self, kept: Tensor) -> None:
        """Keep only the rows ``kept`` (bool over the current rows). Basis vectors are replaced one at a
        time, so compaction never holds two copies of the whole basis."""
        self.rows = self.rows[kept]
        for index, vector in enumerate(self.right_basis):
            self.right_basis[index] = vector[kept]
        self.bidiagonal = self.bidiagonal[kept]
        self.u = self.u[kept]
        self.alpha = self.alpha[kept]
        self.scale = self.scale[kept]
        self.checkpoint = self.checkpoint[kept]
        self.streak = self.streak[kept]
        self.required = self.required[kept]


@torch.no_grad()
def spectral_norm_lanczos(
    matvec: MatVec,
    rmatvec: MatVec,
    v0: Tensor,
    *,
    max_iter: int = 24,
    rtol: float = 1e-4,
    active: Tensor | None = None,
    restrict: Restrict | None = None,
    check_interval: int = CONVERGENCE_CHECK_INTERVAL,
    quiet_checks: int | Tensor = CONSECUTIVE_CHECKS,
    reorthogonalisation_passes: int = REORTHOGONALISATION_PASSES,
) -> SpectralNormEstimate:
    """Golub-Kahan-Lanczos bidiagonalisation with full reorthogonalisation, started from v0.

    Each iteration costs one matvec and one rmatvec. The Krylov basis V grows by one (N, D) block per
    iteration (up to max_iter + 1 of them). ``active`` as in power iteration. With ``restrict`` (see
    :data:`Restrict`) the batch is compacted at every convergence check: elements that converged
    (estimate changed by less than rtol over each of their last ``quiet_checks`` check intervals) are
    finished (their Ritz vector is formed) and leave the iteration, so the cost follows the average
    element, not the slowest one;
    inactive elements never enter it (their sigma is ||A v0||). ``check_interval`` and ``quiet_checks``
    tune the test: checks every few iterations (each is a batch of small eigenproblems and one host
    synchronisation) and how many consecutive ones an element must pass (an int, or a (*batch,) integer
    tensor: a start vector from an earlier estimate of the same operator cannot stall on sigma_2 the way
    a random one can, so it may be trusted after fewer).
    """
    _validate(v0, max_iter, rtol, active)
    required = torch.as_tensor(quiet_checks, device=v0.device).expand(v0.shape[:-1]).reshape(-1)
    if check_interval < 1 or required.is_floating_point() or bool((required < 1).any()):
        raise ValueError(
            "check_interval and quiet_checks must be positive integers, "
            f"got {check_interval!r} and {quiet_checks!r}"
        )
    batch_shape = v0.shape[:-1]
    size = v0.shape[-1]
    v, _ = _normalise(v0)
    elements = v[..., 0].numel()
    flat_v = v.reshape(elements, size)

    def full_matvec(x: Tensor) -> Tensor:
        return matvec(x.view(*batch_shape, size)).reshape(elements, -1)

    def full_rmatvec(y: Tensor) -> Tensor:
        return rmatvec(y.view(*batch_shape, y.shape[-1])).reshape(elements, size)

    # What each element ends with: its Ritz vector, the small problem's estimate (NaN marks a non-finite
    # operator), whether it converged and how many iterations it ran.
    final_vectors = flat_v.clone()
    final_estimate = torch.zeros(elements, dtype=v.dtype, device=v.device)
    final_converged = torch.zeros(elements, dtype=torch.bool, device=v.device)
    final_iterations = torch.zeros(elements, dtype=torch.long, device=v.device)

    rows = torch.arange(elements, device=v.device)
    flat_active = None if active is None else active.reshape(elements).to(v.device)
    op_matvec: MatVec = full_matvec
    op_rmatvec: MatVec = full_rmatvec
    if restrict is not None and flat_active is not None and not bool(flat_active.all()):
        rows = rows[flat_active]  # padded steps never enter the iteration
        op_matvec, op_rmatvec = restrict(rows)
    if rows.numel() == 0:
        return _finish(
            full_matvec, final_vectors, final_estimate, final_converged, final_iterations, batch_shape, 0
        )
    start = flat_v[rows]
    first_u = op_matvec(start)
    u, alpha = _normalise(first_u)
    n = rows.numel()
    # Only V is stored and reorthogonalised ("one-sided" Lanczos bidiagonalisation, Simon & Zha 2000): U
    # follows the three-term recurrence, which kept the top Ritz value as accurate on RNN Jacobians at half
    # the memory and traffic.
    right_basis = [start]
    state = _LanczosState(
        rows=rows,
        right_basis=right_basis,
        bidiagonal=v.new_zeros((n, max_iter, max_iter + 1)),
        u=u,
        alpha=alpha,
        scale=alpha.clone(),
        # alpha_0 = ||A v_0|| is the estimate of the one-vector Krylov space: from a warm start that is
        # already right, the first two checks can pass and the element stops after 2 intervals.
        checkpoint=alpha.clone(),
        streak=torch.zeros(n, dtype=torch.long, device=v.device),
        required=required.to(v.device)[rows],
    )

    def finish_rows(selected: Tensor, steps: int, sigma: Tensor, converged: Tensor) -> None:
        """Form the Ritz vectors V_{k+1} y of the ``selected`` rows (y: top right singular vector of their
        small matrix) and store them with their estimate and convergence flag."""
        small = state.bidiagonal[selected, :steps, : steps + 1]
        coefficients = _top_right_singular_vector(small)
        vectors = torch.einsum(
            "nk,knd->nd", coefficients, torch.stack([vector[selected] for vector in state.right_basis])
        )
        targets = state.rows[selected]
        final_vectors[targets] = _normalise(vectors)[0]
        final_estimate[targets] = sigma[selected]
        final_converged[targets] = converged[selected]
        final_iterations[targets] = steps

    steps = 0
    for j in range(max_iter):
        steps = j + 1
        state.bidiagonal[:, j, j] = state.alpha
        # beta_j v_{j+1} = A^T u_j - alpha_j v_j, then made orthogonal to all earlier v.
        w = op_rmatvec(state.u) - state.alpha.unsqueeze(-1) * state.right_basis[j]
        w = _orthogonalise(w, state.right_basis, j + 1, reorthogonalisation_passes)
        v_next, beta = _breakdown_to_zero(w, safe_vector_norm(w), state.scale)
        state.scale = torch.maximum(state.scale, beta)
        state.right_basis.append(v_next)
        state.bidiagonal[:, j, j + 1] = beta
        if (j + 1) % check_interval == 0 or j + 1 == max_iter:
            # The small SVDs are only needed where they are looked at.
            sigma = _top_singular_value(state.bidiagonal[:, : j + 1, : j + 2])
            passed = _changed_little(sigma, state.checkpoint, rtol)
            state.streak = torch.where(passed, state.streak + 1, torch.zeros_like(state.streak))
            converged = state.streak >= state.required
            state.checkpoint = sigma
            settled = converged | ~torch.isfinite(sigma)
            if restrict is None and flat_active is not None:
                settled = settled | ~flat_active[state.rows]
            everyone = j + 1 == max_iter or bool(settled.all())
            if everyone:
                finish_rows(torch.ones_like(settled), steps, sigma, converged)
                break
            if restrict is not None and bool(settled.any()):
                finish_rows(settled, steps, sigma, converged)
                kept = ~settled
                state.keep(kept)
                v_next, beta = v_next[kept], beta[kept]
                op_matvec, op_rmatvec = restrict(state.rows)
        # alpha_{j+1} u_{j+1} = A v_{j+1} - beta_j u_j (one-sided: U is not reorthogonalised).
        z = op_matvec(v_next) - beta.unsqueeze(-1) * state.u
        state.u, state.alpha = _breakdown_to_zero(z, safe_vector_norm(z), state.scale)
        state.scale = torch.maximum(state.scale, state.alpha)
    return _finish(
        full_matvec, final_vectors, final_estimate, final_converged, final_iterations, batch_shape, steps
    )


def _finish(
    full_matvec: MatVec,
    vectors: Tensor,
    estimate: Tensor,
    converged: Tensor,
    iterations: Tensor,
    batch_shape: torch.Size,
    steps: int,
) -> SpectralNormEstimate:
    """Re-measure every final vector as ||A v|| (one matvec), so the reported sigma is a guaranteed lower
    bound even after rounding in the basis; NaN stays NaN for non-finite operators."""
    measured = safe_vector_norm(full_matvec(vectors))
    sigma = torch.where(torch.isfinite(estimate), measured, estimate)
    size = vectors.shape[-1]
    return SpectralNormEstimate(
        sigma.view(batch_shape),
        vectors.view(*batch_shape, size),
        converged.view(batch_shape),
        steps,
        iterations.view(batch_shape),
    )


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
    restrict: Restrict | None = None,
    check_interval: int = CONVERGENCE_CHECK_INTERVAL,
    quiet_checks: int | Tensor = CONSECUTIVE_CHECKS,
) -> SpectralNormEstimate:
    """Dispatch to :func:`spectral_norm_lanczos` or :func:`spectral_norm_power_iteration` by name
    (``restrict``, ``check_interval`` and ``quiet_checks`` tune Lanczos; power iteration ignores them)."""
    if method == "lanczos":
        return spectral_norm_lanczos(
            matvec,
            rmatvec,
            v0,
            max_iter=max_iter,
            rtol=rtol,
            active=active,
            restrict=restrict,
            check_interval=check_interval,
            quiet_checks=quiet_checks,
        )
    if method == "power":
        return spectral_norm_power_iteration(matvec, rmatvec, v0, max_iter=max_iter, rtol=rtol, active=active)
    raise ValueError(f"unknown spectral norm method {method!r}; expected one of {SPECTRAL_METHODS}")

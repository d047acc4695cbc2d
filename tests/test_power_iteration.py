"""Batched spectral-norm estimators against exact SVDs of dense matrices."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from gradwatch.estimators.power_iteration import (
    CONSECUTIVE_CHECKS,
    CONVERGENCE_CHECK_INTERVAL,
    random_start_vectors,
    safe_vector_norm,
    spectral_norm,
    spectral_norm_lanczos,
    spectral_norm_power_iteration,
)

METHODS = ["lanczos", "power"]


def operators(matrices: Tensor):
    """matvec / rmatvec of a batch of dense matrices (*batch, M, D)."""
    return (
        lambda v: torch.einsum("...md,...d->...m", matrices, v),
        lambda u: torch.einsum("...md,...m->...d", matrices, u),
    )


def matrices_with_gap(
    batch: int, rows: int, columns: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Random matrices with singular values 2, 1, ... (a clear gap, so power iteration converges fast)."""
    k = min(rows, columns)
    left, _ = torch.linalg.qr(torch.randn(batch, rows, k, generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(batch, columns, k, generator=generator, dtype=torch.float64))
    singular = torch.linspace(1.0, 0.1, k, dtype=torch.float64).repeat(batch, 1)
    singular[:, 0] = 2.0
    return left @ torch.diag_embed(singular) @ right.transpose(-1, -2), singular[:, 0]


@pytest.mark.parametrize("method", METHODS, ids=METHODS)
@pytest.mark.parametrize(
    "shape", [(7, 5, 5), (3, 4, 9, 6), (6, 12, 3)], ids=["square", "two-batch-dims", "tall"]
)
def test_matches_exact_norm(method: str, shape: tuple[int, ...]) -> None:
    generator = torch.Generator().manual_seed(1)
    batch = 1
    for size in shape[:-2]:
        batch *= size
    dense, _ = matrices_with_gap(batch, shape[-2], shape[-1], generator)
    dense = dense.reshape(shape)
    matvec, rmatvec = operators(dense)
    v0 = torch.randn(*shape[:-2], shape[-1], generator=generator, dtype=torch.float64)
    estimate = spectral_norm(method, matvec, rmatvec, v0, max_iter=200, rtol=1e-10)
    exact = torch.linalg.matrix_norm(dense, ord=2)
    torch.testing.assert_close(estimate.sigma, exact, rtol=1e-7, atol=0)
    assert bool(estimate.converged.all())
    # The returned vector achieves the estimate: ||A v|| = sigma with ||v|| = 1.
    torch.testing.assert_close(safe_vector_norm(estimate.right_vectors), torch.ones_like(exact))
    torch.testing.assert_close(safe_vector_norm(matvec(estimate.right_vectors)), estimate.sigma)


def test_lanczos_is_exact_once_the_krylov_space_is_full_even_without_a_gap() -> None:
    generator = torch.Generator().manual_seed(2)
    dense = torch.randn(50, 8, 8, generator=generator, dtype=torch.float64)
    matvec, rmatvec = operators(dense)
    v0 = torch.randn(50, 8, generator=generator, dtype=torch.float64)
    estimate = spectral_norm_lanczos(matvec, rmatvec, v0, max_iter=8, rtol=1e-12)
    torch.testing.assert_close(estimate.sigma, torch.linalg.matrix_norm(dense, ord=2), rtol=1e-9, atol=0)


@pytest.mark.parametrize("method", METHODS, ids=METHODS)
def test_estimate_never_exceeds_the_exact_norm(method: str) -> None:
    generator = torch.Generator().manual_seed(3)
    dense = torch.randn(200, 20, 20, generator=generator, dtype=torch.float64)
    matvec, rmatvec = operators(dense)
    v0 = torch.randn(200, 20, generator=generator, dtype=torch.float64)
    for max_iter in (1, 3, 10):
        estimate = spectral_norm(method, matvec, rmatvec, v0, max_iter=max_iter, rtol=1e-4)
        exact = torch.linalg.matrix_norm(dense, ord=2)
        assert bool((estimate.sigma <= exact * (1 + 1e-12)).all())


@pytest.mark.parametrize("method", METHODS, ids=METHODS)
def test_zero_operator_gives_zero_without_nan(method: str) -> None:
    dense = torch.zeros(4, 6, 6)
    matvec, rmatvec = operators(dense)
    estimate = spectral_norm(method, matvec, rmatvec, torch.randn(4, 6), max_iter=20, rtol=1e-4)
    assert torch.equal(estimate.sigma, torch.zeros(4))
    assert bool(estimate.converged.all())
    assert estimate.iterations <= (CONSECUTIVE_CHECKS + 1) * CONVERGENCE_CHECK_INTERVAL + 1
    assert bool(torch.isfinite(estimate.right_vectors).all())


@pytest.mark.parametrize("method", METHODS, ids=METHODS)
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_operator_gives_nan_for_that_element_only(method: str, bad_value: float) -> None:
    generator = torch.Generator().manual_seed(4)
    dense = torch.randn(3, 5, 5, generator=generator, dtype=torch.float64)
    dense[1, 2, 3] = bad_value
    matvec, rmatvec = operators(dense)
    estimate = spectral_norm(
        method,
        matvec,
        rmatvec,
        torch.randn(3, 5, generator=generator, dtype=torch.float64),
        max_iter=60,
        rtol=1e-8,
    )
    assert bool(torch.isnan(estimate.sigma[1]))
    keep = torch.tensor([0, 2])
    exact = torch.linalg.matrix_norm(dense[keep], ord=2)
    torch.testing.assert_close(estimate.sigma[keep], exact, rtol=1e-3, atol=0)


@pytest.mark.parametrize("method", METHODS, ids=METHODS)
def test_zero_start_vector_gives_zero(method: str) -> None:
    matvec, rmatvec = operators(torch.eye(3).repeat(2, 1, 1))
    estimate = spectral_norm(method, matvec, rmatvec, torch.zeros(2, 3), max_iter=5, rtol=1e-4)
    assert torch.equal(estimate.sigma, torch.zeros(2))


@pytest.mark.parametrize("method", METHODS, ids=METHODS)
def test_warm_start_from_the_top_vector_stops_at_the_first_checks(method: str) -> None:
    generator = torch.Generator().manual_seed(5)
    dense = torch.randn(10, 30, 30, generator=generator, dtype=torch.float64)
    _, _, right = torch.linalg.svd(dense)
    matvec, rmatvec = operators(dense)
    estimate = spectral_norm(method, matvec, rmatvec, right[:, 0, :], max_iter=100, rtol=1e-6)
    checks = CONSECUTIVE_CHECKS if method == "lanczos" else 2
    assert estimate.iterations <= checks * CONVERGENCE_CHECK_INTERVAL
    torch.testing.assert_close(estimate.sigma, torch.linalg.matrix_norm(dense, ord=2), rtol=1e-9, atol=0)


def test_inactive_elements_do_not_hold_up_stopping() -> None:
    generator = torch.Generator().manual_seed(6)
    easy, _ = matrices_with_gap(3, 6, 6, generator)
    # A matrix with two equal top singular values and a rotating start: power iteration keeps moving.
    hard = torch.randn(1, 6, 6, generator=generator, dtype=torch.float64) * 1e-3
    hard[0, 0, 1], hard[0, 1, 0] = 1.0, -0.999
    dense = torch.cat([easy, hard])
    matvec, rmatvec = operators(dense)
    v0 = torch.randn(4, 6, generator=generator, dtype=torch.float64)
    everything = spectral_norm_power_iteration(matvec, rmatvec, v0, max_iter=300, rtol=1e-12)
    active = torch.tensor([True, True, True, False])
    only_easy = spectral_norm_power_iteration(matvec, rmatvec, v0, max_iter=300, rtol=1e-12, active=active)
    assert only_easy.iterations < everything.iterations
    assert bool(only_easy.converged[:3].all())


def test_huge_entries_do_not_overflow_the_norm() -> None:
    generator = torch.Generator().manual_seed(7)
    dense = torch.randn(2, 8, 8, generator=generator)
    matvec, rmatvec = operators(dense * 1e30)
    estimate = spectral_norm_lanczos(matvec, rmatvec, torch.randn(2, 8, generator=generator), max_iter=8)
    torch.testing.assert_close(
        estimate.sigma / 1e30, torch.linalg.matrix_norm(dense, ord=2), rtol=1e-4, atol=0
    )


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"max_iter": 0}, ValueError),
        ({"rtol": 0.0}, ValueError),
        ({"v0": torch.ones(3, dtype=torch.int64)}, TypeError),
        ({"v0": torch.ones(2, 0)}, ValueError),
        ({"active": torch.ones(5, dtype=torch.bool)}, ValueError),
    ],
    ids=["max-iter", "rtol", "int-v0", "empty-v0", "active-shape"],
)
def test_bad_arguments_raise_clear_errors(kwargs: dict, error: type[Exception]) -> None:
    matvec, rmatvec = operators(torch.eye(3).repeat(2, 1, 1))
    arguments = {"v0": torch.ones(2, 3), "max_iter": 5, "rtol": 1e-4, **kwargs}
    v0 = arguments.pop("v0")
    with pytest.raises(error):
        spectral_norm_lanczos(matvec, rmatvec, v0, **arguments)


def test_unknown_method_is_named_in_the_error() -> None:
    with pytest.raises(ValueError, match="lanczos"):
        spectral_norm("svd", lambda v: v, lambda u: u, torch.ones(3), max_iter=3, rtol=1e-4)  # type: ignore[arg-type]


def test_random_start_vectors_leave_the_global_rng_alone() -> None:
    before = torch.get_rng_state()
    first = random_start_vectors((4, 5), dtype=torch.float64, device=torch.device("cpu"), generator=None)
    second = random_start_vectors(
        (4, 5), dtype=torch.float64, device=torch.device("cpu"), generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(first, second)
    torch.testing.assert_close(safe_vector_norm(first), torch.ones(4, dtype=torch.float64))


small_matrices = st.integers(min_value=1, max_value=6).flatmap(
    lambda rows: st.integers(min_value=1, max_value=6).flatmap(
        lambda columns: st.lists(
            st.floats(min_value=-10, max_value=10, allow_nan=False, width=32),
            min_size=rows * columns,
            max_size=rows * columns,
        ).map(lambda values: torch.tensor(values, dtype=torch.float64).reshape(rows, columns))
    )
)


@settings(max_examples=60, deadline=None)
@given(matrix=small_matrices, scale=st.floats(min_value=-1e3, max_value=1e3).filter(lambda s: abs(s) > 1e-3))
def test_property_matches_exact_scales_linearly_and_is_non_negative(matrix: Tensor, scale: float) -> None:
    columns = matrix.shape[1]
    v0 = torch.linspace(1.0, 2.0, columns, dtype=torch.float64)
    estimate = spectral_norm_lanczos(*operators(matrix), v0, max_iter=columns, rtol=1e-10)
    exact = torch.linalg.matrix_norm(matrix, ord=2)
    assert float(estimate.sigma) >= 0
    assert abs(float(estimate.sigma) - float(exact)) <= 1e-9 * float(exact) + 1e-12
    scaled = spectral_norm_lanczos(*operators(matrix * scale), v0, max_iter=columns, rtol=1e-10)
    assert (
        abs(float(scaled.sigma) - abs(scale) * float(estimate.sigma))
        <= 1e-8 * abs(scale) * float(exact) + 1e-12
    )


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**31 - 1), size=st.integers(min_value=2, max_value=12))
def test_property_float32_agrees_with_float64(seed: int, size: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(size, size, generator=generator, dtype=torch.float64)
    v0 = torch.randn(size, generator=generator, dtype=torch.float64)
    double = spectral_norm_lanczos(*operators(matrix), v0, max_iter=size, rtol=1e-8)
    single = spectral_norm_lanczos(*operators(matrix.float()), v0.float(), max_iter=size, rtol=1e-5)
    assert single.sigma.dtype == torch.float32
    assert abs(float(single.sigma) - float(double.sigma)) <= 1e-4 * float(double.sigma) + 1e-6


def restriction_of(matrices: Tensor, calls: list[Tensor]):
    """A ``restrict`` for dense operators (*batch, M, D) that records which rows it was asked for."""
    flat = matrices.reshape(-1, *matrices.shape[-2:])

    def restrict(rows: Tensor):
        calls.append(rows.clone())
        return operators(flat[rows])

    return restrict


def test_lanczos_with_compaction_matches_the_full_iteration_and_drops_converged_elements() -> None:
    generator = torch.Generator().manual_seed(7)
    # Easy (big gap) and hard (clustered) operators in one batch: the easy ones must leave early.
    easy, _ = matrices_with_gap(6, 20, 20, generator)
    hard = torch.randn(6, 20, 20, generator=generator, dtype=torch.float64)
    dense = torch.cat([easy, hard]).reshape(3, 4, 20, 20)
    matvec, rmatvec = operators(dense)
    v0 = torch.randn(3, 4, 20, generator=generator, dtype=torch.float64)
    calls: list[Tensor] = []
    compacted = spectral_norm_lanczos(
        matvec, rmatvec, v0, max_iter=20, rtol=1e-8, restrict=restriction_of(dense, calls)
    )
    exact = torch.linalg.matrix_norm(dense, ord=2)
    torch.testing.assert_close(compacted.sigma, exact, rtol=1e-6, atol=0)
    assert compacted.element_iterations is not None
    assert compacted.element_iterations.shape == (3, 4)
    assert int(compacted.element_iterations.max()) == compacted.iterations
    easy_iterations = compacted.element_iterations.flatten()[:6]
    assert int(easy_iterations.max()) < compacted.iterations  # they stopped before the hard ones
    assert calls and all(len(later) < len(earlier) for earlier, later in itertools.pairwise(calls))
    assert bool((safe_vector_norm(compacted.right_vectors) - 1).abs().max() < 1e-9)


def test_lanczos_compaction_never_runs_inactive_elements() -> None:
    generator = torch.Generator().manual_seed(8)
    dense, top = matrices_with_gap(6, 8, 8, generator)
    matvec, rmatvec = operators(dense)
    active = torch.tensor([True, False, True, True, False, True])
    calls: list[Tensor] = []
    estimate = spectral_norm_lanczos(
        matvec,
        rmatvec,
        torch.randn(6, 8, generator=generator, dtype=torch.float64),
        max_iter=30,
        rtol=1e-10,
        active=active,
        restrict=restriction_of(dense, calls),
    )
    assert torch.equal(calls[0], torch.tensor([0, 2, 3, 5]))
    assert all(not bool(torch.isin(rows, torch.tensor([1, 4])).any()) for rows in calls)
    torch.testing.assert_close(estimate.sigma[active], top[active], rtol=1e-8, atol=0)
    assert estimate.element_iterations is not None
    assert estimate.element_iterations[~active].tolist() == [0, 0]
    # Inactive elements keep their start vector and report ||A v0||, a lower bound.
    assert bool((estimate.sigma[~active] <= top[~active] + 1e-12).all())


def test_a_stalled_ritz_value_needs_two_quiet_checks_before_it_stops() -> None:
    """sigma_2 found first (start vector almost orthogonal to the top direction) must not end the search
    after a single quiet interval: the top direction emerges a few iterations later (with one quiet check
    this case stops at 0.95 after 9 iterations)."""
    size = 40
    generator = torch.Generator().manual_seed(9)
    left, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    singular = torch.linspace(0.6, 0.1, size, dtype=torch.float64)
    singular[0], singular[1] = 1.0, 0.95
    dense = (left @ torch.diag(singular) @ right.T).unsqueeze(0)
    start = torch.randn(1, size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    start = start - (start @ right[:, 0]).unsqueeze(-1) * right[:, 0] + 1e-6 * right[:, 0]
    matvec, rmatvec = operators(dense)
    estimate = spectral_norm_lanczos(matvec, rmatvec, start, max_iter=40, rtol=1e-4)
    assert CONSECUTIVE_CHECKS >= 2
    assert float(estimate.sigma) == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("failures", [1, 2], ids=["float64-retry", "svd-fallback"])
def test_small_eigenproblem_failures_fall_back_instead_of_raising(
    monkeypatch: pytest.MonkeyPatch, failures: int
) -> None:
    """LAPACK's syevd can fail on bidiagonals with exact zeros; the estimate must still come out."""
    real_eigvalsh, real_eigh = torch.linalg.eigvalsh, torch.linalg.eigh
    remaining = {"eigvalsh": failures, "eigh": failures}

    def flaky(name, real):
        def call(matrix):
            if remaining[name] > 0:
                remaining[name] -= 1
                raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
            return real(matrix)

        return call

    generator = torch.Generator().manual_seed(10)
    dense, top = matrices_with_gap(3, 6, 6, generator)
    monkeypatch.setattr(torch.linalg, "eigvalsh", flaky("eigvalsh", real_eigvalsh))
    monkeypatch.setattr(torch.linalg, "eigh", flaky("eigh", real_eigh))
    matvec, rmatvec = operators(dense)
    estimate = spectral_norm_lanczos(
        matvec, rmatvec, torch.randn(3, 6, generator=generator, dtype=torch.float64), max_iter=6, rtol=1e-12
    )
    torch.testing.assert_close(estimate.sigma, top, rtol=1e-8, atol=0)
    assert remaining == {"eigvalsh": 0, "eigh": 0}


def test_per_element_quiet_checks_let_trusted_starts_stop_sooner() -> None:
    generator = torch.Generator().manual_seed(11)
    dense = torch.randn(2, 30, 30, generator=generator, dtype=torch.float64).repeat(2, 1, 1)
    matvec, rmatvec = operators(dense)
    v0 = torch.randn(2, 30, generator=generator, dtype=torch.float64).repeat(2, 1)
    calls: list[Tensor] = []
    estimate = spectral_norm_lanczos(
        matvec,
        rmatvec,
        v0,
        max_iter=30,
        rtol=1e-6,
        restrict=restriction_of(dense, calls),
        check_interval=1,
        quiet_checks=torch.tensor([1, 1, 4, 4]),
    )
    assert estimate.element_iterations is not None
    trusted, checked = estimate.element_iterations[:2], estimate.element_iterations[2:]
    assert bool((checked - trusted >= 3).all())  # same operators and starts: three more quiet checks
    exact = torch.linalg.matrix_norm(dense, ord=2)
    torch.testing.assert_close(estimate.sigma, exact, rtol=1e-4, atol=0)


@pytest.mark.parametrize("quiet_checks", [0, torch.tensor([1, 0]), torch.tensor([1.0, 2.0])])
def test_quiet_checks_must_be_positive_integers(quiet_checks: object) -> None:
    matvec, rmatvec = operators(torch.eye(3).repeat(2, 1, 1))
    with pytest.raises(ValueError, match="quiet_checks must be positive integers"):
        spectral_norm_lanczos(matvec, rmatvec, torch.ones(2, 3), quiet_checks=quiet_checks)  # type: ignore[arg-type]

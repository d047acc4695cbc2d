"""Lag norms and the top Lyapunov exponent against dense products and theory."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import Tensor

from gradwatch.estimators.jacobian import builtin_step_jacobians, function_step_jacobians
from gradwatch.estimators.products import (
    SHARED_LYAPUNOV_MIN_STEPS,
    WARM_LONG_LAG,
    _representable,
    default_lags,
    estimate_lag_norms,
    lag_norms,
    lyapunov_from_full_products,
    lyapunov_max,
)
from tests._estimator_cases import (
    CellCase,
    assert_lag_norms_match_dense,
    dense_step_jacobians,
    random_cell_weights,
    random_sequences,
)


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        (0, []),
        (1, []),
        (2, [1, 2]),
        (3, [1, 2, 3]),
        (5, [1, 2, 4, 5]),
        (8, [1, 2, 4, 8]),
        (9, [1, 2, 4, 8, 9]),
    ],
    ids=["T0", "T1", "T2", "T3", "T5", "T8", "T9"],
)
def test_default_lags(steps: int, expected: list[int]) -> None:
    assert default_lags(steps) == expected


class ConstantLinearJacobians:
    """A hand-written operator for the linear cell s_{t+1} = W s_t + U x_t: J_t = W for every t."""

    def __init__(self, matrix: Tensor, steps: int, batch: int) -> None:
        self.matrix = matrix
        self.time_steps, self.batch_size, self.state_size = steps, batch, matrix.shape[0]
        self.dtype, self.device = matrix.dtype, matrix.device

    def jvp(self, v: Tensor, t: int | None = None) -> Tensor:
        return v @ self.matrix.T

    def vjp(self, u: Tensor, t: int | None = None) -> Tensor:
        return u @ self.matrix

    def activation_derivatives(self) -> Tensor | None:
        return None

    def gate_values(self) -> Tensor | None:
        return None


def linear_cell_jacobians(matrix: Tensor, steps: int, batch: int, implementation: str, seed: int):
    if implementation == "analytic":
        return ConstantLinearJacobians(matrix, steps, batch)
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(3, matrix.shape[0], generator=generator, dtype=matrix.dtype)
    x = torch.randn(steps, batch, 3, generator=generator, dtype=matrix.dtype)
    s_prev = torch.randn(steps, batch, matrix.shape[0], generator=generator, dtype=matrix.dtype)
    return function_step_jacobians(lambda xi, s: s @ matrix.T + xi @ inputs, x, s_prev)


@pytest.mark.parametrize("implementation", ["analytic", "function"])
@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_scaled_orthogonal_products_have_norm_scale_to_the_lag(method: str, implementation: str) -> None:
    generator = torch.Generator().manual_seed(0)
    orthogonal, _ = torch.linalg.qr(torch.randn(10, 10, generator=generator, dtype=torch.float64))
    scale = 0.9
    steps, batch = 20, 3
    jac = linear_cell_jacobians(scale * orthogonal, steps, batch, implementation, seed=1)
    mask = torch.ones(steps, batch, dtype=torch.bool)
    mask[12:, 1] = False  # sequence 1 has 12 real steps
    lags = [1, 2, 4, 8, 12, 16, 19, 20]
    norms = lag_norms(jac, mask, lags, method=method, generator=generator)
    lengths = [20, 12, 20]
    for tau in lags:
        for b, length in enumerate(lengths):
            if tau > length:
                assert math.isnan(float(norms[tau][b]))
            else:
                assert float(norms[tau][b]) == pytest.approx(scale**tau, rel=1e-4)


@pytest.mark.parametrize("implementation", ["analytic", "function"])
def test_lyapunov_of_a_linear_cell_is_the_log_spectral_radius(implementation: str) -> None:
    generator = torch.Generator().manual_seed(2)
    size = 24
    matrix = 0.9 * torch.randn(size, size, generator=generator, dtype=torch.float64) / math.sqrt(size)
    # Non-normal: one step can stretch by ~1.8 while the product still follows the spectral radius.
    assert float(torch.linalg.matrix_norm(matrix, ord=2)) > 1.5
    expected = math.log(float(torch.linalg.eigvals(matrix).abs().max()))
    steps = 256
    jac = linear_cell_jacobians(matrix, steps, 3, implementation, seed=3)
    exponents = lyapunov_max(jac, torch.ones(steps, 3, dtype=torch.bool), generator=generator)
    assert exponents.shape == (3,)
    assert float((exponents - expected).abs().max()) < 0.05


def exact_lyapunov(dense: Tensor, lengths: list[int]) -> list[float]:
    """(1/L_b) log ||J_{L_b-1} ... J_0||_2 from dense float64 Jacobians (T, B, D, D), renormalising the
    product after every step so that long products neither overflow nor underflow."""
    out = []
    for b, length in enumerate(lengths):
        product = torch.eye(dense.shape[-1], dtype=torch.float64)
        log_norm = 0.0
        for t in range(length):
            product = dense[t, b].double() @ product
            norm = float(torch.linalg.matrix_norm(product, ord=2))
            log_norm += math.log(norm)
            product = product / norm
        out.append(log_norm / length)
    return out


LYAPUNOV_CASES = [
    CellCase("rnn_tanh", 16),
    CellCase("rnn_relu", 16),
    CellCase("lstm", 12),
    CellCase("lstm", 12, proj_size=6),
    CellCase("gru", 16),
    CellCase("lstm", 48),
]


@pytest.mark.parametrize("case", LYAPUNOV_CASES, ids=[c.case_id for c in LYAPUNOV_CASES])
@pytest.mark.parametrize("steps", [3, 10, 40])
def test_lyapunov_is_the_exact_log_norm_growth_of_the_product(case: CellCase, steps: int) -> None:
    """lambda_b = (1/L_b) log sigma_max(J_{L_b-1} ... J_0) within the documented 1e-4 per step (measured
    <= 3e-6), for short products too, where one renormalised random vector is biased low by ~log(D)/2T."""
    generator = torch.Generator().manual_seed(steps)
    weights = random_cell_weights(case, generator, dtype=torch.float32)
    x, s_prev = random_sequences(case, weights, steps=steps, batch=4, generator=generator)
    mask = torch.ones(steps, 4, dtype=torch.bool)
    mask[steps // 2 + 1 :, 1] = False
    mask[:, 3] = False  # an empty sequence
    lengths = mask.sum(0).tolist()
    dense = dense_step_jacobians(weights.to(torch.float64), x.double(), s_prev.double())
    exponents = lyapunov_max(builtin_step_jacobians(weights, x, s_prev), mask)
    expected = exact_lyapunov(dense, lengths[:3])
    assert [float(e) for e in exponents[:3]] == pytest.approx(expected, abs=1e-4)
    assert math.isnan(float(exponents[3]))


def test_lyapunov_is_deterministic_and_does_not_depend_on_the_start_vectors() -> None:
    """The same Jacobians give the same lambda bit for bit (no generator: a fixed start), and other start
    vectors agree within the tolerance: the estimator's own noise cannot reach the detector."""
    case = CellCase("gru", 32)
    generator = torch.Generator().manual_seed(8)
    weights = random_cell_weights(case, generator)
    x, s_prev = random_sequences(case, weights, steps=10, batch=6, generator=generator)
    jac = builtin_step_jacobians(weights, x, s_prev)
    mask = torch.ones(10, 6, dtype=torch.bool)
    first = lyapunov_max(jac, mask)
    assert all(torch.equal(lyapunov_max(jac, mask), first) for _ in range(3))
    others = [lyapunov_max(jac, mask, generator=torch.Generator().manual_seed(s)) for s in range(6)]
    spread = torch.stack(others).amax(0) - torch.stack(others).amin(0)
    assert float(spread.max()) < 1e-4


def test_lyapunov_of_a_long_vanishing_product_is_finite_where_lag_norms_underflow() -> None:
    """A product of 400 steps of 0.2 x orthogonal is 0.2**400 ~ 1e-280: zero in float32 (and far below the
    lag norms' range), yet lambda = log 0.2 exactly, since every step is renormalised."""
    orthogonal, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(1)))
    jac = ConstantLinearJacobians(0.2 * orthogonal, steps=400, batch=2)
    exponents = lyapunov_max(jac, torch.ones(400, 2, dtype=torch.bool))
    assert [float(e) for e in exponents] == pytest.approx([math.log(0.2)] * 2, abs=1e-5)


CASES = [
    CellCase("rnn_tanh", 16),
    CellCase("rnn_relu", 16),
    CellCase("lstm", 12),
    CellCase("lstm", 12, proj_size=6),
    CellCase("gru", 16),
]


@pytest.mark.parametrize("case", CASES, ids=[c.case_id for c in CASES])
def test_lag_norms_match_dense_products(case: CellCase) -> None:
    generator = torch.Generator().manual_seed(5)
    weights = random_cell_weights(case, generator, dtype=torch.float32)
    steps, batch = 12, 4
    x, s_prev = random_sequences(case, weights, steps=steps, batch=batch, generator=generator)
    mask = torch.ones(steps, batch, dtype=torch.bool)
    mask[7:, 1] = False
    mask[3:, 2] = False
    lengths = mask.sum(0).tolist()
    dense = dense_step_jacobians(weights.to(torch.float64), x.double(), s_prev.double())
    jac = builtin_step_jacobians(weights, x, s_prev)
    lags = [*default_lags(steps), steps]
    estimate = estimate_lag_norms(jac, mask, lags, generator=generator)
    assert_lag_norms_match_dense(estimate.norms, lags, lengths, dense, rel=1e-2)


def test_warm_started_lag_norms_stop_sooner() -> None:
    case = CellCase("lstm", 16)
    generator = torch.Generator().manual_seed(6)
    weights = random_cell_weights(case, generator)
    x, s_prev = random_sequences(case, weights, steps=10, batch=3, generator=generator)
    jac = builtin_step_jacobians(weights, x, s_prev)
    mask = torch.ones(10, 3, dtype=torch.bool)
    cold = estimate_lag_norms(jac, mask, [1, 4, 9], rtol=1e-6, max_iter=30, generator=generator)
    warm = estimate_lag_norms(jac, mask, [1, 4, 9], rtol=1e-6, max_iter=30, v0=cold.estimate.right_vectors)
    assert warm.estimate.iterations < cold.estimate.iterations
    torch.testing.assert_close(warm.norms, cold.norms, rtol=1e-5, atol=0)


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_a_warm_start_from_a_product_that_was_zero_measures_the_new_product(method: str) -> None:
    """A product that was exactly 0 once (all units of a ReLU layer dead at one step) leaves zero or NaN
    right vectors; the next measurement starts those rows afresh instead of reading 0 for ever."""
    steps, batch, lags = 12, 3, [1, 4, 12]
    mask = torch.ones(steps, batch, dtype=torch.bool)
    dead = linear_cell_jacobians(torch.zeros(6, 6, dtype=torch.float64), steps, batch, "analytic", seed=0)
    previous = estimate_lag_norms(dead, mask, lags, method=method)
    assert bool((previous.norms == 0).all())
    generator = torch.Generator().manual_seed(3)
    orthogonal, _ = torch.linalg.qr(torch.randn(6, 6, generator=generator, dtype=torch.float64))
    alive = linear_cell_jacobians(0.9 * orthogonal, steps, batch, "analytic", seed=0)
    warm = estimate_lag_norms(alive, mask, lags, method=method, v0=previous.estimate.right_vectors)
    for k, tau in enumerate(lags):
        torch.testing.assert_close(warm.norms[k], torch.full((batch,), 0.9**tau, dtype=torch.float64))


def test_mask_errors_and_lag_errors_are_clear() -> None:
    jac = ConstantLinearJacobians(torch.eye(3), steps=4, batch=2)
    with pytest.raises(ValueError, match="left-aligned"):
        lag_norms(jac, torch.tensor([[True, False], [False, True], [False, False], [False, False]]), [1])
    with pytest.raises(TypeError, match="bool"):
        lyapunov_max(jac, torch.ones(4, 2))
    with pytest.raises(ValueError, match="shape"):
        lag_norms(jac, torch.ones(3, 2, dtype=torch.bool), [1])
    with pytest.raises(ValueError, match="positive integers"):
        lag_norms(jac, torch.ones(4, 2, dtype=torch.bool), [0])


def test_no_lags_gives_an_empty_result_and_the_global_rng_is_untouched() -> None:
    jac = ConstantLinearJacobians(torch.eye(3), steps=4, batch=2)
    mask = torch.ones(4, 2, dtype=torch.bool)
    before = torch.get_rng_state()
    assert lag_norms(jac, mask, []) == {}
    assert set(lag_norms(jac, mask, [1, 3])) == {1, 3}
    lyapunov_max(jac, mask)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("case", LYAPUNOV_CASES, ids=[c.case_id for c in LYAPUNOV_CASES])
def test_lyapunov_shared_with_the_lag_sweeps_is_the_exact_log_norm_growth(case: CellCase) -> None:
    """lambda from the whole-product rows of the lag Lanczos (estimate_layer's path) keeps the 1e-4 per
    step bound against jacrev products, for sequences on the shared path (L_b >= 16) and for the short
    and empty ones that fall back to the rescaled path."""
    steps = 40
    generator = torch.Generator().manual_seed(3)
    weights = random_cell_weights(case, generator, dtype=torch.float32)
    x, s_prev = random_sequences(case, weights, steps=steps, batch=5, generator=generator)
    mask = torch.ones(steps, 5, dtype=torch.bool)
    mask[30:, 1] = False  # shared path, ragged
    mask[SHARED_LYAPUNOV_MIN_STEPS - 1 :, 2] = False  # too short: the rescaled path
    mask[:, 4] = False  # empty
    lengths = mask.sum(0).tolist()
    jac = builtin_step_jacobians(weights, x, s_prev)
    lag_estimate = estimate_lag_norms(jac, mask, default_lags(steps), full_products=True)
    exponents = lyapunov_from_full_products(jac, mask, lag_estimate)
    dense = dense_step_jacobians(weights.to(torch.float64), x.double(), s_prev.double())
    assert [float(e) for e in exponents[:4]] == pytest.approx(exact_lyapunov(dense, lengths[:4]), abs=1e-4)
    assert math.isnan(float(exponents[4]))
    # The lag norms of the same call are the plain estimate's (the extra rows change no lag row).
    plain = estimate_lag_norms(jac, mask, default_lags(steps))
    torch.testing.assert_close(lag_estimate.norms, plain.norms, rtol=2e-3, atol=0.0, equal_nan=True)


def test_shared_lyapunov_falls_back_where_the_product_underflows() -> None:
    """0.2 x orthogonal over 400 steps: the whole product (~1e-280) is zero in float32, so the shared rows
    read 0 and lambda must come from the rescaled path: log 0.2, finite."""
    orthogonal, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(1)))
    jac = ConstantLinearJacobians(0.2 * orthogonal, steps=400, batch=2)
    mask = torch.ones(400, 2, dtype=torch.bool)
    lag_estimate = estimate_lag_norms(jac, mask, [1, 2], full_products=True)
    assert lag_estimate.full_product_norms is not None
    assert not bool(_representable(lag_estimate.full_product_norms).any())
    exponents = lyapunov_from_full_products(jac, mask, lag_estimate)
    assert [float(e) for e in exponents] == pytest.approx([math.log(0.2)] * 2, abs=1e-5)


def test_warm_started_long_lags_and_whole_products_leave_after_two_quiet_checks() -> None:
    """A warm start from a nearby measurement (weights 1% away) lets the long lags (tau >= WARM_LONG_LAG)
    and the whole-product rows stop after <= 3 iterations (three quiet checks ask for >= 4), while
    the norms stay within 2% of the dense products and lambda within 1e-4 per step of exact."""
    case = CellCase("lstm", 16)
    generator = torch.Generator().manual_seed(11)
    weights = random_cell_weights(case, generator, dtype=torch.float32)
    x, s_prev = random_sequences(case, weights, steps=40, batch=3, generator=generator)
    nearby = dataclasses.replace(
        weights,
        weight_hh=weights.weight_hh * (1 + 0.01 * torch.randn(weights.weight_hh.shape, generator=generator)),
    )
    mask = torch.ones(40, 3, dtype=torch.bool)
    lags = default_lags(40)
    previous = estimate_lag_norms(builtin_step_jacobians(nearby, x, s_prev), mask, lags, full_products=True)
    jac = builtin_step_jacobians(weights, x, s_prev)
    warm = estimate_lag_norms(jac, mask, lags, v0=previous.estimate.right_vectors, full_products=True)
    iterations = warm.estimate.element_iterations
    assert iterations is not None
    long_rows = torch.tensor([tau >= WARM_LONG_LAG for tau in lags] + [True])
    assert int(iterations[long_rows].max()) <= 3
    dense = dense_step_jacobians(weights.to(torch.float64), x.double(), s_prev.double())
    for k, tau in enumerate(lags):
        for b in range(3):
            product = torch.eye(weights.state_size, dtype=torch.float64)
            for t in range(40 - tau, 40):
                product = dense[t, b] @ product
            exact = float(torch.linalg.matrix_norm(product, ord=2))
            assert float(warm.norms[k, b]) == pytest.approx(exact, rel=2e-2)
    exponents = lyapunov_from_full_products(jac, mask, warm)
    assert [float(e) for e in exponents] == pytest.approx(exact_lyapunov(dense, [40] * 3), abs=1e-4)


def test_warm_start_near_the_second_singular_vector_does_not_stop_short() -> None:
    """After real training drift the previous top vector of a product whose top two singular values are
    clustered can be close to the new *second* one. Linear steps J_t = diag(d), d = (1, 0.995, 0.5, ...):
    sigma_max(P_tau) = 1 and sigma_2 = 0.995**tau (0.96 at tau = 8, 0.92 at 16). Warm-started from
    e_2 + 0.03 e_1, a power step barely moves (one quiet check passed it 4-8% short); the estimate must
    still find sigma_max for every lag and the whole product."""
    steps, batch, state = 40, 2, 6
    diagonal = torch.tensor([1.0, 0.995, 0.5, 0.5, 0.4, 0.3], dtype=torch.float64)
    jac = function_step_jacobians(
        lambda x, s: s * diagonal,
        torch.zeros(steps, batch, 1, dtype=torch.float64),
        torch.ones(steps, batch, state, dtype=torch.float64),
    )
    mask = torch.ones(steps, batch, dtype=torch.bool)
    lags = default_lags(steps)
    warm = torch.zeros(len(lags) + 1, batch, state, dtype=torch.float64)
    warm[..., 1] = 1.0
    warm[..., 0] = 0.03
    estimate = estimate_lag_norms(jac, mask, lags, v0=warm, full_products=True)
    assert estimate.norms.flatten().tolist() == pytest.approx([1.0] * (batch * len(lags)), rel=1e-3)
    assert estimate.full_product_norms is not None
    assert estimate.full_product_norms.tolist() == pytest.approx([1.0] * batch, rel=1e-3)

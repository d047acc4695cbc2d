"""The lag-product sweep touches only the lags whose window covers each step, and stays exact."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from gradwatch.estimators.jacobian import builtin_step_jacobians
from gradwatch.estimators.products import _active_lag_spans, default_lags, estimate_lag_norms
from tests._estimator_cases import (
    CellCase,
    assert_lag_norms_match_dense,
    dense_step_jacobians,
    random_cell_weights,
    random_sequences,
)


@pytest.mark.parametrize(
    ("touched", "expected"),
    [
        ([[False, False, False]], [[]]),
        ([[True, True, True]], [[(0, 3)]]),
        ([[False, True, True]], [[(1, 3)]]),
        ([[True, False, True]], [[(0, 1), (2, 3)]]),
        ([[False, True, False], [True, True, False]], [[(1, 2)], [(0, 2)]]),
    ],
    ids=["none", "all", "suffix", "two-runs", "two-steps"],
)
def test_active_lag_spans_are_the_maximal_runs(touched: list[list[bool]], expected: list) -> None:
    assert _active_lag_spans(torch.tensor(touched)) == expected


class CountingJacobians:
    """Wraps a StepJacobians and counts the (vector, sequence) rows each per-step product receives."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.time_steps, self.batch_size, self.state_size = (
            inner.time_steps,
            inner.batch_size,
            inner.state_size,
        )
        self.dtype, self.device = inner.dtype, inner.device
        self.jvp_rows = 0
        self.jvp_calls = 0

    def jvp(self, v: Tensor, t: int | None = None) -> Tensor:
        self.jvp_calls += 1
        self.jvp_rows += v[..., 0].numel()
        return self.inner.jvp(v, t)

    def vjp(self, u: Tensor, t: int | None = None) -> Tensor:
        return self.inner.vjp(u, t)

    def activation_derivatives(self) -> Tensor | None:
        return None

    def gate_values(self) -> Tensor | None:
        return None


def test_a_product_sweep_costs_sum_of_lags_times_batch_rows() -> None:
    case = CellCase("gru", 6)
    generator = torch.Generator().manual_seed(1)
    weights = random_cell_weights(case, generator, dtype=torch.float32)
    steps, batch = 16, 3
    x, s_prev = random_sequences(case, weights, steps=steps, batch=batch, generator=generator)
    counting = CountingJacobians(builtin_step_jacobians(weights, x, s_prev))
    lags = default_lags(steps)  # 1, 2, 4, 8, 16
    estimate = estimate_lag_norms(
        counting, torch.ones(steps, batch, dtype=torch.bool), lags, method="power", max_iter=1
    )
    # power iteration with max_iter=1: exactly one product sweep (A v); each lag tau is applied on its
    # own tau steps, so the sweep costs sum(tau) * B rows instead of K * T * B.
    assert estimate.estimate.iterations == 1
    assert counting.jvp_rows == sum(lags) * batch
    assert counting.jvp_calls == steps  # the longest lag, T, reaches step 0


@pytest.mark.parametrize("lags", [[8, 1, 11, 2], [3, 12, 5]], ids=["unsorted-gaps", "unsorted"])
def test_unsorted_lags_with_variable_lengths_match_dense_products(lags: list[int]) -> None:
    case = CellCase("lstm", 5)
    generator = torch.Generator().manual_seed(7)
    weights = random_cell_weights(case, generator, dtype=torch.float32)
    steps, batch = 12, 4
    x, s_prev = random_sequences(case, weights, steps=steps, batch=batch, generator=generator)
    mask = torch.ones(steps, batch, dtype=torch.bool)
    mask[9:, 0] = False
    mask[2:, 3] = False
    lengths = mask.sum(0).tolist()
    dense = dense_step_jacobians(weights.to(torch.float64), x.double(), s_prev.double())
    jac = builtin_step_jacobians(weights, x, s_prev)
    warm = torch.randn(len(lags), batch, weights.state_size, generator=generator)
    warm_copy = warm.clone()
    estimate = estimate_lag_norms(jac, mask, lags, v0=warm, rtol=1e-6, max_iter=40)
    assert torch.equal(warm, warm_copy)  # the sweep works on its own copy
    assert_lag_norms_match_dense(estimate.norms, lags, lengths, dense, rel=1e-3)


def test_converged_long_lags_leave_and_later_sweeps_shrink_to_the_short_lags() -> None:
    case = CellCase("lstm", 8)
    generator = torch.Generator().manual_seed(2)
    weights = random_cell_weights(case, generator, dtype=torch.float32)
    steps, batch = 24, 3
    x, s_prev = random_sequences(case, weights, steps=steps, batch=batch, generator=generator)
    counting = CountingJacobians(builtin_step_jacobians(weights, x, s_prev))
    lags = [1, 2, 23]
    estimate = estimate_lag_norms(counting, torch.ones(steps, batch, dtype=torch.bool), lags, rtol=1e-6)
    iterations = estimate.estimate.element_iterations
    assert iterations is not None
    longest, shortest = iterations[2].max(), iterations[:2].max()
    assert int(longest) < int(shortest)  # the product over 23 steps has a wide gap: it converges first
    # Forward sweeps: the start, one per iteration, one final re-measurement. Without compaction all of
    # them would cover the 23 steps of the longest lag; with it, those after the long lag left cover 2.
    without_compaction = (int(shortest) + 1) * (steps - 1)
    with_compaction = (int(longest) + 2) * (steps - 1) + (int(shortest) + 1) * 2
    assert counting.jvp_calls <= with_compaction < without_compaction


def test_a_lag_equal_to_a_sequence_length_is_swept_once_in_the_whole_product_row() -> None:
    """Lag tau = L_b is sequence b's whole product: with ``full_products`` it is estimated once, in the
    whole-product row, and matches the dense product like every other lag."""
    case = CellCase("lstm", 5)
    generator = torch.Generator().manual_seed(11)
    weights = random_cell_weights(case, generator, dtype=torch.float32)
    steps, batch = 12, 3
    x, s_prev = random_sequences(case, weights, steps=steps, batch=batch, generator=generator)
    mask = torch.ones(steps, batch, dtype=torch.bool)
    mask[8:, 1] = False  # L = 12, 8, 12: lag 12 is the whole product of sequences 0 and 2, lag 8 of 1
    lengths = mask.sum(0).tolist()
    lags = [1, 2, 4, 8, 12]
    jac = builtin_step_jacobians(weights, x, s_prev)
    counting = CountingJacobians(jac)
    full_length = torch.ones(steps, batch, dtype=torch.bool)
    estimate_lag_norms(counting, full_length, lags, method="power", max_iter=1, full_products=True)
    # One sweep (power iteration, max_iter=1) with every L_b = 12: each lag on its own steps, except lag 12,
    # which is the whole-product row's product and is not swept a second time.
    assert counting.jvp_rows == (sum(lags[:-1]) + steps) * batch

    dense = dense_step_jacobians(weights.to(torch.float64), x.double(), s_prev.double())
    estimate = estimate_lag_norms(jac, mask, lags, rtol=1e-6, max_iter=40, full_products=True)
    assert estimate.full_product_norms is not None
    assert_lag_norms_match_dense(estimate.norms, lags, lengths, dense, rel=1e-3)
    for b, length in enumerate(lengths):  # the shared elements are the whole-product row's, bit for bit
        assert float(estimate.norms[lags.index(length), b]) == float(estimate.full_product_norms[b])
    # The shared elements carry the whole product's vector, so the next measurement's warm start fits.
    vectors = estimate.estimate.right_vectors
    assert torch.equal(vectors[4, 0], vectors[5, 0]) and torch.equal(vectors[3, 1], vectors[5, 1])

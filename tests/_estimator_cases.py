"""Shared test helpers for the estimator tests: random cells like torch's default init, exact references."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from gradwatch.estimators.cells import CellKind, CellWeights, cell_step, gate_count


@dataclass(frozen=True)
class CellCase:
    """One cell configuration to test: kind, sizes, projection, bias."""

    kind: CellKind
    hidden_size: int
    proj_size: int = 0
    bias: bool = True
    input_size: int = 5

    @property
    def case_id(self) -> str:
        proj = f"-proj{self.proj_size}" if self.proj_size else ""
        bias = "" if self.bias else "-nobias"
        return f"{self.kind}-H{self.hidden_size}{proj}{bias}"


def random_cell_weights(
    case: CellCase, generator: torch.Generator, dtype: torch.dtype = torch.float64
) -> CellWeights:
    """Weights drawn like torch's default RNN init: U(-1/sqrt(H), 1/sqrt(H))."""
    hidden = case.hidden_size
    output = case.proj_size or hidden
    bound = 1 / math.sqrt(hidden)
    rows = gate_count(case.kind) * hidden

    def uniform(*shape: int) -> Tensor:
        return (torch.rand(*shape, generator=generator, dtype=dtype) * 2 - 1) * bound

    return CellWeights(
        kind=case.kind,
        weight_ih=uniform(rows, case.input_size),
        weight_hh=uniform(rows, output),
        bias_ih=uniform(rows) if case.bias else None,
        bias_hh=uniform(rows) if case.bias else None,
        weight_hr=uniform(output, hidden) if case.proj_size else None,
    )


def run_cell(weights: CellWeights, x: Tensor, s0: Tensor) -> Tensor:
    """States s_0 .. s_{T-1} (T, B, D) of the cell driven by x (T, B, I) from s0 (B, D)."""
    states = [s0]
    for t in range(x.shape[0] - 1):
        states.append(cell_step(weights, x[t], states[-1]))
    return torch.stack(states)


def random_sequences(
    case: CellCase, weights: CellWeights, steps: int, batch: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Inputs ~ N(0, 1) and the states the cell really visits from a small random initial state."""
    dtype = weights.weight_hh.dtype
    x = torch.randn(steps, batch, case.input_size, generator=generator, dtype=dtype)
    s0 = 0.1 * torch.randn(batch, weights.state_size, generator=generator, dtype=dtype)
    with torch.no_grad():
        return x, run_cell(weights, x, s0)


def dense_step_jacobians(weights: CellWeights, x: Tensor, s_prev: Tensor) -> Tensor:
    """Exact J_t for every (t, b) by torch.func.jacrev: (T, B, D, D)."""
    steps, batch, state = s_prev.shape
    flat_x = x.reshape(steps * batch, -1)
    flat_s = s_prev.reshape(steps * batch, state)
    jacobian = torch.func.vmap(torch.func.jacrev(lambda xi, si: cell_step(weights, xi, si), argnums=1))
    return jacobian(flat_x, flat_s).reshape(steps, batch, state, state)


def exact_sigma_max(dense: Tensor) -> Tensor:
    return torch.linalg.matrix_norm(dense, ord=2)


def exact_lag_norm(dense: Tensor, sequence: int, length: int, tau: int) -> float:
    """||J_{L-1} ... J_{L-tau}||_2 of one sequence with L = ``length`` real steps, from dense (T, B, D, D)
    step Jacobians: the product over its last tau real steps."""
    product = torch.eye(dense.shape[-1], dtype=dense.dtype)
    for t in range(length - tau, length):
        product = dense[t, sequence] @ product
    return float(torch.linalg.matrix_norm(product, ord=2))


def assert_lag_norms_match_dense(
    norms: Tensor, lags: list[int], lengths: list[int], dense: Tensor, rel: float
) -> None:
    """Every estimated lag norm (K, B) equals the dense product's within ``rel``; NaN where tau > L_b."""
    for k, tau in enumerate(lags):
        for b, length in enumerate(lengths):
            value = float(norms[k, b])
            if tau > length:
                assert math.isnan(value), (tau, b)
            else:
                assert value == pytest.approx(exact_lag_norm(dense, b, length, tau), rel=rel), (tau, b)

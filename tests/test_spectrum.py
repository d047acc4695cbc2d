"""The top-k Lyapunov spectrum against exact QR and SVD of dense products (jacrev Jacobians) and theory."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import gradwatch
from gradwatch.estimators.cells import cell_step
from gradwatch.estimators.jacobian import builtin_step_jacobians, function_step_jacobians
from gradwatch.estimators.products import lyapunov_max
from gradwatch.estimators.spectrum import lyapunov_spectrum, orthonormalise, qr_sweep
from tests._estimator_cases import CellCase, dense_step_jacobians, random_cell_weights, random_sequences

CASES = [
    CellCase("rnn_tanh", 16),
    CellCase("rnn_relu", 16),
    CellCase("lstm", 12),
    CellCase("lstm", 12, proj_size=6),
    CellCase("gru", 16),
]


def exact_log_singular_values(dense: Tensor, sequence: int, length: int) -> Tensor:
    """log sigma_i(J_{L-1} ... J_0) of one sequence, all i, from dense float64 Jacobians (T, B, D, D):
    the product is rescaled by its norm after every step, so it neither over- nor underflows."""
    product = torch.eye(dense.shape[-1], dtype=torch.float64)
    log_scale = 0.0
    for t in range(length):
        product = dense[t, sequence].double() @ product
        norm = float(torch.linalg.matrix_norm(product, ord=2))
        log_scale += math.log(norm)
        product = product / norm
    return torch.log(torch.linalg.svdvals(product)) + log_scale


def _setup(case: CellCase, steps: int, batch: int = 3, seed: int | None = None):
    generator = torch.Generator().manual_seed(steps if seed is None else seed)
    weights = random_cell_weights(case, generator, dtype=torch.float32)
    x, s_prev = random_sequences(case, weights, steps=steps, batch=batch, generator=generator)
    dense = dense_step_jacobians(weights.to(torch.float64), x.double(), s_prev.double())
    return weights, x, s_prev, dense


@pytest.mark.parametrize("case", CASES, ids=[c.case_id for c in CASES])
@pytest.mark.parametrize("steps", [3, 10, 40])
def test_spectrum_is_the_exact_log_singular_value_growth_of_the_product(case: CellCase, steps: int) -> None:
    """lambda_i = (1/L_b) log sigma_i(J_{L_b-1} ... J_0) for i = 1..4 (padded and empty sequences too), and
    lambda_1 agrees with the monitor's lyapunov_max."""
    weights, x, s_prev, dense = _setup(case, steps, batch=4)
    mask = torch.ones(steps, 4, dtype=torch.bool)
    mask[steps // 2 + 1 :, 1] = False
    mask[:, 3] = False  # an empty sequence
    jac = builtin_step_jacobians(weights, x, s_prev)
    spectrum = lyapunov_spectrum(jac, mask, 4)
    assert spectrum.exponents.shape == (4, 4)
    lengths = mask.sum(0).tolist()
    for b in range(3):
        expected = exact_log_singular_values(dense, b, lengths[b])[:4] / lengths[b]
        assert spectrum.exponents[b].double().tolist() == pytest.approx(expected.tolist(), abs=2e-4), b
        condition = float(expected[0] - expected[3]) * lengths[b]
        assert float(spectrum.log_condition[b]) == pytest.approx(condition, abs=2e-4 * lengths[b])
    assert torch.isnan(spectrum.exponents[3]).all() and math.isnan(float(spectrum.log_condition[3]))
    top = lyapunov_max(jac, mask)
    assert spectrum.exponents[:3, 0].tolist() == pytest.approx(top[:3].tolist(), abs=2e-4)


@pytest.mark.parametrize("case", CASES[:1] + CASES[2:3] + CASES[4:], ids=["rnn_tanh", "lstm", "gru"])
def test_one_forward_sweep_is_the_exact_qr_of_the_dense_product_times_the_start_frame(case: CellCase) -> None:
    """The standard algorithm itself: sum_t log|diag R_t| of the step-by-step QR equals log|diag R| of the
    QR of the dense product P Q_0 (the same frame Q_0), and the final frame spans P Q_0."""
    steps = 12
    weights, x, s_prev, dense = _setup(case, steps, batch=2)
    jac = builtin_step_jacobians(weights.to(torch.float64), x.double(), s_prev.double())
    start, _ = orthonormalise(
        torch.randn(2, jac.state_size, 3, generator=torch.Generator().manual_seed(5)).double()
    )

    def frame_map(frame: Tensor, t: int) -> Tensor:
        return jac.jvp(frame.permute(2, 0, 1), t).permute(1, 2, 0)

    frame, sums = qr_sweep(frame_map, start, range(steps))
    for b in range(2):
        product = torch.eye(jac.state_size, dtype=torch.float64)
        for t in range(steps):
            product = dense[t, b] @ product
        q, r = torch.linalg.qr(product @ start[b])
        assert sums[b].tolist() == pytest.approx(torch.log(torch.diagonal(r).abs()).tolist(), abs=1e-9)
        assert torch.allclose(frame[b] @ frame[b].T @ q, q, atol=1e-9)  # same span


def test_spectrum_of_a_constant_linear_map_is_the_log_of_its_singular_values() -> None:
    """Theory: for J_t = A (symmetric), sigma_i(A^T) = |eig_i|^T, so lambda_i = log |eig_i(A)| exactly;
    also through the torch.func path a user cell takes."""
    generator = torch.Generator().manual_seed(1)
    eigenvalues = torch.tensor([1.3, -1.1, 0.9, 0.5, 0.2, -0.05], dtype=torch.float64)
    basis, _ = torch.linalg.qr(torch.randn(6, 6, generator=generator, dtype=torch.float64))
    matrix = basis @ torch.diag(eigenvalues) @ basis.T
    steps, batch = 30, 2
    x = torch.zeros(steps, batch, 1, dtype=torch.float64)
    s_prev = torch.randn(steps, batch, 6, generator=generator, dtype=torch.float64)
    jac = function_step_jacobians(lambda xi, s: s @ matrix.T + xi, x, s_prev)
    spectrum = lyapunov_spectrum(jac, torch.ones(steps, batch, dtype=torch.bool), 4)
    expected = torch.log(eigenvalues.abs()).sort(descending=True).values[:4]
    for b in range(batch):
        assert spectrum.exponents[b].tolist() == pytest.approx(expected.tolist(), abs=1e-8)
    assert float(spectrum.log_condition[0]) == pytest.approx(
        steps * float(expected[0] - expected[3]), rel=1e-6
    )


def test_a_long_vanishing_product_keeps_finite_exponents() -> None:
    """T = 400 steps of a contracting tanh RNN: the product underflows float32 (and float64) many times
    over, the per-step QR keeps every exponent finite, agreeing with lyapunov_max for lambda_1."""
    case = CellCase("rnn_tanh", 16)
    generator = torch.Generator().manual_seed(3)
    weights = random_cell_weights(case, generator, dtype=torch.float32)
    x, s_prev = random_sequences(case, weights, steps=400, batch=2, generator=generator)
    jac = builtin_step_jacobians(weights, x, s_prev)
    mask = torch.ones(400, 2, dtype=torch.bool)
    spectrum = lyapunov_spectrum(jac, mask, 4)
    assert torch.isfinite(spectrum.exponents).all()
    assert float(spectrum.exponents[:, 0].max()) < -0.3  # ~1e-52 per 400 steps and lower
    assert (spectrum.exponents[:, :-1] >= spectrum.exponents[:, 1:] - 1e-6).all()
    assert spectrum.exponents[:, 0].tolist() == pytest.approx(lyapunov_max(jac, mask).tolist(), abs=1e-4)


def test_spectrum_is_deterministic_caps_k_at_the_state_size_and_leaves_the_global_rng_alone() -> None:
    case = CellCase("gru", 3)
    weights, x, s_prev, _ = _setup(case, 8, batch=2, seed=4)
    jac = builtin_step_jacobians(weights, x, s_prev)
    mask = torch.ones(8, 2, dtype=torch.bool)
    state = torch.random.get_rng_state()
    first = lyapunov_spectrum(jac, mask, 10)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert first.exponents.shape == (2, 3)  # D = 3
    assert torch.equal(lyapunov_spectrum(jac, mask, 10).exponents, first.exponents)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        lyapunov_spectrum(jac, mask, 0)
    with pytest.raises(ValueError, match="max_passes"):
        lyapunov_spectrum(jac, mask, 2, max_passes=0)


def test_the_dense_reference_helper_agrees_with_the_cell() -> None:
    """Guard of the oracle: the jacrev Jacobian times a small step is the cell's own finite difference."""
    case = CellCase("lstm", 4)
    weights, x, s_prev, dense = _setup(case, 2, batch=1, seed=9)
    w64, x64, s64 = weights.to(torch.float64), x.double(), s_prev.double()
    direction = torch.randn(s64.shape[-1], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    eps = 1e-6
    difference = (
        cell_step(w64, x64[0], s64[0] + eps * direction) - cell_step(w64, x64[0], s64[0] - eps * direction)
    ) / (2 * eps)
    assert torch.allclose(dense[0, 0] @ direction, difference[0], atol=1e-7)


@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
def test_watch_with_the_spectrum_turned_on_logs_it_for_every_layer(kind: str, tmp_path: Path) -> None:
    """End to end: estimator=EstimatorSettings(lyapunov_spectrum=3) puts k exponents (largest first,
    lambda_1 = lyapunov_max) and the condition number into each layer's log line; the default does not."""
    module = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[kind](3, 5, num_layers=2)
    for settings, log in ((gradwatch.EstimatorSettings(lyapunov_spectrum=3), "on"), (None, "off")):
        path = tmp_path / f"{log}.jsonl"
        monitor = gradwatch.watch(module, every=1, log=str(path), estimator=settings, background=False)
        out, _ = module(torch.randn(12, 2, 3, generator=torch.Generator().manual_seed(0)))
        out.sum().backward()
        monitor.step()
        monitor.close()
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        metrics = [line["metrics"] for line in lines if line["kind"] == "measurement"]
        assert len(metrics) == 2  # two layers
        for m in metrics:
            if settings is None:
                assert "lyapunov_spectrum" not in m and "lyapunov_log10_condition" not in m
                continue
            spectrum = [m["lyapunov_spectrum"][str(i)] for i in (1, 2, 3)]
            assert spectrum == sorted(spectrum, reverse=True)
            assert spectrum[0] == pytest.approx(m["lyapunov_max"], abs=1e-4)
            assert m["lyapunov_log10_condition"] >= 0

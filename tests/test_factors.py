"""The lecture's two factors: derivative statistics over real steps and sigma_max(W_hh)."""

from __future__ import annotations

import pytest
import torch

from gradwatch.estimators.factors import activation_statistics, weight_spectral_norm
from tests._estimator_cases import CellCase, random_cell_weights


def test_activation_statistics_count_only_real_steps() -> None:
    generator = torch.Generator().manual_seed(0)
    derivatives = torch.rand(6, 3, 5, generator=generator, dtype=torch.float64)
    mask = torch.ones(6, 3, dtype=torch.bool)
    mask[4:, 0] = False
    mask[1:, 2] = False
    padded = derivatives.clone()
    padded[~mask] = float("nan")  # garbage on padded steps must not leak in
    mean, saturation = activation_statistics(padded, mask, saturation_threshold=0.3)
    real = derivatives[mask]  # (real steps, H)
    assert float(mean) == pytest.approx(float(real.abs().mean()), rel=1e-12)
    assert float(saturation) == pytest.approx(float((real.abs() < 0.3).double().mean()), rel=1e-12)


def test_relu_saturation_is_the_dead_unit_share() -> None:
    derivatives = torch.tensor([[[1.0, 0.0, 0.0, 1.0]], [[0.0, 0.0, 0.0, 1.0]]])  # (T=2, B=1, H=4)
    statistics = activation_statistics(derivatives, torch.ones(2, 1, dtype=torch.bool))
    assert float(statistics.saturation_ratio) == pytest.approx(5 / 8)
    assert float(statistics.mean) == pytest.approx(3 / 8)


def test_no_real_step_gives_nan_not_an_error() -> None:
    statistics = activation_statistics(torch.ones(2, 2, 3), torch.zeros(2, 2, dtype=torch.bool))
    assert torch.isnan(statistics.mean) and torch.isnan(statistics.saturation_ratio)


@pytest.mark.parametrize(
    ("derivatives", "mask", "threshold", "message"),
    [
        (torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool), 0.05, r"\(T, B, H\)"),
        (torch.ones(2, 3, 4), torch.ones(3, 2, dtype=torch.bool), 0.05, "mask"),
        (torch.ones(2, 3, 4), torch.ones(2, 3), 0.05, "bool"),
        (torch.ones(2, 3, 4), torch.ones(2, 3, dtype=torch.bool), -1.0, "saturation_threshold"),
    ],
    ids=["rank", "mask-shape", "mask-dtype", "threshold"],
)
def test_activation_statistics_reject_bad_input(derivatives, mask, threshold: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        activation_statistics(derivatives, mask, threshold)


CASES = [
    CellCase("rnn_tanh", 32),
    CellCase("lstm", 32),
    CellCase("lstm", 32, proj_size=16),
    CellCase("gru", 32),
]


@pytest.mark.parametrize("method", ["lanczos", "power"])
@pytest.mark.parametrize("case", CASES, ids=[c.case_id for c in CASES])
def test_weight_spectral_norm_of_the_stacked_matrix(case: CellCase, method: str) -> None:
    generator = torch.Generator().manual_seed(1)
    weight_hh = random_cell_weights(case, generator).weight_hh  # (gates * H, P), as torch stores it
    exact = float(torch.linalg.matrix_norm(weight_hh, ord=2))
    max_iter = 40 if method == "lanczos" else 2000
    estimate = weight_spectral_norm(
        weight_hh, method=method, max_iter=max_iter, rtol=1e-9, generator=generator
    )
    tolerance = 1e-6 if method == "lanczos" else 1e-3  # power iteration crawls on clustered top values
    assert float(estimate.sigma) == pytest.approx(exact, rel=tolerance)
    assert float(estimate.sigma) <= exact * (1 + 1e-12)
    warm = weight_spectral_norm(
        weight_hh, v0=estimate.right_vectors, method=method, max_iter=max_iter, rtol=1e-9
    )
    assert warm.iterations <= estimate.iterations
    assert float(warm.sigma) == pytest.approx(exact, rel=tolerance)


def test_weight_spectral_norm_ignores_a_misfit_warm_start_and_rejects_bad_weights() -> None:
    weight_hh = torch.diag(torch.tensor([3.0, 1.0, 0.5]))
    estimate = weight_spectral_norm(weight_hh, v0=torch.ones(7))
    assert float(estimate.sigma) == pytest.approx(3.0, rel=1e-6)
    with pytest.raises(ValueError, match="matrix"):
        weight_spectral_norm(torch.ones(3))
    with pytest.raises(TypeError, match="floating"):
        weight_spectral_norm(torch.ones(3, 3, dtype=torch.int64))

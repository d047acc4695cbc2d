"""The per-step gradient check skips the per-element non-finite pass when every norm is finite."""

from __future__ import annotations

import pytest
import torch

from gradwatch.estimators.gradients import gradient_norms


def parameters_with(*gradients: torch.Tensor) -> dict[str, torch.Tensor]:
    named = {}
    for index, gradient in enumerate(gradients):
        parameter = torch.nn.Parameter(torch.zeros_like(gradient))
        parameter.grad = gradient
        named[f"p{index}"] = parameter
    return named


@pytest.mark.parametrize(
    ("bad_values", "expected"),
    [([], 0), ([float("nan")], 1), ([float("inf"), float("-inf"), float("nan")], 3)],
    ids=["finite", "one-nan", "inf-and-nan"],
)
def test_count_matches_the_exact_count(bad_values: list[float], expected: int) -> None:
    gradient = torch.randn(50, generator=torch.Generator().manual_seed(0))
    gradient[: len(bad_values)] = torch.tensor(bad_values)
    named = parameters_with(gradient, torch.ones(3, 3))
    norms, count = gradient_norms(named).to_host()
    assert count == expected == int((~torch.isfinite(gradient)).sum())
    assert norms["p1"] == pytest.approx(3.0)


def test_finite_values_whose_norm_overflows_count_zero() -> None:
    huge = torch.full((8,), 3e38)  # finite float32 values; the sum of squares overflows
    norms, count = gradient_norms(parameters_with(huge)).to_host()
    assert count == 0
    assert norms["p0"] > 1e38


def test_the_fast_path_does_not_read_gradients_elementwise(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = torch.isfinite

    def counting_isfinite(x: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return original(x)

    monkeypatch.setattr(torch, "isfinite", counting_isfinite)
    _, count = gradient_norms(parameters_with(torch.ones(1000), torch.ones(20, 20))).to_host()
    assert count == 0
    assert calls == []  # no full-size isfinite pass over the gradients
    stats = gradient_norms(parameters_with(torch.tensor([1.0, float("nan")])))
    assert stats.to_host()[1] == 1
    assert calls == [(2,)]

"""Per-parameter gradient norms and the non-finite element count."""

from __future__ import annotations

import math

import pytest
import torch

from gradwatch.estimators.gradients import gradient_norms


def test_norms_match_per_parameter_norms_and_skip_missing_gradients() -> None:
    model = torch.nn.LSTM(3, 4)
    frozen = torch.nn.Parameter(torch.ones(2))  # never used: grad stays None
    output, _ = model(torch.randn(5, 2, 3))
    output.square().sum().backward()
    named = {**dict(model.named_parameters()), "frozen": frozen}
    stats = gradient_norms(named)
    assert stats.names == tuple(name for name, _ in model.named_parameters())
    norms, nonfinite = stats.to_host()
    for name, parameter in model.named_parameters():
        assert norms[name] == pytest.approx(float(torch.linalg.vector_norm(parameter.grad)), rel=1e-6)
    assert nonfinite == 0


def test_non_finite_elements_are_counted_over_all_gradients() -> None:
    first = torch.nn.Parameter(torch.zeros(4))
    second = torch.nn.Parameter(torch.zeros(2, 3))
    first.grad = torch.tensor([1.0, float("nan"), float("inf"), 2.0])
    second.grad = torch.full((2, 3), float("-inf"))
    stats = gradient_norms({"first": first, "second": second})
    norms, nonfinite = stats.to_host()
    assert nonfinite == 2 + 6
    assert norms["second"] == float("inf")
    assert stats.nonfinite_count.dtype == torch.int64


def test_mixed_dtypes_and_sparse_gradients() -> None:
    half = torch.nn.Parameter(torch.zeros(3, dtype=torch.float16))
    half.grad = torch.tensor([3.0, 4.0, 0.0], dtype=torch.float16)
    embedding = torch.nn.Embedding(10, 2, sparse=True)
    embedding(torch.tensor([1, 1, 4])).sum().backward()
    stats = gradient_norms({"half": half, "embedding": embedding.weight})
    norms, _ = stats.to_host()
    assert norms["half"] == pytest.approx(5.0)
    assert norms["embedding"] == pytest.approx(float(embedding.weight.grad.to_dense().norm()), rel=1e-6)


def test_no_gradients_and_bad_input() -> None:
    stats = gradient_norms({"weight": torch.nn.Parameter(torch.ones(2))})
    assert stats.to_host() == ({}, 0)
    with pytest.raises(TypeError, match="mapping"):
        gradient_norms([torch.ones(2)])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="'weight'"):
        gradient_norms({"weight": 3.0})  # type: ignore[dict-item]


def test_huge_finite_gradients_get_finite_norms_and_a_zero_count() -> None:
    """Issue #19.1: every element finite (|g| = 3.2e21) but the float32 sum of squares overflows."""
    huge = torch.nn.Parameter(torch.zeros(4, 5))
    huge.grad = torch.full((4, 5), 3.2e21)
    huge.grad[0, 0] = -1.5e21
    half = torch.nn.Parameter(torch.zeros(3, dtype=torch.float16))
    half.grad = torch.tensor([6.0e4, 6.0e4, 1.0], dtype=torch.float16)  # float16 squares overflow too
    bad = torch.nn.Parameter(torch.zeros(3))
    bad.grad = torch.tensor([1.0, float("nan"), 1e30])
    stats = gradient_norms({"huge": huge, "half": half, "bad": bad})
    norms, counts = stats.to_host_per_parameter()
    assert norms["huge"] == pytest.approx(float(torch.linalg.vector_norm(huge.grad.double())), rel=1e-12)
    assert norms["half"] == pytest.approx(float(torch.linalg.vector_norm(half.grad.double())), rel=1e-12)
    assert counts == {"huge": 0, "half": 0, "bad": 1}
    assert math.isnan(norms["bad"])
    assert stats.to_host()[1] == 1

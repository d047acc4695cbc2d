"""The calibration reference (tests/oracles/exact_metrics.py) against ground truths from theory."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradwatch.estimators.cells import cell_step
from tests.oracles.exact_metrics import default_lags, exact_metrics, layer_weights, run_states, step_jacobians
from tests.oracles.reference_cases import scaled_orthogonal_rnn

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    ("steps", "expected"),
    [(1, []), (2, [1, 2]), (5, [1, 2, 4, 5]), (20, [1, 2, 4, 8, 16, 20])],
    ids=["T1", "T2", "T5", "T20"],
)
def test_default_lags(steps: int, expected: list[int]) -> None:
    assert default_lags(steps) == expected


@pytest.mark.parametrize("gain", [0.5, 1.0, 1.3], ids=["gain-0.5", "gain-1", "gain-1.3"])
def test_linear_regime_gives_powers_of_the_gain(gain: float) -> None:
    """Zero inputs and biases keep every state at 0 where tanh' = 1, so J_t = W_hh = gain x orthogonal:
    ||product of tau steps|| = gain**tau and the top Lyapunov exponent is log(gain) (up to the float32
    rounding of the module's orthogonal matrix, ~1e-7 per step)."""
    module = scaled_orthogonal_rnn("tanh", gain, hidden=8, inputs=3)
    with torch.no_grad():
        module.bias_ih_l0.zero_()
        module.bias_hh_l0.zero_()
    metrics = exact_metrics(layer_weights(module), torch.zeros(17, 3, 3))
    for tau, norm in metrics.lag_norm.items():
        assert norm == pytest.approx(gain ** int(tau), rel=1e-5)
    assert metrics.lyapunov_max == pytest.approx(math.log(gain), abs=1e-6)
    assert metrics.weight_hh_sigma_max == pytest.approx(gain, rel=1e-6)
    assert metrics.jacobian_sigma_max_mean == pytest.approx(gain, rel=1e-6)
    assert metrics.activation_derivative_mean == 1.0 and metrics.activation_saturation_ratio == 0.0
    if gain != 1.0:  # at gain 1 rounding decides which side of 1 each norm falls
        assert metrics.jacobian_frac_above_one == (1.0 if gain > 1 else 0.0)
    assert (metrics.sequences, metrics.time_steps) == (3, 17)


@pytest.mark.parametrize("module_type", [nn.LSTM, nn.GRU, nn.RNN], ids=["lstm", "gru", "rnn"])
def test_step_jacobians_match_autograd_and_states_match_torch(module_type: type) -> None:
    module = module_type(3, 4)
    x = torch.randn(6, 2, 3)
    weights = layer_weights(module)
    states = run_states(weights, x.double())
    output, _ = module(x)
    torch.testing.assert_close(states[1:, ..., : module.hidden_size].float(), output, rtol=1e-5, atol=1e-6)
    jacobians = step_jacobians(weights, x.double(), states)

    t, b = 3, 1
    reference = torch.autograd.functional.jacobian(
        lambda s: cell_step(weights, x[t, b].double(), s), states[t, b]
    )
    torch.testing.assert_close(jacobians[t, b], reference)
    gates = exact_metrics(weights, x).gate_mean
    assert (gates is None) == (module_type is nn.RNN)

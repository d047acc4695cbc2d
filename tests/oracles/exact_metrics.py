"""Exact (dense, brute-force) layer metrics for small RNNs: the ground truth the detectors are calibrated on.

Independent of gradwatch's matrix-free estimators: every step Jacobian is formed densely with
``torch.func.jacrev`` and every norm is ``torch.linalg.matrix_norm(ord=2)``, in float64 so that products
over 100+ steps neither underflow nor overflow.

Index convention (the same as gradwatch.estimators): states s_0..s_T, inputs x_0..x_{T-1},
J_t = ds_{t+1}/ds_t evaluated at (x_t, s_t), t = 0..T-1. ``lag_norm[str(tau)]`` is the mean over
sequences of ||J_{T-1} ... J_{T-tau}||_2 = ||ds_T/ds_{T-tau}||_2 for tau in 1, 2, 4, ... (< T) and T.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from gradwatch.estimators.cells import CellWeights, cell_step, hidden_preactivation, input_preactivation
from gradwatch.records import Direction, Measurement, MeasurementMetrics


def default_lags(time_steps: int) -> list[int]:
    """1, 2, 4, ... (powers of two < T) plus T itself; empty when T < 2."""
    if time_steps < 2:
        return []
    powers = [2**k for k in range(time_steps.bit_length()) if 2**k < time_steps]
    return [*powers, time_steps]


def layer_weights(
    module: nn.RNN | nn.LSTM | nn.GRU, layer: int = 0, direction: Direction = "forward"
) -> CellWeights:
    """One layer and direction of a built-in RNN module as CellWeights (float64 copies)."""
    if isinstance(module, nn.LSTM):
        kind = "lstm"
    elif isinstance(module, nn.GRU):
        kind = "gru"
    elif isinstance(module, nn.RNN):
        kind = "rnn_relu" if module.nonlinearity == "relu" else "rnn_tanh"
    else:
        raise TypeError(f"expected nn.RNN, nn.LSTM or nn.GRU, got {type(module).__name__}")
    suffix = f"_l{layer}" + ("_reverse" if direction == "reverse" else "")

    def param(name: str) -> Tensor | None:
        value = getattr(module, name + suffix, None)
        return None if value is None else value.detach().to(torch.float64)

    weight_ih, weight_hh = param("weight_ih"), param("weight_hh")
    assert weight_ih is not None and weight_hh is not None
    return CellWeights(kind, weight_ih, weight_hh, param("bias_ih"), param("bias_hh"), param("weight_hr"))  # type: ignore[arg-type]


def run_states(weights: CellWeights, inputs: Tensor, initial_state: Tensor | None = None) -> Tensor:
    """States s_0..s_T, shape (T+1, B, D), for time-major inputs (T, B, I); s_0 defaults to zeros."""
    time_steps, batch = inputs.shape[:2]
    state = (
        torch.zeros(batch, weights.state_size, dtype=weights.weight_hh.dtype)
        if initial_state is None
        else initial_state
    )
    states = [state]
    for t in range(time_steps):
        state = cell_step(weights, inputs[t], state)
        states.append(state)
    return torch.stack(states)


def step_jacobians(weights: CellWeights, inputs: Tensor, states: Tensor) -> Tensor:
    """Dense J_t = ds_{t+1}/ds_t for every (t, sequence): shape (T, B, D, D)."""
    time_steps, batch = inputs.shape[:2]
    state_size = states.shape[-1]

    def one_step(x: Tensor, s: Tensor) -> Tensor:
        return cell_step(weights, x, s)

    per_pair = torch.func.vmap(torch.func.jacrev(one_step, argnums=1))
    flat = per_pair(
        inputs.reshape(time_steps * batch, -1), states[:-1].reshape(time_steps * batch, state_size)
    )
    return flat.reshape(time_steps, batch, state_size, state_size)


def candidate_derivatives(
    weights: CellWeights, inputs: Tensor, states: Tensor
) -> tuple[Tensor, Tensor | None]:
    """f'(a) of the candidate nonlinearity (T, B, H) and the gates (LSTM forget f, GRU update z) or None.

    RNN: f'(W_ih x + W_hh h + b); LSTM: tanh'(g pre-activation); GRU: tanh'(n pre-activation).
    """
    hidden = states[:-1, ..., : weights.output_size]
    pre = input_preactivation(weights, inputs) + hidden_preactivation(weights, hidden)
    if weights.kind == "rnn_tanh":
        return 1 - torch.tanh(pre) ** 2, None
    if weights.kind == "rnn_relu":
        return (pre > 0).to(pre.dtype), None
    if weights.kind == "lstm":
        _, forget, candidate, _ = pre.chunk(4, dim=-1)
        return 1 - torch.tanh(candidate) ** 2, torch.sigmoid(forget)
    xi = input_preactivation(weights, inputs)
    hh = hidden_preactivation(weights, hidden)
    xr, xz, xn = xi.chunk(3, dim=-1)
    hr, hz, hn = hh.chunk(3, dim=-1)
    reset = torch.sigmoid(xr + hr)
    return 1 - torch.tanh(xn + reset * hn) ** 2, torch.sigmoid(xz + hz)


def product_norms(jacobians: Tensor, lags: list[int]) -> dict[int, Tensor]:
    """(B,) ||J_{T-1} ... J_{T-tau}||_2 per lag, accumulated right to left from the last step."""
    time_steps, batch, state_size, _ = jacobians.shape
    product = torch.eye(state_size, dtype=jacobians.dtype).expand(batch, state_size, state_size)
    norms: dict[int, Tensor] = {}
    for tau in range(1, max(lags, default=0) + 1):
        product = product @ jacobians[time_steps - tau]
        if tau in lags:
            norms[tau] = torch.linalg.matrix_norm(product, ord=2)
    return norms


def lyapunov_exponents(jacobians: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """(B,) finite-time top Lyapunov exponent, (1/T) log ||J_{T-1} ... J_0||_2 (what gradwatch's
    lyapunov_max estimates): the dense product, renormalised after every step so that it cannot
    over/underflow. ``generator`` is unused (kept for callers of the old random-vector version)."""
    time_steps, batch, state_size, _ = jacobians.shape
    product = torch.eye(state_size, dtype=jacobians.dtype).expand(batch, state_size, state_size)
    log_norm = torch.zeros(batch, dtype=jacobians.dtype)
    for t in range(time_steps):
        product = jacobians[t] @ product
        norm = torch.linalg.matrix_norm(product, ord=2)
        log_norm += torch.log(norm)
        product = product / norm.clamp_min(torch.finfo(product.dtype).tiny).view(batch, 1, 1)
    return log_norm / time_steps


def exact_metrics(
    weights: CellWeights,
    inputs: Tensor,
    *,
    grad_norm: Mapping[str, float | None] | None = None,
    saturation_threshold: float = 0.05,
    seed: int = 0,
) -> MeasurementMetrics:
    """All MeasurementMetrics of one layer, computed exactly in float64 for time-major inputs (T, B, I)."""
    weights = weights.to(torch.float64)
    inputs = inputs.detach().to(torch.float64)
    with torch.no_grad():
        states = run_states(weights, inputs)
    jacobians = step_jacobians(weights, inputs, states)
    with torch.no_grad():
        sigmas = torch.linalg.matrix_norm(jacobians, ord=2).flatten()
        lags = default_lags(inputs.shape[0])
        lag_norms = {str(tau): float(norms.mean()) for tau, norms in product_norms(jacobians, lags).items()}
        lyapunov = lyapunov_exponents(jacobians, torch.Generator().manual_seed(seed))
        derivatives, gates = candidate_derivatives(weights, inputs, states)
        weight_sigma = torch.linalg.matrix_norm(weights.weight_hh, ord=2)
    return MeasurementMetrics(
        jacobian_sigma_max_mean=float(sigmas.mean()),
        jacobian_sigma_max_min=float(sigmas.min()),
        jacobian_sigma_max_max=float(sigmas.max()),
        jacobian_sigma_max_p95=float(torch.quantile(sigmas, 0.95)),
        jacobian_frac_above_one=float((sigmas > 1).to(torch.float64).mean()),
        weight_hh_sigma_max=float(weight_sigma),
        activation_derivative_mean=float(derivatives.abs().mean()),
        activation_saturation_ratio=float(
            (derivatives.abs() < saturation_threshold).to(torch.float64).mean()
        ),
        lyapunov_max=float(lyapunov.median()),
        lag_norm=lag_norms,
        grad_norm=dict(grad_norm or {}),
        gate_mean=None if gates is None else float(gates.mean()),
        sequences=int(inputs.shape[1]),
        time_steps=int(inputs.shape[0]),
    )


def exact_measurement(
    module: nn.RNN | nn.LSTM | nn.GRU,
    inputs: Tensor,
    *,
    step: int = 0,
    name: str = "rnn",
    layer: int = 0,
    grad_norm: Mapping[str, float | None] | None = None,
) -> Measurement:
    """A Measurement record of layer ``layer`` of ``module`` on time-major ``inputs`` (layer 0 only)."""
    if layer != 0:
        raise ValueError("exact_measurement replays layer 0 only (its inputs are the module's inputs)")
    metrics = exact_metrics(layer_weights(module, layer), inputs, grad_norm=grad_norm)
    return Measurement(
        step=step, time=float(step), module=name, layer=layer, direction="forward", metrics=metrics
    )


def gradient_norms(module: nn.Module) -> dict[str, float | None]:
    """Per-parameter gradient 2-norms as the monitor reports them (no entry for a leaf without a gradient)."""
    return {
        name: float(torch.linalg.vector_norm(p.grad))
        for name, p in module.named_parameters()
        if p.grad is not None
    }

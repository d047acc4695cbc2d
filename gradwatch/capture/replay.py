"""Replay of recorded recurrent calls in plain PyTorch, to expose every layer's per-step states.

nn.RNN/LSTM/GRU run fused kernels that hide the states of inner layers and single steps. We recompute
each layer and direction from the module's own weights (``gradwatch.estimators.cells``), in float32 (float64
modules stay float64). Layout of a :class:`LayerTrace` (what the estimators receive):

* time-major, in *processing order*: for the reverse direction each sequence is flipped within its own
  length, so every sequence starts at t = 0 and ``mask[t, b]`` is True for t < L_b (padded steps after);
* ``states[t]`` is s_t, so the step Jacobian J_t = ds_{t+1}/ds_t is evaluated at (inputs[t], states[t]).

Inter-layer dropout of a module in training mode cannot be replayed (its mask is gone); deeper layers are
replayed without it — the Jacobians of the deterministic network — and the replay check then compares only
the first layer's final state, which dropout does not touch.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence
from torch.nn.utils.stateless import _reparametrize_module

from gradwatch.capture.cell_calls import CallLayout, new_state
from gradwatch.capture.hooks import CellCall, FusedCall, frozen_parametrizations, record_fused_call
from gradwatch.capture.modules import CustomCellSpec, weight_names
from gradwatch.estimators.cells import (
    CellKind,
    CellWeights,
    cell_step,
    cell_step_from_preactivation,
    input_preactivation,
    join_state,
    split_state,
)
from gradwatch.records import Direction

FlatStep = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class LayerTrace:
    """Inputs and states of one layer and direction, ready for the estimators."""

    layer: int
    direction: Direction
    inputs: Tensor  # (T, B, I)
    states: Tensor  # (T + 1, B, D)
    mask: Tensor  # (T, B) bool
    weights: CellWeights | None = None  # built-in cells: analytic Jacobians
    step_function: FlatStep | None = None  # user cells: (x_t, s_{t-1}) -> s_t on flat states
    recurrent_weight: Tensor | None = None  # W_hh for the weight factor
    autocast_dtype: torch.dtype | None = None  # the recorded calls ran under torch.autocast in this dtype

    @property
    def previous_states(self) -> Tensor:
        """s_0 .. s_{T-1}: where each step Jacobian is evaluated."""
        return self.states[:-1]


@dataclass(frozen=True)
class ReplayCheck:
    """How far the replay is from what the module itself computed."""

    max_abs_error: float
    tolerance: float
    compared: str

    @property
    def ok(self) -> bool:
        return self.max_abs_error <= self.tolerance  # NaN compares False: a NaN replay is not ok


EARLY_STEPS = 4
"""Steps of the forward direction that must agree when a long sequence drifts (see check_fused_replay)."""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (float32, float16, bfloat16) is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def replay_tolerance(dtype: torch.dtype) -> float:
    """Absolute tolerance on replayed outputs (which lie in [-1, 1] for tanh cells)."""
    return {torch.float64: 1e-8, torch.float32: 1e-4}.get(dtype, 3e-2)


# --- fused nn.RNN / nn.LSTM / nn.GRU ------------------------------------------------------------------


Weights = dict[str, Tensor]
"""Effective weights by the name the forward reads (``weight_hh_l0``), e.g. as kept by the forward hook."""


def current_weights(module: nn.Module) -> Weights:
    """The module's effective weights now: parametrizations evaluated (without updating their state),
    a weight-dropped weight as its wrapper last assigned it."""
    with frozen_parametrizations(module):
        out = {name: getattr(module, name, None) for name in weight_names(module)}
    return {name: t.detach() for name, t in out.items() if t is not None}


def _weights_dtype(weights: Weights, name: str) -> torch.dtype:
    if name not in weights:
        raise ValueError(f"the module has no weight {name!r} (its weights are {sorted(weights)})")
    return compute_dtype(weights[name].dtype)


def fused_layer_weights(
    module: nn.Module, kind: CellKind, layer: int, direction: Direction, weights: Weights | None = None
) -> CellWeights:
    """The weights of one layer and direction of a fused module (``weights``: the recorded effective
    weights; None: the current ones), in the compute dtype."""
    suffix = f"_l{layer}" + ("_reverse" if direction == "reverse" else "")
    weights = current_weights(module) if weights is None else weights
    dtype = _weights_dtype(weights, "weight_hh_l0")

    def get(name: str) -> Tensor | None:
        t = weights.get(name + suffix)
        return None if t is None else t.detach().to(dtype)

    return CellWeights(
        kind,
        # every built-in cell has weight_ih and weight_hh (only biases may be absent):
        get("weight_ih"),  # type: ignore[arg-type]
        get("weight_hh"),  # type: ignore[arg-type]
        get("bias_ih"),
        get("bias_hh"),
        get("weight_hr"),
    )


def fused_parameter_names(module: nn.Module, layer: int, direction: Direction) -> list[str]:
    """Names of the weights of one layer and direction, as the forward reads them (the leaf parameters
    behind them: ``WatchedModule.weight_leaves``)."""
    suffix = f"_l{layer}" + ("_reverse" if direction == "reverse" else "")
    # torch's RNNBase attribute, typed as Tensor | Module by nn.Module.__getattr__:
    return [name for name in module._flat_weights_names if name.endswith(suffix)]  # type: ignore[union-attr]


def reverse_within_lengths(x: Tensor, lengths: Tensor) -> Tensor:
    """Flip each sequence of a time-major padded tensor within its own length (padding stays at the end)."""
    steps = x.shape[0]
    t = torch.arange(steps, device=x.device)[:, None]
    lengths = lengths.to(x.device)[None, :]
    index = torch.where(t < lengths, lengths - 1 - t, t)  # (T, B); an involution
    return x.gather(0, index[..., None].expand_as(x))


def run_layer(weights: CellWeights, inputs: Tensor, s0: Tensor, mask: Tensor) -> Tensor:
    """All states s_0..s_T of one layer; a sequence's state is held after its last real step."""
    xi = input_preactivation(weights, inputs)  # one matmul for the whole sequence
    states = [s0]
    s = s0
    for t in range(inputs.shape[0]):
        s_next = cell_step_from_preactivation(weights, xi[t], s)
        s = torch.where(mask[t, :, None], s_next, s)
        states.append(s)
    return torch.stack(states)


@dataclass(frozen=True)
class FusedReplay:
    traces: list[LayerTrace]
    output: Tensor  # (T, B, directions * P), zeros at padded steps
    h_n: Tensor
    c_n: Tensor | None


def replay_fused(
    module: nn.RNNBase, kind: CellKind, call: FusedCall, weights: Weights | None = None
) -> FusedReplay:
    """Recompute every layer and direction of a recorded call with ``weights`` (those the recorded forward
    used) or, when None, the module's current weights."""
    weights = current_weights(module) if weights is None else weights
    dtype = _weights_dtype(weights, "weight_hh_l0")
    directions: tuple[Direction, ...] = ("forward", "reverse") if module.bidirectional else ("forward",)
    num_layers = int(module.num_layers)
    x = call.inputs.to(dtype)
    steps, batch = x.shape[0], x.shape[1]
    lengths = call.lengths.to(x.device)
    mask = torch.arange(steps, device=x.device)[:, None] < lengths[None, :]
    traces: list[LayerTrace] = []
    h_n: list[Tensor] = []
    c_n: list[Tensor] = []
    layer_input = x
    for layer in range(num_layers):
        outputs = []
        for d, direction in enumerate(directions):
            layer_weights = fused_layer_weights(module, kind, layer, direction, weights)
            index = layer * len(directions) + d
            h0 = (
                call.h0[index].to(dtype)
                if call.h0 is not None
                else x.new_zeros(batch, layer_weights.output_size)
            )
            c0 = None
            if kind == "lstm":
                c0 = (
                    call.c0[index].to(dtype)
                    if call.c0 is not None
                    else x.new_zeros(batch, layer_weights.hidden_size)
                )
            seq = layer_input if direction == "forward" else reverse_within_lengths(layer_input, lengths)
            states = run_layer(layer_weights, seq, join_state(h0, c0), mask)
            h_seq, c_last = split_state(layer_weights, states)
            h_seq = h_seq[1:] * mask[..., None]
            outputs.append(h_seq if direction == "forward" else reverse_within_lengths(h_seq, lengths))
            h_n.append(split_state(layer_weights, states[-1])[0])
            if c_last is not None:
                c_n.append(c_last[-1])
            traces.append(
                LayerTrace(layer, direction, seq, states, mask, layer_weights, None, layer_weights.weight_hh)
            )
        layer_input = torch.cat(outputs, dim=-1)
    return FusedReplay(traces, layer_input, torch.stack(h_n), torch.stack(c_n) if c_n else None)


def check_fused_replay(module: nn.RNNBase, call: FusedCall, replay: FusedReplay) -> ReplayCheck:
    """Compare the replay with what the fused kernel returned for the same call."""
    dtype = replay.output.dtype
    # The loosest of the replay's, the inputs' and the outputs' precision (under autocast the kernel ran in
    # float16/bfloat16 on float32 inputs).
    dtypes = (dtype, call.inputs.dtype, call.output.dtype, call.autocast_dtype or dtype)
    tolerance = max(replay_tolerance(d) for d in dtypes)
    if module.training and float(module.dropout) > 0 and int(module.num_layers) > 1:
        layer0 = 2 if module.bidirectional else 1  # dropout sits between layers: layer 0 is untouched
        error = (replay.h_n[:layer0] - call.h_n[:layer0].to(dtype)).abs().max()
        return ReplayCheck(float(error), tolerance, "first layer's final state (inter-layer dropout active)")
    errors = [
        (replay.output - call.output.to(dtype)).abs().max(),
        (replay.h_n - call.h_n.to(dtype)).abs().max(),
    ]
    if replay.c_n is not None and call.c_n is not None:
        errors.append((replay.c_n - call.c_n.to(dtype)).abs().max())
    full = ReplayCheck(float(torch.stack(errors).max()), tolerance, "outputs and final states")
    if full.ok:
        return full
    # An exploding or chaotic recurrence amplifies float rounding along the sequence (by the very product of
    # Jacobians we measure), so two correct implementations can drift apart late in a long sequence. A wrong
    # replay (other weights or formula) is wrong from the start: accept the replay when the forward
    # direction's first steps agree, which a few steps of amplification cannot spoil.
    width = replay.output.shape[-1] // (2 if module.bidirectional else 1)
    early = (
        (replay.output[:EARLY_STEPS, :, :width] - call.output[:EARLY_STEPS, :, :width].to(dtype)).abs().max()
    )
    if replay.output.shape[0] > EARLY_STEPS and float(early) <= tolerance:
        return ReplayCheck(
            float(early),
            tolerance,
            f"first {EARLY_STEPS} steps (later steps drift by {full.max_abs_error:.2g}: "
            "the recurrence amplifies rounding)",
        )
    return full


def rerun_fused(module: nn.Module, call: FusedCall) -> FusedCall:
    """Run the module itself (``module.forward``: no hooks) on a kept probe with its current weights.

    The fixed probe's replay is checked against this on every measurement. The caller runs it under
    ``torch.no_grad()`` and a forked RNG, so inter-layer dropout leaves the user's random stream untouched;
    parametrizations are frozen so that reading the weights (spectral_norm) updates none of their state.
    """
    with frozen_parametrizations(module):
        return _rerun_fused(module, call)


def _rerun_fused(module: nn.Module, call: FusedCall) -> FusedCall:
    dtype = current_weights(module)["weight_hh_l0"].dtype
    x = call.inputs.to(dtype)
    steps = x.shape[0]
    h0 = None if call.h0 is None else call.h0.to(dtype)
    c0 = None if call.c0 is None else call.c0.to(dtype)
    hx: object = (h0, c0) if isinstance(module, nn.LSTM) and h0 is not None and c0 is not None else h0
    if isinstance(module, nn.LSTM) and (h0 is None or c0 is None):
        hx = None
    if bool((call.lengths == steps).all()):
        inputs: object = x.transpose(0, 1) if module.batch_first else x
    else:
        inputs = pack_padded_sequence(x, call.lengths.cpu(), enforce_sorted=False)
    output = module.forward(inputs, hx)
    rerun = record_fused_call(module, (inputs, hx), {}, output, call.inputs.shape[1])
    assert rerun is not None
    return rerun


# --- cells (built-in and user-written) ------------------------------------------------------------------


def cell_weights(module: nn.Module, kind: CellKind, weights: Weights | None = None) -> CellWeights:
    """The weights of an nn.RNNCell/LSTMCell/GRUCell (``weights``: recorded; None: current) in the
    compute dtype."""
    weights = current_weights(module) if weights is None else weights
    dtype = _weights_dtype(weights, "weight_hh")

    def get(name: str) -> Tensor | None:
        t = weights.get(name)
        return None if t is None else t.detach().to(dtype)

    # every built-in cell has weight_ih and weight_hh (only biases may be absent):
    return CellWeights(kind, get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh"))  # type: ignore[arg-type]


def stack_cell_calls(calls: list[CellCall], dtype: torch.dtype) -> tuple[Tensor, Tensor, list[int]]:
    """Inputs (T, B, I), recorded flat states (T + 1, B, D) and the sizes of the state's parts."""
    sizes = [t.shape[-1] for t in calls[0].state_in]
    inputs = torch.stack([c.x for c in calls]).to(dtype)
    states = [torch.cat(calls[0].state_in, dim=-1)] + [torch.cat(c.state_out, dim=-1) for c in calls]
    return inputs, torch.stack(states).to(dtype), sizes


def trace_builtin_cell(
    module: nn.Module, kind: CellKind, calls: list[CellCall], recompute: bool, weights: Weights | None = None
) -> LayerTrace:
    """A trace from recorded cell calls at ``weights`` (the recorded calls' own; None: the current ones);
    ``recompute`` re-runs the chain with those weights."""
    cell = cell_weights(module, kind, weights)
    inputs, states, _ = stack_cell_calls(calls, cell.weight_hh.dtype)
    if recompute:
        states = _rerun_chain(lambda x, s: cell_step(cell, x, s), inputs, states[0])
    mask = torch.ones(inputs.shape[:2], dtype=torch.bool, device=inputs.device)
    autocast = next((c.autocast_dtype for c in calls if c.autocast_dtype is not None), None)
    return LayerTrace(0, "forward", inputs, states, mask, cell, None, cell.weight_hh, autocast)


def check_cell_replay(trace: LayerTrace) -> ReplayCheck:
    """Does our cell formula reproduce the recorded s_t from (x_t, s_{t-1})? (Built-in cells only.)"""
    assert trace.weights is not None
    predicted = cell_step(trace.weights, trace.inputs, trace.previous_states)
    error = (predicted - trace.states[1:]).abs().max()
    dtypes = (
        trace.states.dtype,
        trace.autocast_dtype or trace.states.dtype,
    )  # autocast: the kernel's precision
    tolerance = max(replay_tolerance(d) for d in dtypes)
    return ReplayCheck(float(error), tolerance, "cell outputs")


def check_cell_against_module(module: nn.Module, trace: LayerTrace) -> ReplayCheck:
    """Do the module's own outputs (``module.forward``, all steps batched) match the replayed states?"""
    assert trace.weights is not None
    steps, batch = trace.inputs.shape[:2]
    dtype = current_weights(module)["weight_hh"].dtype
    x = trace.inputs.reshape(steps * batch, -1).to(dtype)
    h, c = split_state(trace.weights, trace.previous_states.reshape(steps * batch, -1).to(dtype))
    with frozen_parametrizations(module):
        out = module.forward(x, h if c is None else (h, c))
    predicted = torch.cat(out, dim=-1) if isinstance(out, tuple) else out
    error = (predicted.to(trace.states.dtype) - trace.states[1:].reshape(steps * batch, -1)).abs().max()
    tolerance = max(replay_tolerance(trace.states.dtype), replay_tolerance(dtype))
    return ReplayCheck(float(error), tolerance, "cell outputs (module re-run)")


def private_copy(module: nn.Module) -> nn.Module:
    """A deep copy of a user cell to measure on: its forward may update buffers or attributes (a call
    counter), and gradwatch never runs the user's own module (what it computes next must not change)."""
    try:
        with torch.no_grad():
            return copy.deepcopy(module)
    except Exception as exc:
        raise ValueError(
            f"gradwatch measures a registered cell ({type(module).__name__}) on a private copy, so that "
            "running it cannot change the user's module (a forward may update buffers or attributes), but "
            f"copy.deepcopy failed: {exc!r}. Make the cell deep-copyable, or do not register it"
        ) from exc


def custom_step_function(
    module: nn.Module,
    spec: CustomCellSpec,
    layout: CallLayout | None,
    sizes: list[int],
    dtype: torch.dtype,
    weights: Weights | None = None,
) -> FlatStep:
    """The user's cell as a function of flat states, on ``module`` (a private copy: see
    :func:`private_copy`) through ``module.forward`` (no hooks). ``weights`` (parameters by name, as the
    recorded calls had them) stand in for its parameters, and every call starts from the buffers it had when
    this function was made, so a buffer the forward updates cannot make two calls differ."""
    single = len(sizes) == 1
    buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
    param_dtype = _parameter_dtype(module, dtype)

    def step(x: Tensor, s: Tensor) -> Tensor:
        substitutes = {**(weights or {}), **{name: b.clone() for name, b in buffers.items()}}
        if not substitutes:
            return one_step(x, s)
        with _reparametrize_module(module, substitutes):
            return one_step(x, s)

    def one_step(x: Tensor, s: Tensor) -> Tensor:
        parts = tuple(torch.split(s, sizes, dim=-1))
        state = _cast_state(parts[0] if single else parts, param_dtype)
        x = x.to(param_dtype)
        if spec.step is not None:
            first = layout.parts[0] if layout is not None and layout.parts else None
            x_t = x.reshape(x.shape[0], *first.shape) if first is not None else x
            out = spec.step(module, x_t, state)
        elif layout is not None:
            args, kwargs = layout.rebuild(x, state)
            out = new_state(module, spec, module.forward(*args, **kwargs), _as_state_tuple(state))
        else:
            out = module.forward(state, x) if spec.state_first else module.forward(x, state)
        out_tuple = (out,) if isinstance(out, Tensor) else tuple(out)
        return torch.cat(out_tuple, dim=-1).to(dtype)

    return step


def trace_custom_cell(
    module: nn.Module,
    spec: CustomCellSpec,
    calls: list[CellCall],
    recompute: bool,
    weights: Weights | None = None,
) -> LayerTrace:
    """A trace of a user-written cell at ``weights`` (its parameters as the recorded calls had them; None:
    its current ones), measured on a private copy in eval mode; its Jacobians come from torch.func on
    ``step_function``."""
    shadow = private_copy(module)
    shadow.train(False)  # no dropout: every J v of the iteration must be the same matrix
    dtype = compute_dtype(_parameter_dtype(shadow, torch.float32))
    inputs, states, sizes = stack_cell_calls(calls, dtype)
    step = custom_step_function(shadow, spec, calls[0].layout, sizes, dtype, weights)
    if recompute:
        states = _rerun_chain(step, inputs, states[0])
    mask = torch.ones(inputs.shape[:2], dtype=torch.bool, device=inputs.device)
    weight = None
    if spec.recurrent_weight is not None:
        param = (weights if weights is not None else dict(shadow.named_parameters())).get(
            spec.recurrent_weight
        )
        if param is None:
            raise ValueError(
                f"register_cell(recurrent_weight={spec.recurrent_weight!r}) names no parameter of "
                f"{type(module).__name__}; its parameters are {[n for n, _ in module.named_parameters()]}"
            )
        weight = param.detach().to(dtype)
    return LayerTrace(0, "forward", inputs, states, mask, None, step, weight)


def _rerun_chain(step: FlatStep, inputs: Tensor, s0: Tensor) -> Tensor:
    states = [s0]
    for t in range(inputs.shape[0]):
        states.append(step(inputs[t], states[-1]))
    return torch.stack(states)


def _parameter_dtype(module: nn.Module, default: torch.dtype) -> torch.dtype:
    for p in module.parameters():
        return p.dtype
    return default


def _as_state_tuple(state: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return (state,) if isinstance(state, Tensor) else tuple(state)


def _cast_state(state: Tensor | tuple[Tensor, ...], dtype: torch.dtype) -> Tensor | tuple[Tensor, ...]:
    if isinstance(state, Tensor):
        return state.to(dtype)
    return tuple(t.to(dtype) for t in state)


@contextmanager
def deterministic_mode(module: nn.Module) -> Iterator[None]:
    """Run a user cell in eval mode (no dropout) and restore every submodule's own training flag."""
    flags = [(m, m.training) for m in module.modules()]
    module.train(False)
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag

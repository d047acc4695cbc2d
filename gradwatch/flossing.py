"""Gradient flossing (Engelken 2023, arXiv:2312.17306): push the top Lyapunov exponents of the recurrent
layers toward 0 on the user's own inputs, before (or between stretches of) training.

The loss is the paper's: the mean of (lambda_i - target)^2 over the top-k exponents of every flossed layer,
the exponents from QR propagation of k tangent vectors (:func:`gradwatch.estimators.spectrum.qr_sweep`)
through the layer's own forward pass, differentiated through torch.linalg.qr and the trajectory, and
minimised with Adam. No targets are needed: only the inputs the layers see.

What is optimised: the parameters of each flossed nn.RNN / nn.GRU / nn.LSTM module (weight_ih, weight_hh,
the biases and an LSTM's weight_hr, every layer and direction), as the paper flosses the input, recurrent
and bias weights of its RNN. Every other parameter and buffer of the model (embeddings, heads, norms) is
untouched, gradients already stored on any parameter are restored, and the global RNG state is the same
after the call as before (the model's forward runs in eval mode under a forked RNG, the tangent frames come
from a private generator).
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gradwatch.capture.modules import builtin_cell_kind, custom_cell_spec, unwrap_model
from gradwatch.estimators.cells import (
    CellKind,
    CellWeights,
    cell_step_from_preactivation,
    input_preactivation,
)
from gradwatch.estimators.jacobian import builtin_step_jacobians
from gradwatch.estimators.spectrum import lyapunov_spectrum, orthonormalise, qr_sweep
from gradwatch.records import Direction

DEFAULT_FLOSS_STEPS = 100
DEFAULT_FLOSS_EXPONENTS = 4
DEFAULT_FLOSS_LR = 1e-3

_FLOSSABLE = (nn.RNN, nn.GRU, nn.LSTM)
_CELLS = (nn.RNNCell, nn.GRUCell, nn.LSTMCell)


class FlossError(ValueError):
    """A model, input or setting that floss() cannot work with; the message says what it accepts."""


@dataclass(frozen=True)
class LayerFloss:
    """The top-k Lyapunov spectrum of one layer and direction before and after flossing (medians over the
    sequences of the first batch, measured as the monitor measures them: lambda_i = log sigma_i(P) / T)."""

    module: str
    layer: int
    direction: Direction
    before: tuple[float, ...]
    after: tuple[float, ...]


@dataclass(frozen=True)
class FlossResult:
    """What :func:`floss` changed: the spectrum of every flossed layer, the parameters it optimised, the
    steps it took and the flossing loss (mean squared distance of the exponents to ``target``)."""

    steps: int
    exponents: int
    target: float
    parameters: tuple[str, ...]
    layers: tuple[LayerFloss, ...]
    loss_before: float
    loss_after: float
    skipped_steps: int = 0
    """Steps whose loss or gradient was not finite (no update was made)."""

    def summary(self) -> str:
        """One line per layer: the spectrum before -> after."""

        def fmt(values: tuple[float, ...]) -> str:
            return "[" + ", ".join(f"{v:+.3f}" for v in values) + "]"

        lines = [
            f"flossed {len(self.layers)} layer(s) for {self.steps} steps toward lambda = {self.target:g} "
            f"(loss {self.loss_before:.4g} -> {self.loss_after:.4g})"
        ]
        for layer in self.layers:
            lines.append(
                f"  {layer.module} layer {layer.layer} {layer.direction}: "
                f"{fmt(layer.before)} -> {fmt(layer.after)}"
            )
        return "\n".join(lines)


@dataclass
class _Call:
    """One recorded call of a flossed module: time-major inputs and its initial states (or None)."""

    x: Tensor
    hx: Tensor | tuple[Tensor, Tensor] | None


@dataclass(frozen=True)
class _Target:
    name: str
    module: nn.RNNBase
    kind: CellKind


def _find_targets(model: nn.Module) -> list[_Target]:
    """The model's nn.RNN/GRU/LSTM modules, or a FlossError naming what it found instead."""
    if not isinstance(model, nn.Module):
        raise FlossError(f"floss expects a torch.nn.Module, got {type(model).__name__}")
    root = unwrap_model(model)
    targets: list[_Target] = []
    unsupported: list[str] = []
    for name, module in root.named_modules():
        label = name or type(module).__name__
        if custom_cell_spec(module) is not None or isinstance(module, _CELLS):
            unsupported.append(f"{label} ({type(module).__name__})")
        elif isinstance(module, _FLOSSABLE):
            kind = builtin_cell_kind(module)
            if kind is None or torch.nn.utils.parametrize.is_parametrized(module):
                unsupported.append(f"{label} ({type(module).__name__}, parametrized weights)")
            else:
                targets.append(_Target(label, module, kind))
    if not targets:
        found = f"; it has {', '.join(unsupported)}, which floss cannot floss" if unsupported else ""
        raise FlossError(
            "floss needs a model with at least one torch.nn.RNN, nn.GRU or nn.LSTM module (without "
            f"parametrized weights){found}. Cells stepped by your own loop and registered custom cells are "
            "not supported: their inputs and states are only known inside your forward."
        )
    if unsupported:
        warnings.warn(
            f"gradwatch.floss: flossing {', '.join(t.name for t in targets)}; leaving "
            f"{', '.join(unsupported)} as they are (only nn.RNN, nn.GRU and nn.LSTM can be flossed)",
            stacklevel=3,
        )
    return targets


def _batches(batches: Any, steps: int) -> Iterator[Any]:
    """``steps`` batches, cycling through a re-iterable (list, DataLoader); a one-shot iterator is read
    once (at most ``steps`` items) and then cycled; a single tensor is one batch."""
    if isinstance(batches, Tensor | Mapping | tuple):
        return itertools.repeat(batches, steps)
    if not isinstance(batches, Iterable):
        raise FlossError(
            f"batches must be an input tensor or an iterable of model inputs, got {type(batches).__name__}"
        )
    if iter(batches) is batches:  # a generator or iterator: read it once
        batches = list(itertools.islice(batches, steps))
    if isinstance(batches, list | tuple) and not batches:
        raise FlossError("batches is empty: floss needs at least one batch of model inputs")
    return itertools.islice(itertools.cycle(batches), steps)


def _call_model(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, Tensor):
        model(batch)
    elif isinstance(batch, Mapping):
        model(**batch)
    elif isinstance(batch, tuple | list):
        model(*batch)
    else:
        raise FlossError(
            f"a batch must be a tensor, a tuple/list of positional inputs or a dict of keyword inputs "
            f"for the model, got {type(batch).__name__}"
        )


def _record_calls(model: nn.Module, targets: list[_Target], batch: Any) -> dict[str, _Call]:
    """Run the model once (eval mode, no grad) and keep each target's first call of this batch."""
    calls: dict[str, _Call] = {}

    def hook_for(target: _Target) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if target.name in calls:
                return
            inputs = args[0] if args else kwargs.get("input")
            hx = args[1] if len(args) > 1 else kwargs.get("hx")
            if isinstance(inputs, nn.utils.rnn.PackedSequence):
                raise FlossError(
                    f"{target.name} was called with a PackedSequence; floss needs padded tensor inputs "
                    "(pass batches of equal-length sequences)"
                )
            if not isinstance(inputs, Tensor):
                raise FlossError(f"{target.name} was called with {type(inputs).__name__}, not a tensor")
            x = inputs.detach()
            batch_first = bool(getattr(module, "batch_first", False))
            if x.ndim == 2:  # unbatched (T, I)
                x = x.unsqueeze(1)
                if hx is not None:
                    hx = tuple(h.unsqueeze(1) for h in hx) if isinstance(hx, tuple) else hx.unsqueeze(1)
            elif batch_first:
                x = x.transpose(0, 1)
            if isinstance(hx, tuple):
                hx = (hx[0].detach(), hx[1].detach())
            elif isinstance(hx, Tensor):
                hx = hx.detach()
            calls[target.name] = _Call(x, hx)

        return hook

    handles = [t.module.register_forward_pre_hook(hook_for(t), with_kwargs=True) for t in targets]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            _call_model(model, batch)
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode
    missing = [t.name for t in targets if t.name not in calls]
    if len(missing) == len(targets):
        raise FlossError(f"the model's forward never called {', '.join(missing)} on this batch")
    return calls


def _layer_weights(module: nn.RNNBase, kind: CellKind, layer: int, direction: Direction) -> CellWeights:
    """The live (differentiable) parameters of one layer and direction."""
    suffix = f"_l{layer}" + ("_reverse" if direction == "reverse" else "")

    def get(name: str) -> Tensor | None:
        value = getattr(module, name + suffix, None)
        return value if isinstance(value, Tensor) else None

    weight_ih, weight_hh = get("weight_ih"), get("weight_hh")
    assert weight_ih is not None and weight_hh is not None
    return CellWeights(kind, weight_ih, weight_hh, get("bias_ih"), get("bias_hh"), get("weight_hr"))


def _initial_state(module: nn.RNNBase, call: _Call, weights: CellWeights, index: int) -> Tensor:
    """s_0 of layer-direction ``index`` (B, D): from the call's hx, else zeros."""
    batch = call.x.shape[1]
    dtype = call.x.dtype if call.x.is_floating_point() else weights.weight_hh.dtype
    if call.hx is None:
        return torch.zeros(batch, weights.state_size, dtype=dtype, device=call.x.device)
    if isinstance(call.hx, tuple):
        return torch.cat([call.hx[0][index], call.hx[1][index]], dim=-1)
    return call.hx[index]


def _flip(x: Tensor) -> Tensor:
    return x.flip(0)


@dataclass
class _LayerRun:
    """One layer and direction driven by its inputs: exponents (B, k) and its outputs h (T, B, P)."""

    exponents: Tensor
    outputs: Tensor
    weights: CellWeights
    inputs: Tensor
    s_prev: Tensor


def _run_layer(weights: CellWeights, inputs: Tensor, s0: Tensor, frame: Tensor, transient: int) -> _LayerRun:
    """The layer's trajectory and its top-k exponents by QR propagation, differentiable in the weights."""
    xi = input_preactivation(weights, inputs)
    steps = inputs.shape[0]
    states = [s0]

    def step(t: int, s: Tensor) -> Tensor:
        return cell_step_from_preactivation(weights, xi[t], s)

    def frame_map(q: Tensor, t: int) -> Tensor:
        s = states[t]
        states.append(step(t, s))
        # J_t Q column by column: forward-mode AD of the cell step in the state (vmapped over the k columns)
        return torch.func.vmap(
            lambda v: torch.func.jvp(lambda z: step(t, z), (s,), (v,))[1], in_dims=2, out_dims=2
        )(q)

    _, sums = qr_sweep(frame_map, frame, range(steps), counted_from=transient)
    exponents = sums / max(1, steps - transient)
    trajectory = torch.stack(states)
    outputs = trajectory[1:, :, : weights.output_size]
    return _LayerRun(exponents, outputs, weights, inputs, trajectory[:-1])


def _module_runs(
    target: _Target, call: _Call, k: int, transient: int, generator: torch.Generator
) -> list[tuple[int, Direction, _LayerRun]]:
    """Every layer and direction of one recorded call, layer by layer (each layer's inputs are the
    previous layer's outputs, detached: each layer is flossed through its own parameters)."""
    module = target.module
    directions: tuple[Direction, ...] = ("forward", "reverse") if module.bidirectional else ("forward",)
    inputs = call.x.to(_layer_weights(module, target.kind, 0, "forward").weight_hh.dtype)
    runs: list[tuple[int, Direction, _LayerRun]] = []
    for layer in range(module.num_layers):
        outputs = []
        for d, direction in enumerate(directions):
            weights = _layer_weights(module, target.kind, layer, direction)
            s0 = _initial_state(module, call, weights, layer * len(directions) + d).to(inputs.dtype)
            size = min(k, weights.state_size)
            start = torch.randn(
                (inputs.shape[1], weights.state_size, size), generator=generator, dtype=torch.float32
            ).to(device=inputs.device, dtype=inputs.dtype)
            frame, _ = orthonormalise(start)
            layer_inputs = inputs if direction == "forward" else _flip(inputs)
            run = _run_layer(weights, layer_inputs, s0.detach(), frame, transient)
            runs.append((layer, direction, run))
            outputs.append(run.outputs if direction == "forward" else _flip(run.outputs))
        inputs = torch.cat(outputs, dim=-1).detach()
    return runs


def _spectrum(run: _LayerRun, k: int) -> tuple[float, ...]:
    """The monitor's reading of one layer: median over sequences of lambda_i = log sigma_i(P) / T."""
    with torch.no_grad():
        detached = CellWeights(
            run.weights.kind,
            run.weights.weight_ih.detach(),
            run.weights.weight_hh.detach(),
            None if run.weights.bias_ih is None else run.weights.bias_ih.detach(),
            None if run.weights.bias_hh is None else run.weights.bias_hh.detach(),
            None if run.weights.weight_hr is None else run.weights.weight_hr.detach(),
        )
        jac = builtin_step_jacobians(detached, run.inputs.detach(), run.s_prev.detach())
        mask = torch.ones(jac.time_steps, jac.batch_size, dtype=torch.bool, device=jac.device)
        exponents = lyapunov_spectrum(jac, mask, k).exponents
        return tuple(float(v) for v in exponents.double().nanmedian(dim=0).values.cpu())


def _check_settings(steps: int, exponents: int, lr: float, target: float, transient: int | None) -> None:
    for name, value in (("steps", steps), ("exponents", exponents)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "steps" else 1):
            least = "a non-negative" if name == "steps" else "a positive"
            raise FlossError(f"{name} must be {least} integer, got {value!r}")
    if not (isinstance(lr, int | float) and lr > 0 and math.isfinite(lr)):
        raise FlossError(f"lr must be a positive float, got {lr!r}")
    if not (isinstance(target, int | float) and math.isfinite(target)):
        raise FlossError(f"target must be a finite float (the exponent to push toward), got {target!r}")
    if transient is not None and (
        isinstance(transient, bool) or not isinstance(transient, int) or transient < 0
    ):
        raise FlossError(f"transient must be None or a non-negative integer, got {transient!r}")


def floss(
    model: nn.Module,
    batches: Any,
    *,
    steps: int = DEFAULT_FLOSS_STEPS,
    exponents: int = DEFAULT_FLOSS_EXPONENTS,
    lr: float = DEFAULT_FLOSS_LR,
    target: float = 0.0,
    transient: int | None = None,
    seed: int = 0,
) -> FlossResult:
    """Floss the recurrent layers of ``model``: ``steps`` Adam steps (learning rate ``lr``) on the mean of
    (lambda_i - target)^2 over the top ``exponents`` Lyapunov exponents of every nn.RNN/GRU/LSTM layer and
    direction, measured on the model's own inputs ``batches``: one batch (a tensor, a tuple of positional
    inputs or a dict of keyword inputs) or a list/iterable of such batches, cycled if shorter than ``steps``.

    ``transient``: the first steps of each sequence left out of the exponents while the tangent frame
    aligns (default T // 10, as in the paper's code). Call it before training, or every N steps during
    training for the paper's "flossing during training". Raises :class:`FlossError` for a model without an
    nn.RNN/GRU/LSTM, packed inputs or bad settings; other recurrent modules are left alone with a warning.
    """
    _check_settings(steps, exponents, lr, target, transient)
    targets = _find_targets(model)
    parameters = [
        (f"{t.name}.{name}", p) for t in targets for name, p in t.module.named_parameters() if p.requires_grad
    ]
    if not parameters:
        raise FlossError("the recurrent modules have no trainable parameters (requires_grad is False)")
    names = tuple(name for name, _ in parameters)
    params = [p for _, p in parameters]
    devices = sorted(
        {p.device.index for p in params if p.device.type == "cuda" and p.device.index is not None}
    )
    saved_grads = [p.grad for p in params]
    with torch.random.fork_rng(devices=devices):
        optimizer = torch.optim.Adam(params, lr=lr)
        first_batch: Any = None
        losses: list[float] = []
        skipped = 0
        before: dict[tuple[str, int, Direction], tuple[float, ...]] = {}

        def loss_of(batch: Any) -> tuple[Tensor, list[tuple[str, int, Direction, _LayerRun]]]:
            calls = _record_calls(model, targets, batch)
            generator = torch.Generator().manual_seed(seed)  # the same frames every step, as in the paper
            runs = []
            terms = []
            for t in targets:
                call = calls.get(t.name)
                if call is None:
                    continue
                length = call.x.shape[0]
                skip = length // 10 if transient is None else transient
                if skip >= length:
                    raise FlossError(
                        f"transient ({skip}) must be shorter than the sequences ({length} steps)"
                    )
                for layer, direction, run in _module_runs(t, call, exponents, skip, generator):
                    runs.append((t.name, layer, direction, run))
                    terms.append((run.exponents - target).square().mean())
            return torch.stack(terms).mean(), runs

        try:
            for index, batch in enumerate(_batches(batches, max(steps, 1))):
                if index == 0:
                    first_batch = batch
                    with torch.no_grad():
                        loss0, runs0 = loss_of(batch)
                    before = {(n, layer, d): _spectrum(run, exponents) for n, layer, d, run in runs0}
                    losses.append(float(loss0))
                if index >= steps:
                    break
                loss, _ = loss_of(batch)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                if not torch.isfinite(loss) or any(
                    g is not None and not torch.isfinite(g).all() for g in grads
                ):
                    skipped += 1
                    continue
                for p, g in zip(params, grads, strict=True):
                    p.grad = None if g is None else g.detach()
                optimizer.step()
            with torch.no_grad():
                loss_end, runs_end = loss_of(first_batch)
        finally:
            for p, grad in zip(params, saved_grads, strict=True):
                p.grad = grad
    layers = tuple(
        LayerFloss(n, layer, d, before.get((n, layer, d), ()), _spectrum(run, exponents))
        for n, layer, d, run in runs_end
    )
    return FlossResult(
        steps=steps,
        exponents=exponents,
        target=float(target),
        parameters=names,
        layers=layers,
        loss_before=losses[0],
        loss_after=float(loss_end),
        skipped_steps=skipped,
    )

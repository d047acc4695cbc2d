"""Forward hooks that keep detached copies of what a measurement needs, on measured steps only.

The hook never changes a module's inputs or outputs. It keeps the *last* call of a measured step (the last
micro-batch under gradient accumulation; for cells, the last unbroken chain of calls), sliced to the first
``max_sequences`` sequences and cloned so later in-place edits by the user cannot reach it.

Under ``torch.compile`` the hook body is traced, so it cannot copy tensors eagerly: it only appends the call's
tensors to a list (Dynamo replays that as a side effect after the graph runs) and :meth:`CallRecorder.settle`
copies them at the end of the step. No graph break, so ``fullgraph=True`` keeps working.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from gradwatch.capture.modules import CELL_TYPES, FUSED_TYPES, State, WatchedModule, weight_names

MAX_CELL_CALLS = 4096  # bound on the recorded chain of one cell per measured step

PendingCall = tuple[tuple[Any, ...], dict[str, Any], Any, "torch.dtype | None"]
"""(args, kwargs, output, autocast dtype) of a call made inside a torch.compile'd forward, copied later."""


@dataclass(frozen=True)
class FusedCall:
    """One call of nn.RNN/LSTM/GRU, time-major and padded, first sequences only."""

    inputs: Tensor  # (T, B, I)
    lengths: Tensor  # (B,) int64, on inputs.device
    h0: Tensor | None  # (layers * directions, B, P) or None for zeros
    c0: Tensor | None  # LSTM only
    output: Tensor  # (T, B, directions * P), zeros at padded steps
    h_n: Tensor  # (layers * directions, B, P)
    c_n: Tensor | None
    autocast_dtype: torch.dtype | None = None  # the call ran under torch.autocast with this dtype


@dataclass(frozen=True)
class CellCall:
    """One call of a cell: s_t = cell(x_t, s_{t-1}), first sequences only."""

    x: Tensor  # (B, I)
    state_in: tuple[Tensor, ...]  # each (B, n_i)
    state_out: tuple[Tensor, ...]
    autocast_dtype: torch.dtype | None = None  # the call ran under torch.autocast with this dtype


class CallRecorder:
    """The forward hook of one watched module; records only while ``armed``.

    It is deepcopy- and pickle-safe: a deep copy of the model shares this recorder, which ignores calls from
    any module but its own; a pickled model gets an inert hook in its place. A failure while recording never
    reaches the user's forward pass when ``on_fault`` is set: the exception goes to it instead (the monitor
    disables the module there, or re-raises in strict mode).
    """

    def __init__(
        self,
        watched: WatchedModule,
        max_sequences: int,
        on_fault: Callable[[Exception], None] | None = None,
    ) -> None:
        self.watched = watched
        self.max_sequences = max_sequences
        self.on_fault = on_fault
        self.armed = False
        self.fused_call: FusedCall | None = None
        self.cell_calls: list[CellCall] = []
        self._last_output: tuple[Tensor, ...] | None = None  # the user's tensors, to detect a chain
        self._deferred: list[PendingCall] = []  # calls seen inside a compiled forward
        # The effective weights (parametrized, weight-dropped) the kept call ran with, copied at record time:
        # the optimizer may move the parameters before the measurement (LBFGS, a second optimizer).
        self.weights: dict[str, Tensor] | None = None
        self._weight_sources: list[tuple[Tensor | None, int]] = []  # what self.weights was copied from

    def reset(self) -> None:
        """Drop everything recorded (called after each measurement)."""
        self.fused_call = None
        self.cell_calls = []
        self._last_output = None
        self._deferred = []
        self.weights = None
        self._weight_sources = []

    def _keep_weights(self, module: nn.Module) -> None:
        """Copy the weights this call used, unless they are the very tensors (same version) copied last."""
        used = used_weights(module)
        sources = [(t, -1 if t is None else t._version) for t in used.values()]
        if (
            self.weights is not None
            and len(sources) == len(self._weight_sources)
            and all(
                a is b and va == vb for (a, va), (b, vb) in zip(sources, self._weight_sources, strict=True)
            )
        ):
            return
        self.weights = {n: t.detach().clone() for n, t in used.items() if t is not None}
        self._weight_sources = sources

    @property
    def has_data(self) -> bool:
        self.settle()
        return self.fused_call is not None or bool(self.cell_calls)

    def settle(self) -> None:
        """Record, in call order, the calls a compiled forward handed over (call before reading the data)."""
        deferred, self._deferred = self._deferred, []
        for args, kwargs, output, autocast_dtype in deferred:
            self._record(args, kwargs, output, autocast_dtype)

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if not self.armed or module is not self.watched.module or not torch.is_grad_enabled():
            return  # eval / no_grad passes, copies of the model and unmeasured steps are not recorded
        if _is_compiling():
            # Traced by Dynamo: keep references only (a side effect it replays); settle() copies them eagerly.
            self._deferred.append((args, kwargs, output, _autocast_dtype(output)))
            return
        try:
            self.settle()
            self._record(args, kwargs, output, _autocast_dtype(output))
        except Exception as exc:
            if self.on_fault is None:
                raise
            self.reset()
            self.armed = False
            self.on_fault(exc)

    def _record(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any, autocast: torch.dtype | None
    ) -> None:
        with torch.no_grad():
            if self.watched.kind == "fused":
                call = record_fused_call(self.watched.module, args, kwargs, output, self.max_sequences)
                if call is not None:
                    self.fused_call = replace(call, autocast_dtype=autocast)
                    self._keep_weights(self.watched.module)
            else:
                self._record_cell(args, kwargs, output, autocast)

    def _record_cell(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any, autocast: torch.dtype | None = None
    ) -> None:
        custom = self.watched.custom
        x_at, state_at = (1, 0) if custom is not None and custom.state_first else (0, 1)
        x = args[x_at] if len(args) > x_at else kwargs.get("input", kwargs.get("x"))
        state = args[state_at] if len(args) > state_at else kwargs.get("hx", kwargs.get("state"))
        if not isinstance(x, Tensor) or (x.dim() > 1 and x.shape[0] == 0):
            return  # an empty batch has nothing to measure; keep the chain recorded so far
        out = _as_tuple(output)
        if x.dim() == 1:  # unbatched call of a built-in cell
            x = x.unsqueeze(0)
            out = tuple(t.unsqueeze(0) for t in out)
            state = None if state is None else tuple(t.unsqueeze(0) for t in _as_tuple(state))
        if state is None:
            if self.watched.kind == "custom":
                return  # a user cell given no state: its shape is unknown, nothing to measure
            state = tuple(torch.zeros_like(t) for t in out)
        state_in = _as_tuple(state)
        if self.watched.kind == "custom" and not self.cell_calls:
            check_custom_signature(self.watched, x, state_in, out)
        k = min(self.max_sequences, x.shape[0])
        chained = self._last_output is not None and _same_state(state_in, self._last_output)
        if not chained:
            self.cell_calls = []
        if len(self.cell_calls) >= MAX_CELL_CALLS:
            return
        self.cell_calls.append(
            CellCall(
                x=x[:k].detach().clone(),
                state_in=tuple(t[:k].detach().clone() for t in state_in),
                state_out=tuple(t[:k].detach().clone() for t in out),
                autocast_dtype=autocast,
            )
        )
        self._last_output = out
        self._keep_weights(self.watched.module)

    def __deepcopy__(self, memo: dict[int, Any]) -> CallRecorder:
        return self

    def __reduce__(self) -> tuple[Callable[[], Callable[..., None]], tuple[()]]:
        return (_inert_hook, ())


def check_custom_signature(
    watched: WatchedModule, x: Tensor, state_in: tuple[Tensor, ...], out: tuple[Tensor, ...]
) -> None:
    """A registered cell must return a new state shaped like its state; say how to register it if not."""
    if [tuple(t.shape) for t in state_in] == [tuple(t.shape) for t in out]:
        return
    assert watched.custom is not None
    order = "cell(state, x_t)" if watched.custom.state_first else "cell(x_t, state)"
    shapes = ", ".join(str(tuple(t.shape)) for t in state_in)
    hint = (
        "If its forward is cell(state, x_t), register it with "
        f"gradwatch.register_cell({type(watched.module).__name__}, state_first=True)"
        if not watched.custom.state_first
        else "If its forward is cell(x_t, state), register it without state_first=True"
    )
    swapped = (tuple(x.shape),) == tuple(tuple(t.shape) for t in out)
    raise ValueError(
        f"registered cell {watched.name} ({type(watched.module).__name__}) was called with a state of "
        f"shape {shapes} but returned {', '.join(str(tuple(t.shape)) for t in out)}: gradwatch reads the "
        f"call as {order} -> new_state, with new_state shaped like state. "
        + (hint + "." if swapped else hint + "; for another signature pass step=lambda cell, x, state: ...")
    )


@contextmanager
def frozen_parametrizations(module: nn.Module) -> Iterator[None]:
    """Parametrizations in eval mode while gradwatch reads a weight or re-runs the module.

    spectral_norm does a power iteration, updating its buffers in place, whenever the weight is read in
    training mode; in eval mode it uses the vectors the last forward left, i.e. the weight that forward used.
    Reading it must not change what the model computes next.
    """
    lists = [m for m in module.modules() if isinstance(m, nn.utils.parametrize.ParametrizationList)]
    flags = [(m, m.training) for p in lists for m in p.modules()]
    for m, _ in flags:
        m.training = False
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def used_weights(module: nn.Module) -> dict[str, Tensor | None]:
    """The weights a built-in RNN or cell computes with right now, by name (effective values: a
    parametrized weight is evaluated, a weight-dropped one is whatever tensor the wrapper assigned); for a
    user cell, its parameters by name."""
    if not isinstance(module, FUSED_TYPES + CELL_TYPES):  # a user cell: all its parameters
        return dict(module.named_parameters())
    if isinstance(module, nn.RNNBase) and len(module._flat_weights) == len(module._flat_weights_names):
        # The tensors the last forward actually used (RNNBase refreshes them at each forward, and a
        # weight-drop wrapper's setattr goes straight into this list).
        return dict(zip(module._flat_weights_names, module._flat_weights, strict=True))
    with frozen_parametrizations(module):
        return {name: getattr(module, name, None) for name in weight_names(module)}


def _inert_hook() -> Callable[..., None]:
    return _do_nothing


def _do_nothing(*args: Any, **kwargs: Any) -> None:
    return None


def _autocast_dtype(output: Any) -> torch.dtype | None:
    """The lower precision dtype the call ran under, if torch.autocast was on for the output's device."""
    first = output if isinstance(output, Tensor) else next(_tensors(output), None)
    if first is None:
        return None
    device_type = first.device.type
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _tensors(value: Any) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, PackedSequence):
        yield value.data
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


def _as_tuple(state: State | Any) -> tuple[Tensor, ...]:
    if isinstance(state, Tensor):
        return (state,)
    if isinstance(state, (tuple, list)) and all(isinstance(t, Tensor) for t in state):
        return tuple(state)
    raise TypeError(f"a cell state must be a tensor or a tuple of tensors, got {type(state).__name__}")


def _same_state(state_in: tuple[Tensor, ...], last_out: tuple[Tensor, ...]) -> bool:
    """Is this call's input state the previous call's output (the loop ``h = cell(x_t, h)``)?"""
    if len(state_in) != len(last_out):
        return False
    if all(a is b for a, b in zip(state_in, last_out, strict=True)):
        return True
    return all(
        a.shape == b.shape and bool(torch.equal(a.detach(), b.detach()))
        for a, b in zip(state_in, last_out, strict=True)
    )


def record_fused_call(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any, k: int
) -> FusedCall | None:
    """The call's first ``k`` sequences, or None for an empty batch (no sequence, nothing to measure)."""
    x = args[0] if args else kwargs["input"]
    hx = args[1] if len(args) > 1 else kwargs.get("hx")
    out, h_out = output
    is_lstm = isinstance(module, nn.LSTM)
    h0, c0 = (hx if hx is not None else (None, None)) if is_lstm else (hx, None)
    h_n, c_n = h_out if is_lstm else (h_out, None)

    if isinstance(x, PackedSequence):
        inputs, lengths = pad_packed_sequence(x)  # original batch order, time-major
        output_padded, _ = pad_packed_sequence(out, total_length=inputs.shape[0])
    else:
        batched = x.dim() == 3
        inputs = x if batched else x.unsqueeze(1)
        output_padded = out if batched else out.unsqueeze(1)
        if batched and getattr(module, "batch_first", False):
            inputs = inputs.transpose(0, 1)
            output_padded = output_padded.transpose(0, 1)
        if not batched:
            h0 = None if h0 is None else h0.unsqueeze(1)
            c0 = None if c0 is None else c0.unsqueeze(1)
            h_n = h_n.unsqueeze(1)
            c_n = None if c_n is None else c_n.unsqueeze(1)
        lengths = torch.full((inputs.shape[1],), inputs.shape[0], dtype=torch.long)
    if inputs.shape[0] == 0 or inputs.shape[1] == 0:
        return None
    k = min(k, inputs.shape[1])

    def first(t: Tensor | None, batch_dim: int) -> Tensor | None:
        return None if t is None else t.narrow(batch_dim, 0, k).detach().clone()

    return FusedCall(
        inputs=first(inputs, 1),  # type: ignore[arg-type]
        lengths=lengths[:k].to(device=inputs.device, dtype=torch.long),
        h0=first(h0, 1),
        c0=first(c0, 1),
        output=first(output_padded, 1),  # type: ignore[arg-type]
        h_n=first(h_n, 1),  # type: ignore[arg-type]
        c_n=first(c_n, 1),
    )

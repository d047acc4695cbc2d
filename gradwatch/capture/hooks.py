"""Forward hooks that keep detached copies of what a measurement needs, on measured steps only.

The hook never changes a module's inputs or outputs. It keeps the *last* call of a measured step (the last
micro-batch under gradient accumulation), or the last unbroken chain of calls, each fed the state the previous
one returned (a cell in a loop; an nn.GRU stepped one token at a time by a decoder), as one sequence; sliced
to the first ``max_sequences`` sequences and cloned so later in-place edits by the user cannot reach it.

Under ``torch.compile`` the hook body is traced, so it cannot copy tensors eagerly: it only appends the call's
tensors to a list (Dynamo replays that as a side effect after the graph runs) and :meth:`CallRecorder.settle`
copies them at the end of the step. No graph break, so ``fullgraph=True`` keeps working.

Nothing is registered on the watched module itself: one process-wide forward hook
(``torch.nn.modules.module.register_module_forward_hook``) dispatches through a map id(module) -> recorder,
so ``torch.save(model)``, ``copy.deepcopy(model)`` and ``torch.jit.script(model)`` see exactly the unwatched
module. The global hook is installed only while some recorder is armed (a measured step), so unmeasured steps
cost nothing; once a recorder has been traced by ``torch.compile`` it stays installed until the last monitor
closes, because a graph compiled without it would never call it again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence
from torch.utils.hooks import RemovableHandle

from gradwatch.capture.cell_calls import CallLayout, hint_for, new_state, read_call
from gradwatch.capture.modules import CELL_TYPES, FUSED_TYPES, State, WatchedModule, weight_names

MAX_CELL_CALLS = 4096  # bound on the recorded chain of one cell per measured step
MAX_CHAINED_STEPS = 4096  # bound on the time steps of a fused module's chained calls per measured step

PendingCall = tuple[tuple[Any, ...], dict[str, Any], Any, "torch.dtype | None", bool]
"""(args, kwargs, output, autocast dtype, module.training) of a call made inside a torch.compile'd forward,
copied later."""


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
    layout: CallLayout | None = None  # a user cell: how to call it again from (x, state)


class CallRecorder:
    """Records the calls of one watched module; records only while ``armed``.

    The monitor attaches it with :func:`attach` (nothing goes on the module; see the module docstring); it
    also works as an ordinary per-module forward hook (``with_kwargs=True``). It ignores calls from any module
    but its own. Only training-mode calls count once one has been seen on the step: an eval-mode forward
    with gradients on (a validation batch) recorded earlier on the step is replaced by the training call, and
    one made after it is ignored. If the step has only eval-mode calls they are kept and ``recorded_in_eval``
    says so (a user who trains with the RNN in eval mode). A failure while recording never reaches the
    user's forward pass when ``on_fault`` is set: the exception goes to it instead (the monitor disables the
    module there, or re-raises in strict mode).
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
        self._armed = False
        self.traced_by_compile = False  # a torch.compile trace called it: keep the global hook installed
        self._fused_chain: list[FusedCall] = []  # the kept call, or the chained calls (joined when read)
        self._chained_steps = 0  # time steps of the kept chain
        self.cell_calls: list[CellCall] = []
        self.recorded_in_eval = False  # what is recorded came from eval-mode calls (no training call yet)
        self._training_seen = False  # a training-mode call was recorded on this step
        self._last_output: tuple[Tensor, ...] | None = None  # the user's tensors, to detect a chain
        self.calls_seen = 0  # calls recorded on this step (training-mode ones once one was seen)
        self.own_calls = 0  # calls on this step that fired the module's own hook (not through a wrapper)
        self.chained_calls = 1  # calls joined into the kept fused chain (see :func:`continues_chain`)
        self._deferred: list[PendingCall] = []  # calls seen inside a compiled forward
        # The effective weights (parametrized, weight-dropped) the kept call ran with, copied at record time:
        # the optimizer may move the parameters before the measurement (LBFGS, a second optimizer).
        self.weights: dict[str, Tensor] | None = None
        self._weight_sources: list[tuple[Tensor | None, int]] = []  # what self.weights was copied from

    @property
    def fused_call(self) -> FusedCall | None:
        """The kept call of a fused module: its chained calls joined into one (see :meth:`_record_fused`)."""
        if len(self._fused_chain) > 1:
            self._fused_chain = [join_fused_calls(self._fused_chain)]
        return self._fused_chain[0] if self._fused_chain else None

    @fused_call.setter
    def fused_call(self, call: FusedCall | None) -> None:
        self._fused_chain = [] if call is None else [call]
        self._chained_steps = 0 if call is None else int(call.inputs.shape[0])

    @property
    def armed(self) -> bool:
        """Record calls now (set by the monitor on measured steps)."""
        return self._armed

    @armed.setter
    def armed(self, value: bool) -> None:
        self._armed = bool(value)
        _refresh_global_hook()

    def reset(self) -> None:
        """Drop everything recorded (called after each measurement)."""
        self.fused_call = None
        self.cell_calls = []
        self.recorded_in_eval = False
        self._training_seen = False
        self._last_output = None
        self._deferred = []
        self.weights = None
        self._weight_sources = []
        self.calls_seen = 0
        self.own_calls = 0
        self.chained_calls = 1

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

    def settle(self) -> None:
        """Record, in call order, the calls a compiled forward handed over (call before reading the data)."""
        deferred, self._deferred = self._deferred, []
        for args, kwargs, output, autocast_dtype, training in deferred:
            self._take(args, kwargs, output, autocast_dtype, training)

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if module is not self.watched.module:
            return  # a copy of the model
        if _is_compiling():
            self.traced_by_compile = True
        if not self._armed or not torch.is_grad_enabled():
            return  # no_grad passes and unmeasured steps are not recorded
        self.own_calls += 1
        if _is_compiling():
            # Traced by Dynamo: keep references only (a side effect it replays); settle() copies them eagerly.
            self._deferred.append((args, kwargs, output, _autocast_dtype(output), bool(module.training)))
            return
        self._record_call(module, args, kwargs, output)

    def wrapper_called(
        self, wrapper: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        """The module's parent (a wrapper) finished a call. When no call of the module fired its own hook on
        this step and the wrapper's arguments and result are the module's own (salesforce's WeightDrop:
        ``return self.module.forward(*args)``), record the wrapper's call as the module's, at the weights the
        wrapper set. A parent whose call does not look like the module's is ignored."""
        if not self._armed or self.own_calls or not torch.is_grad_enabled() or _is_compiling():
            return
        module = self.watched.module
        if self.watched.kind == "custom" or not looks_like_builtin_call(module, args, kwargs, output):
            return
        self._record_call(module, args, kwargs, output)

    def _record_call(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        """Copy one recorded call (after any deferred compiled calls); a fault disarms this capture."""
        try:
            self.settle()
            self._take(args, kwargs, output, _autocast_dtype(output), bool(module.training))
        except Exception as exc:
            if self.on_fault is None:
                raise
            self.reset()
            self.armed = False
            self.on_fault(exc)

    def _take(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        output: Any,
        autocast: torch.dtype | None,
        training: bool,
    ) -> None:
        """Record a call unless it is an eval-mode call on a step that already had a training-mode one."""
        if not training:
            if self._training_seen:
                return  # e.g. a validation forward after the training forward, before optimizer.step()
            self.recorded_in_eval = True
        elif not self._training_seen:
            self._training_seen = True
            if self.recorded_in_eval:  # drop the eval-mode calls recorded before this training call
                self.fused_call = None
                self.cell_calls = []
                self._last_output = None
                self.recorded_in_eval = False
                self.calls_seen = 0
                self.chained_calls = 1
        self.calls_seen += 1
        self._record(args, kwargs, output, autocast)

    def _record(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any, autocast: torch.dtype | None
    ) -> None:
        with torch.no_grad():
            if self.watched.kind == "fused":
                self._record_fused(args, kwargs, output, autocast)
            else:
                self._record_cell(args, kwargs, output, autocast)

    def _record_fused(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any, autocast: torch.dtype | None
    ) -> None:
        """Keep the call, or append it to the kept one when it continues it: fed the state the previous
        call returned, with the same weights (a decoder stepped one token at a time is one sequence)."""
        module = self.watched.module
        call = record_fused_call(module, args, kwargs, output, self.max_sequences)
        if call is None:
            return
        call = replace(call, autocast_dtype=autocast)
        state_in = args[1] if len(args) > 1 else kwargs.get("hx")
        previous = self._fused_chain[-1] if self._fused_chain else None
        if (
            previous is not None
            and self._last_output is not None
            and state_in is not None
            and not getattr(module, "bidirectional", False)
            and _same_state(_as_tuple(state_in), self._last_output)
            and self._same_weights(module)
            and full_length(previous)
            and full_length(call)
        ):
            if self._chained_steps + call.inputs.shape[0] <= MAX_CHAINED_STEPS:
                self._fused_chain.append(call)  # joined once, when read: no copy per token
                self._chained_steps += int(call.inputs.shape[0])
                self.chained_calls += 1
                self._last_output = _as_tuple(output[1])
            return  # a chain over the bound keeps its first MAX_CHAINED_STEPS steps
        self.fused_call = call
        self.chained_calls = 1
        self._last_output = _as_tuple(output[1])
        self._keep_weights(module)

    def _same_weights(self, module: nn.Module) -> bool:
        """Does the module compute with the very weight tensors (same versions) of the kept call?"""
        sources = [(t, -1 if t is None else t._version) for t in used_weights(module).values()]
        return len(sources) == len(self._weight_sources) and all(
            a is b and va == vb for (a, va), (b, vb) in zip(sources, self._weight_sources, strict=True)
        )

    def _record_cell(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any, autocast: torch.dtype | None = None
    ) -> None:
        if self.watched.kind == "custom":
            self._record_custom_cell(args, kwargs, output, autocast)
            return
        x = args[0] if args else kwargs.get("input")
        state = args[1] if len(args) > 1 else kwargs.get("hx")
        if not isinstance(x, Tensor) or (x.dim() > 1 and x.shape[0] == 0):
            return  # an empty batch has nothing to measure; keep the chain recorded so far
        out = _as_tuple(output)
        if x.dim() == 1:  # unbatched call of a built-in cell
            x = x.unsqueeze(0)
            out = tuple(t.unsqueeze(0) for t in out)
            state = None if state is None else tuple(t.unsqueeze(0) for t in _as_tuple(state))
        if state is None:
            state = tuple(torch.zeros_like(t) for t in out)
        self._append_cell_call(x, _as_tuple(state), out, autocast, None)

    def _record_custom_cell(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any, autocast: torch.dtype | None
    ) -> None:
        """A registered cell's call, read through its registration (``state=``, ``returns=``, ``step=``)."""
        module, spec = self.watched.module, self.watched.custom
        assert spec is not None
        view = read_call(module, spec, args, kwargs)
        if view is None or view.x.shape[0] == 0:
            return  # no state passed (its shape is unknown) or an empty batch: nothing to measure
        state_in = _as_tuple(view.state)
        out = _as_tuple_or_none(new_state(module, spec, output, state_in))
        if not self.cell_calls:
            check_custom_signature(
                self.watched, view.x, state_in, out, hint_for(module, args, kwargs, output)
            )
        assert out is not None  # check_custom_signature raised otherwise
        previous = self.cell_calls[-1].layout if self.cell_calls else None
        if previous is not None and not previous.same_kept_values(view.layout):
            self._last_output = None  # other kept arguments: not one step function, start a new chain
        self._append_cell_call(view.x, state_in, out, autocast, view.layout)

    def _append_cell_call(
        self,
        x: Tensor,
        state_in: tuple[Tensor, ...],
        out: tuple[Tensor, ...],
        autocast: torch.dtype | None,
        layout: CallLayout | None,
    ) -> None:
        """Continue the kept chain with this call if it was fed the state the last call returned, else
        start a new chain with it."""
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
                layout=layout,
            )
        )
        self._last_output = out
        self._keep_weights(self.watched.module)


# --- attaching without touching the module ---------------------------------------------------------------

# Keyed by id(module): an attached recorder holds its module, so the id cannot be reused while the entry
# exists, and detach() removes it. (Not a WeakKeyDictionary: under torch.compile a lookup there compares
# against every key, which makes Dynamo wrap other monitors' modules.)
_attached: dict[int, CallRecorder] = {}
_owners: dict[int, str] = {}
_wrapped: dict[int, list[CallRecorder]] = {}  # id(parent module) -> recorders of the modules it holds
_global_handle: RemovableHandle | None = None


def check_custom_signature(
    watched: WatchedModule,
    x: Tensor,
    state_in: tuple[Tensor, ...],
    out: tuple[Tensor, ...] | None,
    hint: str | None = None,
) -> None:
    """A registered cell must return a new state shaped like its state; say how to register it if not."""
    if out is not None and [tuple(t.shape) for t in state_in] == [tuple(t.shape) for t in out]:
        return
    spec = watched.custom
    assert spec is not None
    cls = type(watched.module).__name__
    order = "cell(state, x_t)" if spec.state_first else "cell(x_t, state)"
    if spec.state is not None:
        order = f"a call whose argument {spec.state!r} is the state"
    returned = (
        "something that is not a tensor or a tuple of tensors"
        if out is None
        else ", ".join(str(tuple(t.shape)) for t in out)
    )
    taken = (
        "the whole return value" if spec.returns is None else f"returns={spec.returns!r} of the return value"
    )
    shapes = ", ".join(str(tuple(t.shape)) for t in state_in)
    swapped = out is not None and (tuple(x.shape),) == tuple(tuple(t.shape) for t in out)
    if hint is None and swapped and not spec.state_first and spec.state is None:
        hint = (
            "if its forward is cell(state, x_t), register it with "
            f"gradwatch.register_cell({cls}, state_first=True)"
        )
    elif hint is None and spec.state_first:
        hint = "if its forward is cell(x_t, state), register it without state_first=True"
    options = (
        "register_cell(state=<argument position or name>, returns=<position or name of the new state in "
        "the return value>), or step=lambda cell, x, state: new_state"
    )
    raise ValueError(
        f"registered cell {watched.name} ({cls}) was called with a state of shape {shapes} but "
        f"{taken} is {returned}: gradwatch reads the call as {order} -> new_state, with new_state shaped "
        f"like state. "
        + (f"{hint[0].upper()}{hint[1:]}; otherwise use {options}." if hint else f"Use {options}.")
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


def attach(module: nn.Module, recorder: CallRecorder, owner: str) -> None:
    """Route ``module``'s forward calls to ``recorder``; ``owner`` describes the monitor (for errors).

    Raises ValueError if another recorder is attached to ``module`` already (one monitor per module).
    """
    current = _owners.get(id(module))
    if current is not None:
        raise ValueError(already_watched_message(module, current))
    _attached[id(module)] = recorder
    _owners[id(module)] = owner
    _refresh_global_hook()


def detach(module: nn.Module, recorder: CallRecorder) -> None:
    """Undo :func:`attach` (if ``recorder`` is still attached); removes the global hook when unused."""
    if _attached.get(id(module)) is recorder:
        del _attached[id(module)]
        _owners.pop(id(module), None)
    for key, recorders in list(_wrapped.items()):
        if recorder in recorders:
            recorders.remove(recorder)
            if not recorders:
                del _wrapped[key]
    _refresh_global_hook()


def attach_parent(parent: nn.Module, recorder: CallRecorder) -> None:
    """Also hand ``parent``'s finished calls to ``recorder`` (see :meth:`CallRecorder.wrapper_called`);
    :func:`detach` undoes it. The recorder keeps its module alive, so the parent's id is not reused while the
    entry exists (the parent holds the module)."""
    _wrapped.setdefault(id(parent), []).append(recorder)


def attached_owner(module: nn.Module) -> str | None:
    """The description of the monitor attached to ``module``, if any."""
    return _owners.get(id(module))


def already_watched_message(module: nn.Module, owner: str) -> str:
    return (
        f"this {type(module).__name__} is already watched by {owner}; watching it twice would record "
        "every call twice. Close that monitor first (monitor.close(), or use `with gradwatch.watch(...)`), "
        "then watch again"
    )


def keep_for_compile(recorder: CallRecorder) -> None:
    """Keep the global hook installed for ``recorder`` from now on: its module is (or will be) compiled, and
    a graph traced while the hook is absent would never call it."""
    recorder.traced_by_compile = True
    _refresh_global_hook()


def global_hook_installed() -> bool:
    """Is gradwatch's process-wide forward hook registered now (for tests and benchmarks)?"""
    return _global_handle is not None


def _refresh_global_hook() -> None:
    """Install the global forward hook while some attached recorder needs it, remove it otherwise."""
    global _global_handle
    recorders = list(_attached.values())
    needed = any(r._armed or r.traced_by_compile for r in recorders)
    if needed and _global_handle is None:
        _global_handle = torch.nn.modules.module.register_module_forward_hook(
            _dispatch_forward, with_kwargs=True
        )
    elif not needed and _global_handle is not None:
        remove_global_hook(_global_handle)
        _global_handle = None


def remove_global_hook(handle: RemovableHandle) -> None:
    """Remove a global forward hook registered with ``with_kwargs=True`` completely.

    torch's handle knows ``_global_forward_hooks`` and ``_global_forward_hooks_always_called`` but not
    ``_global_forward_hooks_with_kwargs`` (torch 2.13, ``register_module_forward_hook``), so its entry would
    stay behind and ``torch.compile`` would warn about "global hooks" for the rest of the process.
    """
    handle.remove()
    torch.nn.modules.module._global_forward_hooks_with_kwargs.pop(handle.id, None)


def _dispatch_forward(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
    """The global forward hook: hands a watched module's call to its recorder, ignores every other module."""
    recorder = _attached.get(id(module))
    if recorder is not None:
        recorder(module, args, kwargs, output)
    for held in _wrapped.get(id(module), ()):
        held.wrapper_called(module, args, kwargs, output)


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


def _as_tuple_or_none(state: Any) -> tuple[Tensor, ...] | None:
    try:
        return _as_tuple(state)
    except TypeError:
        return None


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


def looks_like_builtin_call(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
) -> bool:
    """Are these the arguments and the result of a call of the built-in ``module`` (input of its input size
    and a floating dtype; a fused module's (output, state) of its output size, a cell's new state of its
    hidden size)?"""
    x = args[0] if args else kwargs.get("input")
    data = x.data if isinstance(x, PackedSequence) else x
    if not isinstance(data, Tensor) or not data.is_floating_point() or data.dim() < 1:
        return False
    if data.shape[-1] != getattr(module, "input_size", None):
        return False
    if isinstance(module, CELL_TYPES):
        parts = output if isinstance(output, tuple) else (output,)
        hidden = int(getattr(module, "hidden_size", 0))
        return all(isinstance(t, Tensor) and t.shape[-1] == hidden for t in parts) and len(parts) in (1, 2)
    if not isinstance(output, tuple) or len(output) != 2:
        return False
    out = output[0].data if isinstance(output[0], PackedSequence) else output[0]
    proj = int(getattr(module, "proj_size", 0) or 0)
    width = (proj or int(getattr(module, "hidden_size", 0))) * (
        2 if getattr(module, "bidirectional", False) else 1
    )
    return isinstance(out, Tensor) and out.shape[-1] == width


def full_length(call: FusedCall) -> bool:
    """Does every kept sequence of the call run its whole length (no packed, shorter sequence)?"""
    return bool((call.lengths == call.inputs.shape[0]).all())


def join_fused_calls(calls: list[FusedCall]) -> FusedCall:
    """One call from consecutive ones, each started from the state the previous one returned."""
    first, last = calls[0], calls[-1]
    return FusedCall(
        inputs=torch.cat([c.inputs for c in calls]),
        lengths=torch.stack([c.lengths for c in calls]).sum(0),
        h0=first.h0,
        c0=first.c0,
        output=torch.cat([c.output for c in calls]),
        h_n=last.h_n,
        c_n=last.c_n,
        autocast_dtype=next((c.autocast_dtype for c in calls if c.autocast_dtype is not None), None),
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
        # a fused call always has inputs, an output and h_n (first() keeps None only), here and below:
        inputs=first(inputs, 1),  # type: ignore[arg-type]
        lengths=lengths[:k].to(device=inputs.device, dtype=torch.long),
        h0=first(h0, 1),
        c0=first(c0, 1),
        output=first(output_padded, 1),  # type: ignore[arg-type]
        h_n=first(h_n, 1),  # type: ignore[arg-type]
        c_n=first(c_n, 1),
    )

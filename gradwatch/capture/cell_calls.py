"""Reading a registered user cell's call: which argument is the state, which part of the return value is the
new state, and how to call the cell again with another state.

A hand-written RNN is rarely ``cell(x_t, state) -> new_state``: PyTorch's char-RNN tutorials write
``forward(input, hidden)`` and ``forward(category, input, hidden)``, both returning ``(output, hidden)``.
``register_cell(state=..., returns=...)`` says where the state is (by argument position or name) and which
part of the return value is the new state (a tuple position; a key or field of a returned mapping or
namedtuple; or, for a plain tuple, the name the forward's ``return a, b`` statement gives it). Every other
argument is an input of the step, held at its recorded value when the step Jacobian d(new state)/d(state)
is measured: tensors with one row per sequence are recorded per call (flattened into the step's input
x_t), anything else is kept from the call as it was.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

import torch
from torch import Tensor, nn

from gradwatch.capture.modules import CustomCellSpec

Where = int | str  # a positional index or a keyword name


@dataclass(frozen=True)
class ArgumentPart:
    """One argument of the call other than the state: a per-sequence tensor (``shape`` per row, its columns
    ``start:stop`` of the flat input) or a value kept as it was (``value``)."""

    where: Where
    kind: Literal["sequence", "kept"]
    shape: tuple[int, ...] = ()
    start: int = 0
    stop: int = 0
    value: Any = None


@dataclass(frozen=True)
class CallLayout:
    """How a recorded call of a user cell is rebuilt from (x_t, state): where the state goes and what the
    other arguments are."""

    state_at: Where
    parts: tuple[ArgumentPart, ...]
    positional: int  # how many positional arguments the call had

    def rebuild(self, x: Tensor, state: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The call's (args, kwargs) with ``x`` (rows, I) as its per-sequence tensors and ``state``."""
        values: dict[Where, Any] = {self.state_at: state}
        rows = x.shape[0]
        for part in self.parts:
            if part.kind == "sequence":
                values[part.where] = x[:, part.start : part.stop].reshape(rows, *part.shape)
            else:
                values[part.where] = part.value
        args = tuple(values[i] for i in range(self.positional))
        kwargs = {k: v for k, v in values.items() if isinstance(k, str)}
        return args, kwargs

    def same_kept_values(self, other: CallLayout) -> bool:
        """Do two calls agree on everything but their per-sequence tensors (so they can share one step)?"""
        if (self.state_at, self.positional) != (other.state_at, other.positional) or len(self.parts) != len(
            other.parts
        ):
            return False
        for a, b in zip(self.parts, other.parts, strict=True):
            if (a.where, a.kind, a.shape, a.start, a.stop) != (b.where, b.kind, b.shape, b.start, b.stop):
                return False
            if a.kind == "kept" and not _same_value(a.value, b.value):
                return False
        return True


@dataclass(frozen=True)
class CellCallView:
    """A user cell's call read through its registration: the state passed in, the flat per-sequence input
    (batch, I) and the layout to call it again."""

    state: Any
    x: Tensor
    layout: CallLayout


def state_argument(module: nn.Module, spec: CustomCellSpec) -> tuple[int | None, str | None]:
    """(position, name) of the state argument of ``module.forward`` (either may be None)."""
    names = _positional_names(_class_of(module))
    where: Where = spec.state if spec.state is not None else (0 if spec.state_first else 1)
    if isinstance(where, int):
        return where, names[where] if where < len(names) else None
    return (names.index(where) if where in names else None), where


def read_call(
    module: nn.Module, spec: CustomCellSpec, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> CellCallView | None:
    """The state and inputs of one call, or None when the call passed no state (its shape is unknown)."""
    position, name = state_argument(module, spec)
    if position is not None and position < len(args):
        state_at: Where = position
        state = args[position]
    elif name is not None and name in kwargs:
        state_at, state = name, kwargs[name]
    else:
        known = _all_names(_class_of(module))
        if name is not None and known is not None and name not in known:
            cls = type(module).__name__
            raise ValueError(
                f"register_cell({cls}, state={name!r}): {cls}.forward has no argument {name!r} "
                f"(its arguments are {list(known)})"
            )
        return None
    if state is None:
        return None
    batch = _as_tensors(state)[0].shape[0]
    parts: list[ArgumentPart] = []
    columns: list[Tensor] = []
    width = 0
    others: list[tuple[Where, Any]] = [(i, a) for i, a in enumerate(args) if i != state_at]
    others += [(k, v) for k, v in kwargs.items() if k != state_at]
    first_tensor_only = spec.step is not None  # step(cell, x_t, state): x_t is the first other tensor
    for where, value in others:
        per_sequence = isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == batch
        if per_sequence and not (first_tensor_only and columns):
            flat = value.reshape(batch, -1)
            parts.append(
                ArgumentPart(where, "sequence", tuple(value.shape[1:]), width, width + flat.shape[1])
            )
            columns.append(flat)
            width += flat.shape[1]
        elif not first_tensor_only:
            kept = value.detach().clone() if isinstance(value, Tensor) else value
            parts.append(ArgumentPart(where, "kept", value=kept))
    if not columns:
        raise ValueError(
            f"registered cell {type(module).__name__} was called with no input tensor of one row per "
            f"sequence besides its state (batch {batch}); gradwatch needs x_t to measure "
            "d(new state)/d(state)"
        )
    x = torch.cat(columns, dim=1) if len(columns) > 1 else columns[0]
    layout = CallLayout(state_at, tuple(parts), len(args))
    return CellCallView(state, x, layout)


def new_state(module: nn.Module, spec: CustomCellSpec, output: Any, state_in: tuple[Tensor, ...]) -> Any:
    """The part of a call's return value that is the new state (``returns=``); without ``returns=``, the
    whole return value, or with ``step=`` the one element of a returned tuple shaped like the state."""
    if spec.returns is not None:
        return pick_returned(module, spec.returns, output)
    if spec.step is not None and isinstance(output, (tuple, list)) and not _shaped_like(output, state_in):
        matches = [item for item in output if _shaped_like(item, state_in)]
        if len(matches) == 1:
            return matches[0]
    return output


def pick_returned(module: nn.Module, returns: Where, output: Any) -> Any:
    """``returns`` of a call's return value: a position in a tuple, a key of a mapping, a field of a
    namedtuple or object, or the name a plain tuple has in the forward's ``return`` statement."""
    cls = type(module).__name__
    if isinstance(returns, int):
        if isinstance(output, (tuple, list)) and -len(output) <= returns < len(output):
            return output[returns]
        raise ValueError(
            f"register_cell({cls}, returns={returns}): its forward returned {_describe(output)}, which has "
            f"no element {returns}"
        )
    if isinstance(output, Mapping) and returns in output:
        return output[returns]
    if hasattr(output, returns) and not isinstance(output, Tensor):
        return getattr(output, returns)
    if isinstance(output, (tuple, list)):
        names = returned_names(_class_of(module))
        if names is not None and returns in names and len(names) == len(output):
            return output[names.index(returns)]
    raise ValueError(
        f"register_cell({cls}, returns={returns!r}): its forward returned {_describe(output)} with no part "
        f"named {returns!r} (names work for a mapping, a namedtuple, or a tuple its forward returns as "
        f"`return a, b`: {returned_names(_class_of(module))}); pass the position instead, e.g. returns=1"
    )


@cache
def returned_names(cls: Any) -> tuple[str, ...] | None:
    """The names of ``return a, b`` in ``cls.forward`` when every return statement names the same plain
    variables in the same order; None otherwise (or when the source cannot be read)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    except (OSError, TypeError, SyntaxError):
        return None
    function = tree.body[0] if tree.body else None
    if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return None
    found: set[tuple[str, ...]] = set()
    for node in _own_returns(function):
        value = node.value
        if not isinstance(value, ast.Tuple) or not all(isinstance(e, ast.Name) for e in value.elts):
            return None
        found.add(tuple(e.id for e in value.elts if isinstance(e, ast.Name)))
    return found.pop() if len(found) == 1 else None


def hint_for(module: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any], output: Any) -> str | None:
    """How to register a cell whose return value is a tuple holding the new state as one element: an
    argument and a returned element of the same name and shape (``return output, hidden``), else the one
    element shaped like the argument read as the state now."""
    if not isinstance(output, (tuple, list)):
        return None
    cls = type(module).__name__
    arg_names = _positional_names(_class_of(module))
    passed = dict(zip(arg_names, args, strict=False)) | dict(kwargs)
    names = returned_names(_class_of(module))
    if names is not None and len(names) == len(output):
        for i, name in enumerate(names):
            value = passed.get(name)
            if value is not None and _shaped_like(output[i], _as_tensors_or_empty(value)):
                return (
                    f"if its new state is the {name!r} it returns, register it with "
                    f"gradwatch.register_cell({cls}, state={name!r}, returns={name!r})"
                )
    return None


def _as_tensors_or_empty(value: Any) -> tuple[Tensor, ...]:
    try:
        return _as_tensors(value)
    except TypeError:
        return ()


def _own_returns(function: ast.AST) -> list[ast.Return]:
    """The return statements of ``function`` itself (not of functions or lambdas nested in it)."""
    out: list[ast.Return] = []
    stack = list(ast.iter_child_nodes(function))
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue
        if isinstance(node, ast.Return) and node.value is not None:
            out.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return out


@cache
def _positional_names(cls: Any) -> tuple[str, ...]:
    """The argument names of ``cls.forward`` after ``self``, in order (empty for ``*args``)."""
    try:
        parameters = list(inspect.signature(cls.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return ()
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(p.name for p in parameters if p.kind in kinds)


@cache
def _all_names(cls: Any) -> tuple[str, ...] | None:
    """Every named argument of ``cls.forward`` after ``self``; None when it takes ``**kwargs``."""
    try:
        parameters = list(inspect.signature(cls.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return tuple(p.name for p in parameters if p.kind is not inspect.Parameter.VAR_POSITIONAL)


def _class_of(module: nn.Module) -> Any:
    """``type(module)``, typed for the caches keyed by class (mypy cannot hash ``type[Module]``)."""
    return type(module)


def _as_tensors(value: Any) -> tuple[Tensor, ...]:
    if isinstance(value, Tensor):
        return (value,)
    if isinstance(value, (tuple, list)) and value and all(isinstance(t, Tensor) for t in value):
        return tuple(value)
    raise TypeError(f"a cell state must be a tensor or a tuple of tensors, got {_describe(value)}")


def _shaped_like(value: Any, state: tuple[Tensor, ...]) -> bool:
    try:
        parts = _as_tensors(value)
    except TypeError:
        return False
    return [tuple(t.shape) for t in parts] == [tuple(t.shape) for t in state]


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (
            isinstance(a, Tensor)
            and isinstance(b, Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and bool(torch.equal(a, b))
        )
    try:
        return bool(a is b or a == b)
    except Exception:
        return False


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        inner = ", ".join(_describe(v) if not isinstance(v, Tensor) else str(tuple(v.shape)) for v in value)
        return f"a {type(value).__name__} ({inner})"
    return f"a {type(value).__name__}"

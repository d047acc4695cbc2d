"""Finding the recurrent modules of a model, and the registry for user-written cells."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor, nn

from gradwatch.estimators.cells import CellKind

State = Tensor | tuple[Tensor, ...]
StepFunction = Callable[[nn.Module, Tensor, State], State]
"""``step(cell, x_t, state) -> new_state`` for a user-written cell (state: a tensor or a tuple of them)."""

ModuleKind = Literal["fused", "cell", "custom"]

FUSED_TYPES: tuple[type[nn.Module], ...] = (nn.RNN, nn.LSTM, nn.GRU)
CELL_TYPES: tuple[type[nn.Module], ...] = (nn.RNNCell, nn.LSTMCell, nn.GRUCell)


@dataclass(frozen=True)
class CustomCellSpec:
    """How to run a user-written cell one step, and which parameter is its recurrent weight W_hh."""

    step: StepFunction | None = None
    recurrent_weight: str | None = None

    def run(self, cell: nn.Module, x: Tensor, state: State) -> State:
        if self.step is not None:
            return self.step(cell, x, state)
        return cell(x, state)  # type: ignore[no-any-return]


_registered_classes: dict[type[nn.Module], CustomCellSpec] = {}
_registered_instances: weakref.WeakKeyDictionary[nn.Module, CustomCellSpec] = weakref.WeakKeyDictionary()

CellTarget = TypeVar("CellTarget", bound="type[nn.Module] | nn.Module")


def register_cell(
    target: CellTarget,
    *,
    step: StepFunction | None = None,
    recurrent_weight: str | None = None,
) -> CellTarget:
    """Tell gradwatch that a module class (or one instance) is a recurrent cell it should watch.

    The cell is called once per time step as ``cell(x_t, state) -> new_state`` where ``state`` is a tensor
    of shape (batch, n) or a tuple of such tensors (flattened into one state vector s = [h; c; ...]).
    If its ``forward`` has another signature, pass ``step(cell, x_t, state) -> new_state``.
    ``recurrent_weight`` names the parameter that plays W_hh (reported as ``weight_hh_sigma_max``).
    Usable as a class decorator: ``@gradwatch.register_cell``.
    """
    spec = CustomCellSpec(step=step, recurrent_weight=recurrent_weight)
    if isinstance(target, type):
        if not issubclass(target, nn.Module):
            raise TypeError(f"register_cell expects an nn.Module subclass or instance, got class {target!r}")
        _registered_classes[target] = spec
    elif isinstance(target, nn.Module):
        _registered_instances[target] = spec
    else:
        raise TypeError(
            f"register_cell expects an nn.Module subclass or instance, got {type(target).__name__}"
        )
    return target


def unregister_cell(target: type[nn.Module] | nn.Module) -> None:
    """Undo :func:`register_cell` (mostly for tests)."""
    if isinstance(target, type):
        _registered_classes.pop(target, None)
    else:
        _registered_instances.pop(target, None)


def custom_cell_spec(module: nn.Module) -> CustomCellSpec | None:
    """The registration that applies to ``module``, if any (instance first, then its class hierarchy)."""
    spec = _registered_instances.get(module)
    if spec is not None:
        return spec
    for cls in type(module).__mro__:
        if cls in _registered_classes:
            return _registered_classes[cls]
    return None


@dataclass(frozen=True)
class WatchedModule:
    """One recurrent module the monitor attaches to."""

    name: str
    module: nn.Module
    kind: ModuleKind
    cell_kind: CellKind | None  # for built-in modules
    custom: CustomCellSpec | None = None

    @property
    def num_layers(self) -> int:
        return int(getattr(self.module, "num_layers", 1)) if self.kind == "fused" else 1

    @property
    def directions(self) -> tuple[str, ...]:
        if self.kind == "fused" and getattr(self.module, "bidirectional", False):
            return ("forward", "reverse")
        return ("forward",)

    def describe(self) -> dict[str, Any]:
        """A JSON-able description for the run header."""
        info: dict[str, Any] = {
            "name": self.name,
            "type": type(self.module).__name__,
            "kind": self.kind,
            "cell": self.cell_kind or "custom",
            "layers": self.num_layers,
            "directions": list(self.directions),
        }
        for attr in (
            "input_size",
            "hidden_size",
            "proj_size",
            "nonlinearity",
            "batch_first",
            "dropout",
            "bias",
        ):
            if hasattr(self.module, attr) and isinstance(getattr(self.module, attr), (int, float, str, bool)):
                info[attr] = getattr(self.module, attr)
        return info


def builtin_cell_kind(module: nn.Module) -> CellKind | None:
    """The cell kind of a built-in recurrent module, or None for anything else."""
    if isinstance(module, nn.LSTM | nn.LSTMCell):
        return "lstm"
    if isinstance(module, nn.GRU | nn.GRUCell):
        return "gru"
    if isinstance(module, nn.RNN):
        return "rnn_relu" if module.nonlinearity == "relu" else "rnn_tanh"
    if isinstance(module, nn.RNNCell):
        return "rnn_relu" if module.nonlinearity == "relu" else "rnn_tanh"
    return None


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model behind DistributedDataParallel / DataParallel / torch.compile wrappers."""
    seen = 0
    while seen < 8:
        seen += 1
        inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if isinstance(inner, nn.Module):
            model = inner
            continue
        if isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
            model = model.module
            continue
        break
    return model


def find_rnn_modules(model: nn.Module) -> list[WatchedModule]:
    """Every recurrent module in ``model``: built-in RNN/LSTM/GRU, their Cells, and registered cells.

    A registered custom cell is watched as a whole: modules inside it are not watched separately.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"gradwatch.watch expects a torch.nn.Module, got {type(model).__name__}")
    found: list[WatchedModule] = []
    for name, module in _walk(unwrap_model(model), ""):
        spec = custom_cell_spec(module)
        if spec is not None:
            found.append(WatchedModule(name or _root_name(module), module, "custom", None, spec))
            continue
        if isinstance(module, FUSED_TYPES):
            found.append(
                WatchedModule(name or _root_name(module), module, "fused", builtin_cell_kind(module))
            )
        elif isinstance(module, CELL_TYPES):
            found.append(WatchedModule(name or _root_name(module), module, "cell", builtin_cell_kind(module)))
    return found


def _root_name(module: nn.Module) -> str:
    """Name for a recurrent module passed to watch() directly (it has no qualified name)."""
    return type(module).__name__.lower()


def _walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
    """Like named_modules(), but does not descend into recurrent modules or registered cells."""
    yield prefix, module
    if custom_cell_spec(module) is not None or isinstance(module, FUSED_TYPES + CELL_TYPES):
        return
    for child_name, child in module.named_children():
        yield from _walk(child, f"{prefix}.{child_name}" if prefix else child_name)


NO_RNN_MESSAGE = (
    "gradwatch found no recurrent module in this model. It looks for torch.nn.RNN, LSTM, GRU, RNNCell, "
    "LSTMCell, GRUCell and cells registered with gradwatch.register_cell(MyCell) (a module called as "
    "cell(x_t, state) -> new_state; pass step=... for another signature)."
)


def is_compile_wrapper(model: nn.Module) -> bool:
    """Does ``model`` (or a DDP/DataParallel wrapper chain around it) include torch.compile's wrapper?"""
    for _ in range(8):
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            return True
        if isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
            model = model.module
            continue
        break
    return False


def no_rnn_message(model: nn.Module) -> str:
    """Why watch() found nothing to watch: a scripted or quantized model gets its own explanation."""
    modules = list(model.modules()) if isinstance(model, nn.Module) else []
    if any(isinstance(m, torch.jit.ScriptModule) for m in modules):
        return (
            f"gradwatch cannot watch a TorchScript module ({type(model).__name__} from torch.jit.script or "
            "torch.jit.trace): its recurrent layers are compiled code, not nn.RNN/LSTM/GRU modules it can "
            "hook and replay. Watch the eager model you scripted instead (gradwatch.watch(model, ...)) and "
            "train that one; a scripted copy runs but is not measured."
        )
    quantized = sorted(
        {
            type(m).__name__
            for m in modules
            if type(m).__module__.startswith(("torch.ao.nn.quantized", "torch.nn.quantized"))
            and any(word in type(m).__name__ for word in ("RNN", "LSTM", "GRU"))
        }
    )
    if quantized:
        return (
            f"gradwatch cannot watch quantized recurrent modules ({', '.join(quantized)}, e.g. from "
            "torch.ao.quantization.quantize_dynamic): their weights are packed int8 and there is no float "
            "recurrence to replay. Watch the float model while it trains, before quantizing it."
        )
    return NO_RNN_MESSAGE

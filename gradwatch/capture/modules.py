"""Finding the recurrent modules of a model, and the registry for user-written cells."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from gradwatch.estimators.cells import CellKind
from gradwatch.records import Direction

State = Tensor | tuple[Tensor, ...]
StepFunction = Callable[[nn.Module, Tensor, State], State]
"""``step(cell, x_t, state) -> new_state`` for a user-written cell (state: a tensor or a tuple of them)."""

ModuleKind = Literal["fused", "cell", "custom"]

FUSED_TYPES: tuple[type[nn.Module], ...] = (nn.RNN, nn.LSTM, nn.GRU)
CELL_TYPES: tuple[type[nn.Module], ...] = (nn.RNNCell, nn.LSTMCell, nn.GRUCell)


@dataclass(frozen=True)
class CustomCellSpec:
    """How a user-written cell is called and measured (see :func:`register_cell`)."""

    step: StepFunction | None = None
    recurrent_weight: str | None = None
    state_first: bool = False  # the cell's forward is ``cell(state, x_t)``
    state: int | str | None = None  # the argument that holds the state (position or name)
    returns: int | str | None = None  # the part of the return value that is the new state


_registered_classes: dict[type[nn.Module], CustomCellSpec] = {}
_registered_instances: weakref.WeakKeyDictionary[nn.Module, CustomCellSpec] = weakref.WeakKeyDictionary()

CellTarget = TypeVar("CellTarget", bound="type[nn.Module] | nn.Module")


def register_cell(
    target: CellTarget,
    *,
    state: int | str | None = None,
    returns: int | str | None = None,
    step: StepFunction | None = None,
    recurrent_weight: str | None = None,
    state_first: bool = False,
) -> CellTarget:
    """Tell gradwatch that a module class (or one instance) is a recurrent cell it should watch.

    By default the cell is called once per time step as ``cell(x_t, state) -> new_state`` where ``state``
    is a tensor of shape (batch, n) or a tuple of such tensors (flattened into one state vector
    s = [h; c; ...]). For another call:

    * ``state``: the argument that holds the state, by position (``2``) or name (``"hidden"``); every other
      argument is an input of the step, held at its recorded value while d(new state)/d(state) is measured
      (tensors with one row per sequence are recorded on each call). ``state_first=True`` is ``state=0``.
    * ``returns``: which part of the return value is the new state: a position in a returned tuple
      (``returns=1`` for ``return output, hidden``), a key of a returned dict or a field of a namedtuple,
      or the name a plain tuple has in the forward's ``return output, hidden`` statement
      (``returns="hidden"``). Default: the whole return value.
    * ``step(cell, x_t, state) -> new_state``: how to run one step when measuring, for anything else
      (``x_t``: the first per-sequence tensor argument other than the state). The hook then needs the
      return value only to follow the state from call to call: ``returns`` if given, else the element of a
      returned tuple shaped like the state.

    ``recurrent_weight`` names the parameter that plays W_hh (reported as ``weight_hh_sigma_max``).
    The cell is measured on a private copy, so a forward that updates buffers or attributes (a call
    counter) is never run on the user's module by gradwatch.
    Usable as a class decorator: ``@gradwatch.register_cell``.
    """
    if not isinstance(state_first, bool):
        raise TypeError(f"state_first must be True or False, got {state_first!r}")
    for option, value in (("state", state), ("returns", returns)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, str))):
            raise TypeError(
                f"register_cell({option}=...) takes an argument position (int) or a name (str), got {value!r}"
            )
    if state is not None and state_first:
        raise ValueError(
            "register_cell: pass state=... or state_first=True, not both (state_first is state=0)"
        )
    if step is not None and not callable(step):
        raise TypeError(f"register_cell(step=...) must be a callable step(cell, x_t, state), got {step!r}")
    spec = CustomCellSpec(
        step=step, recurrent_weight=recurrent_weight, state_first=state_first, state=state, returns=returns
    )
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
    weight_leaves: dict[str, dict[str, nn.Parameter]] = field(default_factory=dict)
    """For each weight the forward reads (``weight_hh_l0``), the leaf parameters behind it, by name relative
    to the module (a leaf on a parent module: its name relative to the model). Empty for a weight whose leaf
    could not be found (see :func:`weight_leaves`)."""
    parent: nn.Module | None = field(default=None, repr=False, compare=False)
    """The module that holds this one (None for the model itself): a wrapper such as salesforce's WeightDrop
    calls ``self.module.forward(...)``, which fires no hook of this module, only the wrapper's."""

    @property
    def unattributed_weights(self) -> list[str]:
        """Weights the forward reads that are neither parameters nor backed by a leaf gradwatch found."""
        return [name for name, leaves in self.weight_leaves.items() if not leaves]

    @property
    def num_layers(self) -> int:
        return int(getattr(self.module, "num_layers", 1)) if self.kind == "fused" else 1

    @property
    def directions(self) -> tuple[Direction, ...]:
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
        derived = {n: sorted(leaves) for n, leaves in self.weight_leaves.items() if list(leaves) != [n]}
        if derived:
            info["weight_leaves"] = derived  # parametrized or weight-dropped weights -> their leaves
        if self.unattributed_weights:
            info["unattributed_weights"] = self.unattributed_weights
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
    root = unwrap_model(model)
    for name, module in _walk(root, ""):
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
    qualified = {id(m): n for n, m in _walk(root, "")}
    out = []
    for w in found:
        ancestors = _ancestors(root, qualified[id(w.module)])
        parent = ancestors[0][1] if ancestors else None
        leaves = weight_leaves(w.module, ancestors) if w.kind != "custom" else w.weight_leaves
        out.append(replace(w, weight_leaves=leaves, parent=parent))
    return out


def weight_names(module: nn.Module) -> list[str]:
    """The weights the forward of a built-in RNN or cell reads, in its own order."""
    if isinstance(module, FUSED_TYPES):
        # torch's RNNBase attribute, typed as Tensor | Module by nn.Module.__getattr__:
        return list(module._flat_weights_names)  # type: ignore[arg-type]
    names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if getattr(module, "bias", True) else [])
    return names


def weight_leaves(
    module: nn.Module, ancestors: list[tuple[str, nn.Module]] | None = None
) -> dict[str, dict[str, nn.Parameter]]:
    """The leaf parameters behind each weight of a built-in RNN or cell.

    * a plain parameter is its own leaf;
    * a parametrized weight (``torch.nn.utils.parametrize``: orthogonal, spectral_norm, weight_norm) is
      computed from ``parametrizations.<name>.original`` (``original0``/``original1`` for weight_norm) and any
      parameters of the parametrizations themselves;
    * a dropped weight (AWD-LSTM's WeightDrop: the parameter deleted and re-assigned on every forward from
      ``<name>_raw``) comes from ``<name>_raw`` on the module itself (salesforce) or on the nearest parent
      (fastai's WeightDropout), named relative to the model there;
    * anything else has no leaf gradwatch can find: an empty dict.
    """
    out: dict[str, dict[str, nn.Parameter]] = {}
    own = dict(module.named_parameters())
    for name in weight_names(module):
        param = module._parameters.get(name)
        if param is not None:
            out[name] = {name: param}
        elif parametrize.is_parametrized(module, name):
            prefix = f"parametrizations.{name}."
            out[name] = {n: p for n, p in own.items() if n.startswith(prefix)}
        elif f"{name}_raw" in module._parameters and module._parameters[f"{name}_raw"] is not None:
            # checked not None on the line above; a dict lookup does not narrow:
            out[name] = {f"{name}_raw": module._parameters[f"{name}_raw"]}  # type: ignore[dict-item]
        else:
            out[name] = {}
            for prefix, parent in ancestors or []:
                raw = parent._parameters.get(f"{name}_raw")
                if raw is not None:
                    out[name] = {f"{prefix}.{name}_raw" if prefix else f"{name}_raw": raw}
                    break
    return out


def _ancestors(root: nn.Module, name: str) -> list[tuple[str, nn.Module]]:
    """The modules above ``root.<name>``, nearest first, with their names relative to ``root``."""
    parts = name.split(".") if name else []
    chain: list[tuple[str, nn.Module]] = [("", root)]
    module = root
    for i, part in enumerate(parts[:-1]):
        module = getattr(module, part)
        chain.append((".".join(parts[: i + 1]), module))
    return chain[::-1] if parts else []


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

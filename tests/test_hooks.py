"""How gradwatch attaches to a model: nothing on the module (pickle, deepcopy, jit, close), one monitor per
module, and which forward of a step is recorded (training mode before eval mode)."""

from __future__ import annotations

import copy
import gc
import io
import pickletools
import types
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.capture import hooks
from gradwatch.records import Measurement


class SeqModel(nn.Module):
    """embedding-free RNN -> dropout -> linear, like pytorch/examples word_language_model."""

    def __init__(self, rnn: nn.Module, hidden: int) -> None:
        super().__init__()
        self.rnn = rnn
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.rnn(x)[0])).squeeze(-1)


class CellModel(nn.Module):
    """A hand-written loop over a cell (built-in or user-written)."""

    def __init__(self, cell: nn.Module, hidden: int) -> None:
        super().__init__()
        self.cell = cell
        self.hidden = hidden
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(x.shape[1], self.hidden)
        state: Any = (h, h.clone()) if isinstance(self.cell, nn.LSTMCell) else h
        outs = []
        for t in range(x.shape[0]):
            state = self.cell(x[t], state)
            outs.append(self.head(state[0] if isinstance(state, tuple) else state))
        return torch.stack(outs).squeeze(-1)


@gradwatch.register_cell
class UserCell(nn.Module):
    """A user-written cell registered with gradwatch: h' = tanh(W x + U h)."""

    def __init__(self, n_in: int = 3, n_hidden: int = 5) -> None:
        super().__init__()
        self.inp = nn.Linear(n_in, n_hidden)
        self.rec = nn.Linear(n_hidden, n_hidden, bias=False)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.inp(x) + self.rec(h))


MODEL_KINDS: dict[str, Callable[[], nn.Module]] = {
    "rnn": lambda: SeqModel(nn.RNN(3, 5), 5),
    "lstm": lambda: SeqModel(nn.LSTM(3, 5, num_layers=2), 5),
    "gru": lambda: SeqModel(nn.GRU(3, 5, bidirectional=True), 10),
    "rnncell": lambda: CellModel(nn.RNNCell(3, 5), 5),
    "lstmcell": lambda: CellModel(nn.LSTMCell(3, 5), 5),
    "grucell": lambda: CellModel(nn.GRUCell(3, 5), 5),
    "usercell": lambda: CellModel(UserCell(3, 5), 5),
}


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return MODEL_KINDS[kind]()


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> None:
    optimizer.zero_grad()
    model(x).pow(2).mean().backward()
    optimizer.step()


def _saved(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _pickle_names(data: bytes) -> str:
    """Every opcode argument of the pickle inside a torch.save archive (globals included)."""
    import zipfile

    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
        pickle_bytes = archive.read(name)
    return " ".join(str(arg) for _, arg, _ in pickletools.genops(pickle_bytes))


def _hook_dicts(model: nn.Module) -> list[dict[str, Any]]:
    """Every hook dictionary of every submodule, as plain dicts."""
    return [
        {name: dict(value) for name, value in vars(m).items() if "hook" in name and isinstance(value, dict)}
        for m in model.modules()
    ]


def _gradwatch_objects(root: object) -> list[str]:
    """Instances of gradwatch classes reachable from ``root`` (through containers, instances, bound methods
    and partials; not through classes, plain functions or modules, which lead everywhere)."""
    found: list[str] = []
    seen: set[int] = set()
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, type | types.ModuleType | types.FunctionType):
            continue
        seen.add(id(obj))
        if type(obj).__module__.startswith("gradwatch"):
            found.append(type(obj).__qualname__)
        stack.extend(gc.get_referents(obj))
    return found


def test_the_reachability_check_finds_a_hook_of_the_old_kind() -> None:
    model = _model("lstm")
    recorder = hooks.CallRecorder(gradwatch.capture.modules.find_rnn_modules(model)[0], 2)
    model.rnn.register_forward_hook(recorder, with_kwargs=True)
    assert "CallRecorder" in _gradwatch_objects(copy.deepcopy(model))


# --- item: a watched model pickles like an unwatched one --------------------------------------------------


@pytest.mark.parametrize("kind", list(MODEL_KINDS))
def test_a_watched_model_saves_to_the_same_bytes_and_loads_with_weights_only(kind: str) -> None:
    model = _model(kind)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(6, 4, 3)
    unwatched, unwatched_optimizer = _saved(model), _saved(optimizer)
    with gradwatch.watch(model, optimizer, every=2, probe="live") as monitor:
        armed = _saved(model)  # step 0: the recorders are armed
        model(x)  # and hold a recorded call
        mid_step = _saved(model)
        _train_step(model, optimizer, x)  # step 1: not measured
        later_model = _saved(model)
        later_optimizer = _saved(optimizer)
        assert [r.step for r in monitor.history if isinstance(r, Measurement)]
    assert armed == unwatched and mid_step == unwatched
    assert "gradwatch" not in _pickle_names(later_model)
    assert "gradwatch" not in _pickle_names(later_optimizer)
    assert _pickle_names(unwatched_optimizer) == _pickle_names(later_optimizer)

    # weights_only=True (torch's default) with only torch and user classes allowed
    allowed = sorted({type(m) for m in model.modules()}, key=str)
    with torch.serialization.safe_globals(allowed):
        loaded = torch.load(io.BytesIO(later_model))
    assert _hook_dicts(loaded) == _hook_dicts(_model(kind))
    loaded_optimizer = torch.optim.SGD(loaded.parameters(), lr=0.01)
    with gradwatch.watch(loaded, loaded_optimizer, every=1, probe="live") as again:
        _train_step(loaded, loaded_optimizer, x)
        assert [r.step for r in again.history if isinstance(r, Measurement)]


def test_state_dict_of_a_watched_model_is_unchanged() -> None:
    model = _model("lstm")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with gradwatch.watch(model, every=1):
        after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# --- item: deepcopy and close leave nothing behind ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["lstm", "grucell", "usercell"])
def test_close_releases_the_monitor_even_with_deep_copies_of_the_model(kind: str) -> None:
    model = _model(kind)
    optimizer = torch.optim.Adam(model.parameters())
    monitor = gradwatch.watch(model, optimizer, every=1, probe="live")
    x = torch.randn(6, 4, 3)
    _train_step(model, optimizer, x)
    copy_before = copy.deepcopy(model)  # e.g. an EMA / teacher copy
    optimizer_copy = copy.deepcopy(optimizer)
    measured_before = [r.step for r in monitor.history if isinstance(r, Measurement)]
    copy_before(x)  # a copy's calls are not the watched module's
    optimizer.step()  # a measured step on which only the copy ran: nothing is measured
    assert [r.step for r in monitor.history if isinstance(r, Measurement)] == measured_before
    reference = _hook_dicts(_model(kind))
    assert _hook_dicts(copy_before) == reference
    assert _gradwatch_objects(copy_before) == [] and _gradwatch_objects(optimizer_copy) == []

    monitor.close()
    copy_after = copy.deepcopy(model)
    ref = weakref.ref(monitor)
    del monitor
    gc.collect()
    assert ref() is None, "the closed monitor is still reachable"
    for m in (model, copy_before, copy_after):
        assert _hook_dicts(m) == reference
        assert _gradwatch_objects(m) == []
    assert _gradwatch_objects(optimizer) == []
    _train_step(copy_after, torch.optim.SGD(copy_after.parameters(), lr=0.1), x)  # trains as before


# --- item: torch.jit.script of a watched model --------------------------------------------------------------


class Scriptable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(3, 5)
        self.head = nn.Linear(5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out).squeeze(-1)


def _silent_script(model: nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script is deprecated in torch 2.13
        return torch.jit.script(model)


def test_scripting_a_watched_model_works_and_the_eager_model_stays_measured() -> None:
    torch.manual_seed(0)
    model = Scriptable()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = gradwatch.watch(model, optimizer, every=1, probe="live")
    scripted = _silent_script(model)
    x = torch.randn(6, 4, 3)
    torch.testing.assert_close(scripted(x), model(x))
    for _ in range(3):
        scripted(torch.randn(9, 2, 3)).sum().backward()  # the scripted copy runs, is not recorded
        optimizer.zero_grad()
        _train_step(model, optimizer, x)
    steps = sorted({r.step for r in monitor.history if isinstance(r, Measurement)})
    monitor.close()
    assert steps == [0, 1, 2]


def test_watching_a_scripted_or_quantized_model_says_what_to_watch_instead() -> None:
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"TorchScript.*Watch the eager model"):
        gradwatch.watch(_silent_script(Scriptable()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(Scriptable(), {nn.LSTM, nn.Linear})
    with pytest.raises(ValueError, match=r"quantized recurrent modules \(LSTM.*Watch the float model"):
        gradwatch.watch(quantized)
    with pytest.raises(ValueError, match="found no recurrent module"):
        gradwatch.watch(nn.Linear(3, 3))


# --- item: one monitor per module ---------------------------------------------------------------------------


def test_watching_the_same_model_twice_names_the_first_monitor(tmp_path: Any) -> None:
    model = _model("lstm")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    first = gradwatch.watch(model, optimizer, every=1, run_id="first-run")
    with pytest.raises(ValueError, match=r"already watched by monitor first-run \(modules rnn\).*[Cc]lose"):
        gradwatch.watch(model, optimizer, log=tmp_path / "second.jsonl")
    with pytest.raises(ValueError, match="already watched by monitor first-run"):
        gradwatch.watch(model.rnn)  # the same module through another root
    _train_step(model, optimizer, torch.randn(6, 4, 3))  # the first monitor is undisturbed: one measurement
    assert [r.step for r in first.history if isinstance(r, Measurement)] == [0, 0]  # two LSTM layers
    first.close()
    with gradwatch.watch(model, optimizer, every=1) as second:
        _train_step(model, optimizer, torch.randn(6, 4, 3))
        assert [r.step for r in second.history if isinstance(r, Measurement)] == [0, 0]


# --- item: eval-mode forwards with gradients on ------------------------------------------------------------


TRAIN_SHAPE, VAL_SHAPE = (10, 4, 3), (17, 6, 3)


@pytest.mark.parametrize("kind", ["lstm", "grucell"])
@pytest.mark.parametrize("order", ["eval-before-training", "eval-after-training"])
def test_an_eval_mode_forward_with_grad_is_not_measured_instead_of_the_training_batch(
    kind: str, order: str
) -> None:
    model = _model(kind)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    monitor = gradwatch.watch(model, optimizer, every=1, probe="live")
    torch.manual_seed(1)
    x_train, x_val = torch.randn(*TRAIN_SHAPE), torch.randn(*VAL_SHAPE)

    def validate() -> None:
        model.eval()
        model(x_val)  # grad enabled: a forgotten no_grad
        model.train()

    with warnings.catch_warnings():
        warnings.simplefilter("error", gradwatch.GradWatchWarning)  # no "eval mode" warning here
        if order == "eval-before-training":
            validate()
        optimizer.zero_grad()
        torch.manual_seed(2)  # the same dropout mask as the reference below
        model(x_train).pow(2).mean().backward()
        if order == "eval-after-training":
            validate()
        optimizer.step()
    measured = [r.metrics for r in monitor.history if isinstance(r, Measurement)]
    monitor.close()

    reference_model = _model(kind)  # the same model measuring the training batch alone
    reference_optimizer = torch.optim.SGD(reference_model.parameters(), lr=0.0)
    with gradwatch.watch(reference_model, reference_optimizer, every=1, probe="live") as reference:
        reference_optimizer.zero_grad()
        torch.manual_seed(2)
        reference_model(x_train).pow(2).mean().backward()
        reference_optimizer.step()
        expected = [r.metrics for r in reference.history if isinstance(r, Measurement)]
    assert measured == expected and measured


def test_training_with_the_rnn_in_eval_mode_is_measured_with_one_warning() -> None:
    model = _model("lstm")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = gradwatch.watch(model, optimizer, every=1, probe="live")
    model.eval()  # deliberate: e.g. to switch dropout off
    with pytest.warns(gradwatch.GradWatchWarning, match="ran only in eval mode") as caught:
        for _ in range(3):
            _train_step(model, optimizer, torch.randn(*TRAIN_SHAPE))
    assert len([w for w in caught if "eval mode" in str(w.message)]) == 1
    assert sorted({r.step for r in monitor.history if isinstance(r, Measurement)}) == [0, 1, 2]
    monitor.close()


# --- the global hook: present on measured steps only, and under torch.compile -----------------------------


@pytest.fixture
def isolated_hooks(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Monitors other tests left open do not keep the global hook installed during this test.

    Internal on purpose: the global hook's registry is process state no public API should expose."""
    for recorder in list(hooks._attached.values()):
        monkeypatch.setattr(recorder, "_armed", False)
        monkeypatch.setattr(recorder, "traced_by_compile", False)
    hooks._refresh_global_hook()
    yield
    monkeypatch.undo()
    hooks._refresh_global_hook()


def test_the_global_hook_is_installed_on_measured_steps_only(isolated_hooks: None) -> None:
    model = _model("gru")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    installed = []
    with gradwatch.watch(model, optimizer, every=3, probe="live") as monitor:
        for _ in range(7):
            installed.append(hooks.global_hook_installed())
            _train_step(model, optimizer, torch.randn(6, 4, 3))
        assert sorted({r.step for r in monitor.history if isinstance(r, Measurement)}) == [0, 3, 6]
    assert installed == [True, False, False, True, False, False, True]
    assert not hooks.global_hook_installed()


def test_fullgraph_compile_keeps_measuring_after_unmeasured_steps(isolated_hooks: None) -> None:
    torch._dynamo.reset()
    model = _model("lstmcell")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's note on global hooks and OptimizedModule
        with gradwatch.watch(compiled, optimizer, every=2, probe="live") as monitor:
            for _ in range(5):
                _train_step(compiled, optimizer, torch.randn(6, 4, 3))
            steps = sorted({r.step for r in monitor.history if isinstance(r, Measurement)})
    torch._dynamo.reset()
    assert steps == [0, 2, 4]
    assert not hooks.global_hook_installed()

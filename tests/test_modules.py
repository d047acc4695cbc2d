"""Finding recurrent modules and registering user-written cells."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradwatch.capture.modules import (
    NO_RNN_MESSAGE,
    custom_cell_spec,
    find_rnn_modules,
    register_cell,
    unregister_cell,
)


class Seq2Seq(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.encoder = nn.LSTM(4, 8, num_layers=2, bidirectional=True)
        self.decoder = nn.GRUCell(4, 8)
        self.head = nn.Linear(8, 10)


class ElmanCell(nn.Module):
    def __init__(self, n_in: int, n_hidden: int) -> None:
        super().__init__()
        self.inp = nn.Linear(n_in, n_hidden)
        self.rec = nn.Linear(n_hidden, n_hidden, bias=False)
        self.inner = nn.RNNCell(n_hidden, n_hidden)  # must not be watched separately

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.inp(x) + self.rec(h))


def test_finds_builtin_modules_with_qualified_names():
    found = {w.name: w for w in find_rnn_modules(Seq2Seq())}
    assert set(found) == {"encoder", "decoder"}
    assert found["encoder"].kind == "fused" and found["encoder"].cell_kind == "lstm"
    assert found["encoder"].num_layers == 2 and found["encoder"].directions == ("forward", "reverse")
    assert found["decoder"].kind == "cell" and found["decoder"].cell_kind == "gru"


@pytest.mark.parametrize(
    ("module", "kind"),
    [
        (nn.RNN(2, 3), "rnn_tanh"),
        (nn.RNN(2, 3, nonlinearity="relu"), "rnn_relu"),
        (nn.RNNCell(2, 3, nonlinearity="relu"), "rnn_relu"),
        (nn.LSTMCell(2, 3), "lstm"),
        (nn.GRU(2, 3), "gru"),
    ],
    ids=lambda v: v if isinstance(v, str) else type(v).__name__,
)
def test_a_bare_module_is_watched_under_its_type_name(module, kind):
    (watched,) = find_rnn_modules(module)
    assert watched.cell_kind == kind
    assert watched.name == type(module).__name__.lower()


def test_wrappers_are_unwrapped():
    model = nn.DataParallel(Seq2Seq())
    assert {w.name for w in find_rnn_modules(model)} == {"encoder", "decoder"}


def test_registered_class_is_watched_as_a_whole():
    register_cell(ElmanCell, recurrent_weight="rec.weight")
    try:
        model = nn.Sequential(ElmanCell(3, 4))
        (watched,) = find_rnn_modules(model)
        assert watched.kind == "custom" and watched.name == "0"
        assert watched.custom is not None and watched.custom.recurrent_weight == "rec.weight"
    finally:
        unregister_cell(ElmanCell)
    assert find_rnn_modules(nn.Sequential(ElmanCell(3, 4)))[0].kind == "cell"  # only the inner RNNCell now


def test_registered_instance_only():
    a, b = ElmanCell(3, 4), ElmanCell(3, 4)
    register_cell(a)
    try:
        assert custom_cell_spec(a) is not None and custom_cell_spec(b) is None
    finally:
        unregister_cell(a)


def test_register_cell_works_as_decorator_and_rejects_non_modules():
    @register_cell
    class Tiny(nn.Module):
        def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
            return x + h

    try:
        assert custom_cell_spec(Tiny()) is not None
    finally:
        unregister_cell(Tiny)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        register_cell(int)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"nn\.Module"):
        register_cell("cell")  # type: ignore[arg-type]


def test_no_recurrent_module_message_says_what_was_looked_for():
    assert find_rnn_modules(nn.Linear(2, 2)) == []
    for word in ("LSTM", "GRUCell", "register_cell"):
        assert word in NO_RNN_MESSAGE
    with pytest.raises(TypeError, match=r"nn\.Module"):
        find_rnn_modules("model")  # type: ignore[arg-type]

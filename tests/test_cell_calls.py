"""capture/cell_calls.py: reading a registered cell's call through ``state=`` / ``returns=``."""

from __future__ import annotations

from collections import namedtuple
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from gradwatch.capture.cell_calls import pick_returned, read_call, returned_names
from gradwatch.capture.modules import CustomCellSpec

Step = namedtuple("Step", ["output", "hidden"])


class TupleCell(nn.Module):
    def forward(self, category: Tensor, input: Tensor, hidden: Tensor, scale: float = 1.0) -> Any:
        if scale < 0:
            return input, hidden
        output = input * scale
        return output, hidden


class BranchingCell(nn.Module):
    def forward(self, x: Tensor, h: Tensor) -> Any:
        if x.sum() > 0:
            return x, h
        return h, x


def test_returned_names_come_from_the_return_statements_and_only_when_they_agree() -> None:
    assert returned_names(TupleCell) is None  # `return input, hidden` and `return output, hidden` disagree
    assert returned_names(BranchingCell) is None

    class Plain(nn.Module):
        def forward(self, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
            def helper() -> tuple[int, int]:
                return 1, 2  # a nested function's return is not the forward's

            output, hidden = x, h
            return output, hidden

    assert returned_names(Plain) == ("output", "hidden")


@pytest.mark.parametrize(
    ("output", "returns"),
    [
        ((torch.zeros(1), torch.ones(1)), 1),
        ((torch.zeros(1), torch.ones(1)), -1),
        ({"output": torch.zeros(1), "hidden": torch.ones(1)}, "hidden"),
        (Step(torch.zeros(1), torch.ones(1)), "hidden"),
    ],
    ids=["position", "negative-position", "mapping-key", "namedtuple-field"],
)
def test_pick_returned_by_position_key_or_field(output: Any, returns: int | str) -> None:
    assert torch.equal(pick_returned(BranchingCell(), returns, output), torch.ones(1))


def test_pick_returned_says_what_was_returned_when_nothing_matches() -> None:
    with pytest.raises(ValueError, match=r"returns=2\): its forward returned a tuple \(\(1,\), \(1,\)\)"):
        pick_returned(BranchingCell(), 2, (torch.zeros(1), torch.ones(1)))
    with pytest.raises(ValueError, match=r"no part named 'state'.*returns=1"):
        pick_returned(BranchingCell(), "state", (torch.zeros(1), torch.ones(1)))


def test_read_call_holds_per_sequence_tensors_as_inputs_and_keeps_the_rest() -> None:
    cell = TupleCell()
    category, letter, hidden = torch.ones(2, 3), torch.full((2, 4), 2.0), torch.zeros(2, 5)
    spec = CustomCellSpec(state="hidden", returns="hidden")
    view = read_call(cell, spec, (category, letter, hidden), {"scale": 0.5})
    assert view is not None and view.state is hidden
    assert view.x.shape == (2, 7) and torch.equal(view.x[:, :3], category)
    args, kwargs = view.layout.rebuild(view.x[:1], hidden[:1])
    assert torch.equal(args[1], letter[:1]) and args[2].shape == (1, 5) and kwargs == {"scale": 0.5}


def test_read_call_finds_the_state_passed_by_keyword_and_names_a_wrong_one() -> None:
    cell = TupleCell()
    x, h = torch.ones(2, 3), torch.zeros(2, 5)
    view = read_call(cell, CustomCellSpec(state="hidden"), (x, x), {"hidden": h})
    assert view is not None and view.state is h
    assert read_call(cell, CustomCellSpec(state="hidden"), (x, x), {}) is None  # no state passed
    with pytest.raises(ValueError, match=r"has no argument 'hx' \(its arguments are \['category', 'input'"):
        read_call(cell, CustomCellSpec(state="hx"), (x, x, h), {})

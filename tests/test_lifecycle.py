"""The monitor's lifecycle under attack (issue #30 items 5, 6, 8, 9): a watch() that fails half way, Ctrl-C
during close(), os.fork() mid-run, and a process that ends without close()."""

from __future__ import annotations

import errno
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.capture import hooks as hooks_module
from gradwatch.capture import optimizer_steps
from gradwatch.records import Record

REPO = Path(__file__).resolve().parents[1]


class SeqModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(3, 5)
        self.head = nn.Linear(5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0]).squeeze(-1)


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(6, 2, 3)).pow(2).mean().backward()
        optimizer.step()


def _nothing_left_on(model: SeqModel, optimizer: torch.optim.Optimizer) -> bool:
    """No recorder attached to the module, no monitor attached to the optimizer."""
    return hooks_module.attached_owner(model.rnn) is None and not optimizer_steps._listeners.get(optimizer)


def _log_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- item 6: a watch() that fails while writing its run header undoes everything -------------------------


class FullDevice:
    """A sink on a full device: every write raises ENOSPC."""

    def __init__(self) -> None:
        self.closed = False

    def write(self, record: Record) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def test_a_watch_failing_on_its_run_header_leaves_nothing_behind(tmp_path: Path) -> None:
    model = SeqModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(gradwatch.GradWatchFault, match="No space left on device"):
        gradwatch.watch(model, optimizer, strict=True, sinks=[FullDevice()], log=tmp_path / "a.jsonl")
    assert _nothing_left_on(model, optimizer)
    _train(model, optimizer, 2)  # a plain step raises nothing
    with gradwatch.watch(model, optimizer, every=1, log=tmp_path / "b.jsonl", background=False):
        _train(model, optimizer, 1)  # and the model can be watched again
    assert [r["kind"] for r in _log_records(tmp_path / "b.jsonl")][:2] == ["run", "measurement"]


def test_a_watch_under_warnings_as_errors_with_a_full_device_starts_with_an_error_record(
    tmp_path: Path,
) -> None:
    model = SeqModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monitor = gradwatch.watch(model, optimizer, every=1, sinks=[FullDevice()], log=tmp_path / "a.jsonl")
        _train(model, optimizer, 2)
    monitor.close()
    kinds = [r["kind"] for r in _log_records(tmp_path / "a.jsonl")]
    assert kinds[:2] == ["run", "error"]
    assert _nothing_left_on(model, optimizer)

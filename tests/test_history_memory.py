"""``monitor.history`` is bounded in memory by default (issue #30): one measurement record keeps about
2.8 KB alive, so the default ``history_size`` must keep the whole history to a few tens of MB."""

from __future__ import annotations

import gc
import inspect
import json
import tracemalloc

import torch
from torch import nn

import gradwatch
from gradwatch.records import Measurement

HISTORY_BUDGET_BYTES = 32 * 2**20


def _measurement_record() -> Measurement:
    model = nn.LSTM(3, 16, num_layers=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradwatch.watch(model, optimizer, every=1, background=False) as monitor:
        for _ in range(2):
            optimizer.zero_grad()
            model(torch.randn(16, 4, 3))[0].sum().backward()
            optimizer.step()
    return [r for r in monitor.history if isinstance(r, Measurement)][-1]


def test_the_default_history_fits_its_memory_budget() -> None:
    record = _measurement_record()
    text = json.dumps(record.to_json())
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = [Measurement.from_json(json.loads(text)) for _ in range(500)]  # no shared dicts or strings
        per_record = (tracemalloc.get_traced_memory()[0] - before) / len(kept)
    finally:
        tracemalloc.stop()
    default = inspect.signature(gradwatch.watch).parameters["history_size"].default
    assert (
        1000 < per_record < 10_000
    )  # a measurement record is a few KB: the figure docs/performance.md gives
    assert default * per_record <= HISTORY_BUDGET_BYTES, (default, per_record)

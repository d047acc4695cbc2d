"""The measurement pipeline on its own: capture -> prepare -> estimate, and warm starts that travel with the
job (in) and the result (out) instead of living in state shared with the worker thread."""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import nn

import gradwatch
from gradwatch.capture.modules import find_rnn_modules
from gradwatch.estimators.layer import EstimatorSettings, WarmStart
from gradwatch.faults import FaultPolicy
from gradwatch.measure import MeasurementPipeline, estimate
from gradwatch.records import Measurement
from tests.test_monitor import SeqModel


def _pipeline(model: nn.Module) -> MeasurementPipeline:
    faults = FaultPolicy(strict=True, rank=0, run_id="t", current_step=lambda: 0)
    return MeasurementPipeline(
        find_rnn_modules(model), faults, probe="live", max_sequences=4, seed=0, estimator=EstimatorSettings()
    )


def test_pipeline_measures_one_forward_and_returns_the_warm_starts_with_the_result() -> None:
    model = SeqModel(nn.LSTM(3, 4, num_layers=2), 4)
    pipeline = _pipeline(model)
    x = torch.randn(7, 2, 3)
    with pipeline.capturing(owner="test"):
        model(x)
        job = pipeline.prepare(0, {}, warm_starts={})
        given = dict(job.warm_starts)
        result = estimate(job)
    assert [(r.layer, r.direction) for r in result.records] == [(0, "forward"), (1, "forward")]
    assert all(isinstance(r, Measurement) for r in result.records)
    assert set(result.warm_starts) == {("rnn", 0, "forward"), ("rnn", 1, "forward")}
    assert all(isinstance(w, WarmStart) for w in result.warm_starts.values())
    assert job.warm_starts == given  # the job's own copy is read, never written
    # The next job starts from them: a copy goes in, the caller's mapping stays as it was.
    with pipeline.capturing(owner="test"):
        model(x)
        kept = dict(result.warm_starts)
        again = pipeline.measure(1, warm_starts=kept)
    assert kept == result.warm_starts and len(again.records) == 2
    assert not any(p.grad is not None for p in model.parameters())  # no backward: nothing touched


def test_the_worker_thread_never_writes_the_monitors_warm_starts() -> None:
    """Item 2 of issue 13: only the training thread stores warm starts (at publication)."""
    writers: list[str] = []

    class Watched(dict[Any, Any]):
        def __setitem__(self, key: Any, value: Any) -> None:
            writers.append(threading.current_thread().name)
            super().__setitem__(key, value)

        def update(self, *args: Any, **kwargs: Any) -> None:
            writers.append(threading.current_thread().name)
            super().update(*args, **kwargs)

    model = SeqModel(nn.GRU(3, 4), 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = gradwatch.watch(model, optimizer, every=1, background=True)
    monitor._warm_starts = Watched()  # type: ignore[assignment]
    for _ in range(3):
        optimizer.zero_grad()
        out, _ = model(torch.randn(6, 2, 3))
        out.sum().backward()
        optimizer.step()
    monitor.close()
    assert writers and set(writers) == {threading.main_thread().name}
    assert set(monitor.warm_starts) == {("rnn", 0, "forward")}

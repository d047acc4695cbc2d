"""The benchmark training loop: a recurrent language model (embedding -> LSTM/GRU -> linear) trained with Adam.

One worker process builds the model, attaches one *instrumentation* (nothing, gradwatch at some schedule,
or a peer tool), runs warm-up steps, then times ``steps`` training steps one by one and reports wall times,
peak memory and the tensors still alive afterwards. overhead.py and peers.py both drive it.
"""

from __future__ import annotations

import contextlib
import gc
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.harness import peak_rss_bytes, reset_peak_rss, rss_bytes, set_threads

RNN_KINDS = {"lstm": nn.LSTM, "gru": nn.GRU}


class LanguageModel(nn.Module):
    """Token embedding -> one recurrent layer (time-major) -> linear readout over the vocabulary."""

    def __init__(self, kind: str, vocabulary: int, hidden: int, layers: int = 1) -> None:
        super().__init__()
        if kind not in RNN_KINDS:
            raise ValueError(f"kind must be one of {sorted(RNN_KINDS)}, got {kind!r}")
        self.embedding = nn.Embedding(vocabulary, hidden)
        self.rnn = RNN_KINDS[kind](hidden, hidden, num_layers=layers)
        self.readout = nn.Linear(hidden, vocabulary)

    def forward(self, tokens: Tensor) -> Tensor:
        hidden, _ = self.rnn(self.embedding(tokens))
        return self.readout(hidden)


@dataclass(frozen=True)
class WorkerSettings:
    """One worker run: the model, the batch, the instrumentation and how many steps to time."""

    kind: str = "lstm"
    hidden: int = 256
    steps: int = 64  # T
    batch: int = 32  # B
    vocabulary: int = 1000
    layers: int = 1
    instrument: str = "bare"
    every: int | None = 50  # gradwatch: None = watch()'s default schedule (every 50 within a time budget)
    background: bool | None = None  # gradwatch: None = its default (automatic choice)
    timed_steps: int = 50
    warmup_steps: int = 2
    # Untimed instrumented steps after step 0, so the timed block can start with a measured step: at
    # every=50, lead_in_steps=49 times steps 50..99, whose first step is measured, as in a long run where
    # the estimators of step 50 run (inline or in the background) within the 50 steps that follow.
    lead_in_steps: int = 0
    # > 0: the timed block instead runs from a measured step to just before the measured step this many
    # measurements later (at most MAX_SCHEDULE_BLOCK steps): a schedule whose interval gradwatch chooses
    # (the time budget) is timed over whole intervals, each holding exactly one measurement.
    measured_intervals: int = 0
    threads: int | None = 1
    seed: int = 0
    device: str = "cpu"
    estimator: str = "economy"  # gradwatch: watch(estimator=...), "economy" (the default) or "full"


@dataclass(frozen=True)
class WorkerResult:
    step_seconds: list[float]  # wall time of each timed step
    total_seconds: float
    peak_rss_bytes: int | None  # high-water mark over the timed steps (reset before them)
    rss_growth_bytes: int | None  # RSS after the last timed step minus after the first one
    cuda_peak_bytes: int | None
    live_tensors: int  # tensors alive after the timed steps, parameters/grads/optimizer state included
    live_tensor_bytes: int
    detail: dict[str, Any]


Instrument = Callable[
    [LanguageModel, torch.optim.Optimizer, WorkerSettings], contextlib.AbstractContextManager
]


# An instrument is a context manager around the timed steps; the dict it yields may carry "after_step",
# called as after_step(step, loss) after each optimizer step (step 0 = the instrument's first step).


@contextlib.contextmanager
def no_instrument(
    model: LanguageModel, optimizer: torch.optim.Optimizer, settings: WorkerSettings
) -> Iterator[dict]:
    yield {}


@contextlib.contextmanager
def gradwatch_instrument(
    model: LanguageModel, optimizer: torch.optim.Optimizer, settings: WorkerSettings
) -> Iterator[dict]:
    """gradwatch.watch at ``settings.every`` with its defaults (a logging sink only, no run log).

    "settle" waits for step 0's cold measurement before the timing starts; "drain" waits for the last
    measurement inside the timed block, so a measurement running in the background is paid in full.
    """
    import gradwatch

    monitor = gradwatch.watch(
        model, optimizer, every=settings.every, background=settings.background, estimator=settings.estimator
    )
    detail: dict[str, Any] = {
        "settle": monitor.wait,
        "drain": monitor.wait,
        "is_measured": monitor._is_measured,  # the schedule's decision for a step (a benchmark may peek)
        "measurements_so_far": lambda: (
            monitor.wait() or sum(1 for r in monitor.history if type(r).__name__ == "Measurement")
        ),
    }
    try:
        yield detail
    finally:
        detail["measurements"] = sum(1 for r in monitor.history if type(r).__name__ == "Measurement")
        detail["alerts"] = sum(1 for r in monitor.history if type(r).__name__ == "Alert")
        detail["background"] = monitor.config.background  # the worker was chosen (or forced)
        # measurements the memory budget ran inline instead of on the worker (gradwatch/policy/memory.py)
        detail["inline_by_budget"] = any(getattr(r, "where", None) == "memory" for r in monitor.history)
        monitor.close()


INSTRUMENTS: dict[str, Instrument] = {"bare": no_instrument, "gradwatch": gradwatch_instrument}


def register_instrument(name: str, instrument: Instrument) -> None:
    """peers.py adds wandb and tensorboard here (imported only where they run)."""
    INSTRUMENTS[name] = instrument


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def live_tensor_summary() -> tuple[int, int]:
    """(count, bytes of distinct storages) of the torch tensors alive in this process (after a gc pass)."""
    gc.collect()
    storages: dict[int, int] = {}
    count = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance() on deprecated torch module attributes warns
        for obj in gc.get_objects():
            with contextlib.suppress(Exception):
                if isinstance(obj, Tensor):
                    count += 1
                    storage = obj.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
    return count, sum(storages.values())


def run_worker(settings: WorkerSettings) -> WorkerResult:
    """Train for warm-up + timed steps under one instrumentation; time each timed step."""
    set_threads(settings.threads)
    torch.manual_seed(settings.seed)
    device = torch.device(settings.device)
    model = LanguageModel(settings.kind, settings.vocabulary, settings.hidden, settings.layers).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(settings.seed)
    shape = (settings.steps + 1, settings.batch)
    tokens = torch.randint(0, settings.vocabulary, shape, generator=generator).to(device)
    inputs, targets = tokens[:-1], tokens[1:]
    loss_function = nn.CrossEntropyLoss()

    after_step: Callable[[int, Tensor], None] | None = None
    step_index = 0

    def train_step() -> None:
        nonlocal step_index
        optimizer.zero_grad(set_to_none=True)
        logits = model(inputs)
        loss = loss_function(logits.reshape(-1, settings.vocabulary), targets.reshape(-1))
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step(step_index, loss)
        step_index += 1

    for _ in range(settings.warmup_steps):  # allocator and Adam state warm, before any instrumentation
        train_step()
    instrument = INSTRUMENTS[settings.instrument]
    with instrument(model, optimizer, settings) as detail:
        after_step = detail.pop("after_step", None)  # a peer's per-step logging call, if it has one
        settle = detail.pop("settle", None)
        drain = detail.pop("drain", None)
        step_index = 0
        train_step()  # step 0 of the instrumentation (gradwatch measures it cold): not timed
        if settle is not None:
            settle()
        for _ in range(settings.lead_in_steps):
            train_step()
        is_measured = detail.pop("is_measured", None)
        measurements_so_far = detail.pop("measurements_so_far", None)
        if settings.measured_intervals > 0:
            if is_measured is None or measurements_so_far is None:
                raise ValueError("measured_intervals needs an instrument that tells its measured steps")
            # The schedule's interval set by a warm measurement (the cold one costs more), then up to the
            # next measured step, so the block starts with one.
            for _ in range(MAX_SCHEDULE_BLOCK):
                if measurements_so_far() >= 2 and is_measured(step_index):
                    break
                train_step()
        _synchronise(device)
        gc.collect()
        reset_peak_rss()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step_seconds: list[float] = []
        rss_first = None
        started = time.perf_counter()
        index = measured_in_block = 0
        while True:
            if settings.measured_intervals > 0:
                assert is_measured is not None
                if is_measured(step_index):  # asked for the next step only, as the monitor does
                    if measured_in_block == settings.measured_intervals:
                        break
                    measured_in_block += 1
                if index >= MAX_SCHEDULE_BLOCK:
                    break
            elif index >= settings.timed_steps:
                break
            begin = time.perf_counter()
            train_step()
            _synchronise(device)
            step_seconds.append(time.perf_counter() - begin)
            if index == 0:
                rss_first = rss_bytes()
            index += 1
        if drain is not None:
            drain()  # work still running in the background belongs to this block
            _synchronise(device)
        total = time.perf_counter() - started
        peak = peak_rss_bytes()
        rss_last = rss_bytes()
        cuda_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        tensors, tensor_bytes = live_tensor_summary()
    growth = None if rss_first is None or rss_last is None else rss_last - rss_first
    return WorkerResult(step_seconds, total, peak, growth, cuda_peak, tensors, tensor_bytes, dict(detail))


MAX_SCHEDULE_BLOCK = 5000
"""The longest block (and lead-in) a schedule-timed run (``measured_intervals``) may take, in steps."""


def worker_main(arguments: dict[str, Any]) -> dict[str, Any]:
    """Entry point of ``script --worker JSON``: settings in, result dict out (printed as JSON by the caller)."""
    settings = WorkerSettings(**arguments)
    os.environ.setdefault("WANDB_DIR", tempfile.mkdtemp(prefix="gradwatch-bench-wandb-"))
    return asdict(run_worker(settings))

"""Benchmark: how long TensorBoardSink.write() and flush() hold the training thread, next to JsonlSink.

Run from the repository root (needs ``pip install 'gradwatch[tensorboard]'``):

    python3 -m benchmarks.tensorboard_sink                 # 200 measurements of an LSTM 2 layers x 2 dirs
    python3 -m benchmarks.tensorboard_sink --measurements 50
    python3 -m benchmarks.tensorboard_sink --lag-images     # only TensorBoardSink(lag_images=True)

The records are real: one measurement of a 2-layer bidirectional LSTM (H=256, T=64, B=8 measured) taken with
gradwatch, re-stamped with increasing steps. Each measurement is what the monitor does with it: ``write``
every layer's record (4 records, 104 scalars and 4 histograms in all), then ``flush()`` (for
TensorBoardSink it does not wait for the writer thread; the final ``flush(wait=True)`` is timed once). The two sinks take
turns measurement by measurement, so drifts of the shared machine hit both alike. ``close`` is timed once.
``--lag-images`` times the sink that also draws the lag-norm curves, alone (its writer thread would slow
the others down).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import gradwatch
from benchmarks.harness import format_table, machine, median
from gradwatch.records import Measurement
from gradwatch.sinks.base import Sink
from gradwatch.sinks.jsonl import JsonlSink
from gradwatch.sinks.tensorboard import TensorBoardSink, measurement_scalars


def sample_records(hidden: int) -> list[Measurement]:
    torch.manual_seed(0)
    model = nn.LSTM(32, hidden, num_layers=2, bidirectional=True, batch_first=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    monitor = gradwatch.watch(model, optimizer, every=1, background=False)
    out, _ = model(torch.randn(8, 64, 32))
    out.sum().backward()
    optimizer.step()
    records = [r for r in monitor.history if isinstance(r, Measurement)]
    monitor.close()
    return records


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--measurements", type=int, default=200)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument(
        "--gap-ms",
        type=float,
        default=50.0,
        help="pause between measurements (the training steps in between; sleeping releases the GIL as torch "
        "kernels do). 0 = back to back: the writer thread then competes with write() for the GIL",
    )
    parser.add_argument("--lag-images", action="store_true", help="time TensorBoardSink(lag_images=True)")
    args = parser.parse_args()
    print(machine().describe())
    records = sample_records(args.hidden)
    scalars = sum(len(measurement_scalars(r)) for r in records)
    print(f"one measurement = {len(records)} records, {scalars} scalars, {len(records)} histograms")

    with tempfile.TemporaryDirectory() as tmp:
        if args.lag_images:
            sinks: dict[str, Sink] = {
                "TensorBoardSink(lag_images=True)": TensorBoardSink(Path(tmp, "tb"), lag_images=True)
            }
        else:
            sinks = {
                "TensorBoardSink": TensorBoardSink(Path(tmp, "tb")),
                "JsonlSink": JsonlSink(Path(tmp, "x")),
            }
        writes: dict[str, list[float]] = {name: [] for name in sinks}
        flushes: dict[str, list[float]] = {name: [] for name in sinks}
        for index in range(args.measurements):
            time.sleep(args.gap_ms / 1e3)
            items = list(sinks.items())
            order = items[index % len(items) :] + items[: index % len(items)]  # rotate: drifts hit all alike
            for name, sink in order:
                for record in records:
                    stamped = dataclasses.replace(record, step=index, time=time.time())
                    start = time.perf_counter()
                    sink.write(stamped)
                    writes[name].append(time.perf_counter() - start)
                start = time.perf_counter()
                sink.flush()
                flushes[name].append(time.perf_counter() - start)
        drains = {}
        for name, sink in sinks.items():  # what is still queued after the last measurement
            start = time.perf_counter()
            if isinstance(sink, TensorBoardSink):
                sink.flush(wait=True)
            else:
                sink.flush()
            drains[name] = time.perf_counter() - start
        closes = {}
        for name, sink in sinks.items():
            start = time.perf_counter()
            sink.close()
            closes[name] = time.perf_counter() - start

    rows = []
    for name in sinks:
        rows.append(
            [
                name,
                f"{median(writes[name]) * 1e6:.0f}",
                f"{percentile(writes[name], 0.99) * 1e6:.0f}",
                f"{max(writes[name]) * 1e6:.0f}",
                f"{median(flushes[name]) * 1e6:.0f}",
                f"{percentile(flushes[name], 0.99) * 1e6:.0f}",
                f"{max(flushes[name]) * 1e6:.0f}",
                f"{drains[name] * 1e3:.1f}",
                f"{closes[name] * 1e3:.1f}",
            ]
        )
    headers = [
        "sink",
        "write us (median)",
        "write p99",
        "write max",
        "flush us (median)",
        "flush p99",
        "flush max",
        "final flush(wait) ms",
        "close ms",
    ]
    print(format_table(headers, rows))
    print(
        f"({args.measurements} measurements x {len(records)} records, {args.gap_ms:g} ms apart; "
        "write = one layer's record)"
    )


if __name__ == "__main__":
    main()

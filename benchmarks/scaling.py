"""Benchmark: the cost of one gradwatch measurement as H, T, B and the number of layers grow.

Run from the repository root:

    python3 -m benchmarks.scaling            # LSTM; H, T, B and layer sweeps (~5 min on 2 cores)
    python3 -m benchmarks.scaling --kind gru
    python3 -m benchmarks.scaling --quick    # smaller sizes

One measurement is timed through the public API: ``monitor = gradwatch.watch(rnn, every=1, background=False,
max_sequences=B)``, forward and backward on a (T, B, H) batch, then ``monitor.step()`` (which replays the
layers, runs every estimator and writes the records). Two starts are timed:

* cold -- a fresh monitor (the first measurement of a run: random start vectors);
* warm -- the next measurement after a small weight update (relative 1e-3, like one optimizer step),
          warm-started from the previous one as in a running job.

Sizes are alternated within each round (order rotated) and each cost is the median over the rounds; the
exponent p of cost ~ size^p is a least-squares fit on log-log axes.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

import gradwatch
from benchmarks.harness import alternating, fit_power_law, format_table, machine, median, set_threads

RNN_KINDS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


@dataclass(frozen=True)
class Size:
    hidden: int
    steps: int  # T
    batch: int  # B = max_sequences: every sequence is measured
    layers: int

    def label(self) -> str:
        return f"H={self.hidden} T={self.steps} B={self.batch} L={self.layers}"


def time_measurements(kind: str, size: Size, seed: int) -> tuple[float, float]:
    """(cold, warm) seconds of one ``monitor.step()`` measurement of a fresh model of this size."""
    torch.manual_seed(seed)
    rnn = RNN_KINDS[kind](size.hidden, size.hidden, num_layers=size.layers)
    inputs = torch.randn(size.steps, size.batch, size.hidden)
    # background=False: the measurement runs inside monitor.step(), so its time is what the clock sees.
    monitor = gradwatch.watch(rnn, every=1, max_sequences=size.batch, background=False)
    try:
        seconds = []
        for update in (False, True):
            if update:  # one small optimizer-like step: the warm start is close, not exact
                with torch.no_grad():
                    for parameter in rnn.parameters():
                        parameter.add_(torch.randn_like(parameter) * 1e-3 * parameter.std())
            rnn.zero_grad(set_to_none=True)
            output, _ = rnn(inputs)
            output.square().mean().backward()
            begin = time.perf_counter()
            monitor.step()
            seconds.append(time.perf_counter() - begin)
        measured = sum(1 for r in monitor.history if type(r).__name__ == "Measurement")
        if measured != 2 * size.layers:
            raise RuntimeError(
                f"expected {2 * size.layers} measurement records for {size.label()}, got {measured}"
            )
    finally:
        monitor.close()
    return seconds[0], seconds[1]


def sweeps(quick: bool) -> dict[str, tuple[str, list[Size]]]:
    """Axis name -> (the attribute that varies, the sizes), each around a base point."""
    base = Size(hidden=64, steps=64, batch=8, layers=1)
    hidden = [32, 64, 128] if quick else [32, 64, 128, 256]
    steps = [16, 32, 64] if quick else [16, 32, 64, 128]
    batch = [2, 4, 8] if quick else [2, 4, 8, 16]
    layers = [1, 2] if quick else [1, 2, 4]
    return {
        "hidden size H": ("hidden", [Size(h, base.steps, base.batch, base.layers) for h in hidden]),
        "time steps T": ("steps", [Size(base.hidden, t, base.batch, base.layers) for t in steps]),
        "sequences B": ("batch", [Size(base.hidden, base.steps, b, base.layers) for b in batch]),
        "layers": ("layers", [Size(base.hidden, base.steps, base.batch, n) for n in layers]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kind", default="lstm", choices=sorted(RNN_KINDS))
    parser.add_argument("--repeats", type=int, default=5, help="alternating rounds (>= 5 for the docs)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    print(machine().describe())
    print(f"{args.kind}: one measurement via monitor.step(); {args.repeats} alternating rounds, medians")

    for axis, (attribute, sizes) in sweeps(args.quick).items():
        cold: dict[Size, list[float]] = {s: [] for s in sizes}
        warm: dict[Size, list[float]] = {s: [] for s in sizes}
        for round_index, size in alternating(sizes, args.repeats):
            cold_s, warm_s = time_measurements(args.kind, size, seed=round_index)
            cold[size].append(cold_s)
            warm[size].append(warm_s)
            print(f"  {axis}: {size.label()} cold {cold_s:.3f} s warm {warm_s:.3f} s", file=sys.stderr)
        values = [getattr(s, attribute) for s in sizes]
        cold_medians = [median(cold[s]) for s in sizes]
        warm_medians = [median(warm[s]) for s in sizes]
        cold_exponent, _ = fit_power_law(values, cold_medians)
        warm_exponent, _ = fit_power_law(values, warm_medians)
        print(
            f"\n### {axis} (cold fit: cost ~ {attribute}^{cold_exponent:.2f}, warm: ^{warm_exponent:.2f})\n"
        )
        print(
            format_table(
                ["size", "cold s", "warm s"],
                [[s.label(), c, w] for s, c, w in zip(sizes, cold_medians, warm_medians, strict=True)],
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

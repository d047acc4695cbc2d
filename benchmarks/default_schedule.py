"""Benchmark: what the default schedule (every 50 steps within a 2% time budget) costs a long run.

Run from the repository root:

    python3 -m benchmarks.default_schedule                          # LSTM and GRU H=256, threads 2 and 1
    python3 -m benchmarks.default_schedule --kinds lstm --threads 2 --steps 600

The model and loop of ``benchmarks/overhead.py`` (embedding -> LSTM/GRU -> linear, V=1000, T=64, B=32, Adam),
trained ``--steps`` steps bare, then watched with ``gradwatch.watch(model, optimizer)`` (every default), then
bare again, each from the same seed in its own process. The default's total against the mean of the two
bare runs is the overhead of a long run; the measured steps, the training thread's time in each
measurement and its share of the run show the budget at work. (``overhead.py`` times one interval of the
schedule, which block-to-block noise on a small VM swamps; a long run averages it out.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import torch
from torch import nn

from benchmarks.harness import format_table, machine, run_worker, set_threads
from benchmarks.training import LanguageModel


def train(kind: str, hidden: int, steps: int, threads: int, watched: bool) -> dict[str, Any]:
    """One run of ``steps`` training steps (after 3 warm-up steps); its times and measurements."""
    import gradwatch
    import gradwatch.monitor as monitor_module

    set_threads(threads)
    torch.manual_seed(0)
    vocabulary = 1000
    model = LanguageModel(kind, vocabulary, hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, vocabulary, (65, 32), generator=torch.Generator().manual_seed(0))
    loss_function = nn.CrossEntropyLoss()
    costs: list[tuple[int, float]] = []
    original = monitor_module.Monitor._timed_measure

    def timed(self: Any, step: int, *args: Any) -> Any:
        begin = time.perf_counter()
        try:
            return original(self, step, *args)
        finally:
            costs.append((step, time.perf_counter() - begin))

    monitor_module.Monitor._timed_measure = timed  # type: ignore[method-assign]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        logits = model(tokens[:-1])
        loss_function(logits.reshape(-1, vocabulary), tokens[1:].reshape(-1)).backward()
        optimizer.step()

    for _ in range(3):
        step()
    monitor = gradwatch.watch(model, optimizer) if watched else None
    step_seconds = []
    started = time.perf_counter()
    for _ in range(steps):
        begin = time.perf_counter()
        step()
        step_seconds.append(time.perf_counter() - begin)
    if monitor is not None:
        monitor.wait()
    total = time.perf_counter() - started
    interval = monitor._schedule.interval() if monitor is not None else None
    if monitor is not None:
        monitor.close()
    return {
        "total_seconds": total,
        "median_step_seconds": statistics.median(step_seconds),
        "measured_steps": [s for s, _ in costs],
        "measurement_seconds": [c for _, c in costs],
        "interval": interval,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kinds", nargs="+", default=["lstm", "gru"], choices=["lstm", "gru"])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--threads", type=int, nargs="+", default=None, help="default: every core, then 1")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(train(**json.loads(args.worker))))
        return 0
    cores = torch.get_num_threads()
    thread_settings = args.threads or sorted({cores, 1}, reverse=True)
    print(machine().describe())
    rows = []
    for threads in thread_settings:
        for kind in args.kinds:
            runs = {}
            for name, watched in (("bare", False), ("default", True), ("bare again", False)):
                settings = {"kind": kind, "hidden": args.hidden, "steps": args.steps, "threads": threads}
                runs[name] = run_worker("benchmarks.default_schedule", {**settings, "watched": watched})
                print(
                    f"  {kind} threads={threads} {name}: {runs[name]['total_seconds']:.1f} s", file=sys.stderr
                )
            bare = (runs["bare"]["total_seconds"] + runs["bare again"]["total_seconds"]) / 2
            default = runs["default"]
            measurement = sum(default["measurement_seconds"])
            rows.append(
                [
                    f"{kind} H={args.hidden} threads={threads}",
                    f"{runs['bare']['total_seconds']:.1f} / {runs['bare again']['total_seconds']:.1f}",
                    f"{default['total_seconds']:.1f}",
                    f"{100 * (default['total_seconds'] / bare - 1):+.1f}%",
                    f"{100 * measurement / default['total_seconds']:.2f}%",
                    " ".join(str(s) for s in default["measured_steps"]),
                    " ".join(f"{c:.2f}" for c in default["measurement_seconds"]),
                    default["interval"],
                ]
            )
    print(f"\n{args.steps} training steps: bare, the default schedule, bare again (one process each)\n")
    print(
        format_table(
            [
                "model",
                "bare s (before / after)",
                "default s",
                "overhead vs bare mean",
                "time in measurements",
                "measured steps",
                "each measurement s (training thread)",
                "interval now",
            ],
            rows,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

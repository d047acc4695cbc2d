"""Benchmark: peak memory of a measured step at large hidden sizes, and what ``monitor.history`` costs.

Run from the repository root:

    python3 -m benchmarks.memory_large_h       # LSTM and GRU, H=256/1024/2048, 1 thread (~20 min, 2 cores)
    python3 -m benchmarks.memory_large_h --kinds lstm --hidden 2048 --repeats 1 --variants background

Each variant runs in its own process (fresh allocator, its own peak-RSS mark), alternated round by round:

* bare       -- no gradwatch;
* inline     -- every=BLOCK, background=False: the estimators run inside the measured optimizer.step();
* background -- every=BLOCK, background=True: the worker thread beside the next steps, unless the job is
  over the background memory budget (gradwatch/policy/memory.py): then inline, said once;
* default    -- every=BLOCK with watch()'s other defaults (background chosen by watch(): the worker where a
  core is spare, e.g. 1 torch thread on 2 cores; the economy estimator as in every variant).

Each row says where the measurements ran: (worker), (inline), or (inline: budget).

Each process trains 2 steps bare, attaches the variant, runs step 0 (measured cold, waited for) and
BLOCK - 1 more untimed steps; the peak-RSS mark (VmHWM) is then reset and the block of BLOCK steps runs,
starting with a measured step and ending by waiting for its measurement. The figure is that block's peak
RSS over the bare block's (same model, same batch), the median over rounds.

The second table measures ``monitor.history``: the bytes one record keeps alive (tracemalloc over a
history of real records of this model), times ``history_size``.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tracemalloc
from dataclasses import asdict

import torch

from benchmarks.harness import alternating, format_table, machine, median, megabytes, run_worker, set_threads
from benchmarks.training import LanguageModel, WorkerSettings, worker_main

VARIANTS = ("bare", "inline", "background", "default")


def settings_for(
    variant: str, kind: str, hidden: int, args: argparse.Namespace, threads: int
) -> WorkerSettings:
    watched = variant != "bare"
    return WorkerSettings(
        kind=kind,
        hidden=hidden,
        steps=args.time_steps,
        batch=args.batch,
        vocabulary=args.vocabulary,
        instrument="gradwatch" if watched else "bare",
        every=args.block,
        background={"inline": False, "background": True}.get(variant),
        lead_in_steps=args.block - 1,
        timed_steps=args.block,
        threads=threads,
    )


def where_measured(detail: dict) -> str:
    """Where a watched run's measurements ran: on the worker, inline (asked or chosen), or inline because a
    job was over the background memory budget."""
    if "background" not in detail:
        return ""
    if detail.get("inline_by_budget"):
        return "(inline: budget)"
    return "(worker)" if detail["background"] else "(inline)"


def bytes_per_record(kind: str, hidden: int, records: int = 2000) -> tuple[float, str]:
    """Bytes one history record keeps alive (tracemalloc), for a real measurement of this model copied
    ``records`` times (as a long run's history holds them), and the record kinds measured."""
    import gradwatch
    from gradwatch.records import Measurement

    model = LanguageModel(kind, 100, hidden)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    monitor = gradwatch.watch(model, optimizer, every=1, background=False)
    tokens = torch.randint(0, 100, (17, 4))
    for _ in range(2):
        optimizer.zero_grad()
        model(tokens[:-1]).sum().backward()
        optimizer.step()
    monitor.close()
    sample = [r for r in monitor.history if isinstance(r, Measurement)][-1]
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    # Decoded from JSON each time, so no two records share their dicts and strings (as in a real run).
    text = json.dumps(sample.to_json())
    kept = [type(sample).from_json(json.loads(text)) for _ in range(records)]
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del kept
    return (after - before) / records, f"measurement, T=16, {len(sample.metrics.lag_norm or {})} lags"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kinds", nargs="+", default=["lstm", "gru"], choices=["lstm", "gru"])
    parser.add_argument("--hidden", nargs="+", type=int, default=[256, 1024, 2048])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS[1:]), choices=VARIANTS[1:])
    parser.add_argument("--time-steps", type=int, default=64, help="T (default 64)")
    parser.add_argument("--batch", type=int, default=32, help="B (default 32)")
    parser.add_argument("--vocabulary", type=int, default=1000)
    parser.add_argument(
        "--block", type=int, default=5, help="steps per timed block, one measured (default 5)"
    )
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds (default 2)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1], help="torch thread settings")
    parser.add_argument(
        "--history-size", type=int, default=None, help="history_size to price (default: watch's)"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker_main(json.loads(args.worker))))
        return 0

    print(machine("cpu").describe())
    print(
        f"model: embedding -> RNN -> linear, V={args.vocabulary}, T={args.time_steps}, B={args.batch}, Adam; "
        f"block of {args.block} steps starting with a measured one; {args.repeats} rounds, medians"
    )
    rows = []
    for threads in dict.fromkeys(args.threads):
        for kind in args.kinds:
            for hidden in args.hidden:
                variants = ["bare", *args.variants]
                peaks: dict[str, list[float]] = {v: [] for v in variants}
                where: dict[str, str] = {}
                for round_index, variant in alternating(variants, args.repeats):
                    settings = settings_for(variant, kind, hidden, args, threads)
                    result = run_worker("benchmarks.memory_large_h", asdict(settings), timeout=3600)
                    peaks[variant].append(float(result["peak_rss_bytes"] or "nan"))
                    where[variant] = where_measured(result["detail"])
                    print(
                        f"  {kind} H={hidden} threads={threads} round {round_index + 1} {variant:<10} "
                        f"peak {megabytes(result['peak_rss_bytes']):.0f} MB, {result['total_seconds']:.1f} s"
                        f"{', ' + where[variant] if where[variant] else ''}",
                        file=sys.stderr,
                    )
                bare = median(peaks["bare"])
                row: list[object] = [f"{kind} H={hidden} t={threads}", megabytes(bare)]
                for variant in VARIANTS[1:]:
                    if variant not in args.variants:
                        row += ["-", "-", "-"]
                        continue
                    peak = median(peaks[variant])
                    row += [
                        megabytes(peak),
                        f"{peak / bare - 1:+.1%} {where[variant]}",
                        megabytes(peak - bare),
                    ]
                rows.append(row)
    print("\nPeak RSS over a block holding one measurement (median over rounds)\n")
    headers = [
        "model",
        "bare MB",
        "inline MB",
        "inline",
        "inline +MB",
        "background MB",
        "background",
        "bg +MB",
        "default MB",
        "default",
        "default +MB",
    ]
    print(format_table(headers, rows))

    import inspect

    import gradwatch

    history_size = args.history_size or inspect.signature(gradwatch.watch).parameters["history_size"].default
    set_threads(1)
    print(f"\nmonitor.history (history_size={history_size:,})\n")
    history_rows = []
    for kind in args.kinds:
        for hidden in (32, 256):
            per_record, what = bytes_per_record(kind, hidden)
            history_rows.append(
                [f"{kind} H={hidden}", what, per_record, megabytes(per_record * history_size)]
            )
    print(format_table(["model", "record", "bytes per record", "MB at history_size"], history_rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

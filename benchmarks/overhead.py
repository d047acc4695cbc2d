"""Benchmark: what gradwatch.watch costs a realistic CPU training loop (LSTM/GRU language model, Adam).

Run from the repository root:

    python3 -m benchmarks.overhead                      # LSTM and GRU, H=256, T=64, B=32 (~12 min on 2 cores)
    python3 -m benchmarks.overhead --hidden 256 512     # the full grid of docs/performance.md
    python3 -m benchmarks.overhead --quick              # H=256, 2 rounds: every table in a few minutes
    python3 -m benchmarks.overhead --estimator economy  # only the default estimator (both by default)
    python3 -m benchmarks.overhead --kinds lstm --variants bare every-step default --repeats 3
                                                        # bounded: one measurement's cost and every=50

Every case runs at each ``--threads`` setting (default: every core, torch's own default, and 1 thread),
so the tables show both: training with every core busy, where a measurement competes with nothing but
also finds no idle core, and training on one thread.

Variants, each in its own process, alternated round by round (order rotated), ``--repeats`` rounds:

* bare          -- no gradwatch;
* default       -- gradwatch.watch(model, optimizer) with its defaults (every 50 steps within a 2% time
                   budget; the estimators on a background thread only where a core is spare): the timed
                   block is one whole interval of that schedule, from a measured step to the step before
                   the next one (after a warm measurement has set the interval), and ends by waiting for
                   the measurement (so background work is paid in full);
* inline        -- every=50 (the fixed schedule), background=False: the estimators run inside
                   optimizer.step(); the timed block of 50 steps holds exactly one measurement;
* background    -- every=50 with background=True: the worker is forced even where the default runs inline
                   (no spare core), so its time and peak memory are always reported;
* every-step    -- every=1, background=False: every timed step is measured (the compute cost of one
                   measurement);
* nonfinite     -- every=10**9: only the per-step gradient checks (non-finite count and norms) remain.

Each process trains 2 warm-up steps bare, attaches the variant and runs its step 0 untimed (gradwatch
measures it from a cold start, and the run waits for that measurement). The 50-step variants then run 49
more untimed steps, so the timed block is steps 50..99: it starts with the measured step 50 and holds the
49 steps during which a background measurement runs, as in a long run; the block ends by waiting for any
measurement still running. The peak-RSS mark is reset just before the block.

Ratios are formed between runs of the same round and their median is reported. Each case runs once per
``--estimator`` (the economy default and ``estimator="full"``), each with its own bare runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.harness import (
    alternating,
    format_table,
    machine,
    median,
    megabytes,
    paired_ratios,
    run_worker,
    set_threads,
)
from benchmarks.training import WorkerSettings, worker_main

NONFINITE_ONLY_EVERY = 10**9
DEFAULT_EVERY = 50  # gradwatch.watch's default schedule


@dataclass(frozen=True)
class Variant:
    name: str
    instrument: str
    every: int | None  # None: watch()'s default schedule
    timed_steps: int
    background: bool | None = None
    lead_in_steps: int = 0
    measured_intervals: int = 0  # > 0: time whole intervals of the schedule instead of timed_steps


def variants(block: int, measured_steps: int) -> list[Variant]:
    lead_in = DEFAULT_EVERY - 1  # every variant runs the same untimed steps before its block
    return [
        Variant("bare", "bare", 1, block, lead_in_steps=lead_in),
        Variant("default", "gradwatch", None, block, lead_in_steps=lead_in, measured_intervals=1),
        Variant("inline", "gradwatch", DEFAULT_EVERY, block, background=False, lead_in_steps=lead_in),
        Variant("background", "gradwatch", DEFAULT_EVERY, block, background=True, lead_in_steps=lead_in),
        Variant("every-step", "gradwatch", 1, measured_steps, background=False),
        Variant("nonfinite", "gradwatch", NONFINITE_ONLY_EVERY, block, lead_in_steps=lead_in),
    ]


@dataclass(frozen=True)
class Summary:
    kind: str
    hidden: int
    threads: int
    estimator: str
    bare_step_s: float
    default_ratio: float  # median over rounds of default time per step / bare time per step
    default_interval: float  # median steps between two measurements of the default schedule (its block)
    inline_ratio: float  # the same for background=False
    composed_inline_ratio: float  # (49 unmeasured + 1 measured step) / 50 bare steps, from medians
    nonfinite_ratio: float
    default_excess: float  # median over rounds of (block total / (steps x the block's own median step) - 1)
    inline_excess: float
    nonfinite_excess: float  # the control: step times are right-skewed even without any measurement
    measured_step_s: float
    measurement_s: float  # measured step minus bare step
    measurement_vs_step: float
    wall_cost_steps: float  # (default block - bare block) / bare step: what one measurement costs the run
    peak_rss_bare_mb: float
    peak_rss_default_mb: float
    peak_rss_default_overhead: float
    peak_rss_measured_mb: float
    peak_rss_background_mb: float
    peak_rss_background_overhead: float  # background=True block peak / bare peak - 1
    background_ratio: float
    peak_rss_overhead: float  # every-step peak / bare peak - 1
    retained_mb: float  # live tensor bytes with gradwatch (default) minus bare, after the timed steps
    rss_growth_default_mb: float


def excess_over_own_median(results: list[dict]) -> float:
    """Median over runs of a block's total against steps x its own median step, minus 1.

    Free of run-to-run drift (each block is compared with itself), so it resolves a few percent where
    block ratios between runs cannot on a noisy machine; compare it with the no-measurement control.
    """
    return median(
        [sum(r["step_seconds"]) / (len(r["step_seconds"]) * median(r["step_seconds"])) - 1 for r in results]
    )


def summarise(
    kind: str, hidden: int, runs: dict[str, list[dict]], threads: int = 1, estimator: str = "economy"
) -> Summary:
    """Medians and ratios of one (kind, hidden, threads) case; a variant left out (``--variants``) reads
    NaN in every figure that needs it."""
    rounds = len(runs["bare"])
    left_out = [
        {
            "total_seconds": math.nan,
            "step_seconds": [math.nan],
            "peak_rss_bytes": math.nan,
            "live_tensor_bytes": math.nan,
            "rss_growth_bytes": math.nan,
        }
    ] * rounds
    bare, default, inline, background, every, nonfinite = (
        runs.get(n) or left_out
        for n in ("bare", "default", "inline", "background", "every-step", "nonfinite")
    )

    def totals(results: list[dict]) -> list[float]:
        # Per step: the default's block is one interval of its schedule, whatever its length.
        return [r["total_seconds"] / len(r["step_seconds"]) for r in results]

    def step_median(results: list[dict]) -> float:
        return median([s for r in results for s in r["step_seconds"]])

    bare_step = step_median(bare)
    measured_step = step_median(every)
    unmeasured_step = step_median(nonfinite)
    measurement = measured_step - bare_step
    peak_bare = median([r["peak_rss_bytes"] or math.nan for r in bare])
    peak_measured = median([r["peak_rss_bytes"] or math.nan for r in every])
    peak_default = median([r["peak_rss_bytes"] or math.nan for r in default])
    peak_background = median([r["peak_rss_bytes"] or math.nan for r in background])
    default_ratio = median(paired_ratios(totals(default), totals(bare)))
    block = len(bare[0]["step_seconds"])
    default_interval = median([len(r["step_seconds"]) for r in default])
    retained = median(
        [d["live_tensor_bytes"] - b["live_tensor_bytes"] for d, b in zip(default, bare, strict=True)]
    )
    return Summary(
        kind=kind,
        hidden=hidden,
        threads=threads,
        estimator=estimator,
        bare_step_s=bare_step,
        default_ratio=default_ratio,
        default_interval=default_interval,
        inline_ratio=median(paired_ratios(totals(inline), totals(bare))),
        composed_inline_ratio=((block - 1) * unmeasured_step + measured_step) / (block * bare_step),
        nonfinite_ratio=median(paired_ratios(totals(nonfinite), totals(bare))),
        default_excess=excess_over_own_median(default),
        inline_excess=excess_over_own_median(inline),
        nonfinite_excess=excess_over_own_median(nonfinite),
        measured_step_s=measured_step,
        measurement_s=measurement,
        measurement_vs_step=measurement / bare_step,
        wall_cost_steps=(default_ratio - 1) * default_interval,
        peak_rss_bare_mb=megabytes(peak_bare),
        peak_rss_default_mb=megabytes(peak_default),
        peak_rss_default_overhead=peak_default / peak_bare - 1,
        peak_rss_measured_mb=megabytes(peak_measured),
        peak_rss_background_mb=megabytes(peak_background),
        peak_rss_background_overhead=peak_background / peak_bare - 1,
        background_ratio=median(paired_ratios(totals(background), totals(bare))),
        peak_rss_overhead=peak_measured / peak_bare - 1,
        retained_mb=megabytes(retained),
        rss_growth_default_mb=megabytes(median([r["rss_growth_bytes"] or math.nan for r in default])),
    )


def per_step_check_seconds(
    kind: str, hidden: int, vocabulary: int, repeats: int = 200
) -> tuple[float, float]:
    """Median extra seconds of the per-step gradient checks (non-finite count, norms), measured in-process.

    Two identical Adam optimizers over the same model, one watched at every=10**9 (only the per-step checks
    run) and one not, step alternately on the same gradients: their difference is the checks' own cost,
    free of the run-to-run noise of the block timings above.
    """
    import time

    import torch

    import gradwatch
    from benchmarks.training import LanguageModel

    torch.manual_seed(0)
    model = LanguageModel(kind, vocabulary, hidden)
    tokens = torch.randint(0, vocabulary, (65, 32))
    bare = torch.optim.Adam(model.parameters(), lr=1e-6)
    watched = torch.optim.Adam(model.parameters(), lr=1e-6)
    model(tokens[:-1]).reshape(-1, vocabulary).logsumexp(-1).mean().backward()
    monitor = gradwatch.watch(model, watched, every=NONFINITE_ONLY_EVERY)
    try:
        watched.step()  # step 0: the one measurement of this schedule, not timed
        differences = []
        for _ in range(repeats):
            begin = time.perf_counter()
            bare.step()
            middle = time.perf_counter()
            watched.step()
            differences.append((time.perf_counter() - middle) - (middle - begin))
    finally:
        monitor.close()
    return median(differences)


def label(summary: Summary) -> str:
    """The row name of a case: cell, hidden size and torch threads."""
    return f"{summary.kind} H={summary.hidden} threads={summary.threads} {summary.estimator}"


def percent(ratio: float) -> str:
    return "n/a" if math.isnan(ratio) else f"{100 * ratio:+.1f}%"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kinds", nargs="+", default=["lstm", "gru"], choices=["lstm", "gru"])
    parser.add_argument("--hidden", nargs="+", type=int, default=[256, 512])
    parser.add_argument("--time-steps", type=int, default=64, help="T (default 64)")
    parser.add_argument("--batch", type=int, default=32, help="B (default 32)")
    parser.add_argument("--vocabulary", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5, help="alternating rounds (>= 5 for the docs)")
    parser.add_argument("--block", type=int, default=50, help="timed steps per run (50 = one default period)")
    parser.add_argument("--measured-steps", type=int, default=4, help="timed steps of the every-step variant")
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[os.cpu_count() or 1, 1],
        help="torch thread settings, each a full set of runs (default: every core, then 1)",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=[v.name for v in variants(1, 1)],
        help="run only these variants (default all; 'bare' is always run, every ratio needs it)",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--estimator",
        nargs="+",
        default=["economy", "full"],
        choices=["economy", "full"],
        help="watch(estimator=)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="H=256 only, 2 rounds: both cells and both thread settings in a few minutes (not for the docs)",
    )
    parser.add_argument("--json", type=Path, help="also write the raw runs and summaries here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker_main(json.loads(args.worker))))
        return 0

    hidden_sizes = [256] if args.quick else args.hidden
    if args.quick:
        args.repeats = min(args.repeats, 2)
    thread_settings = list(dict.fromkeys(args.threads))
    chosen = None if args.variants is None else {"bare", *args.variants}
    set_threads(thread_settings[0])
    print(machine(args.device).describe())
    print(f"torch thread settings: {thread_settings} (each case runs at each)")
    print(
        f"model: embedding -> RNN -> linear, V={args.vocabulary}, T={args.time_steps}, B={args.batch}, Adam; "
        f"{args.repeats} alternating rounds, medians; block {args.block} steps"
    )
    summaries: list[Summary] = []
    raw: dict[str, dict[str, list[dict]]] = {}
    for threads, kind, hidden, estimator in (
        (t, k, h, e)
        for t in thread_settings
        for k in args.kinds
        for h in hidden_sizes
        for e in args.estimator
    ):
        selected = [
            v for v in variants(args.block, args.measured_steps) if chosen is None or v.name in chosen
        ]
        runs: dict[str, list[dict]] = {v.name: [] for v in selected}
        for round_index, variant in alternating(selected, args.repeats):
            settings = WorkerSettings(
                kind=kind,
                hidden=hidden,
                steps=args.time_steps,
                batch=args.batch,
                vocabulary=args.vocabulary,
                instrument=variant.instrument,
                every=variant.every,
                background=variant.background,
                lead_in_steps=variant.lead_in_steps,
                timed_steps=variant.timed_steps,
                measured_intervals=variant.measured_intervals,
                threads=threads,
                device=args.device,
                estimator=estimator,
            )
            result = run_worker("benchmarks.overhead", asdict(settings))
            runs[variant.name].append(result)
            print(
                f"  {kind} H={hidden} threads={threads} {estimator} round {round_index + 1}/{args.repeats} "
                f"{variant.name:<10} {result['total_seconds']:.2f} s",
                file=sys.stderr,
            )
        summaries.append(summarise(kind, hidden, runs, threads, estimator))
        raw[f"{kind}-{hidden}-t{threads}-{estimator}"] = runs
    print_tables(summaries)
    if chosen is None or "nonfinite" in chosen:
        print(
            "\nPer-step checks alone, in-process (watched minus bare optimizer.step(), median of 200 pairs)\n"
        )
        rows = []
        for summary in summaries:
            set_threads(summary.threads)
            extra = per_step_check_seconds(summary.kind, summary.hidden, args.vocabulary)
            rows.append(
                [label(summary), extra * 1e3, summary.bare_step_s * 1e3, percent(extra / summary.bare_step_s)]
            )
        print(format_table(["model", "checks ms", "bare training step ms", "overhead"], rows))
    if args.json is not None:
        args.json.write_text(json.dumps({"summaries": [asdict(s) for s in summaries], "runs": raw}, indent=1))
    return 0


def print_tables(summaries: list[Summary]) -> None:
    print("\nTraining-time overhead (median of per-round ratios of time per step against bare)\n")
    print(
        format_table(
            [
                "model",
                "bare step s",
                "default schedule",
                "its interval (steps)",
                "every=50 inline",
                "every=50 background=True",
                "inline composed 49+1",
                "non-finite check only",
            ],
            [
                [
                    label(s),
                    s.bare_step_s,
                    percent(s.default_ratio - 1),
                    f"{s.default_interval:.0f}",
                    percent(s.inline_ratio - 1),
                    percent(s.background_ratio - 1),
                    percent(s.composed_inline_ratio - 1),
                    percent(s.nonfinite_ratio - 1),
                ]
                for s in summaries
            ],
        )
    )
    print("\nWithin each block: total against 50 x its own median step (the control shows the skew)\n")
    print(
        format_table(
            ["model", "default", "inline", "non-finite check only (control)", "default minus control"],
            [
                [
                    label(s),
                    percent(s.default_excess),
                    percent(s.inline_excess),
                    percent(s.nonfinite_excess),
                    percent(s.default_excess - s.nonfinite_excess),
                ]
                for s in summaries
            ],
        )
    )
    print(
        "\nOne measurement: compute (every=1 inline step minus bare step) and what the default run pays for "
        "it (default block minus bare block), in training steps\n"
    )
    print(
        format_table(
            [
                "model",
                "measured step s",
                "measurement s",
                "compute / training step",
                "default run pays (steps)",
            ],
            [
                [
                    label(s),
                    s.measured_step_s,
                    s.measurement_s,
                    f"{s.measurement_vs_step:.2f}x",
                    f"{s.wall_cost_steps:.2f}",
                ]
                for s in summaries
            ],
        )
    )
    print("\nMemory (peak RSS over the timed steps; live tensors after them)\n")
    print(
        format_table(
            [
                "model",
                "bare peak MB",
                "every-step peak MB",
                "overhead",
                "default peak MB",
                "overhead",
                "background=True peak MB",
                "overhead",
                "retained MB",
                "RSS growth MB (default)",
            ],
            [
                [
                    label(s),
                    s.peak_rss_bare_mb,
                    s.peak_rss_measured_mb,
                    percent(s.peak_rss_overhead),
                    s.peak_rss_default_mb,
                    percent(s.peak_rss_default_overhead),
                    s.peak_rss_background_mb,
                    percent(s.peak_rss_background_overhead),
                    s.retained_mb,
                    s.rss_growth_default_mb,
                ]
                for s in summaries
            ],
        )
    )


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark: gradwatch against the tools people use for the same job, at the same frequency.

Peers (benchmark-only dependencies, never runtime dependencies of gradwatch):

* ``wandb.watch(model, log="gradients", log_freq=N)`` in offline mode (WANDB_MODE=offline), with
  ``wandb.log`` every N steps so the histograms are written;
* a TensorBoard loop: every N steps ``SummaryWriter.add_histogram`` of every parameter's gradient.

Install them in a separate environment that reuses the installed torch (pip must not replace it):

    python3 -m venv --system-site-packages /tmp/gw-bench-venv
    echo "torch==$(python3 -c 'import torch; print(torch.__version__)')" > /tmp/constraints.txt
    /tmp/gw-bench-venv/bin/pip install wandb tensorboard -c /tmp/constraints.txt
    /tmp/gw-bench-venv/bin/python -m benchmarks.peers          # from the repository root (~10 min)
    /tmp/gw-bench-venv/bin/python -m benchmarks.peers --quick  # H=128

A peer that cannot be imported is skipped with a message. Variants run in their own processes, alternated
round by round; ratios against bare are formed within a round and their median is reported. Both peers watch
every parameter (their default); gradwatch watches the recurrent layers (its default).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import (
    alternating,
    format_table,
    machine,
    median,
    paired_ratios,
    run_worker,
    set_threads,
)
from benchmarks.training import (
    LanguageModel,
    WorkerSettings,
    register_instrument,
    worker_main,
)

PEER_MODULES = {"wandb": "wandb", "tensorboard": "torch.utils.tensorboard"}


@contextlib.contextmanager
def wandb_instrument(
    model: LanguageModel, optimizer: torch.optim.Optimizer, settings: WorkerSettings
) -> Iterator[dict]:
    """wandb.watch(log="gradients", log_freq=every), offline; wandb.log every ``every`` steps."""
    import wandb

    os.environ["WANDB_MODE"] = "offline"
    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(project="gradwatch-benchmark", mode="offline", dir=tempfile.mkdtemp(prefix="gw-wandb-"))
    wandb.watch(model, log="gradients", log_freq=settings.every)

    def after_step(step: int, loss: torch.Tensor) -> None:
        if step % settings.every == 0:
            wandb.log({"step": step})

    try:
        yield {"after_step": after_step}
    finally:
        run.finish()


@contextlib.contextmanager
def tensorboard_instrument(
    model: LanguageModel, optimizer: torch.optim.Optimizer, settings: WorkerSettings
) -> Iterator[dict]:
    """SummaryWriter.add_histogram of every parameter's gradient every ``every`` steps."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=tempfile.mkdtemp(prefix="gw-tensorboard-"))
    named = list(model.named_parameters())

    def after_step(step: int, loss: torch.Tensor) -> None:
        # After optimizer.step() the gradients are still there (zero_grad runs at the next step's start).
        if step % settings.every == 0:
            for name, parameter in named:
                if parameter.grad is not None:
                    writer.add_histogram(f"grad/{name}", parameter.grad, step)
            writer.flush()

    try:
        yield {"after_step": after_step}
    finally:
        writer.close()


register_instrument("wandb", wandb_instrument)
register_instrument("tensorboard", tensorboard_instrument)


def available_peers(requested: list[str]) -> list[str]:
    """The requested peers that import here; a message for each one that does not."""
    found = []
    for peer in requested:
        module = PEER_MODULES[peer]
        try:
            available = importlib.util.find_spec(module.split(".")[0]) is not None
            if available and peer == "tensorboard":
                available = importlib.util.find_spec("tensorboard") is not None
        except (ImportError, ValueError):
            available = False
        if available:
            found.append(peer)
        else:
            print(
                f"skipping {peer}: it is not installed in this environment ({sys.executable}); "
                "see the module docstring for `pip install wandb tensorboard`",
                file=sys.stderr,
            )
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kinds", nargs="+", default=["lstm"], choices=["lstm", "gru"])
    parser.add_argument("--hidden", nargs="+", type=int, default=[256])
    parser.add_argument("--every", type=int, default=50, help="N: the shared logging frequency (default 50)")
    parser.add_argument("--peers", nargs="+", default=list(PEER_MODULES), choices=list(PEER_MODULES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--block", type=int, default=50, help="timed steps per run")
    parser.add_argument("--vocabulary", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="H=128 only")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker_main(json.loads(args.worker))))
        return 0

    set_threads(args.threads)
    peers = available_peers(args.peers)
    names = ["bare", "gradwatch", *peers]
    print(machine().describe())
    print(
        f"model: embedding -> RNN -> linear, V={args.vocabulary}, T=64, B=32, Adam; every N={args.every} steps; "
        f"{args.repeats} alternating rounds, medians; block {args.block} steps"
    )
    rows = []
    raw: dict[str, Any] = {}
    for kind in args.kinds:
        for hidden in [128] if args.quick else args.hidden:
            runs: dict[str, list[dict]] = {name: [] for name in names}
            for round_index, name in alternating(names, args.repeats):
                settings = WorkerSettings(
                    kind=kind,
                    hidden=hidden,
                    vocabulary=args.vocabulary,
                    instrument=name,
                    every=args.every,
                    timed_steps=args.block,
                    threads=args.threads,
                    # The block starts with the logging/measured step (as in overhead.py): a background
                    # measurement then runs within the block's later steps, as in a long run.
                    lead_in_steps=args.every - 1,
                )
                result = run_worker("benchmarks.peers", asdict(settings))
                runs[name].append(result)
                print(
                    f"  {kind} H={hidden} round {round_index + 1}/{args.repeats} {name:<11} "
                    f"{result['total_seconds']:.2f} s",
                    file=sys.stderr,
                )
            bare_totals = [r["total_seconds"] for r in runs["bare"]]
            for name in names:
                totals = [r["total_seconds"] for r in runs[name]]
                ratio = median(paired_ratios(totals, bare_totals))
                rows.append(
                    [
                        f"{kind} H={hidden}",
                        name,
                        median(totals),
                        f"{100 * (ratio - 1):+.1f}%",
                        median([r["peak_rss_bytes"] / 2**20 for r in runs[name]]),
                    ]
                )
            raw[f"{kind}-{hidden}"] = runs
    print(f"\nTraining time of {args.block} steps with one logging event each (medians)\n")
    print(format_table(["model", "variant", "block s", "vs bare", "peak RSS MB"], rows))
    if args.json is not None:
        args.json.write_text(json.dumps(raw, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

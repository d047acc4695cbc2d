"""Does flossing before training rescue RNNs that do not learn the adding problem?

The adding problem (gradwatch/demo/task.py) with a tanh nn.RNN (default or orthogonal W_hh init), a linear
head on the last hidden state, Adam, gradient clipping at norm 1: each seed is trained twice with the same
initial weights, the same training batches and the same step budget, once as it is and once after
``gradwatch.floss`` (on inputs only, from a separate stream). Printed: the top Lyapunov exponents before
training, the evaluation MSE along the way (fixed evaluation set; predicting the mean gives 1/6), whether
the run solved the task (MSE < ``--solved``) and the first evaluation at which it did.

    python3 -m benchmarks.flossing                      # T=150, 3 seeds, both inits (~1 h on 1 core)
    python3 -m benchmarks.flossing --seq-len 50 --steps 1000 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from benchmarks.harness import format_table, machine, set_threads
from gradwatch.demo.task import BASELINE_MSE, INPUT_SIZE, adding_problem_batch
from gradwatch.flossing import floss


class AddingModel(nn.Module):
    """tanh RNN -> linear head on the last hidden state."""

    def __init__(self, hidden: int, init: str) -> None:
        super().__init__()
        self.rnn = nn.RNN(INPUT_SIZE, hidden)
        if init == "orthogonal":
            nn.init.orthogonal_(self.rnn.weight_hh_l0)
        elif init != "default":
            raise ValueError(f"init must be 'default' or 'orthogonal', got {init!r}")
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[0][-1])


@dataclass(frozen=True)
class RunResult:
    init: str
    seed: int
    flossed: bool
    exponents_before_training: tuple[float, ...]
    floss_seconds: float
    train_seconds: float
    eval_mse: tuple[tuple[int, float], ...]  # (step, MSE)
    exponents_after_training: tuple[float, ...]
    final_mse: float
    solved_at: int | None


def _evaluate(model: AddingModel, inputs: Tensor, targets: Tensor) -> float:
    with torch.no_grad():
        return float(((model(inputs) - targets) ** 2).mean())


def run_one(args: argparse.Namespace, init: str, seed: int, flossed: bool) -> RunResult:
    torch.manual_seed(seed)
    model = AddingModel(args.hidden, init)
    floss_inputs = torch.Generator().manual_seed(10_000 + seed)
    floss_batches = [
        adding_problem_batch(floss_inputs, args.seq_len, args.floss_batch).inputs
        for _ in range(args.floss_batches)
    ]
    start = time.perf_counter()
    report = floss(model, floss_batches, steps=args.floss_steps if flossed else 0, exponents=args.exponents)
    floss_seconds = time.perf_counter() - start if flossed else 0.0
    before = report.layers[0].after  # the spectrum training starts from (unchanged when not flossed)
    evaluation = adding_problem_batch(
        torch.Generator().manual_seed(20_000 + seed), args.seq_len, args.eval_size
    )
    data = torch.Generator().manual_seed(seed)  # the same training batches with and without flossing
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    curve: list[tuple[int, float]] = [(0, _evaluate(model, evaluation.inputs, evaluation.targets))]
    solved_at = None
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = adding_problem_batch(data, args.seq_len, args.batch)
        loss = ((model(batch.inputs) - batch.targets) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        if step % args.eval_every == 0 or step == args.steps:
            mse = _evaluate(model, evaluation.inputs, evaluation.targets)
            curve.append((step, mse))
            if solved_at is None and mse < args.solved:
                solved_at = step
    after = floss(model, floss_batches, steps=0, exponents=args.exponents).layers[0].before  # a reading only
    return RunResult(
        init=init,
        seed=seed,
        flossed=flossed,
        exponents_before_training=before,
        floss_seconds=floss_seconds,
        train_seconds=time.perf_counter() - start,
        eval_mse=tuple(curve),
        exponents_after_training=after,
        final_mse=curve[-1][1],
        solved_at=solved_at,
    )


def table(results: Sequence[RunResult]) -> str:
    rows = []
    for r in results:
        rows.append(
            [
                r.init,
                r.seed,
                "yes" if r.flossed else "no",
                f"{r.exponents_before_training[0]:+.3f} / {r.exponents_before_training[-1]:+.3f}",
                f"{r.exponents_after_training[0]:+.3f} / {r.exponents_after_training[-1]:+.3f}",
                f"{min(m for _, m in r.eval_mse):.4f}",
                f"{r.final_mse:.4f}",
                "-" if r.solved_at is None else r.solved_at,
                f"{r.floss_seconds:.0f}",
            ]
        )
    headers = [
        "init",
        "seed",
        "flossed",
        "λ1 / λk at start",
        "λ1 / λk at end",
        "best MSE",
        "final MSE",
        "solved at",
        "floss s",
    ]
    return format_table(headers, rows)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seq-len", type=int, default=150)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument(
        "--steps", type=int, default=2000, help="training steps per run (the same budget for both)"
    )
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--inits", nargs="+", default=["default", "orthogonal"], choices=["default", "orthogonal"]
    )
    parser.add_argument("--floss-steps", type=int, default=100)
    parser.add_argument("--exponents", type=int, default=4, help="top-k exponents flossed")
    parser.add_argument("--floss-batch", type=int, default=16)
    parser.add_argument("--floss-batches", type=int, default=4)
    parser.add_argument("--eval-size", type=int, default=512)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--solved", type=float, default=0.01, help="evaluation MSE that counts as solved")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="append one JSON line per run")
    parser.add_argument("--flossed-only", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[RunResult]:
    args = parse_args(argv)
    set_threads(args.threads)
    print(machine().describe())
    print(
        f"adding problem T={args.seq_len}, tanh RNN H={args.hidden}, batch {args.batch}, Adam {args.lr:g}, "
        f"clip {args.clip:g}, {args.steps} steps; flossing: {args.floss_steps} steps, top {args.exponents} "
        f"exponents, {args.floss_batches} batches of {args.floss_batch}; solved: eval MSE < {args.solved:g} "
        f"(predicting the mean: {BASELINE_MSE:.4f})"
    )
    results = []
    for init in args.inits:
        for seed in args.seeds:
            for flossed in (False, True):
                result = run_one(args, init, seed, flossed)
                results.append(result)
                print(
                    f"{init} seed {seed} flossed={flossed}: λ {result.exponents_before_training}, "
                    f"MSE {[round(m, 4) for _, m in result.eval_mse]}, solved at {result.solved_at}",
                    flush=True,
                )
                if args.out is not None:
                    with args.out.open("a") as handle:
                        handle.write(json.dumps(asdict(result)) + "\n")
    print(table(results))
    return results


if __name__ == "__main__":
    main()

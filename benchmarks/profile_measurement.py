"""Profile: where one inline measurement's time goes, against the bare training step it rides on.

Run from the repository root (bounded: a few warm measured steps per setting):

    python3 -m benchmarks.profile_measurement       # LSTM and GRU, H=256 and 512, default threads and 1,
                                                    # the economy (default) and the full estimator
    python3 -m benchmarks.profile_measurement --kind gru --hidden 512 --threads 1 --estimator economy
    python3 -m benchmarks.profile_measurement --quick   # one warm measurement, H=256 only: checks it runs

Each line also gives the default schedule's actual interval and overhead for that cost: the default
measures every 50 steps unless a measurement costs more than 2% of the steps since the last one
(``gradwatch.policy.schedule``), so the interval is 50 * ceil(cost / (0.02 * 50)) steps.

The model is the issue's language model (embedding 64 -> nn.LSTM/GRU(64, H) -> Linear to 64 tokens, T=64,
B=32, Adam at lr 1e-3, a fresh batch every step), watched with ``every=50, background=False``: each warm
measurement starts from vectors 50 training steps old, as under the default schedule, and costs the
measured step minus the median unmeasured step of the same run. (Earlier versions of this script kept the
weights fixed, lr = 0, and measured every step: the warm starts were then exact and the cost came out about
3x too low.) The stages (replay, step Jacobians, step norms, lags and lambda, the record) are timed by wrapping the
functions that run them, and printed largest first in ms and in training steps; indented stages are
parts of the one above.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import gradwatch
import gradwatch.estimators.layer as layer_module
import gradwatch.estimators.products as products_module
import gradwatch.measure as measure_module
from gradwatch.estimators.jacobian import AnalyticStepJacobians
from gradwatch.estimators.layer import EstimatorSettings

#: The stages of one measurement, timed by wrapping the functions that run them where this version of
#: gradwatch has them: (module, function, label). Replay and record are the measurement pipeline's own
#: (gradwatch.measure); lambda came from a separate ``lyapunov_max`` before it shared the lag sweeps.
CANDIDATE_STAGES = (
    (measure_module, "rerun_fused", "replay: re-run the probe"),
    (measure_module, "replay_fused", "replay: layer by layer"),
    (measure_module, "check_fused_replay", "replay: check"),
    (measure_module, "builtin_step_jacobians", "step Jacobians: build"),
    (layer_module, "stratified_step_sample", "step sample: draw"),
    (layer_module, "estimate_step_norms", "step norms (sample)"),
    (layer_module, "weight_spectral_norm", "sigma_max(W_hh)"),
    (layer_module, "estimate_lag_norms", "lags + lambda, all"),
    (products_module, "_warm_power_rows", "  long lags: warm power steps"),
    (products_module, "_lanczos_windows", "  lags: Lanczos (short lags, cold, fallback)"),
    (layer_module, "lyapunov_max", "lambda: separate sweeps"),
    (layer_module, "lyapunov_from_full_products", "lambda: from the shared sweeps"),
    (measure_module, "layer_metrics", "record: summaries, one host copy"),
)
STAGES = tuple((module, name, label) for module, name, label in CANDIDATE_STAGES if hasattr(module, name))

#: ``--estimator`` names: the two modes, and the economy estimator with every lag by Lanczos (the lever
#: ``EstimatorSettings.lag_power_steps`` off), side by side in one process.
ESTIMATORS = {
    "economy": "economy",
    "economy-lanczos": EstimatorSettings(lag_power_steps=0),
    "economy-one-step": EstimatorSettings(lag_power_steps=1),
    "full": "full",
}


class SmallLanguageModel(nn.Module):
    """Embedding 64 -> one recurrent layer (time-major) -> Linear to the vocabulary."""

    def __init__(self, kind: str, hidden: int, vocabulary: int = 64, embedding: int = 64) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, embedding)
        self.rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[kind](embedding, hidden)
        self.readout = nn.Linear(hidden, vocabulary)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.rnn(self.embedding(tokens))
        return self.readout(hidden)


def _timed(
    name: str, function: Callable[..., Any], totals: dict[str, list[float]], stages: list[str]
) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        begin = time.perf_counter()
        stages.append(name)
        try:
            return function(*args, **kwargs)
        finally:
            stages.pop()
            totals[name].append(time.perf_counter() - begin)

    return wrapper


def _counting_step_products(stages: list[str], products: dict[str, int]) -> list[tuple[str, Any]]:
    """Count the vectors every step product (J_t v or J_t^T u of the built-in cells) carries, by the
    innermost timed stage: the machine-independent cost of the sweeps (each vector is one row of a GEMM
    with W_hh). The count is one Python call per product (about 1 µs against 55-460 µs for the product itself at H=256), inside the
    timed measurement like the stage timers. Returns the originals to restore."""
    originals = [(name, getattr(AnalyticStepJacobians, name)) for name in ("_jvp", "_vjp")]
    for name, original in originals:

        def counted(self: Any, v: torch.Tensor, t: Any, _original: Any = original) -> torch.Tensor:
            stage = stages[-1] if stages else "other"
            products[stage] = products.get(stage, 0) + v[..., 0].numel()
            return _original(self, v, t)

        setattr(AnalyticStepJacobians, name, counted)
    return originals


def profile(
    kind: str,
    hidden: int,
    threads: int,
    rounds: int,
    gap: int = 50,
    lr: float = 1e-3,
    steps: int = 64,
    batch: int = 32,
    estimator: str = "economy",
) -> dict:
    """Median unmeasured step, measured step and stage times (seconds) over ``rounds`` warm measurements.

    The loop trains as a user's does (Adam at ``lr``, a fresh batch every step) and is measured every
    ``gap`` steps, so each measurement starts from the previous one's vectors at weights ``gap`` steps
    away, as under the default schedule. The first measurement (cold) is not counted.
    """
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    vocabulary = 64
    model = SmallLanguageModel(kind, hidden, vocabulary)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    batches = [torch.randint(0, vocabulary, (steps + 1, batch)) for _ in range(8)]

    def train_step(tokens: torch.Tensor) -> float:
        begin = time.perf_counter()
        optimizer.zero_grad()
        logits = model(tokens[:-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, vocabulary), tokens[1:].reshape(-1))
        loss.backward()
        optimizer.step()
        return time.perf_counter() - begin

    totals: dict[str, list[float]] = defaultdict(list)
    stages: list[str] = []
    products: dict[str, int] = {}
    originals = [(module, name, getattr(module, name)) for module, name, _ in STAGES]
    for module, name, function in originals:
        setattr(module, name, _timed(name, function, totals, stages))
    product_originals = _counting_step_products(stages, products)
    monitor = gradwatch.watch(
        model, optimizer, every=gap, background=False, estimator=ESTIMATORS.get(estimator, estimator)
    )
    bare_times: list[float] = []
    measured_times: list[float] = []
    per_measurement: list[dict[str, float]] = []
    products_per_measurement: list[dict[str, int]] = []
    try:
        train_step(batches[0])  # the cold first measurement, not counted
        index = 1
        while len(measured_times) < rounds:
            totals.clear()
            products.clear()
            elapsed = train_step(batches[index % len(batches)])
            index += 1
            if totals:
                measured_times.append(elapsed)
                per_measurement.append({name: sum(times) for name, times in totals.items()})
                products_per_measurement.append(dict(products))
            else:
                bare_times.append(elapsed)
    finally:
        monitor.close()
        for module, name, function in originals:
            setattr(module, name, function)
        for name, function in product_originals:
            setattr(AnalyticStepJacobians, name, function)
    result = {
        "bare_step_s": statistics.median(bare_times) if bare_times else math.nan,
        "measured_step_s": statistics.median(measured_times),
    }
    for _, name, _ in STAGES:
        result[name] = statistics.median(m.get(name, 0.0) for m in per_measurement)
    counted = {stage for m in products_per_measurement for stage in m}
    result["step_products"] = {
        stage: statistics.median(m.get(stage, 0) for m in products_per_measurement) for stage in counted
    }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kind", choices=["lstm", "gru"], nargs="+", default=["lstm", "gru"])
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 512])
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[torch.get_num_threads(), 1], help="default: torch's and 1"
    )
    parser.add_argument(
        "--estimator",
        choices=list(ESTIMATORS),
        nargs="+",
        default=["economy", "full"],
        help="economy-lanczos: the economy estimator without the warm power steps on the long lags; "
        "economy-one-step: at most one power step (a row that fails its gap test runs Lanczos)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="warm measured steps per setting")
    parser.add_argument("--quick", action="store_true", help="H=256, one warm measurement per setting")
    parser.add_argument(
        "--gap", type=int, default=50, help="steps between measurements (the default schedule)"
    )
    parser.add_argument(
        "--lr", type=float, default=1e-3, help="Adam learning rate (0: the weights never move)"
    )
    args = parser.parse_args(argv)
    if args.gap < 2:
        parser.error(f"--gap must be >= 2 (unmeasured steps give the bare step time), got {args.gap}")
    if args.quick:
        args.hidden, args.rounds = [256], 1
    for kind in args.kind:
        for hidden in args.hidden:
            for threads in dict.fromkeys(args.threads):
                for estimator in args.estimator:  # side by side, same process and thread setting
                    r = profile(
                        kind, hidden, threads, args.rounds, gap=args.gap, lr=args.lr, estimator=estimator
                    )
                    cost_steps = (r["measured_step_s"] - r["bare_step_s"]) / r["bare_step_s"]
                    interval = default_interval(cost_steps)
                    print(
                        f"{kind} H={hidden} threads={threads} estimator={estimator}: bare step "
                        f"{1e3 * r['bare_step_s']:.0f} ms, measured step {1e3 * r['measured_step_s']:.0f} ms, "
                        f"one measurement = {cost_steps:.2f} training steps -> default interval {interval} "
                        f"steps, overhead {100 * max(cost_steps, 0.0) / interval:.2f}%",
                        flush=True,
                    )
                    print(stage_table(r), flush=True)
    return 0


def stage_table(result: dict) -> str:
    """The stages of one measurement, largest first: median ms and share of the bare training step."""
    bare = result["bare_step_s"]
    rows = sorted(((result[name], label) for _, name, label in STAGES if result[name] > 0), reverse=True)
    measurement = result["measured_step_s"] - bare
    timed = sum(seconds for seconds, label in rows if not label.startswith("  "))
    rows.append((measurement - timed, "other (hooks, sinks, warm starts, the rest)"))
    lines = [f"    {1e3 * seconds:8.1f} ms {seconds / bare:6.2f} steps  {label}" for seconds, label in rows]
    labels = {name: label.strip() for _, name, label in STAGES}
    products = result.get("step_products", {})
    if products:
        parts = ", ".join(
            f"{labels.get(stage, stage)} {count:.0f}"
            for stage, count in sorted(products.items(), key=lambda item: -item[1])
        )
        lines.append(
            f"    step products (vectors through J_t or J_t^T): {sum(products.values()):.0f} = {parts}"
        )
    return "\n".join(lines)


def default_interval(cost_steps: float, every: int = 50, budget: float = 0.02) -> int:
    """The default schedule's interval for a measurement costing ``cost_steps`` training steps: the
    smallest multiple of ``every`` that keeps the measurements within ``budget`` of the training time."""
    if not math.isfinite(cost_steps) or cost_steps <= 0:
        return every
    return every * max(1, math.ceil(cost_steps / (budget * every)))


if __name__ == "__main__":
    raise SystemExit(main())

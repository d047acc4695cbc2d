"""What the top-k Lyapunov spectrum adds to one measurement.

One layer of the overhead benchmark's model (LSTM or GRU, H hidden units, T=64, B=32, torch's default init,
states replayed from random inputs), measured by ``estimate_layer`` + ``layer_metrics`` as the monitor does
it: with the default settings and with ``EstimatorSettings(lyapunov_spectrum=k)``, alternating, medians of
the rounds and the paired ratio. The spectrum's own time is also timed alone.

    python3 -m benchmarks.spectrum_cost                 # LSTM and GRU, H=256, k=4, 5 rounds
    python3 -m benchmarks.spectrum_cost --hidden 64 --rounds 3
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch
from torch import nn

from benchmarks.harness import format_table, machine, median, paired_ratios, set_threads
from gradwatch.capture.replay import fused_layer_weights, run_layer
from gradwatch.estimators.jacobian import builtin_step_jacobians
from gradwatch.estimators.layer import EstimatorSettings, estimate_layer, layer_metrics
from gradwatch.estimators.spectrum import lyapunov_spectrum


def _layer(kind: str, hidden: int, steps: int, batch: int):
    torch.manual_seed(0)
    module = (nn.LSTM if kind == "lstm" else nn.GRU)(64, hidden)
    weights = fused_layer_weights(module, kind, 0, "forward")  # type: ignore[arg-type]
    x = torch.randn(steps, batch, 64)
    mask = torch.ones(steps, batch, dtype=torch.bool)
    with torch.no_grad():
        states = run_layer(weights, x, torch.zeros(batch, weights.state_size), mask)
    return weights, builtin_step_jacobians(weights, x, states[:-1]), mask


def _time_kind(kind: str, args: argparse.Namespace) -> list[object]:
    """One table row: medians of the measurement without and with the spectrum, the spectrum alone."""
    weights, jac, mask = _layer(kind, args.hidden, args.steps, args.batch)
    variants = {"base": EstimatorSettings(), "full": EstimatorSettings(lyapunov_spectrum=args.k)}
    times: dict[str, list[float]] = {"base": [], "full": [], "alone": []}
    layer_metrics(estimate_layer(jac, mask, weights.weight_hh, variants["base"]))  # warm-up
    for round_index in range(args.rounds):
        order = ["base", "full"] if round_index % 2 == 0 else ["full", "base"]
        for name in order:
            start = time.perf_counter()
            layer_metrics(estimate_layer(jac, mask, weights.weight_hh, variants[name]))
            times[name].append(time.perf_counter() - start)
        start = time.perf_counter()
        lyapunov_spectrum(jac, mask, args.k)
        times["alone"].append(time.perf_counter() - start)
    passes = lyapunov_spectrum(jac, mask, args.k).passes
    ratio = median(paired_ratios(times["full"], times["base"]))
    return [
        kind,
        args.hidden,
        *(f"{median(times[name]) * 1e3:.0f}" for name in ("base", "full", "alone")),
        f"{ratio:.2f}x",
        passes,
    ]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kinds", nargs="+", default=["lstm", "gru"], choices=["lstm", "gru"])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("-k", type=int, default=4, help="exponents")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    print(machine().describe())
    rows = [_time_kind(kind, args) for kind in args.kinds]
    print(
        f"T={args.steps}, B={args.batch}, k={args.k}, {args.rounds} rounds, {args.threads} thread(s); "
        "medians in ms"
    )
    headers = ["kind", "H", "measurement", "with spectrum", "spectrum alone", "ratio", "forward sweeps"]
    print(format_table(headers, rows))


if __name__ == "__main__":
    main()

"""Benchmark: estimator accuracy and time on the measurements a real training run makes (warm starts after
real drift), against exact Jacobians.

Run from the repository root:

    python3 -m benchmarks.drift_accuracy                      # LSTM and GRU H=256, 4 warm measurements (~6 min)
    python3 -m benchmarks.drift_accuracy --kinds lstm --hidden 64 --measurements 2    # about 20 s

The loop is issue #14's model (embedding 64 -> nn.LSTM/GRU(64, H) -> Linear to 64 tokens, T=64, B=32, Adam
at lr 1e-3, a fresh batch every step) watched with ``every=50, background=False``. At every measurement the
inputs of ``estimate_layer`` (weights, probe inputs and states, warm start) are kept; afterwards each warm
measurement is estimated again with the code under test and compared with

* sigma_max(J_t) of the dense step Jacobians (``torch.func.jacrev`` of the cell, float64,
  ``torch.linalg.matrix_norm(ord=2)``) for every (t, b);
* the lag norms and the top Lyapunov exponent of the dense products, renormalised after every factor.

Unit tests start from random weights or weights moved by random noise; this is what the estimators meet
after 50 Adam steps, where a warm start can sit near a product's second singular vector.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import gradwatch
import gradwatch.measure as measure_module
from benchmarks.harness import format_table, machine
from benchmarks.profile_measurement import SmallLanguageModel
from gradwatch.estimators.cells import CellWeights, cell_step
from gradwatch.estimators.jacobian import builtin_step_jacobians
from gradwatch.estimators.layer import estimate_layer
from gradwatch.estimators.products import default_lags, sequence_lengths

STEP_P99_GOAL = 0.01  # sigma_max(J_t): p99 relative error
LAG_GOAL = 0.05  # lag norms and lambda: relative error


@dataclass
class CapturedMeasurement:
    """What ``estimate_layer`` received at one measurement of the run."""

    weights: CellWeights
    x: Tensor
    s_prev: Tensor
    mask: Tensor
    weight_hh: Tensor | None
    settings: Any
    warm_start: Any


@dataclass(frozen=True)
class ExactMetrics:
    sigma: Tensor  # (T, B) float64
    lag_norms: Tensor  # (K, B)
    lyapunov: Tensor  # (B,)


def capture_run(kind: str, hidden: int, measurements: int, gap: int = 50) -> list[CapturedMeasurement]:
    """Train and keep the inputs of every measurement (the first one is cold)."""
    torch.manual_seed(0)
    vocabulary = 64
    model = SmallLanguageModel(kind, hidden, vocabulary)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    captured: list[CapturedMeasurement] = []
    inputs: dict[int, tuple[CellWeights, Tensor, Tensor]] = {}
    build, estimate = measure_module.builtin_step_jacobians, measure_module.estimate_layer

    def recording_build(weights: CellWeights, x: Tensor, s_prev: Tensor) -> Any:
        jac = build(weights, x, s_prev)
        inputs[id(jac)] = (weights, x.detach().clone(), s_prev.detach().clone())
        return jac

    def recording_estimate(
        jac: Any, mask: Tensor, weight_hh: Tensor | None, settings: Any, **kwargs: Any
    ) -> Any:
        weights, x, s_prev = inputs.pop(id(jac))
        captured.append(
            CapturedMeasurement(
                weights, x, s_prev, mask.clone(), weight_hh, settings, kwargs.get("warm_start")
            )
        )
        return estimate(jac, mask, weight_hh, settings, **kwargs)

    measure_module.builtin_step_jacobians = recording_build  # type: ignore[assignment]
    measure_module.estimate_layer = recording_estimate  # type: ignore[assignment]
    monitor = gradwatch.watch(model, optimizer, every=gap, background=False)
    try:
        for _ in range(gap * measurements + 1):
            tokens = torch.randint(0, vocabulary, (65, 32))
            optimizer.zero_grad()
            logits = model(tokens[:-1])
            nn.functional.cross_entropy(logits.reshape(-1, vocabulary), tokens[1:].reshape(-1)).backward()
            optimizer.step()
    finally:
        monitor.close()
        measure_module.builtin_step_jacobians = build
        measure_module.estimate_layer = estimate
    return captured


def exact_metrics(measurement: CapturedMeasurement) -> ExactMetrics:
    """Dense float64 step Jacobians by jacrev of the cell, their norms, and the dense lag products."""
    weights = measurement.weights.to(torch.float64)
    x, s_prev = measurement.x.double(), measurement.s_prev.double()
    steps, batch, state = s_prev.shape

    def one_row(x_row: Tensor, s_row: Tensor) -> Tensor:
        return cell_step(weights, x_row.unsqueeze(0), s_row.unsqueeze(0)).squeeze(0)

    jacobian = torch.func.vmap(torch.func.jacrev(one_row, argnums=1))
    dense = torch.stack([jacobian(x[t], s_prev[t]) for t in range(steps)])  # (T, B, D, D)
    sigma = torch.linalg.matrix_norm(dense, ord=2)
    lags = default_lags(steps)
    lengths = sequence_lengths(measurement.mask, steps, batch).tolist()
    lag_norms = torch.full((len(lags), batch), math.nan, dtype=torch.float64)
    lyapunov = torch.full((batch,), math.nan, dtype=torch.float64)
    for b, length in enumerate(lengths):
        product, log_scale = torch.eye(state, dtype=torch.float64), 0.0
        for tau in range(1, length + 1):
            product = product @ dense[length - tau, b]  # J_{L-1} ... J_{L-tau}
            norm = float(torch.linalg.matrix_norm(product, ord=2))
            if tau in lags:
                lag_norms[lags.index(tau), b] = norm * math.exp(log_scale)
            log_scale += math.log(norm)
            product = product / norm  # renormalised: no under/overflow however long
        if length:
            lyapunov[b] = log_scale / length
    return ExactMetrics(sigma, lag_norms, lyapunov)


def evaluate(measurement: CapturedMeasurement, exact: ExactMetrics, cold: bool = False) -> dict[str, Any]:
    """Time one estimate_layer (warm-started unless ``cold``) and its errors against the exact metrics."""
    jac = builtin_step_jacobians(measurement.weights, measurement.x, measurement.s_prev)
    begin = time.perf_counter()
    estimated = estimate_layer(
        jac,
        measurement.mask,
        measurement.weight_hh,
        measurement.settings,
        warm_start=None if cold else measurement.warm_start,
    )
    seconds = time.perf_counter() - begin
    step_error = ((estimated.jacobian_sigma.double() - exact.sigma) / exact.sigma).abs()
    real = measurement.mask
    lag_error = ((estimated.lag_norm_per_sequence.double() - exact.lag_norms) / exact.lag_norms).abs()
    lyapunov = estimated.lyapunov_per_sequence
    assert lyapunov is not None
    lyapunov_error = (lyapunov.double() - exact.lyapunov).abs().nan_to_num(0.0)
    return {
        "seconds": seconds,
        "step_p99": float(step_error[real].quantile(0.99)),
        "step_max": float(step_error[real].max()),
        "lag_max_per_lag": lag_error.nan_to_num(0.0).amax(dim=1).tolist(),
        "lyapunov_abs": float(lyapunov_error.max()),
        "lyapunov_rel": float((lyapunov_error / exact.lyapunov.abs()).nan_to_num(0.0).max()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kinds", nargs="+", default=["lstm", "gru"], choices=["lstm", "gru"])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--measurements", type=int, default=4, help="warm measurements (after the cold one)")
    parser.add_argument("--cold", action="store_true", help="random starts instead of the warm starts")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(machine().describe())
    rows = []
    for kind in args.kinds:
        captured = capture_run(kind, args.hidden, args.measurements)
        results = [evaluate(m, exact_metrics(m), args.cold) for m in captured[1:]]
        lags = default_lags(captured[0].s_prev.shape[0])
        worst_lag = [max(r["lag_max_per_lag"][k] for r in results) for k in range(len(lags))]
        step_p99 = max(r["step_p99"] for r in results)
        lyapunov_rel = max(r["lyapunov_rel"] for r in results)
        met = step_p99 <= STEP_P99_GOAL and max(worst_lag) <= LAG_GOAL and lyapunov_rel <= LAG_GOAL
        rows.append(
            [
                f"{kind} H={args.hidden}",
                len(results),
                round(1e3 * statistics.median(r["seconds"] for r in results), 1),
                f"{100 * step_p99:.2f}%",
                f"{100 * max(r['step_max'] for r in results):.2f}%",
                " ".join(f"{tau}:{100 * e:.1f}%" for tau, e in zip(lags, worst_lag, strict=True)),
                f"{max(r['lyapunov_abs'] for r in results):.1e} ({100 * lyapunov_rel:.2f}%)",
                "yes" if met else "NO",
            ]
        )
    print(
        "Warm measurements after 50 Adam steps each: estimate_layer time and worst errors against exact "
        f"(goals: step p99 <= {STEP_P99_GOAL:.0%}, every lag and lambda <= {LAG_GOAL:.0%})"
    )
    print(
        format_table(
            [
                "model",
                "warm",
                "ms (median)",
                "step p99",
                "step max",
                "worst lag error",
                "lambda abs (rel)",
                "met",
            ],
            rows,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark: batched matrix-free sigma_max(J_t) for every (t, b) vs the exact path (jacrev + SVD).

Run from the repository root:

    python3 benchmarks/estimators.py                       # LSTM H=256, T=64, B=16
    python3 benchmarks/estimators.py --kind gru --hidden 64 --steps 256
    python3 benchmarks/estimators.py --grid                # RNN/LSTM/GRU x H=64,256,1024 x T=64,256

The exact path (dense J_t by torch.func.jacrev, then torch.linalg.matrix_norm(ord=2)) is timed on a random
subset of (t, b) pairs and extrapolated per Jacobian to all T*B pairs; the p99 relative error is measured on
that subset. Times are medians over alternating repeats (exact, estimate, exact, estimate, ...).
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from dataclasses import dataclass

import torch

from gradwatch.estimators.cells import CellKind, CellWeights, cell_step, gate_count
from gradwatch.estimators.jacobian import builtin_step_jacobians
from gradwatch.estimators.layer import EstimatorSettings, estimate_layer, estimate_step_norms
from gradwatch.estimators.power_iteration import random_start_vectors

KINDS: dict[str, CellKind] = {"rnn": "rnn_tanh", "lstm": "lstm", "gru": "gru"}


@dataclass(frozen=True)
class BenchmarkResult:
    kind: str
    hidden: int
    steps: int
    batch: int
    sampled_pairs: int
    exact_seconds: float  # extrapolated to all T*B Jacobians
    estimate_seconds: float  # sigma_max(J_t) for all (t, b)
    layer_seconds: float  # the full estimate_layer call (adds W_hh, lags, Lyapunov, factors)
    p99_relative_error: float
    iterations: int  # the slowest operator's
    mean_iterations: float  # per operator (converged operators leave the iteration early)

    @property
    def speedup(self) -> float:
        return self.exact_seconds / self.estimate_seconds


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU: {cpu}; torch {torch.__version__}; threads {torch.get_num_threads()}"


def default_init_weights(
    kind: CellKind, input_size: int, hidden: int, generator: torch.Generator
) -> CellWeights:
    """U(-1/sqrt(H), 1/sqrt(H)) like torch's RNN modules."""
    bound = 1 / math.sqrt(hidden)
    rows = gate_count(kind) * hidden

    def uniform(*shape: int) -> torch.Tensor:
        return (torch.rand(*shape, generator=generator) * 2 - 1) * bound

    return CellWeights(kind, uniform(rows, input_size), uniform(rows, hidden), uniform(rows), uniform(rows))


def visited_states(weights: CellWeights, x: torch.Tensor) -> torch.Tensor:
    states = [torch.zeros(x.shape[1], weights.state_size)]
    with torch.no_grad():
        for t in range(x.shape[0] - 1):
            states.append(cell_step(weights, x[t], states[-1]))
    return torch.stack(states)


def exact_sigma(weights: CellWeights, x_pairs: torch.Tensor, s_pairs: torch.Tensor) -> torch.Tensor:
    jacobian = torch.func.vmap(torch.func.jacrev(lambda xi, si: cell_step(weights, xi, si), argnums=1))
    return torch.linalg.matrix_norm(jacobian(x_pairs, s_pairs), ord=2)


def run_case(kind: str, hidden: int, steps: int, batch: int, sample: int, repeats: int) -> BenchmarkResult:
    generator = torch.Generator().manual_seed(0)
    cell_kind = KINDS[kind]
    input_size = 32
    weights = default_init_weights(cell_kind, input_size, hidden, generator)
    x = torch.randn(steps, batch, input_size, generator=generator)
    s_prev = visited_states(weights, x)
    pair_count = steps * batch
    chosen = torch.randperm(pair_count, generator=generator)[: min(sample, pair_count)]
    x_pairs = x.reshape(pair_count, input_size)[chosen]
    s_pairs = s_prev.reshape(pair_count, -1)[chosen]
    mask = torch.ones(steps, batch, dtype=torch.bool)
    settings = EstimatorSettings()

    def estimate() -> tuple[torch.Tensor, int, float]:
        jac = builtin_step_jacobians(weights, x, s_prev)
        start = random_start_vectors(
            tuple(s_prev.shape),
            dtype=s_prev.dtype,
            device=s_prev.device,
            generator=torch.Generator().manual_seed(1),
        )
        result = estimate_step_norms(jac, mask, settings, start)
        per_operator = result.element_iterations
        mean = float("nan") if per_operator is None else float(per_operator.float().mean())
        return result.sigma, result.iterations, mean

    exact_times, estimate_times, layer_times = [], [], []
    exact = sigma = None
    iterations, mean_iterations = 0, float("nan")
    for _ in range(repeats):
        began = time.perf_counter()
        exact = exact_sigma(weights, x_pairs, s_pairs)
        exact_times.append((time.perf_counter() - began) / len(chosen) * pair_count)
        began = time.perf_counter()
        sigma, iterations, mean_iterations = estimate()
        estimate_times.append(time.perf_counter() - began)
        began = time.perf_counter()
        estimate_layer(
            builtin_step_jacobians(weights, x, s_prev),
            mask,
            weights.weight_hh,
            settings,
            generator=torch.Generator().manual_seed(2),
        )
        layer_times.append(time.perf_counter() - began)
    assert exact is not None and sigma is not None
    relative = (sigma.reshape(pair_count)[chosen] - exact).abs() / exact
    return BenchmarkResult(
        kind,
        hidden,
        steps,
        batch,
        len(chosen),
        statistics.median(exact_times),
        statistics.median(estimate_times),
        statistics.median(layer_times),
        float(torch.quantile(relative, 0.99)),
        iterations,
        mean_iterations,
    )


def print_result(result: BenchmarkResult) -> None:
    print(
        f"{result.kind:>4} H={result.hidden:<5} T={result.steps:<4} B={result.batch:<3} "
        f"exact {result.exact_seconds:9.3f} s (extrapolated from {result.sampled_pairs} of "
        f"{result.steps * result.batch} Jacobians)  estimate {result.estimate_seconds:7.3f} s "
        f"(Lanczos it.: {result.mean_iterations:.1f} mean, {result.iterations} max)  speedup {result.speedup:7.1f}x  "
        f"p99 rel. error {100 * result.p99_relative_error:.3f}%  full layer {result.layer_seconds:7.3f} s",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kind", choices=sorted(KINDS), default="lstm")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--sample", type=int, default=128, help="(t, b) pairs on which the exact path runs")
    parser.add_argument("--repeats", type=int, default=5, help="alternating repeats; the median is reported")
    parser.add_argument("--grid", action="store_true", help="RNN/LSTM/GRU x H=64,256,1024 x T=64,256")
    arguments = parser.parse_args()
    print(machine_description())
    print(
        f"float32, default EstimatorSettings {EstimatorSettings()}, cold start; medians of {arguments.repeats} repeats"
    )
    if arguments.grid:
        for kind in ("rnn", "lstm", "gru"):
            for hidden in (64, 256, 1024):
                for steps in (64, 256):
                    sample = arguments.sample if hidden < 1024 else min(arguments.sample, 16)
                    print_result(run_case(kind, hidden, steps, arguments.batch, sample, arguments.repeats))
        return
    result = run_case(
        arguments.kind,
        arguments.hidden,
        arguments.steps,
        arguments.batch,
        arguments.sample,
        arguments.repeats,
    )
    print_result(result)
    target = "met" if result.speedup >= 50 and result.p99_relative_error <= 0.01 else "NOT met"
    print(f"target (>= 50x at <= 1% p99): {target}")


if __name__ == "__main__":
    main()

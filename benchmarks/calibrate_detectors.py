"""Calibrate the vanishing/exploding thresholds on exact metrics of small RNNs.

Prints, per case and sequence length, the exact metrics (dense jacrev Jacobians, float64), the one-shot
verdict of ``DetectionConfig.for_diagnosis()`` and the margin to each threshold:
  vanish: lambda - lambda_vanish (> 0: healthy side) and log10(lag / vanishing_lag_norm) (> 0: healthy side)
  explode: lambda_explode - lambda (> 0: healthy side) and log10(exploding_lag_norm / lag) (> 0: healthy side)
A case is flagged only when BOTH conditions of a kind cross, so one positive margin suffices to stay healthy.

The extreme bound (an exploding product that alerts without patience) is read off the same table: the
longest lag norm of every healthy case, and of the brief's fast explosion (relu, W_hh = 1.6 x orthogonal,
H = 48, T = 40, inputs x 0.1) over seeds.

The every-step gradient-growth test is calibrated on training runs: per step, the total gradient norm of
the RNN's parameters against the median of the previous ``gradient_growth_window`` steps; the table shows
the largest ratio of each run (healthy runs must stay below ``gradient_growth_factor``) and, for the
exploding ones, the first step the test fires and the first step the loss is non-finite.

Run from the repository root:  python3 -m benchmarks.calibrate_detectors [--steps 20,50,100,200]
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import click
import torch
from torch import nn

from gradwatch.policy.evidence import growth_rate, longest_lag_norm, reach_and_horizon
from gradwatch.policy.trends import DetectionConfig, TrendDetector
from gradwatch.records import Measurement
from tests.oracles.exact_metrics import exact_measurement, gradient_norms
from tests.oracles.reference_cases import (
    RecurrentRegressor,
    lstm_forget_bias_one,
    regression_batch,
    scaled_orthogonal_rnn,
)


@dataclass(frozen=True)
class Case:
    """A named model builder and the input scale it is measured with."""

    name: str
    build: Callable[[int], nn.RNN | nn.LSTM | nn.GRU]
    input_scale: float = 1.0
    expected: str | None = None  # the brief's reference cases have one; sweep points are only reported


def random_gain_rnn(gain: float) -> Callable[[int], nn.RNN]:
    def build(hidden: int) -> nn.RNN:
        module = nn.RNN(4, hidden)
        with torch.no_grad():
            module.weight_hh_l0.copy_(torch.randn(hidden, hidden) * gain / hidden**0.5)
        return module

    return build


def orthogonal_rnn(nonlinearity: str, gain: float) -> Callable[[int], nn.RNN]:
    return lambda hidden: scaled_orthogonal_rnn(nonlinearity, gain, hidden)


def default_init(module_type: type, **kwargs: object) -> Callable[[int], nn.Module]:
    return lambda hidden: module_type(4, hidden, **kwargs)


CASES: list[Case] = [
    Case("relu rnn W=2.0 x orth", lambda h: scaled_orthogonal_rnn("relu", 2.0, h), expected="exploding"),
    Case("tanh rnn W=0.2 x orth", lambda h: scaled_orthogonal_rnn("tanh", 0.2, h), expected="vanishing"),
    Case("lstm forget bias 1", lambda h: lstm_forget_bias_one(h), expected="healthy"),
    Case("tanh rnn orth, small x", lambda h: scaled_orthogonal_rnn("tanh", 1.0, h), 0.1, expected="healthy"),
    *[Case(f"tanh rnn W={g} x orth", orthogonal_rnn("tanh", g)) for g in (0.5, 0.8, 1.0, 1.2, 1.5)],
    *[Case(f"relu rnn W={g} x orth", orthogonal_rnn("relu", g)) for g in (0.5, 1.0, 1.2, 1.5)],
    Case("tanh rnn random gain 0.9", random_gain_rnn(0.9), 0.1),
    Case("tanh rnn default init", default_init(nn.RNN)),
    Case("relu rnn default init", default_init(nn.RNN, nonlinearity="relu")),
    Case("lstm default init", default_init(nn.LSTM)),
    Case("gru default init", default_init(nn.GRU)),
]


def trained_tanh_rnn(hidden: int, batch: int, seed: int) -> Measurement:
    """The test's training case: orthogonal tanh RNN, small inputs, T=20, 50 SGD steps; the last measurement."""
    generator = torch.Generator().manual_seed(seed)
    model = RecurrentRegressor(scaled_orthogonal_rnn("tanh", 1.0, hidden=hidden))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    measurement = None
    for step in range(50):
        x, y = regression_batch(generator, 20, batch, 4, scale=0.1)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        measurement = exact_measurement(model.rnn, x, step=step, grad_norm=gradient_norms(model.rnn))
        optimizer.step()
    assert measurement is not None
    return measurement


def row(name: str, measurement: Measurement, config: DetectionConfig, expected: str | None) -> str:
    metrics = measurement.metrics
    rate = growth_rate(metrics)
    longest = longest_lag_norm(metrics.lag_norm)
    alerts = TrendDetector(config).update(measurement)
    verdict = alerts[0].alert.value if alerts else "healthy"
    flag = (
        ""
        if expected is None
        else ("  (expected: ok)" if verdict == expected else f"  <-- expected {expected}")
    )
    if rate is None or longest is None:
        return f"{name:26s} T={metrics.time_steps}: not measurable"
    tau, lag = longest
    horizon = math.inf if rate >= 0 else -1 / rate
    lag_log = math.log10(lag) if lag > 0 else -math.inf
    reach, judged_at = reach_and_horizon(metrics.lag_norm, metrics.horizon, config.vanishing_lag_norm)
    # vanishing is judged on the reach against the horizon (steps); the lag margin as before
    vanish = (
        math.nan if reach is None or judged_at is None else reach - judged_at,
        lag_log - math.log10(config.vanishing_lag_norm),
    )
    explode = (config.exploding_growth_rate - rate, math.log10(config.exploding_lag_norm) - lag_log)
    gate = "   -" if metrics.gate_mean is None else f"{metrics.gate_mean:4.2f}"
    return (
        f"{name:26s} T={metrics.time_steps:3d} lambda={rate:+.3f} horizon={horizon:6.2f} "
        f"lag{tau:3d}={lag:8.1e} |J|={metrics.jacobian_sigma_max_mean:4.2f} W={metrics.weight_hh_sigma_max:4.2f} "
        f"f'={metrics.activation_derivative_mean:4.2f} sat={metrics.activation_saturation_ratio:4.2f} gate={gate} "
        f"| vanish margin {vanish[0]:+.2f}/{vanish[1]:+6.1f}dec explode margin {explode[0]:+.2f}/{explode[1]:+6.1f}dec "
        f"-> {verdict}{flag}"
    )


def fast_explosion_lags(seeds: range) -> list[tuple[int, float, float]]:
    """(seed, lambda, longest lag norm) of the brief's fast explosion at initialisation (exact, float64)."""
    rows = []
    for seed in seeds:
        torch.manual_seed(seed)
        module = scaled_orthogonal_rnn("relu", 1.6, hidden=48)
        measurement = exact_measurement(module, torch.randn(40, 8, 4) * 0.1)
        rate, longest = growth_rate(measurement.metrics), longest_lag_norm(measurement.metrics.lag_norm)
        assert rate is not None and longest is not None
        rows.append((seed, rate, longest[1]))
    return rows


@dataclass(frozen=True)
class TrainingRun:
    """A training run for the gradient-growth calibration: model, optimizer, sequence length, input scale."""

    name: str
    build: Callable[[], nn.RNN | nn.LSTM | nn.GRU]
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer]
    time_steps: int = 20
    input_scale: float = 1.0
    steps: int = 150


def adam(lr: float) -> Callable[[list[nn.Parameter]], torch.optim.Optimizer]:
    return lambda params: torch.optim.Adam(params, lr=lr)


def sgd(lr: float) -> Callable[[list[nn.Parameter]], torch.optim.Optimizer]:
    return lambda params: torch.optim.SGD(params, lr=lr)


TRAINING_RUNS: list[TrainingRun] = [
    TrainingRun("lstm default, adam 1e-2", lambda: nn.LSTM(4, 32), adam(1e-2)),
    TrainingRun("lstm forget bias 1, sgd 0.5", lambda: lstm_forget_bias_one(32), sgd(0.5), 50),
    TrainingRun("gru default, adam 1e-2", lambda: nn.GRU(4, 32), adam(1e-2)),
    TrainingRun("gru default, sgd 0.5", lambda: nn.GRU(4, 32), sgd(0.5), 50),
    TrainingRun("tanh rnn default, adam 1e-2", lambda: nn.RNN(4, 32), adam(1e-2)),
    TrainingRun("tanh rnn orth, small x, sgd 0.05", lambda: scaled_orthogonal_rnn("tanh", 1.0, 32), sgd(0.05), 20, 0.1),
    TrainingRun("tanh rnn default, sgd 0.1, T=100", lambda: nn.RNN(4, 32), sgd(0.1), 100),
    TrainingRun("EXPLODING tanh W=0.1 x orth, sgd 1.0, T=200", lambda: scaled_orthogonal_rnn("tanh", 0.1, 32), sgd(1.0), 200, 1.0, 20),
]  # fmt: skip


def growth_ratios(
    run: TrainingRun, seed: int, config: DetectionConfig
) -> tuple[float, int | None, int | None]:
    """(largest norm / running median, first step over gradient_growth_factor, first non-finite loss step)."""
    torch.manual_seed(seed)
    model = RecurrentRegressor(run.build())  # type: ignore[arg-type]
    optimizer = run.optimizer(list(model.parameters()))
    generator = torch.Generator().manual_seed(seed)
    history: deque[float] = deque(maxlen=config.gradient_growth_window)
    largest, fired, nonfinite = 0.0, None, None
    for step in range(run.steps):
        x, y = regression_batch(generator, run.time_steps, 8, 4, scale=run.input_scale)
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        if nonfinite is None and not math.isfinite(loss.item()):
            nonfinite = step
        norms = [float(torch.linalg.vector_norm(p.grad.double())) for p in model.rnn.parameters()]
        total = math.hypot(*norms)
        if math.isfinite(total) and total > 0:
            if len(history) >= config.gradient_growth_min_history:
                ratio = total / math.exp(statistics.median(history))
                largest = max(largest, ratio)
                if fired is None and ratio > config.gradient_growth_factor:
                    fired = step
            history.append(math.log(total))
        optimizer.step()
    return largest, fired, nonfinite


@click.command()
@click.option("--steps", default="20,50,100,200", help="comma-separated sequence lengths T")
@click.option("--hidden", default=32, show_default=True)
@click.option("--batch", default=8, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--growth-seeds", default=3, show_default=True, help="training seeds per growth run (0: skip)")
def main(steps: str, hidden: int, batch: int, seed: int, growth_seeds: int) -> None:
    """Print exact metrics, verdicts and threshold margins for the calibration cases."""
    torch.set_num_threads(1)
    config = DetectionConfig.for_diagnosis()
    click.echo(
        f"thresholds: vanishing when the reach (lag norm >= {config.vanishing_lag_norm:g}) is shorter than "
        f"the horizon (T - 1; margin in steps); exploding lambda > "
        f"{config.exploding_growth_rate} and lag > {config.exploding_lag_norm:g}"
    )
    click.echo(
        f"torch {torch.__version__}, hidden={hidden}, batch={batch}, seed={seed}, inputs ~ N(0, scale^2)"
    )
    for time_steps in (int(t) for t in steps.split(",")):
        click.echo(f"--- T = {time_steps}")
        for case in CASES:
            torch.manual_seed(seed)
            module = case.build(hidden)
            inputs = torch.randn(time_steps, batch, module.input_size) * case.input_scale
            measurement = exact_measurement(module, inputs)
            click.echo(row(case.name, measurement, config, case.expected))
    click.echo("--- trained: tanh rnn orth, small x, T=20, after 50 SGD steps")
    torch.manual_seed(seed)
    click.echo(row("trained tanh rnn", trained_tanh_rnn(hidden, batch, seed), config, "healthy"))
    click.echo(
        f"--- extreme bound {config.exploding_extreme_lag_norm:g}: fast explosion (relu W=1.6 x orth, H=48, "
        "T=40, x 0.1) at init"
    )
    for case_seed, rate, lag in fast_explosion_lags(range(6)):
        click.echo(
            f"seed {case_seed}: lambda={rate:+.3f} lag39={lag:8.2e} -> extreme: {lag > config.exploding_extreme_lag_norm}"
        )
    if growth_seeds:
        click.echo(
            f"--- gradient growth (every step): norm / median of the last {config.gradient_growth_window}, "
            f"threshold {config.gradient_growth_factor:g}"
        )
        for run in TRAINING_RUNS:
            for run_seed in range(growth_seeds):
                largest, fired, nonfinite = growth_ratios(run, run_seed, config)
                click.echo(
                    f"{run.name:45s} seed {run_seed}: max ratio {largest:9.3g} (log10 {math.log10(largest):+.2f}) "
                    f"fires at {fired}, loss non-finite at {nonfinite}"
                )


if __name__ == "__main__":
    main()

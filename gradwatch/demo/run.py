"""The demo's training run: a small RNN on the adding problem with the monitor on, shown live in a console.

What the user sees: a rich progress bar with the loss and the live Jacobian norm of layer 0, each alert
as it happens (``on_alert``), the Prometheus URL and run-log path, and the text report at the end.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from collections.abc import Iterator, Reversible
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypedDict

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from gradwatch.attach import watch
from gradwatch.demo.choices import DEFAULT_PORT
from gradwatch.demo.scenarios import Scenario, build_model, scenario_for
from gradwatch.demo.task import BASELINE_MSE, adding_problem_batch
from gradwatch.monitor import Monitor, new_run_id
from gradwatch.policy.alerts import WARNING_CATEGORIES
from gradwatch.records import Alert, AlertKind, Measurement, Record
from gradwatch.report.command import make_report
from gradwatch.report.render_text import render_text
from gradwatch.report.summary import Report, ReportOptions
from gradwatch.report.verdict import SEVERITY, Verdict
from gradwatch.sinks.base import HasUrl

ALERT_STYLES: dict[AlertKind, str] = {
    AlertKind.VANISHING: "bold yellow",
    AlertKind.EXPLODING: "bold red",
    AlertKind.NONFINITE: "bold magenta",
    AlertKind.RECOVERED: "bold green",
}


class DemoSetupError(RuntimeError):
    """The demo cannot start (for example the Prometheus port is taken); the message says what to change."""


class DemoInterrupted(KeyboardInterrupt):
    """Ctrl-C during the demo's training: the monitor is closed and ``log_path`` holds the run so far."""

    def __init__(self, log_path: Path, step: int) -> None:
        super().__init__(f"interrupted at step {step}; the run log so far is {log_path}")
        self.log_path = log_path
        self.step = step


@dataclass(frozen=True)
class DemoOptions:
    """The demo's settings (the ``gradwatch demo`` options); validated on construction."""

    cell: str = "rnn"
    scenario: str = "vanishing"
    steps: int = 400
    seq_len: int | None = None
    every: int = 10
    seed: int = 0
    port: int | None = DEFAULT_PORT
    """Prometheus exporter port (0: any free port); None turns the exporter off."""
    log_dir: Path = Path("runs")
    batch_size: int = 32
    hidden_size: int = 32

    def __post_init__(self) -> None:
        for name in ("steps", "every", "batch_size", "hidden_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.port is not None and (
            isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535
        ):
            raise ValueError(
                f"port must be in 0..65535 (0 = any free port) or None (no exporter), got {self.port!r}"
            )
        scenario_for(self.scenario, self.cell, self.seq_len)  # raises on an unknown scenario/cell/seq_len


HELD_OUT_SEQUENCES = 512
"""Sequences of the held-out batch the outcome is measured on (drawn from their own seeded generator)."""


@dataclass(frozen=True)
class Outcome:
    """What training achieved: the held-out MSE against the baseline of always predicting 1 (1/6)."""

    held_out_mse: float

    @property
    def kind(self) -> str:
        """``learned`` (below half the baseline), ``diverged`` (non-finite or above twice the baseline: worse
        than always predicting 1) or ``baseline`` (between: the task was not learned)."""
        mse = self.held_out_mse
        if not math.isfinite(mse) or mse > 2 * BASELINE_MSE:
            return "diverged"
        return "learned" if mse < 0.5 * BASELINE_MSE else "baseline"

    def describe(self) -> str:
        words = {
            "learned": "learned the task",
            "baseline": "did not learn: stays at the baseline",
            "diverged": "diverged, worse than always predicting 1",
        }[self.kind]
        return f"held-out MSE {_format(self.held_out_mse)} (baseline {BASELINE_MSE:.3f}): {words}"


@dataclass(frozen=True)
class DemoResult:
    """What a finished demo produced: where its log is, what the monitor said, what the report concluded."""

    scenario: Scenario
    log_path: Path
    prometheus_url: str | None
    final_loss: float
    alerts: tuple[Alert, ...]
    report: Report
    verdict: Verdict
    """The worst layer verdict of the report (healthy < vanishing < exploding < nonfinite)."""
    seconds: float
    outcome: Outcome
    reach: float | None = None
    """Layer 0's gradient reach (steps) at the last measurement, and the horizon it was judged at."""
    horizon: int | None = None

    @property
    def as_expected(self) -> bool:
        return self.verdict.value == self.scenario.expected_verdict


@dataclass
class AlertPrinter:
    """``on_alert`` callback: prints each alert above the progress bar as it happens, and keeps it."""

    console: Console
    alerts: list[Alert] = field(default_factory=list)

    def __call__(self, alert: Alert) -> None:
        self.alerts.append(alert)
        kind = AlertKind(alert.alert)
        line = Text(kind.value.upper(), style=ALERT_STYLES[kind])
        # a Text, not markup: a message's "[sigma_max(W_hh) = ...]" is shown as it is
        line.append(f" at step {alert.step}: {alert.message}")
        self.console.print(line, highlight=False)


def latest_layer_measurement(history: Reversible[Record], layer: int = 0) -> Measurement | None:
    """The newest Measurement of ``layer`` in a monitor's history (searched from the end: O(1) typically)."""
    for record in reversed(history):
        if isinstance(record, Measurement) and record.layer == layer:
            return record
    return None


def _format(value: float | None, spec: str = ".3g") -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


class LiveFields(TypedDict):
    """The progress bar's own columns (a TypedDict, so they never collide with Progress's parameters)."""

    loss: str
    sigma: str
    lyapunov: str


def live_fields(loss: float, history: Reversible[Record]) -> LiveFields:
    """The progress bar's fields: loss, and sigma_max(J_t) mean and lyapunov_max of layer 0."""
    latest = latest_layer_measurement(history)
    metrics = latest.metrics if latest is not None else None
    return LiveFields(
        loss=_format(loss),
        sigma=_format(metrics.jacobian_sigma_max_mean if metrics else None),
        lyapunov=_format(metrics.lyapunov_max if metrics else None, "+.3f"),
    )


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Run the demo's tiny matrices on one intra-op thread, then restore the user's setting.

    With hidden size 32 a second thread only adds synchronisation, and on a busy machine the threads wait
    for each other: the default run gets many times slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def _alerts_shown_once() -> Iterator[None]:
    """The demo prints alerts itself: silence their duplicate log lines and warnings, nothing else.

    ``emit_alert`` logs alerts at WARNING/INFO on the "gradwatch" logger and warns with a subclass of
    GradWatchWarning; faults of gradwatch itself still come through (ERROR logs, other warnings).
    """
    gradwatch_logger = logging.getLogger("gradwatch")
    level = gradwatch_logger.level
    gradwatch_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            for category in WARNING_CATEGORIES.values():
                warnings.simplefilter("ignore", category)
            yield
    finally:
        gradwatch_logger.setLevel(level)


def _start_monitor(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    options: DemoOptions,
    scenario: Scenario,
    log_path: Path,
    printer: AlertPrinter,
    run_id: str,
) -> Monitor:
    try:
        monitor = watch(
            model,
            optimizer,
            run_id=run_id,  # the same id as in the log's file name
            name=f"demo {scenario.name} {scenario.cell}",
            every=options.every,
            log=log_path,
            on_alert=printer,
            clip=scenario.clip,
            clip_scope="all",  # the readout's gradient explodes with the hidden state it reads
            prometheus=options.port,
            seed=options.seed,
        )
    except Exception as exc:
        _remove_if_empty(log_path)  # nothing was logged: leave no empty file that a report calls "empty"
        if isinstance(exc, ValueError) and options.port is not None and "port" in str(exc):
            raise DemoSetupError(
                f"cannot start the Prometheus exporter on port {options.port}: {exc}\n"
                "Try `gradwatch demo --port 0` (any free port) or `--no-prometheus`."
            ) from exc
        raise
    return monitor


def _remove_if_empty(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.stat().st_size == 0:
            path.unlink()


def _prometheus_url(monitor: Monitor) -> str | None:
    for sink in monitor.sinks:
        if isinstance(sink, HasUrl) and isinstance(sink.url, str):
            return sink.url
    return None


def held_out_mse(model: torch.nn.Module, seq_len: int, seed: int) -> float:
    """MSE on a held-out batch of the adding problem (its own generator: the training data is untouched)."""
    batch = adding_problem_batch(torch.Generator().manual_seed(10_000 + seed), seq_len, HELD_OUT_SEQUENCES)
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(model(batch.inputs), batch.targets))


def _make_optimizer(model: torch.nn.Module, scenario: Scenario) -> torch.optim.Optimizer:
    if scenario.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=scenario.learning_rate)
    return torch.optim.SGD(model.parameters(), lr=scenario.learning_rate)


def run_demo(options: DemoOptions, console: Console) -> DemoResult:
    """Train the scenario's network with the monitor on, printing progress, alerts and the final report."""
    scenario = scenario_for(options.scenario, options.cell, options.seq_len)
    console.rule(f"gradwatch demo: {scenario.name} {scenario.cell}")
    baseline = f"always predicting 1 gives MSE {BASELINE_MSE:.3f}"
    console.print(f"Task: the adding problem, T = {scenario.seq_len} ({baseline}).")
    console.print(f"Model: {scenario.describe()}.", highlight=False, markup=False)
    if scenario.adjusted:
        console.print(
            f"[bold]Adjusted:[/] --cell {scenario.requested_cell} with --scenario {scenario.name} "
            f"trains --cell {scenario.cell}.",
        )
    expected = Text("Expected verdict: ")
    expected.append(scenario.expected_verdict, style="bold")
    expected.append(f". Why: {scenario.why}")
    console.print(expected, highlight=False)

    torch.manual_seed(options.seed)
    model = build_model(scenario, options.hidden_size)
    optimizer = _make_optimizer(model, scenario)
    generator = torch.Generator().manual_seed(options.seed)
    options.log_dir.mkdir(parents=True, exist_ok=True)
    run_id = new_run_id()
    log_path = options.log_dir / f"demo-{scenario.name}-{scenario.cell}-{run_id}.jsonl"
    printer = AlertPrinter(console)
    started = time.perf_counter()
    loss_value = math.nan
    with _alerts_shown_once(), _one_torch_thread():
        monitor = _start_monitor(model, optimizer, options, scenario, log_path, printer, run_id)
        url = _prometheus_url(monitor)
        # soft_wrap: a path or URL is never broken across lines (people copy them)
        console.print(f"Run log: {log_path}", highlight=False, soft_wrap=True, markup=False)
        console.print(
            f"Prometheus metrics: {url}" if url else "Prometheus exporter: off",
            highlight=False,
            soft_wrap=True,
            markup=False,
        )
        progress = Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("mean σmax(J_t) {task.fields[sigma]}"),
            TextColumn("λ {task.fields[lyapunov]}"),
            TimeElapsedColumn(),
            console=console,
        )
        interrupted = False
        try:
            with progress:
                task = progress.add_task("training", total=options.steps, **live_fields(loss_value, ()))
                for _ in range(options.steps):
                    batch = adding_problem_batch(generator, scenario.seq_len, options.batch_size)
                    loss = torch.nn.functional.mse_loss(model(batch.inputs), batch.targets)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()  # the monitor measures and clips from the optimizer's step pre-hook
                    loss_value = loss.item()
                    progress.update(task, advance=1, **live_fields(loss_value, monitor.history))
        except KeyboardInterrupt:
            interrupted = True
        finally:
            monitor.close()
    if interrupted:
        done = monitor.current_step  # the optimizer steps that completed
        console.print(
            f"Interrupted at step {done} of {options.steps}. The run log so far: {log_path}\n"
            f"Read it with: gradwatch report {log_path}",
            highlight=False,
            soft_wrap=True,
            markup=False,
        )
        raise DemoInterrupted(log_path, done)
    seconds = time.perf_counter() - started
    outcome = Outcome(held_out_mse(model, scenario.seq_len, options.seed))
    latest = latest_layer_measurement(monitor.history)
    report = make_report([str(log_path)], ReportOptions())
    render_text(report, console)
    verdict = max(
        (layer.verdict.verdict for _, layer in report.layer_verdicts()),
        key=SEVERITY.__getitem__,
        default=Verdict.HEALTHY,
    )
    result = DemoResult(
        scenario,
        log_path,
        url,
        loss_value,
        tuple(printer.alerts),
        report,
        verdict,
        seconds,
        outcome,
        None if latest is None else latest.metrics.gradient_reach,
        None if latest is None else latest.metrics.horizon,
    )
    _print_summary(result, console)
    return result


def run_comparison(options: DemoOptions, console: Console) -> tuple[DemoResult, DemoResult]:
    """The default demo: the vanishing model, then the healthy one of the same cell, and both verdicts
    beside both outcomes (the vanishing model stays at the baseline loss while the healthy one learns)."""
    results = (
        run_demo(replace(options, scenario="vanishing"), console),
        run_demo(replace(options, scenario="healthy"), console),
    )
    console.rule("verdict and outcome")
    table = Table(show_header=True, header_style="bold", box=None)
    for column in ("scenario", "model", "verdict", "gradient reach", "outcome"):
        table.add_column(column)
    for result in results:
        table.add_row(*_verdict_and_outcome(result))
    console.print(table)
    return results


def _reach_text(result: DemoResult) -> str:
    if result.reach is None or result.horizon is None:
        return "n/a"
    if result.reach >= result.horizon:
        return f"the whole horizon of {result.horizon} steps"
    return (
        f"{result.reach:.0f} of {result.horizon} steps"
        if result.reach >= 9.95
        else (f"{result.reach:.1f} of {result.horizon} steps")
    )


def _verdict_and_outcome(result: DemoResult) -> tuple[str, str, str, str, str]:
    colour = {"healthy": "green", "vanishing": "yellow", "exploding": "red"}.get(
        result.verdict.value, "magenta"
    )
    return (
        result.scenario.name,
        result.scenario.describe().split(", sequence length")[0],
        f"[{colour}]{result.verdict.value}[/]",
        _reach_text(result),
        result.outcome.describe(),
    )


def _print_summary(result: DemoResult, console: Console) -> None:
    scenario = result.scenario
    mark = "as expected" if result.as_expected else f"expected {scenario.expected_verdict}"
    console.print(
        f"Verdict: [bold]{result.verdict.value}[/] ({mark}), gradient reach {_reach_text(result)}; "
        f"outcome: {result.outcome.describe()}; {result.seconds:.1f} s.",
        highlight=False,
        soft_wrap=True,  # one line: verdict and outcome side by side
    )
    console.print(
        f"Run log: {result.log_path}  (gradwatch report {result.log_path} --format html -o report.html)",
        highlight=False,
        soft_wrap=True,
        markup=False,
    )
    others = [name for name in ("healthy", "vanishing", "exploding") if name != scenario.name]
    console.print(
        f"Try next: gradwatch demo --scenario {others[0]}, --scenario {others[1]}, or --cell lstm / gru.",
        highlight=False,
    )

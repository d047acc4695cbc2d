"""Same verdicts: the economy estimator (the default) and estimator="full" raise the same alerts at the
same steps and reach the same verdicts on the detector's calibrated cases (the demo's scenarios: real
training runs whose 8 measured sequences x T steps are more (t, sequence) pairs than the sample)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from rich.console import Console

import gradwatch
from gradwatch.demo.scenarios import build_model, scenario_for
from gradwatch.demo.task import adding_problem_batch
from gradwatch.records import Alert
from gradwatch.report.command import make_report
from gradwatch.report.render_text import render_text
from gradwatch.report.summary import ReportOptions

SCENARIOS = [
    ("healthy", "rnn"),
    ("vanishing", "rnn"),
    ("exploding", "rnn"),
    ("vanishing", "lstm"),
    ("healthy", "gru"),
    ("vanishing", "gru"),
]


def _run(
    name: str, cell: str, estimator: str, log: Path
) -> tuple[list[tuple[str, int, str]], list[str], int]:
    """Alerts (kind, step, metric), the report's verdicts and the sample size of one seeded demo run."""
    scenario = scenario_for(name, cell)
    torch.manual_seed(0)
    model = build_model(scenario, hidden_size=32)
    optimizer = torch.optim.SGD(model.parameters(), lr=scenario.learning_rate)
    generator = torch.Generator().manual_seed(0)
    alerts: list[Alert] = []
    monitor = gradwatch.watch(
        model,
        optimizer,
        every=5,
        log=log,
        on_alert=alerts.append,
        clip=scenario.clip,
        clip_scope="all",
        estimator=estimator,
        # 40 steps: inside the vanishing warm-up (100 steps), which would hold every vanishing alert back
        detection=gradwatch.DetectionConfig(vanishing_warmup_steps=0),
    )
    try:
        for _ in range(40):
            batch = adding_problem_batch(generator, scenario.seq_len, 32)
            loss = torch.nn.functional.mse_loss(model(batch.inputs), batch.targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        samples = {r.metrics.step_sample for r in monitor.history if hasattr(r, "metrics")}
    finally:
        monitor.close()
    report = make_report([str(log)], ReportOptions())
    verdicts = [layer.verdict.verdict.value for _, layer in report.layer_verdicts()]
    assert len(samples) == 1
    return [(str(a.alert), a.step, a.metric) for a in alerts], verdicts, samples.pop() or 0


@pytest.mark.parametrize(("name", "cell"), SCENARIOS, ids=[f"{n}-{c}" for n, c in SCENARIOS])
def test_economy_and_full_give_the_same_alerts_and_verdicts(name: str, cell: str, tmp_path: Path) -> None:
    economy = _run(name, cell, "economy", tmp_path / "economy.jsonl")
    full = _run(name, cell, "full", tmp_path / "full.jsonl")
    assert economy[:2] == full[:2]
    assert economy[1] == [scenario_for(name, cell).expected_verdict]
    assert economy[2] < full[2]  # the economy run really sampled


def test_the_report_says_which_estimator_wrote_the_run(tmp_path: Path) -> None:
    notes = {}
    for estimator in ("economy", "full"):
        log = tmp_path / f"{estimator}.jsonl"
        _run("healthy", "gru", estimator, log)
        console = Console(width=200, record=True, file=io.StringIO())
        render_text(make_report([str(log)], ReportOptions()), console)
        notes[estimator] = [line for line in console.export_text().splitlines() if "estimator:" in line]
    assert notes["economy"] == [
        "estimator: economy (σmax(J_t) summaries and max over a stratified sample of up to 64 (t, sequence) "
        "pairs; lags and λ over up to 8 sequences)"
    ]
    assert notes["full"] == ["estimator: full (every (t, sequence) pair and sequence)"]

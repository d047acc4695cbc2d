"""`gradwatch demo`: the task, the scenarios' initialisation, and short CLI runs that reach each verdict."""

from __future__ import annotations

import io
import json
import socket
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from rich.console import Console

from gradwatch.cli import main
from gradwatch.demo import DemoOptions, adding_problem_batch, build_model, scenario_for
from gradwatch.demo.run import AlertPrinter, latest_layer_measurement, live_fields
from gradwatch.demo.scenarios import CELLS, SCENARIOS
from gradwatch.records import Alert, AlertKind, Measurement, MeasurementMetrics, RunHeader
from gradwatch.report.command import make_report, render
from gradwatch.report.summary import ReportOptions


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


# --- the task --------------------------------------------------------------------------------------------


def test_adding_problem_marks_two_steps_and_targets_their_sum() -> None:
    generator = torch.Generator().manual_seed(3)
    batch = adding_problem_batch(generator, seq_len=17, batch_size=64)
    assert batch.inputs.shape == (17, 64, 2)
    assert batch.targets.shape == (64, 1)
    values, markers = batch.inputs[..., 0], batch.inputs[..., 1]
    assert torch.equal(markers.sum(0), torch.full((64,), 2.0))
    assert set(markers.unique().tolist()) == {0.0, 1.0}
    # Independent computation of the target: pick the two marked values by their indices.
    for b in range(64):
        marked = markers[:, b].nonzero().flatten()
        assert len(marked) == 2
        assert batch.targets[b, 0].item() == pytest.approx(values[marked, b].sum().item(), abs=1e-6)
    assert ((values >= 0) & (values < 1)).all()


@pytest.mark.parametrize(("seq_len", "batch_size"), [(1, 4), (5, 0)], ids=["too-short", "empty-batch"])
def test_adding_problem_rejects_bad_sizes(seq_len: int, batch_size: int) -> None:
    with pytest.raises(ValueError, match=r"seq_len|batch_size"):
        adding_problem_batch(torch.Generator(), seq_len, batch_size)


# --- the scenarios ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("name", SCENARIOS)
def test_every_scenario_builds_the_initialisation_it_describes(name: str, cell: str) -> None:
    scenario = scenario_for(name, cell)
    model = build_model(scenario, hidden_size=16)
    rnn = model.rnn
    assert type(rnn).__name__ == scenario.cell.upper()
    assert rnn.mode.startswith({"rnn": "RNN", "lstm": "LSTM", "gru": "GRU"}[scenario.cell])
    # Each gate block of W_hh is gain x orthogonal: every singular value equals the gain.
    for block in rnn.weight_hh_l0.detach().split(16, dim=0):
        singular_values = torch.linalg.svdvals(block)
        torch.testing.assert_close(
            singular_values, torch.full((16,), scenario.recurrent_gain), rtol=1e-5, atol=1e-5
        )
    total_bias = (rnn.bias_ih_l0 + rnn.bias_hh_l0).detach()
    gate_block = {"lstm": 1, "gru": 1}.get(scenario.cell)  # LSTM (i, f, g, o) forget; GRU (r, z, n) update
    if scenario.gate_bias is not None and gate_block is not None:
        gate = total_bias[gate_block * 16 : (gate_block + 1) * 16]
        torch.testing.assert_close(gate, torch.full((16,), scenario.gate_bias))
    if scenario.cell == "rnn" and scenario.nonlinearity == "relu":
        assert torch.count_nonzero(total_bias) == 0
    assert scenario.expected_verdict == name


def test_exploding_gru_is_adjusted_and_says_so() -> None:
    scenario = scenario_for("exploding", "gru")
    assert scenario.adjusted
    assert (scenario.requested_cell, scenario.cell, scenario.nonlinearity) == ("gru", "rnn", "relu")
    assert "GRU" in scenario.why
    assert not scenario_for("exploding", "lstm").adjusted


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"scenario": "chaotic"}, "unknown scenario 'chaotic'"),
        ({"cell": "transformer"}, "unknown cell 'transformer'"),
        ({"seq_len": 1}, "seq_len must be an integer >= 2"),
        ({"steps": 0}, "steps must be a positive integer"),
        ({"port": 70000}, "port must be in 0..65535"),
    ],
    ids=["scenario", "cell", "seq-len", "steps", "port"],
)
def test_demo_options_name_the_bad_value(arguments: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DemoOptions(**arguments)  # type: ignore[arg-type]


def _measurement(step: int, layer: int, sigma: float, lyapunov: float) -> Measurement:
    metrics = MeasurementMetrics(sigma, sigma, sigma, sigma, 0.0, 1.0, 0.5, 0.0, lyapunov)
    return Measurement(step=step, time=0.0, module="rnn", layer=layer, direction="forward", metrics=metrics)


def test_live_fields_show_the_newest_layer_zero_measurement() -> None:
    header = RunHeader(run_id="r", started=0.0, gradwatch="x", torch="y", config={}, modules=())
    history = [
        header,
        _measurement(0, 0, 0.5, -1.0),
        _measurement(10, 0, 0.25, -1.5),
        _measurement(10, 1, 9.0, 2.0),
    ]
    latest = latest_layer_measurement(history)
    assert latest is not None and latest.step == 10 and latest.layer == 0
    assert live_fields(0.1234, history) == {"loss": "0.123", "sigma": "0.25", "lyapunov": "-1.500"}
    assert live_fields(float("nan"), [header]) == {"loss": "-", "sigma": "-", "lyapunov": "-"}


# --- short CLI runs --------------------------------------------------------------------------------------


def _verdicts(log_dir: Path) -> tuple[Path, dict[tuple[str, int, str], str]]:
    """The run log the demo wrote and the verdict per layer, read back with the report's JSON form."""
    (log,) = sorted(log_dir.glob("demo-*.jsonl"))
    report = json.loads(render(make_report([str(log)], ReportOptions()), "json"))
    verdicts = {
        (layer["module"], layer["layer"], layer["direction"]): layer["verdict"]["verdict"]
        for run in report["runs"]
        for layer in run["layers"]
    }
    return log, verdicts


@pytest.mark.parametrize(
    ("scenario", "cell", "steps", "alert_line"),
    [
        # the vanishing warm-up is 100 steps: then 5 measurements of a short reach (every 10)
        ("vanishing", "rnn", 150, "VANISHING at step 140"),
        # the mean lag-30 norm over the measured sequences is 1.6e4 at step 0, beyond the extreme bound 1e4
        ("exploding", "rnn", 40, "EXPLODING at step 0"),
        # 6 measurements past the warm-up (steps 100-125): the rule judges it healthy
        ("healthy", "lstm", 130, None),
    ],
    ids=["vanishing-rnn", "exploding-rnn", "healthy-lstm"],
)
def test_demo_reaches_the_scenarios_verdict(
    runner: CliRunner, tmp_path: Path, scenario: str, cell: str, steps: int, alert_line: str | None
) -> None:
    every = "10" if scenario == "vanishing" else "5"
    result = runner.invoke(
        main,
        [
            *("demo", "--scenario", scenario, "--cell", cell, "--steps", str(steps), "--every", every),
            *("--no-prometheus", "--log-dir", str(tmp_path)),
        ],
    )
    assert result.exit_code == 0, result.output
    log, verdicts = _verdicts(tmp_path)
    assert verdicts == {("rnn", 0, "forward"): scenario}
    header = json.loads(log.read_text().splitlines()[0])
    assert header["name"] == f"demo {scenario} {cell}"  # the run names its scenario
    assert log.name == f"demo-{scenario}-{cell}-{header['run_id']}.jsonl"  # file name and run id agree
    assert f"Run log: {log}" in result.output
    assert f"Verdict: {scenario} (as expected)" in result.output
    assert "outcome: held-out MSE" in result.output and "(baseline 0.167)" in result.output
    assert "Prometheus exporter: off" in result.output
    if alert_line is None:
        assert "at step" not in result.output.split("Run log:")[1].split("training")[0]
    else:
        assert alert_line in result.output
    assert "Summary:" in result.output  # the text report was printed at the end


def test_demo_serves_prometheus_on_a_free_port(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(
        main, ["demo", "--scenario", "healthy", "--steps", "3", "--port", "0", "--log-dir", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    assert (
        "Prometheus metrics: http://127.0.0.1:" in result.output
        or "Prometheus metrics: http://localhost:" in result.output
    )


def test_demo_port_in_use_says_what_to_do_and_leaves_no_empty_log(runner: CliRunner, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = runner.invoke(
            main, ["demo", "--steps", "2", "--port", str(port), "--log-dir", str(tmp_path)]
        )
    assert result.exit_code == 1
    assert f"port {port}" in result.output
    assert "--port 0" in result.output and "--no-prometheus" in result.output
    assert list(tmp_path.glob("*.jsonl")) == []  # no 0-byte log for a later report to call "empty"


def test_demo_rejects_unknown_choices(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(main, ["demo", "--cell", "transformer", "--log-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "transformer" in result.output and "rnn" in result.output
    assert not list(tmp_path.iterdir())


def test_live_alerts_keep_their_bracketed_evidence() -> None:
    """A message's "[sigma_max(W_hh) = ...]" is text, not rich markup (it was eaten as a style tag)."""
    console = Console(file=io.StringIO(), width=300, no_color=True)
    printer = AlertPrinter(console)
    message = "the product shrinks every step [sigma_max(W_hh) = 0.2, mean |f'| = 0.9]. Hint: [/] orthogonal"
    printer(Alert(10, 0.0, "rnn", 0, "forward", AlertKind.VANISHING, "lyapunov_max", -1.6, -0.8, message))
    assert console.file.getvalue().strip() == f"VANISHING at step 10: {message}"


def test_ctrl_c_in_the_demo_points_at_the_partial_log(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gradwatch.demo.run as demo_run

    batches = 0
    real_batch = demo_run.adding_problem_batch

    def interrupting_batch(*args: object, **kwargs: object) -> object:
        nonlocal batches
        batches += 1
        if batches == 4:
            raise KeyboardInterrupt
        return real_batch(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(demo_run, "adding_problem_batch", interrupting_batch)
    result = runner.invoke(
        main, ["demo", "--steps", "50", "--every", "1", "--no-prometheus", "--log-dir", str(tmp_path)]
    )
    assert result.exit_code == 130
    (log,) = tmp_path.glob("demo-*.jsonl")
    assert "Interrupted at step 3 of 50" in result.output
    assert f"gradwatch report {log}" in " ".join(result.output.split())
    kinds = [json.loads(line)["kind"] for line in log.read_text().splitlines()]
    assert kinds[0] == "run" and kinds.count("measurement") == 3  # the steps before Ctrl-C, all logged


def test_the_outcome_is_read_against_the_baseline_of_always_predicting_one() -> None:
    from gradwatch.demo import Outcome

    assert Outcome(0.01).kind == "learned" and "learned the task" in Outcome(0.01).describe()
    assert Outcome(0.16).kind == "baseline" and "stays at the baseline" in Outcome(0.16).describe()
    assert Outcome(0.5).kind == "diverged" and Outcome(float("nan")).kind == "diverged"
    assert Outcome(0.084).kind == "baseline" and Outcome(0.083).kind == "learned"  # half of 1/6


def test_the_default_demo_puts_both_verdicts_beside_both_outcomes(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(
        main, ["demo", "--steps", "12", "--every", "5", "--no-prometheus", "--log-dir", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    assert "gradwatch demo: vanishing rnn" in result.output and "gradwatch demo: healthy rnn" in result.output
    table = result.output.split("verdict and outcome")[1]
    rows = [line for line in table.splitlines() if line.strip().startswith(("vanishing", "healthy"))]
    assert [row.split()[0] for row in rows] == ["vanishing", "healthy"]
    assert table.count("held-out MSE") == 2 and "W_hh = 1 x identity" in table
    assert len(list(tmp_path.glob("demo-*.jsonl"))) == 2

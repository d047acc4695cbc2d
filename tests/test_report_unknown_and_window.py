"""One judge in the report: ``unknown`` below the measurements the rule needs, never-measured layers, the
``--steps`` window judged from its own measurements (an episode opened before it and still open counts),
and ``--fail-on unknown``. Through the CLI (every format) and on the pure verdict functions."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from gradwatch.cli import main
from gradwatch.policy.config import DetectionConfig
from gradwatch.records import Alert, AlertKind, Measurement, MeasurementMetrics, RunHeader
from gradwatch.report.command import make_report, render
from gradwatch.report.reader import read_logs
from gradwatch.report.summary import ReportOptions, StepRange, build_report, run_detection
from gradwatch.report.verdict import Verdict, fallback_verdict, judge_layer
from tests.report_logs import make_run, write_log

pytest_plugins = ["tests.report_fixtures"]

NEEDED = DetectionConfig().measurements_needed
WARM = DetectionConfig().vanishing_warmup_steps  # measurements count towards NEEDED from this step on


def run_report(runner: CliRunner, *args: str) -> Result:
    return runner.invoke(main, ["report", *args], catch_exceptions=False)


def json_layers(runner: CliRunner, *args: str) -> list[dict]:
    result = run_report(runner, "--format", "json", *args)
    return [layer for run in json.loads(result.stdout)["runs"] for layer in run["layers"]]


def _m(step: int, lyapunov: float, lag: float) -> Measurement:
    metrics = MeasurementMetrics(
        0.9, 0.5, 1.0, 1.0, 0.1, 1.0, 0.6, 0.05, lyapunov, {"1": 0.9, "32": lag}, {"w": 1.0}
    )
    return Measurement(step, 0.0, "rnn", 0, "forward", metrics)


def _alert(step: int, kind: AlertKind) -> Alert:
    return Alert(step, 0.0, "rnn", 0, "forward", kind, "lyapunov_max", -1.0, -0.8, kind.value)


# --- unknown: fewer measurements than the rule needs ----------------------------------------------------


@pytest.mark.parametrize("count", range(NEEDED + 1), ids=lambda n: f"{n}-measurements")
def test_fallback_is_unknown_below_the_measurements_the_rule_needs(count: int) -> None:
    measurements = [_m(WARM + 10 * i, -0.05, 0.5) for i in range(count)]
    verdict, reason = fallback_verdict(measurements)
    if count < NEEDED:
        assert verdict is Verdict.UNKNOWN
        expected = "no measurement" if count == 0 else f"{count} measurement{'s' if count > 1 else ''}"
        assert reason == f"{expected}; the rule needs {NEEDED}"
    else:
        assert verdict is Verdict.HEALTHY


def test_alert_path_is_unknown_without_enough_measurements_but_an_open_episode_decides() -> None:
    one = [_m(0, -0.05, 0.5)]
    assert judge_layer(one, [], run_has_alerts=True).verdict is Verdict.UNKNOWN
    assert (
        judge_layer(one, [_alert(0, AlertKind.EXPLODING)], run_has_alerts=True).verdict is Verdict.EXPLODING
    )


def test_a_single_short_run_is_unknown_in_every_format(cli_runner: CliRunner, tmp_path: Path) -> None:
    log = write_log(tmp_path / "short.jsonl", make_run("healthy", measurements=1, first_step=WARM))
    reason = f"1 measurement; the rule needs {NEEDED}"
    (layer,) = json_layers(cli_runner, str(log))
    assert layer["verdict"]["verdict"] == "unknown" and layer["verdict"]["reason"] == reason
    text = run_report(cli_runner, str(log)).stdout
    assert "unknown" in text and reason in text and "Summary: 0 healthy, 1 unknown" in text
    markdown = run_report(cli_runner, str(log), "--format", "markdown").stdout
    assert "❔ **unknown**" in markdown and reason in markdown
    html = run_report(cli_runner, str(log), "--format", "html").stdout
    assert re.search(r'class="verdict"[^>]*>unknown<', html) and reason in html


def test_fail_on_unknown_is_opt_in(cli_runner: CliRunner, tmp_path: Path) -> None:
    log = write_log(tmp_path / "short.jsonl", make_run("healthy", measurements=2, first_step=WARM))
    assert run_report(cli_runner, str(log), "--fail-on", "vanishing,exploding,nonfinite").exit_code == 0
    failed = run_report(cli_runner, str(log), "--fail-on", "unknown")
    assert failed.exit_code == 1
    assert "is unknown (2 measurements; the rule needs" in failed.stderr
    healthy = write_log(tmp_path / "long.jsonl", make_run("healthy", measurements=NEEDED + 2))
    assert run_report(cli_runner, str(healthy), "--fail-on", "unknown").exit_code == 0


def test_fail_on_unknown_counts_a_run_without_any_measurement(cli_runner: CliRunner, tmp_path: Path) -> None:
    log = write_log(tmp_path / "none.jsonl", make_run("healthy", measurements=0))
    assert run_report(cli_runner, str(log), "--fail-on", "exploding").exit_code == 0
    failed = run_report(cli_runner, str(log), "--fail-on", "unknown")
    assert failed.exit_code == 1 and "no layer was measured" in failed.stderr


def test_fail_on_help_says_what_unknown_does(cli_runner: CliRunner) -> None:
    text = " ".join(cli_runner.invoke(main, ["report", "--help"]).stdout.split())
    assert "unknown" in text and "fails only when unknown is named" in text


def test_a_watched_module_never_measured_is_unknown(cli_runner: CliRunner, tmp_path: Path) -> None:
    records = make_run("healthy", measurements=NEEDED, first_step=WARM)
    header = records[0]
    assert isinstance(header, RunHeader)
    decoder = {"name": "decoder.lstm", "type": "LSTM", "layers": 2, "directions": ["forward"]}
    records[0] = RunHeader(**{**header.__dict__, "modules": (*header.modules, decoder)})
    log = write_log(tmp_path / "two.jsonl", records)
    layers = {(layer["module"], layer["layer"]): layer for layer in json_layers(cli_runner, str(log))}
    assert layers[("encoder.rnn", 0)]["verdict"]["verdict"] == "healthy"
    for index in (0, 1):
        never = layers[("decoder.lstm", index)]
        assert never["verdict"]["verdict"] == "unknown" and never["measurements"] == 0
        assert never["verdict"]["reason"].startswith("never measured")
    # the streamed and the whole-file report agree
    options = ReportOptions()
    assert make_report([str(log)], options) == build_report(read_logs([str(log)]), options)


# --- the --steps window ---------------------------------------------------------------------------------


def _first_alert_step(records: list, kind: AlertKind) -> int:
    return next(r.step for r in records if isinstance(r, Alert) and r.alert == kind)


@pytest.mark.parametrize("with_alerts", [True, False], ids=["alerts", "detector-replay"])
def test_an_episode_opened_before_the_window_and_still_open_counts(
    cli_runner: CliRunner, tmp_path: Path, with_alerts: bool
) -> None:
    records = make_run("vanishing", measurements=30)
    start = _first_alert_step(records, AlertKind.VANISHING) + 100  # the episode opened before the window
    log = write_log(tmp_path / "v.jsonl", make_run("vanishing", measurements=30, with_alerts=with_alerts))
    (layer,) = json_layers(cli_runner, str(log), "--steps", f"{start}:")
    assert layer["steps"]["first"] >= start
    assert layer["verdict"]["verdict"] == "vanishing", layer["verdict"]["reason"]
    options = ReportOptions(steps=StepRange(start, None))
    streamed = make_report([str(log)], options)
    assert streamed == build_report(read_logs([str(log)]), options)
    assert render(streamed, "text") == render(build_report(read_logs([str(log)]), options), "text")


def test_an_episode_recovered_before_the_window_is_neither_open_nor_listed() -> None:
    window = [_m(s, -0.05, 0.5) for s in range(100, 160, 10)]
    before_alerts = [_alert(10, AlertKind.VANISHING), _alert(50, AlertKind.RECOVERED)]
    verdict = judge_layer(
        window, [], run_has_alerts=True, before=([], before_alerts), window=" in steps 100:"
    )
    assert verdict.verdict is Verdict.HEALTHY and verdict.recovered == ()
    still_open = judge_layer(
        window, [], run_has_alerts=True, before=([], before_alerts[:1]), window=" in steps 100:"
    )
    assert still_open.verdict is Verdict.VANISHING and "step 10" in still_open.reason


def test_a_window_with_too_few_measurements_is_unknown_and_says_the_window(
    cli_runner: CliRunner, tmp_path: Path
) -> None:
    log = write_log(tmp_path / "h.jsonl", make_run("healthy", measurements=20, every=50))
    (layer,) = json_layers(cli_runner, str(log), "--steps", "900:")
    assert layer["measurements"] == 2
    assert layer["verdict"]["verdict"] == "unknown"
    assert layer["verdict"]["reason"] == f"2 measurements in steps 900:; the rule needs {NEEDED}"


def test_alerts_after_the_window_do_not_judge_it(cli_runner: CliRunner, tmp_path: Path) -> None:
    records = make_run("exploding", measurements=20)
    onset = _first_alert_step(records, AlertKind.EXPLODING)
    log = write_log(tmp_path / "e.jsonl", records)
    (layer,) = json_layers(cli_runner, str(log), "--steps", f":{onset}")
    assert layer["verdict"]["verdict"] == "healthy"
    (layer,) = json_layers(cli_runner, str(log), "--steps", f":{onset + 1}")
    assert layer["verdict"]["verdict"] == "exploding"


# --- a diverged run stays exploding in the report too ---------------------------------------------------


@pytest.mark.parametrize(
    ("lyapunov", "lags", "grad"),
    [
        (0.305, {"1": 2.0, "64": 0.0, "150": None}, 2.2e36),
        (-0.05, {"1": 0.9, "32": 0.5}, 2.2e36),
        (-0.05, {"1": 0.9, "32": 0.5}, None),
    ],
    ids=["overflowed-product-1e36-gradient", "1e36-gradient", "null-gradient"],
)
def test_the_report_keeps_a_diverged_run_exploding(
    cli_runner: CliRunner, tmp_path: Path, lyapunov: float, lags: dict, grad: float | None
) -> None:
    """Issue #28's dead relu run: exploding at first, then lambda 0.305 with the lag-64 norm 0.0 and a
    total gradient norm of 2.2e36; the detector's replay (a log without alerts) must not call it recovered,
    nor a run whose gradients diverged while its Jacobians read healthy."""

    def reading(step: int, lyapunov: float, lags: dict, norm: float | None) -> Measurement:
        metrics = MeasurementMetrics(2.0, 1.0, 3.0, 3.0, 1.0, 2.0, 0.9, 0.0, lyapunov, lags, {"w": norm})
        return Measurement(step, float(step), "rnn", 0, "forward", metrics, run_id="dead")

    records = [reading(10 * i, 0.3, {"1": 2.0, "32": 1e3}, 1.0) for i in range(3)]
    records += [reading(10 * i, lyapunov, lags, grad) for i in range(3, 20)]
    log = write_log(tmp_path / "dead.jsonl", records)
    (layer,) = json_layers(cli_runner, str(log))
    assert layer["verdict"]["verdict"] == "exploding", layer["verdict"]["reason"]
    options = ReportOptions()
    assert make_report([str(log)], options) == build_report(read_logs([str(log)]), options)


def test_a_real_run_measured_once_is_unknown_not_healthy(cli_runner: CliRunner, tmp_path: Path) -> None:
    """Issue #28's repro in small: a loop measured only at step 0 (every=1000) used to report healthy."""
    import torch
    from torch import nn

    import gradwatch

    torch.manual_seed(0)
    model = nn.RNN(3, 8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    log = tmp_path / "once.jsonl"
    with gradwatch.watch(model, optimizer, every=1000, log=log, background=False):
        for _ in range(5):
            output, _ = model(torch.randn(12, 4, 3))
            optimizer.zero_grad()
            output.square().mean().backward()
            optimizer.step()
    (layer,) = json_layers(cli_runner, str(log))
    assert layer["measurements"] == 1
    assert (layer["verdict"]["verdict"], layer["verdict"]["reason"]) == (
        "unknown",
        f"1 measurement, inside the {WARM}-step warm-up; the rule needs {NEEDED} after it",
    )
    assert run_report(cli_runner, str(log), "--fail-on", "unknown").exit_code == 1


@pytest.mark.parametrize(
    ("patience", "verdict"), [(1, "healthy"), (5, "unknown")], ids=["patience-1", "patience-5"]
)
def test_the_report_judges_with_the_detection_config_the_run_header_records(
    cli_runner: CliRunner, tmp_path: Path, patience: int, verdict: str
) -> None:
    """One judge: a run watched with DetectionConfig(patience=...) is judged by that rule, not the default."""
    records = make_run("healthy", measurements=2 if patience == 1 else 4)
    header = records[0]
    assert isinstance(header, RunHeader)
    config = {
        **header.config,
        "detection": {
            "patience": patience,
            "vanishing_patience": patience,
            "vanishing_warmup_steps": 0,  # every measurement counts (make_run starts at step 0)
            "some_future_field": 1,
        },
    }
    records[0] = RunHeader(**{**header.__dict__, "config": config})
    log = write_log(tmp_path / "own.jsonl", records)
    (layer,) = json_layers(cli_runner, str(log))
    assert layer["verdict"]["verdict"] == verdict
    if verdict == "unknown":
        assert layer["verdict"]["reason"] == "4 measurements; the rule needs 5"
    options = ReportOptions()
    assert make_report([str(log)], options) == build_report(read_logs([str(log)]), options)


def test_a_header_without_a_usable_detection_config_falls_back_to_the_default() -> None:
    assert DetectionConfig.from_json({"patience": 2}).patience == 2
    for bad in ({"patience": 0}, "patience", None):
        with pytest.raises(ValueError):
            DetectionConfig.from_json(bad)
    header = make_run("healthy", measurements=0)[0]
    assert isinstance(header, RunHeader)
    broken = RunHeader(**{**header.__dict__, "config": {"detection": {"patience": "three"}}})
    assert run_detection([broken]) == DetectionConfig()


# --- what counts towards the rule: judged measurements only (issue #28) ---------------------------------


def _unmeasurable(step: int) -> Measurement:
    """A measurement whose lag norms could not be measured (all null): no product to judge."""
    metrics = MeasurementMetrics(
        0.9, 0.5, 1.0, 1.0, 0.1, 1.0, 0.6, 0.05, None, {"1": None, "32": None}, {"w": 1.0}
    )
    return Measurement(step, 0.0, "rnn", 0, "forward", metrics, run_id="blind")


def _every_format_says(runner: CliRunner, log: Path, reason: str, *args: str) -> None:
    """The reason in the JSON verdict, once in the layer's verdict line of text and markdown, in the HTML
    layer section, and in --fail-on unknown's message."""
    (layer,) = json_layers(runner, str(log), *args)
    assert (layer["verdict"]["verdict"], layer["verdict"]["reason"]) == ("unknown", reason)
    text = " ".join(run_report(runner, str(log), *args).stdout.split())  # the console wraps long lines
    assert text.count(f"verdict: unknown — {reason}") == 1
    assert "no measurement" not in text
    markdown = run_report(runner, str(log), "--format", "markdown", *args).stdout
    assert markdown.count(f"❔ **unknown**: {reason}") == 1
    html = run_report(runner, str(log), "--format", "html", *args).stdout
    assert html.count(f"<p>{reason} <small>") == 1
    failed = run_report(runner, str(log), "--fail-on", "unknown", *args)
    assert failed.exit_code == 1 and f"is unknown ({reason})" in failed.stderr
    options = ReportOptions(steps=StepRange.parse(args[1]) if args else StepRange())
    assert make_report([str(log)], options) == build_report(read_logs([str(log)]), options)


def test_readings_inside_the_warm_up_do_not_count_in_the_report(
    cli_runner: CliRunner, tmp_path: Path
) -> None:
    """Steps 0, 30, 60 and 90 with the 100-step warm-up: four readings, none judged by the reach rule."""
    log = write_log(tmp_path / "warm.jsonl", make_run("healthy", measurements=4, every=30))
    reason = f"4 measurements, all inside the {WARM}-step warm-up; the rule needs {NEEDED} after it"
    _every_format_says(cli_runner, log, reason)


def test_a_layer_measured_many_times_without_a_lag_product_says_so(
    cli_runner: CliRunner, tmp_path: Path
) -> None:
    log = write_log(tmp_path / "blind.jsonl", [_unmeasurable(WARM + 10 * i) for i in range(12)])
    reason = (
        f"12 measurements, none with a usable lag product; the rule needs {NEEDED} after the {WARM}-step "
        "warm-up"
    )
    _every_format_says(cli_runner, log, reason)


def test_a_window_says_how_its_measurements_counted(cli_runner: CliRunner, tmp_path: Path) -> None:
    log = write_log(tmp_path / "h.jsonl", make_run("healthy", measurements=20, every=30))
    # steps 60 and 90 are inside the warm-up, 120 and 150 are judged
    reason = (
        f"4 measurements in steps 60:160, 2 judged (2 inside the {WARM}-step warm-up); "
        f"the rule needs {NEEDED} after the warm-up"
    )
    _every_format_says(cli_runner, log, reason, "--steps", "60:160")
    inside = write_log(tmp_path / "e.jsonl", make_run("healthy", measurements=20, every=50))
    (layer,) = json_layers(cli_runner, str(inside), "--steps", "0:100")
    assert layer["verdict"]["reason"] == (
        f"2 measurements in steps 0:100, all inside the {WARM}-step warm-up; the rule needs {NEEDED} after it"
    )


@pytest.mark.parametrize("with_alerts", [True, False], ids=["alerts", "detector-replay"])
def test_exactly_the_measurements_needed_give_a_verdict_and_one_fewer_is_unknown(
    cli_runner: CliRunner, tmp_path: Path, with_alerts: bool
) -> None:
    """Warm-up readings first (they never count), then NEEDED - 1 or NEEDED judged ones."""
    for judged, verdict in ((NEEDED - 1, "unknown"), (NEEDED, "healthy")):
        warm = make_run("healthy", measurements=2, every=50, with_alerts=with_alerts)
        past = make_run("healthy", measurements=judged, first_step=WARM, with_alerts=with_alerts)
        records = [*warm, *past[1:]]
        if with_alerts:  # another layer alerted: the run has alert records, this layer has none
            records.append(Alert(WARM, 0.0, "other", 0, "forward", AlertKind.VANISHING, "m", 1.0, 2.0, "x"))
        log = write_log(tmp_path / f"{judged}-{with_alerts}.jsonl", records)
        layer = next(x for x in json_layers(cli_runner, str(log)) if x["module"] == "encoder.rnn")
        assert layer["measurements"] == judged + 2
        assert layer["verdict"]["verdict"] == verdict, layer["verdict"]["reason"]
        if verdict == "unknown":
            assert layer["verdict"]["reason"] == (
                f"{judged + 2} measurements, {judged} judged (2 inside the {WARM}-step warm-up); "
                f"the rule needs {NEEDED} after the warm-up"
            )
        options = ReportOptions()
        assert make_report([str(log)], options) == build_report(read_logs([str(log)]), options)


def test_the_live_detector_and_the_report_give_the_same_unknown_reason(
    cli_runner: CliRunner, tmp_path: Path
) -> None:
    """One judge: a real run measured at steps 0, 30, 60, 90 (inside the warm-up) and 120 ends with one
    judged measurement; the monitor's detector and the report (and --fail-on unknown) say the same."""
    import torch
    from torch import nn

    import gradwatch

    torch.manual_seed(0)
    model = nn.RNN(3, 8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    log = tmp_path / "warm.jsonl"
    with gradwatch.watch(model, optimizer, every=30, log=log, background=False) as monitor:
        for _ in range(WARM + 30):
            output, _ = model(torch.randn(12, 4, 3))
            optimizer.zero_grad()
            output.square().mean().backward()
            optimizer.step()
    (layer,) = json_layers(cli_runner, str(log))
    assert layer["measurements"] == 5
    live = monitor.detector.judgement(layer["module"], layer["layer"], layer["direction"])
    reason = (
        f"5 measurements, 1 judged (4 inside the {WARM}-step warm-up); the rule needs {NEEDED} after the "
    )
    reason += "warm-up"
    assert (live.verdict.value, live.reason) == ("unknown", reason)
    assert (layer["verdict"]["verdict"], layer["verdict"]["reason"]) == ("unknown", reason)
    failed = run_report(cli_runner, str(log), "--fail-on", "unknown")
    assert failed.exit_code == 1 and f"is unknown ({reason})" in failed.stderr

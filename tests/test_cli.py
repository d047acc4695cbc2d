"""``gradwatch report`` end to end through click's CliRunner: every format, option and bad input."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from gradwatch.cli import main
from gradwatch.records import SCHEMA_VERSION, RunHeader
from gradwatch.report.reader import MAX_LINE_BYTES
from gradwatch.report.render_json import REPORT_JSON_SCHEMA
from tests.report_logs import make_run, write_log

pytest_plugins = ["tests.report_fixtures"]


def run_report(runner: CliRunner, *args: str, env: dict[str, str] | None = None) -> Result:
    return runner.invoke(main, ["report", *args], env=env, catch_exceptions=False)


def report_json(runner: CliRunner, *args: str) -> tuple[Result, dict]:
    result = run_report(runner, "--format", "json", *args)
    return result, json.loads(result.stdout)


def verdicts(data: dict) -> dict[str, str]:
    return {run["run_id"]: run["layers"][0]["verdict"]["verdict"] for run in data["runs"] if run["layers"]}


# --- formats --------------------------------------------------------------------------------------------


def test_text_is_default_plain_and_names_every_verdict(cli_runner: CliRunner, runs_dir: Path) -> None:
    result = run_report(cli_runner, str(runs_dir))
    assert result.exit_code == 0, result.stderr
    assert "\x1b[" not in result.stdout  # not a TTY: no colour codes
    for run_id in ("run-healthy", "run-vanishing", "run-exploding", "run-nonfinite", "run-recovered"):
        assert run_id in result.stdout
    assert "Summary: 2 healthy, 0 unknown, 1 vanishing, 1 exploding, 1 nonfinite" in result.stdout
    assert "recovered: exploding from step 500, recovered at step 700" in result.stdout
    assert "orthogonal" in result.stdout and "already clipped" in result.stdout  # the exploding run clips


def test_json_format_is_stable_and_complete(cli_runner: CliRunner, runs_dir: Path) -> None:
    result, data = report_json(cli_runner, str(runs_dir))
    assert result.exit_code == 0
    assert data["schema"] == REPORT_JSON_SCHEMA
    assert set(data) == {
        "schema",
        "generator",
        "files",
        "options",
        "verdicts",
        "runs",
        "problems",
        "skipped_unknown_kinds",
    }
    assert verdicts(data) == {
        "run-healthy": "healthy",
        "run-vanishing": "vanishing",
        "run-exploding": "exploding",
        "run-nonfinite": "nonfinite",
        "run-recovered": "healthy",
    }
    exploding = next(r for r in data["runs"] if r["run_id"] == "run-exploding")
    layer = exploding["layers"][0]
    assert layer["measurements"] == 20 and layer["steps"] == {"first": 0, "last": 950}
    assert layer["longest_lag"] == 32
    assert set(layer["metrics"]) >= {"jacobian_sigma_max_mean", "lyapunov_max", "lag_norm", "grad_norm"}
    assert layer["metrics"]["lyapunov_max"]["scale"] == "linear"
    assert layer["metrics"]["lag_norm"]["trend_per_1000_steps"] > 0
    assert exploding["clips"]["count"] == 8 and 0 < exploding["clips"]["median_scale"] < 1
    assert [a["alert"] for a in exploding["alerts"]] == ["exploding"]
    assert data["problems"] == []


def test_markdown_format(cli_runner: CliRunner, runs_dir: Path) -> None:
    result = run_report(cli_runner, str(runs_dir), "--format", "markdown")
    assert result.exit_code == 0
    assert result.stdout.startswith("# gradwatch report")
    assert "| layer | type | steps | verdict | cause |" in result.stdout
    assert "**vanishing**" in result.stdout and "<details>" in result.stdout


def test_html_is_one_self_contained_file(cli_runner: CliRunner, runs_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    result = run_report(cli_runner, str(runs_dir), "--format", "html", "--output", str(out))
    assert result.exit_code == 0 and result.stdout == ""
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    # five runs: per layer the lag-norm profile and one chart per metric with values (these logs have no
    # gate, no recorded reach and no spectrum: 9)
    assert page.count("<svg") == 5 * (1 + 9)
    assert page.count('class="chart profile"') == 5
    assert 'class="alert-mark"' in page
    for external in ("http:", "https:", "<script", "<link", "src=", "@import", "url("):
        assert external not in page


def test_hostile_module_names_are_escaped_in_every_format(
    cli_runner: CliRunner, make_log: Callable[..., Path], tmp_path: Path
) -> None:
    hostile = "<script>alert('x')</script>|**[x](y)**"
    log = make_log("exploding", module=hostile)
    html = run_report(cli_runner, str(log), "--format", "html").stdout
    assert "<script>" not in html and "&lt;script&gt;" in html
    markdown = run_report(cli_runner, str(log), "--format", "markdown").stdout
    assert "<script>" not in markdown and r"\<script\>" in markdown and r"\|" in markdown
    data = json.loads(run_report(cli_runner, str(log), "--format", "json").stdout)
    assert data["runs"][0]["layers"][0]["module"] == hostile  # json keeps the exact string
    text = run_report(cli_runner, str(log)).stdout
    assert "<script>alert('x')</script>" in text  # rich markup in names is shown, not interpreted


def test_text_colour_only_when_forced_and_no_color_unset(
    cli_runner: CliRunner, make_log: Callable[..., Path]
) -> None:
    from gradwatch.report.render_text import use_color

    class Tty:
        def isatty(self) -> bool:
            return True

    assert use_color(Tty(), {}) is True  # type: ignore[arg-type]
    assert use_color(Tty(), {"NO_COLOR": "1"}) is False  # type: ignore[arg-type]
    result = run_report(cli_runner, str(make_log("exploding")), env={"NO_COLOR": "1"})
    assert "\x1b[" not in result.stdout


# --- selection options ------------------------------------------------------------------------------------


def test_module_filter_accepts_globs(cli_runner: CliRunner, tmp_path: Path) -> None:
    records = make_run("healthy", run_id="two", module="encoder.rnn")
    records += make_run("vanishing", run_id="two", module="decoder.lstm")[1:]
    write_log(tmp_path / "two.jsonl", records)
    _, data = report_json(cli_runner, str(tmp_path / "two.jsonl"), "--module", "dec*")
    assert [layer["module"] for layer in data["runs"][0]["layers"]] == ["decoder.lstm"]
    _, data = report_json(cli_runner, str(tmp_path / "two.jsonl"), "--module", "encoder.rnn", "--module", "x")
    assert [layer["module"] for layer in data["runs"][0]["layers"]] == ["encoder.rnn"]


def test_steps_window_restricts_measurements_and_verdict(
    cli_runner: CliRunner, make_log: Callable[..., Path]
) -> None:
    log = make_log("exploding")
    _, data = report_json(cli_runner, str(log), "--steps", "100:400")
    layer = data["runs"][0]["layers"][0]
    assert layer["steps"] == {"first": 100, "last": 350} and layer["measurements"] == 6
    assert layer["verdict"]["verdict"] == "healthy"  # the explosion starts at step 500
    _, data = report_json(cli_runner, str(log), "--steps", "900:")
    assert data["runs"][0]["layers"][0]["steps"] == {"first": 900, "last": 950}


@pytest.mark.parametrize(
    "bad", ["5", "a:b", "10:5", "1:2:3"], ids=["no-colon", "not-int", "reversed", "extra"]
)
def test_bad_steps_are_rejected_with_the_accepted_form(
    cli_runner: CliRunner, make_log: Callable[..., Path], bad: str
) -> None:
    result = run_report(cli_runner, str(make_log("healthy")), "--steps", bad)
    assert result.exit_code == 2
    assert "A:B" in result.stderr and "Traceback" not in result.output


def test_metric_option_restricts_table_and_charts(
    cli_runner: CliRunner, make_log: Callable[..., Path]
) -> None:
    log = make_log("vanishing")
    _, data = report_json(cli_runner, str(log), "--metric", "lyapunov_max", "--metric", "lag_norm")
    assert list(data["runs"][0]["layers"][0]["metrics"]) == ["lyapunov_max", "lag_norm"]
    html = run_report(cli_runner, str(log), "--format", "html", "--metric", "grad_norm").stdout
    assert html.count("<svg") == 1
    bad = run_report(cli_runner, str(log), "--metric", "loss")
    assert bad.exit_code == 2 and "lyapunov_max" in bad.stderr


def test_ranks_kept_apart_or_merged(cli_runner: CliRunner, tmp_path: Path) -> None:
    write_log(tmp_path / "exp.rank0.jsonl", make_run("healthy", run_id="ddp", rank=0, world_size=2))
    write_log(tmp_path / "exp.rank1.jsonl", make_run("exploding", run_id="ddp", rank=1, world_size=2))
    _, apart = report_json(cli_runner, str(tmp_path / "exp.rank*.jsonl"))
    assert [(r["run_id"], r["ranks"]) for r in apart["runs"]] == [("ddp", [0]), ("ddp", [1])]
    assert [r["layers"][0]["verdict"]["verdict"] for r in apart["runs"]] == ["healthy", "exploding"]
    _, merged = report_json(cli_runner, str(tmp_path), "--merge-ranks")
    (run,) = merged["runs"]
    assert run["ranks"] == [0, 1] and run["merged_ranks"] is True
    layer = run["layers"][0]
    assert layer["ranks"] == [0, 1] and layer["verdict"]["verdict"] == "exploding"
    assert "on rank 1" in layer["verdict"]["reason"]
    assert layer["measurements"] == 40


@pytest.mark.parametrize(
    ("fail_on", "kind", "status"),
    [
        ("exploding", "exploding", 1),
        ("vanishing,nonfinite", "exploding", 0),
        ("vanishing,exploding,nonfinite", "vanishing", 1),
        ("non-finite", "nonfinite", 1),
        ("exploding", "recovered", 0),
        ("exploding", "healthy", 0),
    ],
    ids=["match", "no-match", "list", "alias", "recovered", "healthy"],
)
def test_fail_on_gates_the_exit_status(
    cli_runner: CliRunner, make_log: Callable[..., Path], fail_on: str, kind: str, status: int
) -> None:
    result = run_report(cli_runner, str(make_log(kind)), "--fail-on", fail_on)
    assert result.exit_code == status
    if status:
        assert " is " in result.stderr


def test_fail_on_unknown_verdict(cli_runner: CliRunner, make_log: Callable[..., Path]) -> None:
    result = run_report(cli_runner, str(make_log("healthy")), "--fail-on", "exploding,sad")
    assert (
        result.exit_code == 2
        and "'sad'" in result.stderr
        and "vanishing, exploding, nonfinite" in result.stderr
    )


def test_fallback_rules_without_alert_records(cli_runner: CliRunner, tmp_path: Path) -> None:
    for kind in ("healthy", "vanishing", "exploding"):
        write_log(tmp_path / f"{kind}.jsonl", make_run(kind, with_alerts=False))
    _, data = report_json(cli_runner, str(tmp_path))
    assert verdicts(data) == {
        "run-healthy": "healthy",
        "run-vanishing": "vanishing",
        "run-exploding": "exploding",
    }
    assert {r["layers"][0]["verdict"]["source"] for r in data["runs"]} == {"rules"}


def test_output_to_unwritable_place(
    cli_runner: CliRunner, make_log: Callable[..., Path], tmp_path: Path
) -> None:
    result = run_report(cli_runner, str(make_log("healthy")), "-o", str(tmp_path / "missing-dir" / "r.txt"))
    assert result.exit_code == 2 and "cannot write the report" in result.stderr


def test_text_to_output_file_is_plain(
    cli_runner: CliRunner, make_log: Callable[..., Path], tmp_path: Path
) -> None:
    out = tmp_path / "r.txt"
    result = run_report(cli_runner, str(make_log("vanishing")), "--output", str(out))
    assert result.exit_code == 0
    text = out.read_text(encoding="utf-8")
    assert "vanishing" in text and "\x1b[" not in text


# --- bad input ---------------------------------------------------------------------------------------------


def _write_bytes(tmp_path: Path, name: str, payload: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(payload)
    return path


def _good_lines(kind: str = "healthy") -> bytes:
    return b"".join(json.dumps(r.to_json()).encode() + b"\n" for r in make_run(kind))  # type: ignore[arg-type]


BAD_FILES = {
    "empty": (b"", r"empty\.jsonl: empty file"),
    "not-json": (b"hello world\nthis is a text file\n", r"not-json\.jsonl:1: not valid JSON"),
    "binary": (bytes(range(256)) * 64, r"binary\.jsonl: contains NUL bytes"),
    "non-utf8": (b"\xff\xfe\xfa{}\n", r"non-utf8\.jsonl:1: not UTF-8"),
    "deep": (b"[" * 100_000 + b"]" * 100_000 + b"\n", r"deep\.jsonl:1: JSON nested too deeply"),
    "not-object": (b"[1, 2, 3]\n", r"not-object\.jsonl:1: bad log record: a log line must be a JSON object"),
    "wrong-type": (
        json.dumps({"kind": "measurement", "step": "three"}).encode() + b"\n",
        r"wrong-type\.jsonl:1: bad 'measurement' record: 'step' must be an integer",
    ),
    "schema": (
        json.dumps({"kind": "run", "schema": SCHEMA_VERSION + 1, "run_id": "x"}).encode() + b"\n",
        r"schema\.jsonl:1: unsupported run-log schema",
    ),
}


@pytest.mark.parametrize(("name", "case"), list(BAD_FILES.items()), ids=list(BAD_FILES))
def test_bad_files_give_a_located_message_and_status_2(
    cli_runner: CliRunner, tmp_path: Path, name: str, case: tuple[bytes, str]
) -> None:
    payload, message = case
    log = _write_bytes(tmp_path, f"{name}.jsonl", payload)
    result = run_report(cli_runner, str(log))
    assert result.exit_code == 2
    assert re.search(message, result.stderr), result.stderr
    assert "no usable record was read" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("path", "message"),
    [("missing.jsonl", "no such file or directory"), ("nothing-*.jsonl", "no file matches this pattern")],
    ids=["missing", "glob-no-match"],
)
def test_missing_paths(cli_runner: CliRunner, tmp_path: Path, path: str, message: str) -> None:
    result, data = report_json(cli_runner, str(tmp_path / path))
    assert result.exit_code == 2 and message in result.stderr
    assert data["problems"][0]["message"] == message and data["runs"] == []


def test_empty_directory(cli_runner: CliRunner, tmp_path: Path) -> None:
    result = run_report(cli_runner, str(tmp_path))
    assert result.exit_code == 2 and "contains no *.jsonl files" in result.stderr


def test_crashed_run_reads_everything_before_the_truncated_line(
    cli_runner: CliRunner, make_log: Callable[..., Path]
) -> None:
    log = make_log("exploding", crash_mid_line=True)
    line_count = log.read_bytes().count(b"\n")
    result, data = report_json(cli_runner, str(log))
    assert result.exit_code == 0
    (problem,) = data["problems"]
    assert problem["line"] == line_count + 1 and "truncated last line" in problem["message"]
    assert f"read the {line_count} line(s) before it" in problem["message"]
    assert data["runs"][0]["truncated"] is True
    assert data["runs"][0]["layers"][0]["measurements"] == 20
    assert "probably crashed" in run_report(cli_runner, str(log)).stdout


def test_problems_inside_a_good_log_are_reported_and_the_rest_is_used(
    cli_runner: CliRunner, tmp_path: Path
) -> None:
    good = _good_lines("vanishing").split(b"\n")
    huge = b'{"kind": "measurement", "pad": "' + b"x" * (MAX_LINE_BYTES + 10) + b'"}'
    bad_alert = json.dumps({"kind": "alert", "alert": "meh"}).encode()
    future = json.dumps({"kind": "gpu-temperature", "value": 80}).encode()
    lines = [good[0], huge, good[1], bad_alert, future, future, b"", *good[2:]]
    log = _write_bytes(tmp_path, "mixed.jsonl", b"\n".join(lines))
    result, data = report_json(cli_runner, str(log))
    assert result.exit_code == 0
    messages = {(p["line"], p["message"].split(":")[0].split(";")[0]) for p in data["problems"]}
    assert messages == {(2, f"line longer than {MAX_LINE_BYTES} bytes"), (4, "bad 'alert' record")}
    assert data["skipped_unknown_kinds"] == {"gpu-temperature": 2}
    assert "skipped 2 record(s) of unknown kind 'gpu-temperature'" in result.stderr
    assert data["runs"][0]["layers"][0]["verdict"]["verdict"] == "vanishing"
    assert data["runs"][0]["layers"][0]["measurements"] == 20


def test_records_after_an_unsupported_header_are_skipped_until_the_next_header(
    cli_runner: CliRunner, tmp_path: Path
) -> None:
    future = make_run("exploding", run_id="future")
    header = future[0]
    assert isinstance(header, RunHeader)
    future_lines = [json.dumps({**header.to_json(), "schema": SCHEMA_VERSION + 1}).encode()]
    future_lines += [json.dumps(r.to_json()).encode() for r in future[1:]]
    log = _write_bytes(tmp_path, "resumed.jsonl", b"\n".join(future_lines) + b"\n" + _good_lines())
    result, data = report_json(cli_runner, str(log))
    assert result.exit_code == 0
    assert [r["run_id"] for r in data["runs"]] == ["run-healthy"]
    assert "unsupported run-log schema" in data["problems"][0]["message"]
    assert "skipped" in data["problems"][-1]["message"]


def test_follow_with_timeout_ends_and_reports(cli_runner: CliRunner, make_log: Callable[..., Path]) -> None:
    log = make_log("vanishing")
    result = run_report(cli_runner, str(log), "--follow", "--follow-timeout", "0", "--fail-on", "vanishing")
    assert result.exit_code == 1
    assert "run-vanishing" in result.stdout and "vanishing" in result.stdout


# --- CLI details (#31) ----------------------------------------------------------------------------------


def test_follow_with_json_and_no_output_prints_json(
    cli_runner: CliRunner, make_log: Callable[..., Path]
) -> None:
    log = make_log("vanishing")
    result = run_report(cli_runner, str(log), "--follow", "--follow-timeout", "0", "--format", "json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)  # stdout is the json report alone; the live view went to stderr
    assert verdicts(data) == {"run-vanishing": "vanishing"}
    assert "run-vanishing" in result.stderr


@pytest.mark.parametrize("value", ["", " ", ",", " , "])
def test_fail_on_without_a_verdict_is_refused(
    cli_runner: CliRunner, make_log: Callable[..., Path], value: str
) -> None:
    result = run_report(cli_runner, str(make_log("vanishing")), "--fail-on", value)
    assert result.exit_code == 2
    assert "--fail-on needs at least one verdict" in result.stderr and "vanishing" in result.stderr


def test_metric_gate_mean_is_accepted(cli_runner: CliRunner, make_log: Callable[..., Path]) -> None:
    result, data = report_json(cli_runner, str(make_log("healthy")), "--metric", "gate_mean")
    assert result.exit_code == 0
    assert list(data["runs"][0]["layers"][0]["metrics"]) == ["gate_mean"]


def test_every_report_option_has_help(cli_runner: CliRunner) -> None:
    from gradwatch.cli import report

    for option in report.params:
        if isinstance(option, click.Option):
            assert option.help, f"{option.opts} has no help"
    assert "Seconds between two reads" in cli_runner.invoke(main, ["report", "--help"]).stdout


def test_second_tensorboard_export_into_the_same_directory_is_refused(
    cli_runner: CliRunner, make_log: Callable[..., Path], tmp_path: Path
) -> None:
    pytest.importorskip("tensorboard")
    log = make_log("healthy")
    out = tmp_path / "tb"
    first = run_report(cli_runner, str(log), "--format", "tensorboard", "-o", str(out))
    assert first.exit_code == 0, first.stderr
    events = sorted(out.rglob("events.out.tfevents*"))
    sizes = [p.stat().st_size for p in events]
    second = run_report(cli_runner, str(log), "--format", "tensorboard", "-o", str(out))
    assert second.exit_code == 2
    assert "already hold TensorBoard event files" in second.stderr and "another -o" in second.stderr
    assert sorted(out.rglob("events.out.tfevents*")) == events  # nothing added
    assert [p.stat().st_size for p in events] == sizes

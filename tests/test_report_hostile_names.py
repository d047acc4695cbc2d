"""Terminal escape injection (#30): log text reaches no human-facing output as control characters.

A module name, run id, message or file name could carry escape sequences that clear the screen, set the
window title, or colour a failing layer green; bidirectional overrides reorder what is shown. Every
human-facing format shows them written out (``\\x1b``), on a terminal and in a pipe alike, and the JSON
output escapes them so they read back unchanged.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import gradwatch
from gradwatch.cli import main
from gradwatch.records import Alert, ErrorRecord, Measurement, Record, RunHeader
from gradwatch.report.command import make_report, render
from gradwatch.report.formatting import printable
from gradwatch.report.render_text import build_renderable, make_console
from gradwatch.report.summary import ReportOptions
from tests.report_logs import make_run, write_log

CLEAR_SCREEN = "\x1b[2J\x1b[H"
WINDOW_TITLE = "\x1b]0;pwned\x07"
FAKE_HEALTHY = "\x1b[32mhealthy\x1b[0m"
C1_CSI = "\x9b31m"  # the one-byte CSI of C1: some terminals act on it
BIDI = "\u202etxt.exe\u202c"
HOSTILE_MODULE = f"enc{CLEAR_SCREEN}{FAKE_HEALTHY}{BIDI}"
HOSTILE_RUN = f"run{WINDOW_TITLE}{C1_CSI}"
HOSTILE_MESSAGE = f"boom{CLEAR_SCREEN}\nline two{WINDOW_TITLE}\u2066x\u2069"
SEQUENCES = (CLEAR_SCREEN, WINDOW_TITLE, FAKE_HEALTHY, C1_CSI, "\u202e", "\u2066", "\x07", "\x9b")


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("\x1b[2J", "\\x1b[2J"),
        ("a\x1b]0;title\x07b", "a\\x1b]0;title\\x07b"),
        ("\x9b31m", "\\x9b31m"),
        ("\x7f\x00", "\\x7f\\x00"),
        ("x\u202ey\u202c", "x\\u202ey\\u202c"),
        ("\u2066\u2067\u2068\u2069\u200e\u200f\u061c", "\\u2066\\u2067\\u2068\\u2069\\u200e\\u200f\\u061c"),
        ("a\nb\tc\r\u2028d", "a b c  d"),
        ("lone \ud800", "lone \\ud800"),
        ("plain encoder.rnn é 中 🙂", "plain encoder.rnn é 中 🙂"),
    ],
)
def test_printable_writes_out_every_control_character(text: str, shown: str) -> None:
    assert printable(text) == shown
    assert printable(shown) == shown  # already safe: unchanged


def _hostile_log(tmp_path: Path) -> Path:
    records: list[Record] = []
    for record in make_run("exploding", measurements=30, module=HOSTILE_MODULE, module_type=FAKE_HEALTHY):
        if isinstance(record, (Measurement, Alert, ErrorRecord)):
            record = dataclasses.replace(record, run_id=HOSTILE_RUN)
        if isinstance(record, RunHeader):
            record = dataclasses.replace(record, run_id=HOSTILE_RUN)
        if isinstance(record, Alert):
            record = dataclasses.replace(record, message=HOSTILE_MESSAGE)
        records.append(record)
    records.append(
        ErrorRecord(
            9999, 1.0, f"sink:{WINDOW_TITLE}", HOSTILE_MESSAGE, module=HOSTILE_MODULE, run_id=HOSTILE_RUN
        )
    )
    path = write_log(tmp_path / "hostile.jsonl", records)
    with open(path, "a", encoding="utf-8") as handle:  # an unknown kind and a bad line quoting escapes
        handle.write(json.dumps({"kind": f"x{CLEAR_SCREEN}"}) + "\n")
        handle.write(json.dumps({"kind": "measurement", "step": f"{WINDOW_TITLE}"}) + "\n")
    return path


def _assert_clean(output: str) -> None:
    for sequence in SEQUENCES:
        assert sequence not in output, repr(sequence)
    assert not any(0x80 <= ord(c) < 0xA0 or 0xD800 <= ord(c) < 0xE000 for c in output)


@pytest.mark.parametrize("output_format", ["text", "markdown", "html", "json"])
def test_no_format_lets_a_log_string_control_the_terminal(tmp_path: Path, output_format: str) -> None:
    report = make_report([str(_hostile_log(tmp_path))], ReportOptions(), jobs=1)
    assert report.runs[0].layers[0].measurements == 30
    output = render(report, output_format)
    _assert_clean(output)
    if output_format == "json":  # machine-readable: escaped, and read back exactly
        data = json.loads(output)
        assert data["runs"][0]["run_id"] == HOSTILE_RUN
        assert data["runs"][0]["layers"][0]["module"] == HOSTILE_MODULE
        assert "\\u009b" in output and "\\u202e" in output
    elif output_format == "markdown":  # written out, then markdown-escaped (\\ and [ shown literally)
        assert "\\\\x1b\\[2J" in output and "\\\\x1b\\]0;pwned\\\\x07" in output
    else:
        assert "\\x1b[2J" in output and "\\x1b]0;pwned\\x07" in output and "\\u202e" in output


def test_a_terminal_gets_rich_colours_but_no_log_escape(tmp_path: Path) -> None:
    report = make_report([str(_hostile_log(tmp_path))], ReportOptions(), jobs=1)
    stream = io.StringIO()
    make_console(stream, color=True).print(build_renderable(report))  # what a tty gets (also --follow)
    output = stream.getvalue()
    assert "\x1b[" in output  # rich's own colours are there
    _assert_clean(output)
    assert "\\x1b[32mhealthy\\x1b[0m" in output  # the fake verdict is shown as text


def test_the_cli_in_a_pipe_writes_no_escape_to_stdout_or_stderr(tmp_path: Path) -> None:
    log = _hostile_log(tmp_path)
    hostile_file = tmp_path / f"x{CLEAR_SCREEN}.jsonl"  # a file name is log-supplied too (a directory)
    hostile_file.write_text("not json\n", encoding="utf-8")
    result = CliRunner().invoke(
        main, ["report", str(log), str(hostile_file), "--fail-on", "exploding", "--jobs", "1"]
    )
    assert result.exit_code == 1, result.output
    _assert_clean(result.stdout)
    _assert_clean(result.stderr)
    assert "not valid JSON" in result.stderr and "\\x1b[2J" in result.stderr
    assert "is exploding" in result.stderr


def test_a_real_run_with_an_escape_in_its_module_name_reports_it_written_out(tmp_path: Path) -> None:
    name = f"rnn{CLEAR_SCREEN}"
    model = nn.Module()
    model.add_module(name, nn.RNN(3, 4))
    log = tmp_path / "run.jsonl"
    with gradwatch.watch(model, every=1, log=log, run_id=HOSTILE_RUN) as monitor:
        out, _ = getattr(model, name)(torch.randn(5, 2, 3))
        out.sum().backward()
        monitor.step()
    report = make_report([str(log)], ReportOptions(), jobs=1)
    assert [layer.module for layer in report.runs[0].layers] == [name]  # the data is unchanged
    for output_format in ("text", "markdown", "html"):
        output = render(report, output_format)
        _assert_clean(output)
        assert "rnn\\x1b[2J\\x1b[H" in output

"""The examples run end to end with tiny step counts and leave a run log that the report can read."""

from __future__ import annotations

import json
import runpy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _main(name: str) -> Callable[[list[str]], float]:
    """The example's ``main(argv)``, loaded without running its ``__main__`` block."""
    namespace: dict[str, Any] = runpy.run_path(str(EXAMPLES / name), run_name=f"example_{name[:-3]}")
    return namespace["main"]


def _records(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]


def test_wrap_existing_loop_learns_and_is_measured(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "wrap.jsonl"
    valid_loss = _main("wrap_existing_loop.py")(["--steps", "40", "--every", "10", "--log", str(log)])
    # Predicting 0 for a unit sine wave gives MSE 0.5; 40 TBPTT chunks already get far below that.
    assert valid_loss < 0.1
    records = _records(log)
    assert records[0]["kind"] == "run"
    measured = {(r["step"], r["layer"]) for r in records if r["kind"] == "measurement"}
    assert measured == {(step, layer) for step in (0, 10, 20, 30) for layer in (0, 1)}
    assert "valid loss" in capsys.readouterr().out


def test_char_rnn_trains_clips_and_logs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    log = tmp_path / "char.jsonl"
    arguments = [str(text), "--steps", "25", "--every", "10", "--seq-len", "32", "--clip", "0.05"]
    loss = _main("char_rnn.py")([*arguments, "--log", str(log)])
    # A uniform guess over the 28 distinct characters costs ln(28) = 3.33 nats; training goes below it.
    assert loss < 3.2
    records = _records(log)
    clips = [r for r in records if r["kind"] == "clip"]
    assert clips and all(r["max_norm"] == pytest.approx(0.05) and r["scale"] < 1 for r in clips)
    assert {r["step"] for r in records if r["kind"] == "measurement"} == {0, 10, 20}
    out = capsys.readouterr().out
    assert "sample:" in out and f"clipped {len(clips)} step(s)" in out


def test_char_rnn_default_text_ships_with_python(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "char.jsonl"
    _main("char_rnn.py")(
        ["--steps", "2", "--every", "1", "--batch", "4", "--clip", "none", "--log", str(log)]
    )
    assert "json/__init__.py" in capsys.readouterr().out
    assert not [r for r in _records(log) if r["kind"] == "clip"]


def test_char_rnn_rejects_a_bad_clip_value(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _main("char_rnn.py")(["--clip", "-1"])
    assert exit_info.value.code == 2
    assert "--clip must be a positive max norm" in capsys.readouterr().err

"""benchmarks/trainability.py on a tiny setting: it records a run log and an outcome, and judges them."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from benchmarks.trainability import LEARNED_MSE, diverged_at, learned_at, main


def test_record_then_evaluate_prints_one_judged_row(tmp_path: Path) -> None:
    runner = CliRunner()
    recorded = runner.invoke(
        main,
        [
            "record",
            "--out",
            str(tmp_path),
            "--only",
            "tanh_default-T50-s0",
            "--steps",
            "24",
            "--eval-every",
            "8",
        ],
    )
    assert recorded.exit_code == 0, recorded.output
    outcome = json.loads((tmp_path / "tanh_default-T50-s0.outcome.json").read_text())
    assert outcome["steps"] == 24 and [step for step, _ in outcome["held_out_mse"]] == [8, 16, 24]
    log = (tmp_path / "tanh_default-T50-s0.jsonl").read_text().splitlines()
    measurements = [json.loads(line) for line in log if '"measurement"' in line]
    assert [m["step"] for m in measurements] == [0, 10, 20]  # every=10
    assert all(
        m["metrics"]["horizon"] == 49 and m["metrics"]["gradient_reach"] is not None for m in measurements
    )
    evaluated = runner.invoke(main, ["evaluate", "--out", str(tmp_path)])
    assert evaluated.exit_code == 0, evaluated.output
    row = next(line for line in evaluated.output.splitlines() if line.startswith("| tanh default |"))
    # 24 steps are inside the warm-up: no alert yet, 3 measurements are fewer than the rule needs (unknown),
    # and a run that has not learned must end vanishing
    assert row.startswith("| tanh default | 50 | 0 | 24 | no (") and "| unknown | - | **no**" in row
    assert "0 of 1 rows right" in evaluated.output


def test_learned_and_diverged_steps_read_off_the_held_out_curve() -> None:
    curve = [(100, 0.16), (200, LEARNED_MSE / 2), (300, 0.2), (400, 0.01), (500, 0.02)]
    assert learned_at(curve) == 400  # the first step from which it stays below LEARNED_MSE
    assert learned_at([(100, 0.16)]) is None
    assert diverged_at([(100, 0.16), (200, float("nan"))]) == 200
    assert diverged_at([(100, 0.16), (200, 1e9)]) == 200 and diverged_at(curve) is None

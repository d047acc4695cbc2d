"""benchmarks/flossing.py and benchmarks/spectrum_cost.py on tiny settings (fast, in-process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import flossing, spectrum_cost


def test_the_flossing_benchmark_runs_both_arms_on_the_same_seed_and_records_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "runs.jsonl"
    rng = torch.random.get_rng_state()
    results = flossing.main(
        [
            *("--seq-len", "12", "--hidden", "6", "--batch", "4", "--steps", "6", "--eval-every", "3"),
            *("--eval-size", "8", "--floss-steps", "15", "--floss-batch", "4", "--floss-batches", "2"),
            *("--seeds", "3", "--inits", "orthogonal", "--exponents", "2", "--out", str(out)),
        ]
    )
    torch.random.set_rng_state(rng)
    bare, flossed = results
    assert (bare.seed, bare.flossed, flossed.seed, flossed.flossed) == (3, False, 3, True)
    assert len(bare.exponents_before_training) == len(flossed.exponents_before_training) == 2
    # flossing moved the starting spectrum toward 0; the bare arm starts from the untouched init
    assert sum(abs(v) for v in flossed.exponents_before_training) < sum(
        abs(v) for v in bare.exponents_before_training
    )
    assert [step for step, _ in bare.eval_mse] == [0, 3, 6] == [step for step, _ in flossed.eval_mse]
    assert bare.floss_seconds == 0 and flossed.floss_seconds > 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["flossed"] for line in lines] == [False, True]
    printed = capsys.readouterr().out
    assert "| init" in printed and "orthogonal" in printed


def test_the_spectrum_cost_benchmark_prints_one_row_per_kind(capsys: pytest.CaptureFixture[str]) -> None:
    spectrum_cost.main(["--hidden", "4", "--steps", "6", "--batch", "2", "--rounds", "1", "--kinds", "gru"])
    printed = capsys.readouterr().out
    assert "| gru" in printed and "with spectrum" in printed

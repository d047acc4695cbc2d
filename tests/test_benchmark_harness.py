"""The benchmark plumbing: alternation, paired ratios, power-law fits, tables, memory probes, summaries."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from benchmarks.harness import (
    alternating,
    fit_power_law,
    format_table,
    machine,
    median,
    paired_ratios,
    peak_rss_bytes,
    reset_peak_rss,
)
from benchmarks.overhead import summarise
from benchmarks.training import live_tensor_summary


def test_alternating_runs_every_variant_once_per_round_with_rotated_order() -> None:
    order = list(alternating(["a", "b", "c"], rounds=4))
    assert order == [
        (0, "a"), (0, "b"), (0, "c"),
        (1, "b"), (1, "c"), (1, "a"),
        (2, "c"), (2, "a"), (2, "b"),
        (3, "a"), (3, "b"), (3, "c"),
    ]  # fmt: skip
    with pytest.raises(ValueError, match="rounds must be a positive integer"):
        list(alternating(["a"], rounds=0))
    with pytest.raises(ValueError, match="at least one variant"):
        list(alternating([], rounds=1))


def test_paired_ratios_and_median() -> None:
    assert paired_ratios([2.0, 3.0, 5.0], [1.0, 2.0, 4.0]) == [2.0, 1.5, 1.25]
    assert median(paired_ratios([2.0, 3.0, 5.0], [1.0, 2.0, 4.0])) == 1.5
    assert median([1.0, math.nan, 3.0]) == 2.0
    assert math.isnan(median([]))
    with pytest.raises(ValueError, match="one value per round"):
        paired_ratios([1.0], [1.0, 2.0])


@pytest.mark.parametrize("exponent", [0.5, 1.0, 2.0, 2.7], ids=["sqrt", "linear", "square", "2.7"])
def test_power_law_fit_recovers_an_exact_power_law(exponent: float) -> None:
    sizes = [16, 32, 64, 128, 256]
    fitted, prefactor = fit_power_law(sizes, [3.5 * s**exponent for s in sizes])
    assert fitted == pytest.approx(exponent, rel=1e-12)
    assert prefactor == pytest.approx(3.5, rel=1e-9)
    with pytest.raises(ValueError, match="two different sizes"):
        fit_power_law([4, 4], [1.0, 2.0])
    with pytest.raises(ValueError, match="at least two positive"):
        fit_power_law([4], [1.0])


def test_format_table_aligns_columns_and_marks_missing_values() -> None:
    table = format_table(["name", "value"], [["a", 1.23456], ["long name", math.nan]])
    lines = table.splitlines()
    assert lines[0] == "| name      | value |"
    assert lines[1] == "|-----------|-------|"
    assert lines[2] == "| a         | 1.235 |"
    assert lines[3] == "| long name | n/a   |"


def test_machine_description_names_cpu_cores_torch_and_threads() -> None:
    described = machine().describe()
    assert f"torch {torch.__version__}" in described
    assert f"{torch.get_num_threads()} torch thread(s)" in described
    assert "cores" in described


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc (peak RSS reset)")
def test_peak_rss_reset_and_growth() -> None:
    assert reset_peak_rss()
    before = peak_rss_bytes()
    assert before is not None
    block = torch.ones(16 * 2**20 // 4 * 4)  # 64 MiB, touched
    after = peak_rss_bytes()
    assert after is not None and after - before >= 48 * 2**20
    del block


def test_live_tensor_summary_sees_a_new_tensor() -> None:
    count, size = live_tensor_summary()
    kept = torch.zeros(1_000_000)  # 4 MB
    count_with, size_with = live_tensor_summary()
    assert count_with >= count + 1
    assert size_with - size >= kept.numel() * 4


def run(total: float, step: float, peak: int, live: int, growth: int = 0) -> dict:
    return {
        "total_seconds": total,
        "step_seconds": [step] * 3,
        "peak_rss_bytes": peak,
        "live_tensor_bytes": live,
        "rss_growth_bytes": growth,
    }


def test_overhead_summary_pairs_runs_of_the_same_round() -> None:
    mib = 2**20
    runs = {
        "bare": [run(10.0, 0.2, 100 * mib, 50 * mib), run(20.0, 0.2, 100 * mib, 50 * mib)],
        "default": [run(11.0, 0.2, 101 * mib, 51 * mib), run(21.0, 0.2, 101 * mib, 51 * mib)],
        "inline": [run(12.0, 0.2, 101 * mib, 51 * mib), run(22.0, 0.2, 101 * mib, 51 * mib)],
        "background": [run(13.0, 0.2, 108 * mib, 51 * mib), run(24.0, 0.2, 108 * mib, 51 * mib)],
        "every-step": [run(5.0, 0.5, 110 * mib, 51 * mib), run(5.0, 0.5, 110 * mib, 51 * mib)],
        "nonfinite": [run(10.1, 0.201, 100 * mib, 50 * mib), run(20.2, 0.201, 100 * mib, 50 * mib)],
    }
    summary = summarise("lstm", 8, runs)
    assert summary.default_ratio == pytest.approx(median([1.1, 1.05]))
    assert summary.nonfinite_ratio == pytest.approx(1.01)
    assert summary.measurement_s == pytest.approx(0.3)
    assert summary.measurement_vs_step == pytest.approx(1.5)
    assert summary.inline_ratio == pytest.approx(median([1.2, 1.1]))
    block = 3  # steps per run in these fake results
    assert summary.composed_inline_ratio == pytest.approx(((block - 1) * 0.201 + 0.5) / (block * 0.2))
    assert summary.wall_cost_steps == pytest.approx((median([1.1, 1.05]) - 1) * block)
    assert summary.peak_rss_overhead == pytest.approx(0.1)
    assert summary.peak_rss_default_overhead == pytest.approx(0.01)
    assert summary.background_ratio == pytest.approx(median([1.3, 1.2]))
    assert summary.peak_rss_background_overhead == pytest.approx(0.08)
    assert summary.retained_mb == pytest.approx(1.0)


def test_overhead_summary_of_a_bounded_run_keeps_the_measurement_and_marks_the_rest_missing() -> None:
    """--variants bare every-step: one measurement's cost is still reported (per thread setting), and
    every ratio that needs a variant left out reads NaN instead of failing the run."""
    mib = 2**20
    runs = {
        "bare": [run(10.0, 0.2, 100 * mib, 50 * mib), run(20.0, 0.2, 100 * mib, 50 * mib)],
        "every-step": [run(5.0, 0.5, 110 * mib, 51 * mib), run(5.0, 0.5, 110 * mib, 51 * mib)],
    }
    summary = summarise("lstm", 8, runs, threads=2)
    assert summary.threads == 2
    assert summary.measurement_vs_step == pytest.approx(1.5)
    assert math.isnan(summary.default_ratio) and math.isnan(summary.inline_ratio)
    assert math.isnan(summary.background_ratio) and math.isnan(summary.peak_rss_background_overhead)
    assert math.isnan(summary.retained_mb)

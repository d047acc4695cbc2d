"""Shared plumbing of the benchmark scripts: machine description, memory probes, alternating runs, tables.

Timings on a shared machine drift; every script therefore alternates its variants (A, B, C, A, B, C, ...
with the order rotated each round), reports medians, and forms ratios from runs of the same round.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

Variant = TypeVar("Variant")
REPOSITORY_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Machine:
    """What a benchmark ran on, printed above every table."""

    cpu: str
    cores: int
    torch_version: str
    threads: int
    python: str
    device: str
    load_average: tuple[float, float, float] | None

    def describe(self) -> str:
        load = "n/a" if self.load_average is None else ", ".join(f"{x:.2f}" for x in self.load_average)
        return (
            f"machine: {self.cpu} | {self.cores} cores | torch {self.torch_version} | "
            f"{self.threads} torch thread(s) | python {self.python} | device {self.device} | "
            f"load average {load}"
        )


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (platform.processor() is empty on most Linux builds)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str = "cpu") -> Machine:
    name = device
    if device.startswith("cuda") and torch.cuda.is_available():
        name = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return Machine(
        cpu=cpu_model(),
        cores=os.cpu_count() or 1,
        torch_version=torch.__version__,
        threads=torch.get_num_threads(),
        python=platform.python_version(),
        device=name,
        load_average=load,
    )


# --- memory ------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def peak_rss_bytes() -> int | None:
    """The process's peak resident set size (VmHWM), or None where /proc is missing."""
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


def rss_bytes() -> int | None:
    """The process's current resident set size (VmRSS)."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs); False if not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


# --- statistics --------------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    """The median, NaN for no values (a missing figure stays visibly missing in the tables)."""
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(finite) if finite else math.nan


def alternating(variants: Sequence[Variant], rounds: int) -> Iterator[tuple[int, Variant]]:
    """(round, variant) pairs: every variant once per round, the starting variant rotated each round.

    Rotation spreads slow drifts of the machine (other jobs, thermal state) evenly over the variants.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
    if not variants:
        raise ValueError("need at least one variant to run")
    count = len(variants)
    for round_index in range(rounds):
        for offset in range(count):
            yield round_index, variants[(round_index + offset) % count]


def paired_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """Ratios of the runs of the same round (numerator[i] / denominator[i])."""
    if len(numerator) != len(denominator):
        raise ValueError(
            f"need one value per round on both sides, got {len(numerator)} and {len(denominator)}"
        )
    return [a / b if b else math.nan for a, b in zip(numerator, denominator, strict=True)]


def fit_power_law(sizes: Sequence[float], costs: Sequence[float]) -> tuple[float, float]:
    """(exponent p, prefactor c) of the least-squares fit log(cost) = log(c) + p log(size)."""
    points = [(math.log(s), math.log(c)) for s, c in zip(sizes, costs, strict=True) if s > 0 and c > 0]
    if len(points) < 2:
        raise ValueError("need at least two positive (size, cost) points to fit a power law")
    mean_x = statistics.fmean(x for x, _ in points)
    mean_y = statistics.fmean(y for _, y in points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    if spread == 0:
        raise ValueError("need at least two different sizes to fit a power law")
    exponent = sum((x - mean_x) * (y - mean_y) for x, y in points) / spread
    return exponent, math.exp(mean_y - exponent * mean_x)


# --- tables ------------------------------------------------------------------------------------------


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain, aligned text table (Markdown-compatible pipes, so it can be pasted into the docs)."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.4g}"
    return str(value)


def megabytes(value: float | None) -> float:
    return math.nan if value is None else value / 2**20


# --- worker processes --------------------------------------------------------------------------------


def run_worker(
    module: str, arguments: Mapping[str, Any], *, python: str | None = None, timeout: float = 1800
) -> dict[str, Any]:
    """Run ``python -m module --worker JSON`` in a fresh interpreter; return the JSON object it prints last.

    A fresh process per run gives each variant its own peak-RSS figure and no shared allocator state.
    """
    command = [python or sys.executable, "-m", module, "--worker", json.dumps(dict(arguments))]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPOSITORY_ROOT), env.get("PYTHONPATH")]))
    completed = subprocess.run(
        command, capture_output=True, text=True, env=env, cwd=REPOSITORY_ROOT, timeout=timeout, check=False
    )
    if completed.returncode != 0:
        raise RuntimeError(
            f"benchmark worker {module} {dict(arguments)} failed (exit {completed.returncode}):\n"
            f"{completed.stderr.strip()[-3000:]}"
        )
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"benchmark worker {module} printed no JSON result:\n{completed.stdout[-2000:]}")
    return dict(json.loads(lines[-1]))


def set_threads(threads: int | None) -> None:
    """Fix torch's intra-op threads (None keeps torch's default)."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be a positive integer, got {threads!r}")
        torch.set_num_threads(threads)


def report(title: str, lines: Sequence[str], emit: Callable[[str], None] = print) -> None:
    emit(f"\n## {title}\n")
    for line in lines:
        emit(line)

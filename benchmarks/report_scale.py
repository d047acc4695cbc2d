"""``gradwatch report`` at the scale of real runs: throughput and peak memory on generated run logs.

Four shapes of input (``--shapes``; each log is generated under ``--dir`` from the monitor's measurement
record, with its 16-bin sigma histogram):

* ``files`` (``--sizes-mb``): one file per run and rank, described below;
* ``appended`` (``--appended-mb``, default 1000): ONE file holding runs appended one after another, two
  ranks each (their records interleaved by step), two layers, steps 0..20000 every 10 (issue #34);
* ``out-of-order`` (``--out-of-order-mb``, default 150): the appended shape with one measurement moved
  10,000 steps later in its run (issue #30 item 11);
* ``many-runs`` (``--many-runs``, default 32,695, about 53 MB): one file, each run a header and one
  measurement, reported in text (issue #30 item 11).

For every shape the report runs with the default install (orjson and msgspec) and with both blocked (the
pure-json fallback of platforms without wheels), and with ``--compare-with`` also from another checkout,
alternating in each round. The ``files`` shape:

Generates run logs of a given total size (two runs, two ranks each, one file per rank, four RNN layers,
measurements of every layer every 50 steps; one run healthy and alert-free, so its verdict comes from the
detector replay, the other exploding late with alerts and clip events), then times in fresh subprocesses:

* ``gradwatch report DIR --format json -o /dev/null`` (the streaming report; one worker per file),
* the same with ``--jobs 1`` (one process) and without msgspec (every line through the generic reader:
  what an install without the ``fast`` extra gets), and
* a plain ``json.loads`` loop over the same lines (what any JSON-lines reader pays per line),

printing file size, records, wall time (the median of ``--repeats`` rounds that alternate the commands,
with its range), MB/s, peak RSS and the time as a multiple of the ``json.loads`` loop's in the same round
(steadier than seconds on a shared machine). Peak RSS is the largest sum, sampled every 50 ms from
/proc, of the resident memory of the command's process and all its worker processes (at least
``getrusage``'s peak of the largest one). Measurements carry the monitor's 16-bin sigma histogram
(0.74 M records per GB); ``--no-histogram`` writes smaller ones (1.16 M per GB).

    PYTHONPATH=. python benchmarks/report_scale.py --sizes-mb 1000 --repeats 3 --dir /tmp/gw-report-bench
    PYTHONPATH=. python benchmarks/report_scale.py --sizes-mb 1000 --repeats 3 --no-histogram
    PYTHONPATH=. python benchmarks/report_scale.py --shapes appended out-of-order many-runs \
        --compare-with /path/to/main --repeats 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

LAYERS = 4
HISTOGRAM_BINS = 16
EVERY = 50
RUNS = (("bench-healthy", False), ("bench-exploding", True))
RANKS = 2


def _header(run_id: str, rank: int) -> str:
    return json.dumps(
        {
            "kind": "run",
            "schema": 1,
            "run_id": run_id,
            "started": 1_700_000_000.0,
            "gradwatch": "0.1.0",
            "torch": "2.13.0",
            "config": {"every": EVERY, "lags": [1, 8, 32]},
            "modules": [{"name": "encoder.rnn", "type": "RNN", "layers": LAYERS, "bidirectional": False}],
            "rank": rank,
            "world_size": RANKS,
        }
    )


def _measurement(
    run_id: str, rank: int, step: int, layer: int, growth: float, rng: random.Random, *, histogram: bool
) -> str:
    sigma = 0.95 * growth * (1 + 0.02 * rng.random())
    metrics = {
        "jacobian_sigma_max_mean": sigma,
        "jacobian_sigma_max_min": 0.6 * sigma,
        "jacobian_sigma_max_max": 1.3 * sigma,
        "jacobian_sigma_max_p95": 1.2 * sigma,
        "jacobian_frac_above_one": min(1.0, max(0.0, sigma - 0.8)),
        "weight_hh_sigma_max": 1.0 * growth,
        "activation_derivative_mean": 0.65,
        "activation_saturation_ratio": 0.05 * rng.random(),
        "lyapunov_max": math.log(sigma),
        "lag_norm": {"1": sigma, "8": sigma**8, "32": sigma**32},
        "grad_norm": {
            f"weight_hh_l{layer}": 0.4 * growth**4,
            f"weight_ih_l{layer}": 0.3,
            f"bias_hh_l{layer}": 0.05,
        },
        "grad_nonfinite": 0,
        "gate_mean": None,
        "jacobian_converged_ratio": 1.0,
        "jacobian_iterations": 12,
        "sequences": 8,
        "time_steps": 64,
    }
    if histogram:  # what the monitor writes with every measurement: 16 equal buckets from min to max
        metrics["jacobian_sigma_max_histogram"] = {
            "edges": [0.6 * sigma + 0.7 * sigma * i / HISTOGRAM_BINS for i in range(HISTOGRAM_BINS + 1)],
            "counts": [rng.randrange(0, 64) for _ in range(HISTOGRAM_BINS)],
            "sum": 64 * sigma,
            "sum_squares": 64 * sigma**2,
        }
    return json.dumps(
        {
            "kind": "measurement",
            "run_id": run_id,
            "step": step,
            "time": 1_700_000_000.0 + step,
            "rank": rank,
            "module": "encoder.rnn",
            "layer": layer,
            "direction": "forward",
            "metrics": metrics,
        }
    )


def generate(directory: Path, total_bytes: int, *, histogram: bool = True) -> tuple[int, int]:
    """Write the logs (one file per run and rank); return (bytes, records)."""
    directory.mkdir(parents=True, exist_ok=True)
    files = [(run_id, exploding, rank) for run_id, exploding in RUNS for rank in range(RANKS)]
    per_file = total_bytes // len(files)
    written = records = 0
    for run_id, exploding, rank in files:
        rng = random.Random(rank)
        path = directory / f"{run_id}.rank{rank}.jsonl"
        size = 0
        with open(path, "w", encoding="utf-8") as handle:
            lines = [_header(run_id, rank)]
            step = 0
            while size < per_file:
                # the exploding run's recurrent weight grows over the last fifth of the steps
                for layer in range(LAYERS):
                    growth = 1.0
                    if exploding and size > 0.8 * per_file:
                        growth = 1.0 + 0.5 * (size / per_file - 0.8)
                    lines.append(_measurement(run_id, rank, step, layer, growth, rng, histogram=histogram))
                    if exploding and growth > 1.05 and layer == 0 and step % (EVERY * 100) == 0:
                        lines.append(
                            json.dumps(
                                {
                                    "kind": "clip",
                                    "run_id": run_id,
                                    "step": step,
                                    "time": 0.0,
                                    "rank": rank,
                                    "norm_before": 9.0,
                                    "max_norm": 5.0,
                                    "scale": 5.0 / 9.0,
                                }
                            )
                        )
                if len(lines) >= 4096:
                    text = "\n".join(lines) + "\n"
                    handle.write(text)
                    size += len(text)
                    records += len(lines)
                    lines = []
                step += EVERY
            if lines:
                text = "\n".join(lines) + "\n"
                handle.write(text)
                size += len(text)
                records += len(lines)
        written += size
    return written, records


APPENDED_LAYERS = 2
APPENDED_LAST_STEP = 20_000
APPENDED_EVERY = 10


def _appended_runs(rng: random.Random) -> Iterator[list[str]]:
    """The lines of one run after another: two ranks (interleaved by step), two layers, steps 0..20000."""
    run = 0
    while True:
        run_id = f"appended-{run:04d}"
        lines = [_header(run_id, rank) for rank in range(RANKS)]
        for step in range(0, APPENDED_LAST_STEP + 1, APPENDED_EVERY):
            for rank in range(RANKS):
                for layer in range(APPENDED_LAYERS):
                    lines.append(_measurement(run_id, rank, step, layer, 1.0, rng, histogram=True))
        yield lines
        run += 1


def generate_appended(path: Path, total_bytes: int, *, move_one: bool = False) -> tuple[int, int]:
    """Runs appended in one file up to ``total_bytes``; ``move_one``: one measurement of the first run
    written 10,000 steps late (out of step order). Returns (bytes, records)."""
    size = records = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for number, lines in enumerate(_appended_runs(random.Random(0))):
            if size >= total_bytes:
                break
            if move_one and number == 0:
                # the measurement of rank 0, layer 0 at step 5000 moves after the records of step 15000
                per_step = RANKS * APPENDED_LAYERS
                moved = RANKS + (5000 // APPENDED_EVERY) * per_step
                target = RANKS + (15000 // APPENDED_EVERY + 1) * per_step
                lines.insert(target, lines[moved])
                del lines[moved]
            text = "\n".join(lines) + "\n"
            handle.write(text)
            size += len(text)
            records += len(lines)
    return size, records


def generate_many_runs(path: Path, runs: int) -> tuple[int, int]:
    """``runs`` runs in one file, each a header and one measurement. Returns (bytes, records)."""
    rng = random.Random(0)
    size = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for run in range(runs):
            run_id = f"run-{run:05d}"
            text = _header(run_id, 0) + "\n" + _measurement(run_id, 0, 0, 0, 1.0, rng, histogram=True) + "\n"
            handle.write(text)
            size += len(text)
    return size, 2 * runs


_MEASURE = (
    "import os, resource, subprocess, sys, time\n"
    "def tree_rss_kb(root):\n"
    "    # resident memory of root and all its descendants now (worker processes count too)\n"
    "    parents = {}\n"
    "    for name in os.listdir('/proc'):\n"
    "        if name.isdigit():\n"
    "            try:\n"
    "                with open(f'/proc/{name}/stat') as f:\n"
    "                    parents[int(name)] = int(f.read().rsplit(')', 1)[1].split()[1])\n"
    "            except (OSError, IndexError, ValueError):\n"
    "                pass\n"
    "    tree, grew = {root}, True\n"
    "    while grew:\n"
    "        more = {pid for pid, ppid in parents.items() if ppid in tree} - tree\n"
    "        grew = bool(more)\n"
    "        tree |= more\n"
    "    total = 0\n"
    "    for pid in tree:\n"
    "        try:\n"
    "            with open(f'/proc/{pid}/status') as f:\n"
    "                total += next(int(l.split()[1]) for l in f if l.startswith('VmRSS:'))\n"
    "        except (OSError, StopIteration):\n"
    "            pass\n"
    "    return total\n"
    "start = time.perf_counter()\n"
    "child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
    "peak = 0\n"
    "while child.poll() is None:\n"
    "    if os.path.isdir('/proc'):\n"
    "        peak = max(peak, tree_rss_kb(child.pid))\n"
    "    time.sleep(0.05)\n"
    "wall = time.perf_counter() - start\n"
    "if child.returncode:\n"
    "    sys.exit(child.returncode)\n"
    "usage = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "peak = max(peak, usage.ru_maxrss)\n"
    "print(wall, peak, usage.ru_utime + usage.ru_stime)\n"
)
_JSON_LOOP = (
    "import json, sys\n"
    "for name in sys.argv[1:]:\n"
    "    with open(name, 'rb') as handle:\n"
    "        for line in handle:\n"
    "            json.loads(line)\n"
)


def measure(command: list[str], timeout: float, pythonpath: str | None = None) -> tuple[float, float, float]:
    """Wall seconds, peak RSS (MB) and CPU seconds of ``command`` run in a fresh child process."""
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, *command],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
        env=env,
        cwd=pythonpath,  # `python -c` puts the working directory first on sys.path
    )
    wall, rss_kb, cpu = out.stdout.split()
    return float(wall), int(rss_kb) / 1024, float(cpu)


def _existing(directory: Path) -> tuple[int, int]:
    """(bytes, records) of the logs already in ``directory``."""
    size = records = 0
    for path in directory.glob("*.jsonl"):
        size += path.stat().st_size
        with open(path, "rb") as handle:
            records += sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))
    return size, records


_CLI = "from gradwatch.cli import main; main(sys.argv[1:])"
_NO_FAST = "sys.modules['orjson'] = None; sys.modules['msgspec'] = None; "
"""Blocks both fast decoders (their import raises ImportError): the pure-json fallback."""


def _time_commands(
    label: str,
    size: int,
    records: int,
    commands: dict[str, tuple[list[str], str | None]],
    args: argparse.Namespace,
    *,
    baseline: str | None = None,
) -> None:
    """Run ``commands`` in ``args.repeats`` alternating rounds; print one row per command."""
    walls: dict[str, list[float]] = {what: [] for what in commands}
    cpus: dict[str, list[float]] = {what: [] for what in commands}
    peaks: dict[str, float] = dict.fromkeys(commands, 0.0)
    for _round in range(args.repeats):
        # rounds alternate the commands, so a slow phase of a shared machine hits each of them alike
        for what, (command, pythonpath) in commands.items():
            started = time.perf_counter()
            try:
                wall, rss, cpu = measure(command, args.timeout, pythonpath)
            except subprocess.TimeoutExpired:
                print(f"{what}: timed out after {time.perf_counter() - started:.0f} s")
                continue
            walls[what].append(wall)
            cpus[what].append(cpu)
            peaks[what] = max(peaks[what], rss)
    base = walls.get(baseline or "", [])
    for what, times in walls.items():
        if not times:
            continue
        wall = statistics.median(times)
        spread = f"{min(times):.1f}-{max(times):.1f}" if len(times) > 1 else ""
        ratio = (
            statistics.median(t / b for t, b in zip(times, base, strict=False))
            if len(base) == len(times)
            else math.nan
        )
        print(
            f"{label:<13} {size / 1e6:>6.0f}MB {records:>10} {what:<34} {wall:>8.1f} {spread:>11} "
            f"{statistics.median(cpus[what]):>7.1f} {size / 1e6 / wall:>7.1f} {peaks[what]:>12.0f} {ratio:>8.2f}",
            flush=True,
        )


def _report_commands(
    path: Path, output_format: str, compare_with: str | None, installs: list[str]
) -> dict[str, tuple[list[str], str | None]]:
    """The report of ``path`` with the fast decoders (``default`` in ``installs``) and without
    (``fallback``), here and in ``compare_with``."""
    arguments = ["report", str(path), "--format", output_format, "-o", "/dev/null"]
    default = [sys.executable, "-c", "import sys; " + _CLI, *arguments]
    fallback = [sys.executable, "-c", "import sys; " + _NO_FAST + _CLI, *arguments]
    commands: dict[str, tuple[list[str], str | None]] = {}
    if "default" in installs:
        commands["gradwatch report"] = (default, None)
        if compare_with:
            commands["compared checkout"] = (default, compare_with)
    if "fallback" in installs:
        commands["report, no orjson/msgspec"] = (fallback, None)
        if compare_with:
            commands["compared, no orjson/msgspec"] = (fallback, compare_with)
    return commands


def _shapes(args: argparse.Namespace) -> None:
    """The one-file shapes of issues #34 and #30 (see the module doc)."""
    for shape in args.shapes:
        if shape == "files":
            continue
        path = args.dir / f"{shape}.jsonl"
        if args.reuse and path.is_file():
            size, records = _existing_file(path)
        elif shape == "appended":
            size, records = generate_appended(path, args.appended_mb * 1_000_000)
        elif shape == "out-of-order":
            size, records = generate_appended(path, args.out_of_order_mb * 1_000_000, move_one=True)
        else:
            size, records = generate_many_runs(path, args.many_runs)
        output_format = "text" if shape == "many-runs" else "json"
        commands = _report_commands(path, output_format, args.compare_with, args.installs)
        _time_commands(shape, size, records, commands, args, baseline=next(iter(commands)))
        if args.critical_path and shape == "appended":
            critical_path(path)
        if not args.keep:
            path.unlink()


_CRITICAL_PATH = """
import resource, sys, time
from gradwatch.report import command
from gradwatch.report.render_json import iter_json
from gradwatch.report.summary import ReportOptions

real = command._summarize_piece
cpus = []

def timed(job):
    start = time.process_time()
    summary, contents, lines = real(job)
    summary.piece_cpu = time.process_time() - start  # sent back with the summary
    return summary, contents, lines

absorb = command.StreamingSummary.absorb

def noted(self, other):
    cpus.append(getattr(other, "piece_cpu", 0.0))
    return absorb(self, other)

command._summarize_piece, command.StreamingSummary.absorb = timed, noted
wall = time.perf_counter()
report = command.make_report(sys.argv[1:], ReportOptions(), jobs=0)
with open("/dev/null", "w") as sink:
    for part in iter_json(report):
        sink.write(part)
wall = time.perf_counter() - wall
own = resource.getrusage(resource.RUSAGE_SELF)
parent = own.ru_utime + own.ru_stime
lanes = [0.0, 0.0]
for cpu in sorted(cpus, reverse=True):  # pieces go to whichever of 2 cores is free first
    lanes[lanes.index(min(lanes))] += cpu
print(f"pieces CPU s {[round(c, 2) for c in cpus]}; parent {parent:.1f}; 2-core critical path about "
      f"{max(lanes) + parent:.1f} s; wall here {wall:.1f} s")
"""


def critical_path(path: Path) -> None:
    """Each worker's CPU time and the parent's for one report of ``path``, and the wall time two idle cores
    would take (the longer core's pieces plus the parent): an estimate a shared machine can still give."""
    subprocess.run([sys.executable, "-c", _CRITICAL_PATH, str(path)], check=True)


def _existing_file(path: Path) -> tuple[int, int]:
    with open(path, "rb") as handle:
        records = sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))
    return path.stat().st_size, records


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shapes",
        nargs="+",
        choices=("files", "appended", "out-of-order", "many-runs"),
        default=["files"],
        help="which inputs (see above); files is the one-file-per-rank set of --sizes-mb",
    )
    parser.add_argument(
        "--installs",
        nargs="+",
        choices=("default", "fallback"),
        default=["default", "fallback"],
        help="for the one-file shapes: time the default install (orjson, msgspec), the pure-json fallback, or both",
    )
    parser.add_argument(
        "--critical-path",
        action="store_true",
        help="after the appended shape, time each worker's CPU and estimate the wall time on 2 idle cores",
    )
    parser.add_argument("--appended-mb", type=int, default=1000)
    parser.add_argument("--out-of-order-mb", type=int, default=150)
    parser.add_argument("--many-runs", type=int, default=32_695)
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/gw-report-bench"))
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per measured command")
    parser.add_argument("--keep", action="store_true", help="keep the generated logs")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="reuse logs a previous --keep run left in --dir (no regeneration)",
    )
    parser.add_argument(
        "--compare-with",
        metavar="PYTHONPATH",
        help="also time the report of another gradwatch checkout (e.g. an older version) on the same logs",
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="rounds of every command; the median wall time is printed"
    )
    parser.add_argument(
        "--no-histogram",
        dest="histogram",
        action="store_false",
        help="measurements without the sigma histogram (smaller lines: about 1.16 M records per GB, not 0.74 M)",
    )
    args = parser.parse_args()
    args.dir = args.dir.resolve()  # --compare-with runs the report from that checkout's directory
    print(
        f"{'shape':<13} {'log':>8} {'records':>10} {'what':<34} {'wall s':>8} {'min-max':>11} {'cpu s':>7} "
        f"{'MB/s':>7} {'peak RSS MB':>12} {'x first':>8}"
    )
    _shapes(args)
    if "files" not in args.shapes:
        return
    for size_mb in args.sizes_mb:
        directory = args.dir / f"logs-{size_mb}mb{'' if args.histogram else '-no-histogram'}"
        if args.reuse and directory.is_dir():
            size, records = _existing(directory)
        else:
            shutil.rmtree(directory, ignore_errors=True)
            size, records = generate(directory, size_mb * 1_000_000, histogram=args.histogram)
        files = sorted(str(p) for p in directory.glob("*.jsonl"))
        report = [
            sys.executable,
            "-c",
            "import sys; from gradwatch.cli import main; main(sys.argv[1:])",
            "report",
            str(directory),
            "--format",
            "json",
            "-o",
            "/dev/null",
        ]
        without_fast = [sys.executable, "-c", "import sys; " + _NO_FAST + _CLI, *report[3:]]
        commands: dict[str, tuple[list[str], str | None]] = {
            "json.loads loop": ([sys.executable, "-c", _JSON_LOOP, *files], None),
            "gradwatch report": (report, None),
            "report --jobs 1": ([*report, "--jobs", "1"], None),
            "report, no orjson/msgspec": (without_fast, None),
        }
        if args.compare_with:
            commands["report (--compare-with)"] = (report, args.compare_with)
        _time_commands("files", size, records, commands, args, baseline="json.loads loop")
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()

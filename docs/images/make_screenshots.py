"""Regenerate the README's pictures of the HTML report: docs/images/report.png and lag_profile.png.

Needs chromium (Debian: ``apt-get install -y chromium``). Run from anywhere:
``python3 docs/images/make_screenshots.py`` (about a minute on 2 cores). The TensorBoard picture has its own
script, ``docs/images/tensorboard_screenshot.py``.

1. ``gradwatch demo`` runs the vanishing (tanh RNN) and exploding scenarios and a healthy LSTM, each log
   named by its scenario.
2. ``gradwatch report --format html`` renders all three logs as one page (report.png: its top, with the run
   index and the first run) and the vanishing layer's diagnosis alone (lag_profile.png: verdict, cause and
   fix beside the lag-norm profile).
3. ``chromium --headless`` takes the screenshots; only the two PNGs are written in the repository.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "docs" / "images"
DEMOS = (("vanishing", "rnn"), ("exploding", "rnn"), ("healthy", "lstm"))
MAX_BYTES = 300_000


def screenshot(chromium: str, page: Path, out: Path, window: str) -> None:
    """A headless-Chromium screenshot of ``page`` at ``window`` ("W,H") pixels, scale 1."""
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
            f"--window-size={window}",
            f"--screenshot={out}",
            page.as_uri(),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=120,
    )


def layer_page(logs: list[Path]) -> str:
    """A page holding only the first layer of the first log: the one picture per layer."""
    sys.path.insert(0, str(REPO))
    from gradwatch.report.command import make_report
    from gradwatch.report.render_html import _STYLE, Thresholds, _layer
    from gradwatch.report.summary import ReportOptions

    report = make_report([str(logs[0])], ReportOptions())
    run = report.runs[0]
    card = _layer(run.layers[0], Thresholds.of(run), "layer")
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<style>{_STYLE} details {{ display: none; }} body {{ margin: 0.6em; }}</style></head>"
        f"<body>{card}</body></html>"
    )


def main() -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("chromium not found: apt-get install -y chromium")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    gradwatch = [sys.executable, "-m", "gradwatch.cli"]
    with tempfile.TemporaryDirectory() as work:
        runs = Path(work, "runs")  # run from ``work``, so the page names the logs runs/demo-...jsonl
        logs: list[Path] = []
        for scenario, cell in DEMOS:
            before = set(runs.glob("*.jsonl")) if runs.exists() else set()
            demo = ["demo", "--scenario", scenario, "--cell", cell, "--no-prometheus", "--log-dir", "runs"]
            subprocess.run([*gradwatch, *demo], check=True, env=env, stdout=subprocess.DEVNULL, cwd=work)
            (log,) = set(runs.glob("*.jsonl")) - before
            logs.append(log)
        page = Path(work, "report.html")
        relative = [str(log.relative_to(work)) for log in logs]
        report = [*gradwatch, "report", *relative, "--format", "html", "-o", str(page)]
        subprocess.run(report, check=True, env=env, cwd=work)
        screenshot(chromium, page, IMAGES / "report.png", "1280,1250")
        card = Path(work, "layer.html")
        card.write_text(layer_page(logs), encoding="utf-8")
        screenshot(chromium, card, IMAGES / "lag_profile.png", "1180,330")
    for name in ("report.png", "lag_profile.png"):
        size = (IMAGES / name).stat().st_size
        print(f"wrote {IMAGES / name} ({size} bytes)")
        if size > MAX_BYTES:
            sys.exit(f"{name} is {size} bytes, over {MAX_BYTES}: shrink the window")


if __name__ == "__main__":
    main()

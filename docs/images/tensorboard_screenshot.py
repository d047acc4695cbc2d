"""Regenerate docs/images/tensorboard.png: a demo run in TensorBoard's scalars page, in headless Chromium.

Needs tensorboard (``pip install 'gradwatch[tensorboard]'``) and chromium (Debian:
``apt-get install -y chromium``). Run from anywhere: ``python3 docs/images/tensorboard_screenshot.py``.

1. ``gradwatch demo`` trains a tanh RNN on the adding problem (the exploding initialisation) and writes a
   run log; ``gradwatch report --format tensorboard`` converts it into event files (the same events a live
   ``watch(..., tensorboard=DIR)`` writes).
2. ``tensorboard --logdir`` starts on 127.0.0.1 with a free port; the script waits until it answers.
3. ``chromium --headless`` opens the scalars page filtered on the gradwatch tags and saves a screenshot.
4. TensorBoard is stopped; only docs/images/tensorboard.png is written in the repository.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUTPUT = REPO / "docs" / "images" / "tensorboard.png"
TAG_FILTER = "gradwatch/rnn/L0/forward/(1_verdict|2_lag_norm_log10)/"
"""The cards a person reads first: what decides the verdict, then log10 of the lag norms."""
WINDOW = "1400,1000"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until_serving(url: str, process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """Poll ``url`` until TensorBoard answers with at least one run (it loads event files lazily)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"tensorboard exited with status {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/data/runs", timeout=2) as response:
                if response.read().strip() not in (b"", b"[]"):
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"tensorboard did not serve {url} within {timeout:.0f} s")


def main() -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("chromium not found: apt-get install -y chromium")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with tempfile.TemporaryDirectory() as work:
        runs, events = Path(work, "runs"), Path(work, "tb")
        gradwatch = [sys.executable, "-m", "gradwatch.cli"]
        demo = ["demo", "--cell", "rnn", "--scenario", "exploding", "--steps", "200", "--every", "5"]
        subprocess.run(
            [*gradwatch, *demo, "--no-prometheus", "--log-dir", str(runs)],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
        )
        logs = [str(p) for p in runs.glob("*.jsonl")]
        subprocess.run(
            [*gradwatch, "report", "--format", "tensorboard", "-o", str(events), *logs], check=True, env=env
        )

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        serve = [sys.executable, "-m", "tensorboard.main", "--logdir", str(events), "--host", "127.0.0.1"]
        board = subprocess.Popen(
            [*serve, "--port", str(port), "--reload_interval", "1"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_until_serving(url, board)
            page = f"{url}/?darkMode=false#scalars&tagFilter={urllib.request.quote(TAG_FILTER, safe='')}"
            shot = Path(work, "tensorboard.png")
            browser = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
            browser.append("--force-device-scale-factor=1")
            subprocess.run(
                [
                    *browser,
                    f"--window-size={WINDOW}",
                    "--virtual-time-budget=20000",
                    f"--screenshot={shot}",
                    page,
                ],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=120,
            )
        finally:
            board.terminate()
            board.wait(timeout=30)
        shutil.copyfile(shot, OUTPUT)
    print(f"wrote {OUTPUT} ({OUTPUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()

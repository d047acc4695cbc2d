"""The report path never imports torch: `gradwatch report` reads JSON lines and must start fast and small."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gradwatch

REPO_ROOT = Path(__file__).resolve().parents[1]

_RUN_REPORT = (
    "import sys\n"
    "from gradwatch.cli import main\n"
    "try:\n"
    "    main(sys.argv[1:])\n"
    "except SystemExit:\n"
    "    pass\n"
    "print('torch' in sys.modules, file=sys.stderr)\n"
)


def _write_log(path: Path) -> None:
    header = {"kind": "run", "schema": 1, "run_id": "r", "started": 0.0, "config": {}, "modules": []}
    lines = [json.dumps(header)]
    for step in range(0, 100, 10):
        metrics = {"jacobian_sigma_max_mean": 0.9, "lag_norm": {"1": 0.9}, "grad_norm": {"weight_hh_l0": 0.1}}
        record = {
            "kind": "measurement",
            "run_id": "r",
            "step": step,
            "time": 0.0,
            "module": "rnn",
            "layer": 0,
        }
        lines.append(json.dumps({**record, "direction": "forward", "metrics": metrics}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_report_command_does_not_import_torch(tmp_path: Path) -> None:
    log = tmp_path / "run.jsonl"
    _write_log(log)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    for output_format in ("text", "json", "markdown", "html"):
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                _RUN_REPORT,
                "report",
                str(log),
                "--format",
                output_format,
                "-o",
                os.devnull,
            ],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO_ROOT,
            timeout=120,
            check=True,
        )
        assert done.stderr.strip().splitlines()[-1] == "False", (output_format, done.stderr)


def test_importing_the_package_does_not_import_torch_until_a_torch_name_is_used() -> None:
    code = (
        "import sys, gradwatch, gradwatch.policy, gradwatch.demo, gradwatch.report\n"
        "before = 'torch' in sys.modules\n"
        "gradwatch.watch\n"
        "print(before, 'torch' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=120,
        check=True,
    )
    assert done.stdout.split() == ["False", "True"]


def test_every_public_name_still_resolves() -> None:
    for name in gradwatch.__all__:
        assert getattr(gradwatch, name) is not None, name
    assert set(gradwatch.__all__) <= set(dir(gradwatch))
    assert callable(gradwatch.diagnose) and gradwatch.diagnose.__name__ == "diagnose"
    assert gradwatch.watch.__module__.startswith("gradwatch.")
    import gradwatch.policy as policy

    for name in policy.__all__:
        assert getattr(policy, name) is not None, name
    try:
        gradwatch.no_such_name
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("an unknown attribute must raise AttributeError")

"""Each alert reaches a user who configured no logging exactly once (issue #19.6)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import time
    from gradwatch.policy.alerts import emit_alert
    from gradwatch.records import Alert, AlertKind

    for kind in (AlertKind.EXPLODING, AlertKind.NONFINITE):
        emit_alert(
            Alert(step=3, time=time.time(), module="rnn", layer=0, direction="forward", alert=kind,
                  metric="lyapunov_max", value=1.0, threshold=0.02, message=f"ALERT-{kind.value}-MESSAGE"),
            stacklevel=1,
        )
    """
)


def test_without_logging_configured_each_alert_is_printed_once() -> None:
    root = Path(__file__).resolve().parents[1]
    environment = {**os.environ, "PYTHONPATH": str(root), "PYTHONWARNINGS": "default"}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
        check=True,
    )
    assert result.stderr.count("ALERT-exploding-MESSAGE") == 1, result.stderr
    assert result.stderr.count("ALERT-nonfinite-MESSAGE") == 1, result.stderr
    assert "ExplodingGradientWarning" in result.stderr  # the one copy is the warning

"""The demo's command-line choices, importable without torch (the CLI builds its options from them)."""

from __future__ import annotations

from typing import Literal

CellName = Literal["rnn", "lstm", "gru"]
ScenarioName = Literal["healthy", "vanishing", "exploding"]
CELLS: tuple[CellName, ...] = ("rnn", "lstm", "gru")
SCENARIOS: tuple[ScenarioName, ...] = ("healthy", "vanishing", "exploding")
DEFAULT_PORT = 9400
"""Default localhost port of the demo's Prometheus exporter."""

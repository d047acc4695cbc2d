"""``gradwatch demo``: a small RNN on the adding problem, monitored live (healthy, vanishing or exploding)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gradwatch._lazy import lazy_attributes
from gradwatch.demo.choices import CELLS, SCENARIOS

if TYPE_CHECKING:
    from gradwatch.demo.run import (
        DemoInterrupted,
        DemoOptions,
        DemoResult,
        DemoSetupError,
        Outcome,
        run_comparison,
        run_demo,
    )
    from gradwatch.demo.scenarios import Scenario, build_model, scenario_for
    from gradwatch.demo.task import AddingBatch, adding_problem_batch

# Loaded on first use (PEP 562): the demo needs torch, the CLI that offers it must not import it up front.
_LAZY_ATTRIBUTES: dict[str, str] = {
    "DemoInterrupted": "gradwatch.demo.run",
    "DemoOptions": "gradwatch.demo.run",
    "DemoResult": "gradwatch.demo.run",
    "DemoSetupError": "gradwatch.demo.run",
    "run_demo": "gradwatch.demo.run",
    "run_comparison": "gradwatch.demo.run",
    "Outcome": "gradwatch.demo.run",
    "Scenario": "gradwatch.demo.scenarios",
    "build_model": "gradwatch.demo.scenarios",
    "scenario_for": "gradwatch.demo.scenarios",
    "AddingBatch": "gradwatch.demo.task",
    "adding_problem_batch": "gradwatch.demo.task",
}


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY_ATTRIBUTES, globals())


__all__ = [
    "CELLS",
    "SCENARIOS",
    "AddingBatch",
    "DemoInterrupted",
    "DemoOptions",
    "DemoResult",
    "DemoSetupError",
    "Outcome",
    "Scenario",
    "adding_problem_batch",
    "build_model",
    "run_comparison",
    "run_demo",
    "scenario_for",
]

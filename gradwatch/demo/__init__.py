"""``gradwatch demo``: a small RNN on the adding problem, monitored live (healthy, vanishing or exploding)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from gradwatch.demo.choices import CELLS, SCENARIOS

if TYPE_CHECKING:
    from gradwatch.demo.run import DemoOptions, DemoResult, DemoSetupError, run_demo
    from gradwatch.demo.scenarios import Scenario, build_model, scenario_for
    from gradwatch.demo.task import AddingBatch, adding_problem_batch

# Loaded on first use (PEP 562): the demo needs torch, the CLI that offers it must not import it up front.
_LAZY_ATTRIBUTES: dict[str, str] = {
    "DemoOptions": "gradwatch.demo.run",
    "DemoResult": "gradwatch.demo.run",
    "DemoSetupError": "gradwatch.demo.run",
    "run_demo": "gradwatch.demo.run",
    "Scenario": "gradwatch.demo.scenarios",
    "build_model": "gradwatch.demo.scenarios",
    "scenario_for": "gradwatch.demo.scenarios",
    "AddingBatch": "gradwatch.demo.task",
    "adding_problem_batch": "gradwatch.demo.task",
}


def __getattr__(name: str) -> Any:
    """Import the submodule that defines a public name on first access and cache the name here."""
    module_name = _LAZY_ATTRIBUTES.get(name)
    if module_name is None:
        raise AttributeError(f"module 'gradwatch.demo' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """Module attributes plus the lazily loaded public names."""
    return sorted(set(globals()) | set(_LAZY_ATTRIBUTES))


__all__ = [
    "CELLS",
    "SCENARIOS",
    "AddingBatch",
    "DemoOptions",
    "DemoResult",
    "DemoSetupError",
    "Scenario",
    "adding_problem_batch",
    "build_model",
    "run_demo",
    "scenario_for",
]

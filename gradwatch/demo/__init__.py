"""``gradwatch demo``: a small RNN on the adding problem, monitored live (healthy, vanishing or exploding)."""

from gradwatch.demo.run import DemoOptions, DemoResult, DemoSetupError, run_demo
from gradwatch.demo.scenarios import CELLS, SCENARIOS, Scenario, build_model, scenario_for
from gradwatch.demo.task import AddingBatch, adding_problem_batch

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

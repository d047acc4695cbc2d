"""The measurement schedule: every N steps, stretched to stay within a share of the training time."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import gradwatch
import gradwatch.attach as attach_module
import gradwatch.monitor as monitor_module
from gradwatch.policy.schedule import DEFAULT_TIME_BUDGET, MeasurementSchedule


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run_schedule(
    schedule: MeasurementSchedule, clock: FakeClock, steps: int, step_seconds: float, cost: float
) -> list[int]:
    """Drive the schedule as the monitor does; returns the measured steps."""
    measured = []
    for step in range(steps):
        clock.now += step_seconds  # the step's forward, backward
        schedule.step_boundary()
        if schedule.is_measured(step):
            measured.append(step)
            clock.now += cost
            schedule.measured(step, cost)
    return measured


def test_without_a_budget_every_multiple_is_measured() -> None:
    clock = FakeClock()
    measured = run_schedule(MeasurementSchedule(50, None, clock), clock, 301, 0.03, cost=0.3)
    assert measured == [0, 50, 100, 150, 200, 250, 300]


def test_a_costly_measurement_stretches_the_interval_to_the_budget() -> None:
    """cost 10 training steps, budget 2%: a measurement every 500 steps, on multiples of every."""
    clock = FakeClock()
    schedule = MeasurementSchedule(50, 0.02, clock)
    measured = run_schedule(schedule, clock, 2001, 0.03, cost=0.3)
    assert measured == [0, 500, 1000, 1500, 2000]
    assert schedule.interval() == 500
    # Each measurement after the first costs at most 2% of the training time since the one before it.
    assert (len(measured) - 1) * 0.3 <= 0.02 * (measured[-1] * 0.03) * (1 + 1e-9)


def test_a_cheap_measurement_keeps_the_schedule() -> None:
    clock = FakeClock()
    measured = run_schedule(MeasurementSchedule(50, 0.02, clock), clock, 201, 0.03, cost=0.02)
    assert measured == [0, 50, 100, 150, 200]


def test_the_interval_follows_the_last_measurement_cost() -> None:
    """A cold first measurement (50 steps of compute at a 10% budget: 500 steps), then warm ones (5 steps
    of compute: every 50)."""
    clock = FakeClock()
    schedule = MeasurementSchedule(10, 0.1, clock)
    measured = []
    for step in range(701):
        clock.now += 0.01
        schedule.step_boundary()
        if schedule.is_measured(step):
            measured.append(step)
            cost = 0.5 if step == 0 else 0.05
            clock.now += cost
            schedule.measured(step, cost)
    assert measured == [0, 500, 550, 600, 650, 700]


def test_the_decision_for_a_step_never_changes() -> None:
    """The hooks are armed with the answer before the step runs; the step is measured by it after."""
    clock = FakeClock()
    schedule = MeasurementSchedule(5, 0.5, clock)
    schedule.step_boundary()
    assert schedule.is_measured(0)
    schedule.measured(0, 1.0)
    first = schedule.is_measured(5)  # no step time known yet: measured
    clock.now += 0.001
    for _ in range(5):
        clock.now += 0.001
        schedule.step_boundary()
    assert schedule.is_measured(5) == first


class TinyLstm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(3, 8)
        self.out = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.rnn(x)[0]).sum()


def _train(monitor_every: int | None, steps: int, **options: object) -> list[int]:
    torch.manual_seed(0)
    model = TinyLstm()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.watch(model, optimizer, every=monitor_every, **options) as monitor:  # type: ignore[arg-type]
        for _ in range(steps):
            optimizer.zero_grad()
            model(torch.randn(6, 2, 3)).backward()
            optimizer.step()
        monitor.wait()
        return sorted(
            {record.step for record in monitor.history if isinstance(record, gradwatch.Measurement)}
        )


@pytest.fixture
def slow_measurements(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every measurement costs 30 ms more on the training thread (a training step here is ~1 ms)."""
    import time

    original = monitor_module.Monitor._measure

    def slow(self: monitor_module.Monitor, *args: object, **kwargs: object) -> object:
        time.sleep(0.03)
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(monitor_module.Monitor, "_measure", slow)


def test_the_default_schedule_stays_within_its_budget(
    slow_measurements: None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="gradwatch"):
        measured = _train(None, 151, background=False)
    assert measured[0] == 0
    assert len(measured) < 4  # 0, 50, 100, 150 without the budget
    assert all(step % 50 == 0 for step in measured)
    assert any("measurements within 2% of the training time" in message for message in caplog.messages)


def test_an_explicit_every_measures_exactly_every_n_steps(slow_measurements: None) -> None:
    assert _train(50, 151, background=False) == [0, 50, 100, 150]


def test_time_budget_with_an_explicit_every(slow_measurements: None) -> None:
    measured = _train(10, 61, background=False, time_budget=DEFAULT_TIME_BUDGET)
    assert measured[0] == 0 and len(measured) < 7


@pytest.mark.parametrize("budget", [0, -0.1, 1.5, float("nan"), True, "2%"])
def test_a_bad_time_budget_is_refused_with_what_is_accepted(budget: object) -> None:
    with pytest.raises(ValueError, match=r"time_budget must be None or .* in \(0, 1\]"):
        gradwatch.watch(TinyLstm(), every=5, time_budget=budget)  # type: ignore[arg-type]


def test_several_ranks_keep_the_fixed_schedule(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every rank must measure the same steps (the global view gathers them), so no budget applies."""
    for module in (monitor_module, attach_module):  # watch() and the Monitor both ask for the rank
        monkeypatch.setattr(module, "distributed_rank", lambda: (0, 2))
    monkeypatch.setattr(attach_module, "shared_run_id", lambda run_id: run_id)
    with gradwatch.watch(TinyLstm()) as monitor:
        assert monitor.config.time_budget == DEFAULT_TIME_BUDGET  # asked for, as the header says
        assert monitor._schedule.time_budget is None
    for module in (monitor_module, attach_module):
        monkeypatch.setattr(module, "distributed_rank", lambda: (0, 1))
    with gradwatch.watch(TinyLstm()) as monitor:
        assert monitor._schedule.time_budget == DEFAULT_TIME_BUDGET


def test_a_stretch_past_four_times_every_warns_once_with_the_interval_and_the_remedies(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue #28: cost 10 training steps at a 2% budget stretches every=50 to 500 (10x): one WARNING."""
    clock = FakeClock()
    schedule = MeasurementSchedule(50, 0.02, clock)
    with caplog.at_level(logging.INFO, logger="gradwatch"):
        run_schedule(schedule, clock, 2001, 0.03, cost=0.3)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "every 500 steps instead of every 50" in message
    assert "every=N" in message and "time_budget=" in message and "background=True" in message
    assert not [r for r in caplog.records if r.levelno == logging.INFO]  # the warning says it all


def test_a_small_stretch_is_only_logged_at_info(caplog: pytest.LogCaptureFixture) -> None:
    """cost 3 training steps at a 2% budget: every 50 becomes 150 (3x), within the 4x that only informs."""
    clock = FakeClock()
    with caplog.at_level(logging.INFO, logger="gradwatch"):
        measured = run_schedule(MeasurementSchedule(50, 0.02, clock), clock, 1001, 0.03, cost=0.09)
    assert measured[:3] == [0, 150, 300]
    assert [r.levelno for r in caplog.records if r.name == "gradwatch"] == [logging.INFO]

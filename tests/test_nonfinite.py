"""Non-finite gradients: step suppression proven bit for bit per optimizer, the tracker, the policy."""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable

import pytest
import torch
from torch import nn

from gradwatch.policy.alerts import NonFiniteGradientError
from gradwatch.policy.nonfinite import (
    NonFinitePolicy,
    NonFiniteTracker,
    enforce_nonfinite_policy,
    suppress_optimizer_step,
)
from gradwatch.records import AlertKind

OPTIMIZERS: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adam-amsgrad-weight-decay": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True, weight_decay=0.1),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, weight_decay=0.1),
    "sgd-nesterov": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, nesterov=True),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.5),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2),
    "adamax": lambda p: torch.optim.Adamax(p, lr=1e-2),
    "nadam": lambda p: torch.optim.NAdam(p, lr=1e-2),
    "radam": lambda p: torch.optim.RAdam(p, lr=1e-2),
    "asgd": lambda p: torch.optim.ASGD(p, lr=1e-2),
    "rprop": lambda p: torch.optim.Rprop(p, lr=1e-2),
    "adadelta": lambda p: torch.optim.Adadelta(p, lr=1.0),
}


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[list[torch.Tensor], dict]:
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(optimizer.state_dict())


def assert_bitwise_equal(left: object, right: object) -> None:
    """Tensors compared bit for bit (NaN-aware), containers recursively, scalars by equality."""
    if isinstance(left, torch.Tensor):
        assert isinstance(right, torch.Tensor) and left.dtype == right.dtype and left.shape == right.shape
        assert torch.equal(left.view(-1).view(torch.uint8), right.view(-1).view(torch.uint8))
    elif isinstance(left, dict):
        assert isinstance(right, dict) and left.keys() == right.keys()
        for key in left:
            assert_bitwise_equal(left[key], right[key])
    elif isinstance(left, (list, tuple)):
        assert isinstance(right, (list, tuple)) and len(left) == len(right)
        for a, b in zip(left, right, strict=True):
            assert_bitwise_equal(a, b)
    elif isinstance(left, float) and math.isnan(left):
        assert isinstance(right, float) and math.isnan(right)
    else:
        assert left == right


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> None:
    optimizer.zero_grad()
    output, _ = model(x)
    output.square().mean().backward()
    optimizer.step()


@pytest.mark.parametrize("warm_steps", [0, 3], ids=["first-step", "after-3-steps"])
@pytest.mark.parametrize("make_optimizer", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_suppressed_step_leaves_parameters_and_state_bit_identical(make_optimizer, warm_steps: int) -> None:
    model = nn.GRU(3, 5)
    optimizer = make_optimizer(list(model.parameters()))
    x = torch.randn(4, 2, 3)
    for _ in range(warm_steps):
        train_step(model, optimizer, x)
    # The monitor's mechanism: an optimizer step PRE-hook that cannot cancel the step sets every grad to None.
    handle = optimizer.register_step_pre_hook(lambda opt, args, kwargs: suppress_optimizer_step(opt))
    optimizer.zero_grad()
    output, _ = model(x * float("nan"))
    output.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    before = snapshot(model, optimizer)
    optimizer.step()
    assert_bitwise_equal(snapshot(model, optimizer), before)
    assert all(p.grad is None for p in model.parameters())
    handle.remove()
    train_step(model, optimizer, x)  # training continues normally afterwards
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_without_suppression_the_same_step_does_change_state() -> None:
    """Control for the test above: the nan step really would have corrupted Adam."""
    model = nn.GRU(3, 5)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(4, 2, 3)
    train_step(model, optimizer, x)
    optimizer.zero_grad()
    output, _ = model(x * float("nan"))
    output.sum().backward()
    optimizer.step()
    assert not all(torch.isfinite(p).all() for p in model.parameters())


def test_tracker_alerts_once_per_episode_and_recovers() -> None:
    tracker = NonFiniteTracker()
    alerts = []
    for step in range(5):
        alerts += tracker.update(step, "rnn", {"weight_hh_l0": 3, "bias_hh_l0": 0}, time=float(step))
    assert [(a.alert, a.step, a.value, a.metric) for a in alerts] == [
        (AlertKind.NONFINITE, 0, 3.0, "grad_nonfinite")
    ]
    assert "weight_hh_l0" in alerts[0].message and "bias_hh_l0" not in alerts[0].message
    assert tracker.active() == [("rnn", 0, "forward")]
    recovered = [a for step in range(5, 8) for a in tracker.update(step, "rnn", {"weight_hh_l0": 0})]
    assert [(a.alert, a.step) for a in recovered] == [(AlertKind.RECOVERED, 5)]
    assert "since step 0" in recovered[0].message
    other = tracker.update(9, "other", {"w": 1})
    assert [a.module for a in other] == ["other"]


def test_tracker_state_round_trip() -> None:
    tracker = NonFiniteTracker()
    tracker.update(1, "rnn", {"w": 2})
    restored = NonFiniteTracker()
    restored.load_state_dict(tracker.state_dict())
    assert restored.update(2, "rnn", {"w": 2}) == []
    assert [a.alert for a in restored.update(3, "rnn", {"w": 0})] == [AlertKind.RECOVERED]
    with pytest.raises(ValueError, match="state_dict"):
        restored.load_state_dict({})
    with pytest.raises(TypeError, match="counts"):
        tracker.update(4, "rnn", [1, 2])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("warn", NonFinitePolicy.WARN),
        ("raise", NonFinitePolicy.RAISE),
        (NonFinitePolicy.SKIP, NonFinitePolicy.SKIP),
    ],
    ids=["warn", "raise", "enum"],
)
def test_policy_parse(value: object, expected: NonFinitePolicy) -> None:
    assert NonFinitePolicy.parse(value) is expected  # type: ignore[arg-type]


def test_policy_parse_names_accepted_values() -> None:
    with pytest.raises(ValueError, match="'warn', 'raise', 'skip'"):
        NonFinitePolicy.parse("ignore")


def test_enforce_raise_names_module_and_parameter() -> None:
    expected = re.escape("'weight_ih_l0' in module 'encoder.rnn'")
    with pytest.raises(NonFiniteGradientError, match=expected) as info:
        enforce_nonfinite_policy(
            "raise", module="encoder.rnn", counts={"bias": 0, "weight_ih_l0": 7}, step=12
        )
    assert (info.value.module, info.value.parameter, info.value.count, info.value.step) == (
        "encoder.rnn",
        "weight_ih_l0",
        7,
        12,
    )


def test_enforce_skip_and_warn() -> None:
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.ones(1, 2)).sum().backward()
    assert (
        enforce_nonfinite_policy("warn", module="m", counts={"weight": 1}, step=0, optimizer=optimizer)
        is False
    )
    assert all(p.grad is not None for p in model.parameters())
    assert (
        enforce_nonfinite_policy("skip", module="m", counts={"weight": 0}, step=0, optimizer=optimizer)
        is False
    )
    assert (
        enforce_nonfinite_policy("skip", module="m", counts={"weight": 1}, step=0, optimizer=optimizer)
        is True
    )
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="optimizer"):
        enforce_nonfinite_policy("skip", module="m", counts={"weight": 1}, step=0)


def test_tracker_message_carries_the_explosion_it_follows() -> None:
    """Issue #12.2: a NaN after an exploding measurement names that cause and fix, not the generic hint."""
    from gradwatch.policy.explain import explain_nonfinite_context
    from gradwatch.policy.trends import DetectionConfig, JacobianReading, Verdict

    reading = JacobianReading(0, 0, "forward", Verdict.EXPLODING, 0.21, 39, 2.6e4, "driven by W", "fix W")
    context = explain_nonfinite_context(reading, None, DetectionConfig())
    assert context is not None
    (alert,) = NonFiniteTracker().update(1, "rnn", {"weight_hh_l0": 3}, context=context)
    assert "follows an exploding measurement" in alert.message and "step 0" in alert.message
    assert "driven by W" in alert.message and "Hint: fix W" in alert.message
    healthy = JacobianReading(0, 0, "forward", Verdict.HEALTHY, -0.1, 39, 0.1, "", "")
    assert explain_nonfinite_context(healthy, None, DetectionConfig()) is None
    assert "since step 4" in (explain_nonfinite_context(healthy, 4, DetectionConfig()) or "")

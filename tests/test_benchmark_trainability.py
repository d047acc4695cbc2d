"""The trainability benchmark's own parts: the independent ratio it measures (against theory) and how it
judges a run that never learns (against synthetic alert histories)."""

from __future__ import annotations

import math

import click
import pytest
import torch
from torch import nn

from benchmarks.trainability import (
    AddingModel,
    _judge_never_learned,
    agreement_with_independent_ratio,
    changed_config,
    input_gradient_ratio,
)
from gradwatch.policy.config import DetectionConfig
from gradwatch.records import Alert, AlertKind


@pytest.mark.parametrize("scale", [0.5, 0.9, 1.0])
def test_the_independent_ratio_is_the_product_of_the_step_jacobians_for_a_linear_regime(scale: float) -> None:
    """A ReLU RNN with W_hh = scale x I, positive input weights and inputs, no biases, keeps every unit
    active: J_t = scale x I, so dL/dx_0 = scale^(T-1) dL/dx_(T-1) for every sequence, and the ratio of the
    batch gradients is scale^(T-1) exactly."""
    steps, hidden = 12, 4
    rnn = nn.RNN(2, hidden, nonlinearity="relu")
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(scale * torch.eye(hidden))
        rnn.weight_ih_l0.uniform_(0.1, 1.0)
        rnn.bias_ih_l0.zero_()
        rnn.bias_hh_l0.zero_()
    model = AddingModel(rnn)
    generator = torch.Generator().manual_seed(0)
    inputs = torch.rand(steps, 5, 2, generator=generator) + 0.1
    targets = torch.rand(5, 1, generator=generator)
    before = [p.detach().clone() for p in model.parameters()]
    ratio = input_gradient_ratio(model, inputs, targets)
    stored = float(torch.tensor(scale, dtype=torch.float32))  # the float32 weight the float64 copy holds
    assert ratio == pytest.approx(stored ** (steps - 1), rel=1e-9)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # a copy
    assert all(p.grad is None for p in model.parameters())


def _alert(kind: AlertKind, step: int) -> Alert:
    return Alert(step, float(step), "rnn", 0, "forward", kind, "lyapunov_max", None, None, "")


def _outcome(ratios: list[tuple[int, float]]) -> dict[str, object]:
    return {"input_gradient_ratio": ratios}


CONFIG = DetectionConfig()


def test_a_never_learner_whose_gradient_never_reaches_must_stay_vanishing() -> None:
    ratios = _outcome([(step, 1e-9) for step in range(100, 2001, 100)])
    opened = [_alert(AlertKind.VANISHING, 140)]
    assert _judge_never_learned(opened, "vanishing", ratios, CONFIG) == (True, "")
    recovered = [*opened, _alert(AlertKind.RECOVERED, 900)]
    right, why = _judge_never_learned(recovered, "healthy", ratios, CONFIG)
    assert not right and "recovered at 900" in why
    assert not _judge_never_learned([], "healthy", ratios, CONFIG)[0]  # vanishing must open


def test_a_never_learner_whose_gradient_reaches_may_recover_and_must_not_end_vanishing() -> None:
    ratios = _outcome([(step, 1e-9 if step < 1400 else 5e-3) for step in range(100, 2001, 100)])
    history = [_alert(AlertKind.VANISHING, 140), _alert(AlertKind.RECOVERED, 1520)]
    assert _judge_never_learned(history, "healthy", ratios, CONFIG) == (True, "")
    right, why = _judge_never_learned(history[:1], "vanishing", ratios, CONFIG)
    assert not right and "says not vanishing" in why


def test_without_recorded_ratios_the_issues_literal_rule_applies() -> None:
    history = [_alert(AlertKind.VANISHING, 140), _alert(AlertKind.RECOVERED, 1520)]
    assert not _judge_never_learned(history, "healthy", {}, CONFIG)[0]
    assert _judge_never_learned(history[:1], "vanishing", {}, CONFIG)[0]


def test_agreement_counts_the_evaluations_where_the_state_matches_the_ratio() -> None:
    ratios = _outcome([(200, 1e-9), (300, 1e-9), (400, 1.0), (500, 1.0)])
    history = [_alert(AlertKind.VANISHING, 140), _alert(AlertKind.RECOVERED, 450)]
    # open at 200 and 300 (ratio below: agree), open at 400 (ratio above: disagree), recovered at 500
    assert agreement_with_independent_ratio(history, ratios, CONFIG) == pytest.approx(3 / 4)
    assert agreement_with_independent_ratio(history, {}, CONFIG) is None


def test_changed_config_parses_each_field_as_its_type_and_refuses_unknown_fields() -> None:
    config = changed_config(("vanishing_lag_norm=1e-3", "vanishing_recovery_patience=20"))
    assert config.vanishing_lag_norm == 1e-3 and config.vanishing_recovery_patience == 20
    assert math.isclose(changed_config(()).vanishing_lag_norm, DetectionConfig().vanishing_lag_norm)
    with pytest.raises(click.BadParameter, match="DetectionConfig field"):
        changed_config(("no_such_field=1",))

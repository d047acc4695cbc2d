"""Step policies behind the one StepPolicy interface, without a monitor."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradwatch.capture.modules import find_rnn_modules
from gradwatch.policy.alerts import NonFiniteGradientError
from gradwatch.policy.clipping import FixedNorm
from gradwatch.policy.nonfinite import NonFinitePolicy
from gradwatch.policy.step import ClipStepPolicy, GradientStats, NonFiniteStepPolicy, StepPolicy
from gradwatch.policy.trends import DetectionConfig, TrendDetector
from gradwatch.records import Alert, AlertKind, ClipEvent


def _rnn_with_gradients(scale: float) -> nn.RNN:
    rnn = nn.RNN(3, 4)
    for p in rnn.parameters():
        p.grad = torch.full_like(p, scale)
    return rnn


def _stats(rnn: nn.RNN) -> GradientStats:
    norms = {f"rnn.{n}": float(p.grad.norm()) for n, p in rnn.named_parameters() if p.grad is not None}
    bad = {f"rnn.{n}": int((~torch.isfinite(p.grad)).sum()) for n, p in rnn.named_parameters()}
    return GradientStats(norms, bad)


def test_clip_policy_clips_like_clip_grad_norm_and_never_on_non_finite_steps() -> None:
    rnn = _rnn_with_gradients(1.0)
    reference = [nn.Parameter(p.detach().clone()) for p in rnn.parameters()]
    for copy, p in zip(reference, rnn.parameters(), strict=True):
        copy.grad = p.grad.clone()
    torch.nn.utils.clip_grad_norm_(reference, 0.5)  # what the policy must do to the real gradients
    policy: StepPolicy = ClipStepPolicy(
        FixedNorm(0.5),
        list(rnn.parameters()),
        TrendDetector(DetectionConfig()),
        find_rnn_modules(nn.Sequential(rnn)),
        mode="always",
        rank=0,
        run_id="r",
    )
    (event,) = policy.before_step(3, _stats(rnn), None)
    assert isinstance(event, ClipEvent) and event.step == 3 and event.run_id == "r"
    for p, copy in zip(rnn.parameters(), reference, strict=True):
        torch.testing.assert_close(p.grad, copy.grad, rtol=1e-6, atol=0)
    rnn.weight_hh_l0.grad[0, 0] = float("nan")
    assert policy.before_step(4, _stats(rnn), None) == []  # non-finite: not clipped


def test_nonfinite_policy_alerts_once_and_raises_in_raise_mode() -> None:
    rnn = _rnn_with_gradients(float("inf"))
    watched = find_rnn_modules(nn.Sequential(rnn))
    detector = TrendDetector(DetectionConfig())
    warn = NonFiniteStepPolicy(watched, detector, NonFinitePolicy.WARN, rank=0, run_id="r")
    (alert,) = warn.before_step(0, _stats(rnn), None)
    assert isinstance(alert, Alert) and alert.alert is AlertKind.NONFINITE
    assert warn.before_step(1, _stats(rnn), None) == []  # same episode: one alert
    assert warn.before_step(2, GradientStats({}, {}, complete=False), None) == []  # no stats: no action
    strict = NonFiniteStepPolicy(watched, detector, NonFinitePolicy.RAISE, rank=0, run_id="r")
    with pytest.raises(NonFiniteGradientError):
        strict.before_step(0, _stats(rnn), None)

"""gradwatch.diagnose: one measurement of a fresh model, judged with the monitor's rules."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.policy.evidence import Verdict
from tests.oracles.reference_cases import lstm_forget_bias_one, scaled_orthogonal_rnn

CASES = [
    ("relu-2x-orthogonal", lambda: scaled_orthogonal_rnn("relu", 2.0), 50, Verdict.EXPLODING),
    ("tanh-0.2x-orthogonal-T100", lambda: scaled_orthogonal_rnn("tanh", 0.2), 100, Verdict.VANISHING),
    ("tanh-orthogonal-small-inputs-T20", lambda: scaled_orthogonal_rnn("tanh", 1.0), 20, Verdict.HEALTHY),
    ("lstm-forget-bias-1-T25", lstm_forget_bias_one, 25, Verdict.HEALTHY),
    ("lstm-forget-bias-1-T150", lstm_forget_bias_one, 150, Verdict.VANISHING),
]


@pytest.mark.parametrize(("name", "make", "steps", "expected"), CASES, ids=[c[0] for c in CASES])
def test_reference_cases(name, make, steps, expected):
    model = make()
    scale = 0.1 if "small-inputs" in name else 1.0
    diagnosis = gradwatch.diagnose(model, scale * torch.randn(steps, 8, 4), print_report=False)
    assert diagnosis.verdict(type(model).__name__.lower()) is expected, diagnosis.layers[0].message
    assert diagnosis.healthy is (expected is Verdict.HEALTHY)
    metrics = diagnosis.layers[0].metrics
    assert metrics.horizon == steps - 1 and metrics.gradient_reach is not None
    assert (metrics.gradient_reach < steps - 1) is (expected is Verdict.VANISHING)


def test_a_fresh_gated_cell_that_does_not_reach_is_vanishing_with_a_note_that_it_may_learn_to():
    torch.manual_seed(0)
    diagnosis = gradwatch.diagnose(lstm_forget_bias_one(), torch.randn(150, 8, 4), print_report=False)
    layer = diagnosis.layers[0]
    assert layer.verdict is Verdict.VANISHING
    assert "reaches back about" in layer.message and "of the 149 steps" in layer.message
    assert "cannot be learned now" in layer.message
    assert "Gated cells (LSTM, GRU) often lengthen their reach while they learn" in layer.message
    # a plain RNN gets no such note
    plain = gradwatch.diagnose(scaled_orthogonal_rnn("tanh", 0.2), torch.randn(150, 8, 4), print_report=False)
    assert plain.layers[0].verdict is Verdict.VANISHING and "Gated cells" not in plain.layers[0].message


@pytest.mark.parametrize(("horizon", "expected"), [(10, Verdict.HEALTHY), (100, Verdict.VANISHING)])
def test_vanishing_is_judged_at_the_declared_horizon(horizon: int, expected: Verdict) -> None:
    torch.manual_seed(0)
    model, inputs = nn.RNN(4, 16), torch.randn(100, 8, 4)  # default tanh: reaches back ~15 steps
    diagnosis = gradwatch.diagnose(model, inputs, print_report=False, horizon=horizon)
    layer = diagnosis.layers[0]
    assert layer.metrics.horizon == horizon and layer.verdict is expected, layer.message
    assert layer.metrics.gradient_reach is not None and 5 < layer.metrics.gradient_reach < 40


def test_a_horizon_beyond_the_sequence_is_judged_at_the_sequence_length() -> None:
    diagnosis = gradwatch.diagnose(nn.RNN(4, 8), torch.randn(12, 2, 4), print_report=False, horizon=1000)
    assert diagnosis.layers[0].metrics.horizon == 12
    default = gradwatch.diagnose(nn.RNN(4, 8), torch.randn(12, 2, 4), print_report=False)
    assert default.layers[0].metrics.horizon == 11


@pytest.mark.parametrize("horizon", [0, -5, 2.5, True, "150"])
def test_a_bad_horizon_is_a_clear_error(horizon: object) -> None:
    with pytest.raises(ValueError, match=r"horizon must be None .* a positive integer"):
        gradwatch.diagnose(nn.RNN(4, 8), torch.randn(12, 2, 4), print_report=False, horizon=horizon)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"horizon must be None .* a positive integer"):
        gradwatch.watch(nn.RNN(4, 8), horizon=horizon)  # type: ignore[arg-type]


def test_message_names_the_factor_and_a_hint():
    diagnosis = gradwatch.diagnose(
        scaled_orthogonal_rnn("tanh", 0.2), torch.randn(100, 4, 4), print_report=False
    )
    message = diagnosis.layers[0].message
    assert "sigma_max(W_hh)" in message and "Hint" in message and "orthogonal" in message


def test_diagnosis_is_invisible_to_the_model_and_rng():
    model = nn.Sequential()
    model.add_module("rnn", nn.LSTM(4, 8, num_layers=2, dropout=0.5))
    x = torch.randn(12, 3, 4)
    state = torch.random.get_rng_state()
    params = [p.detach().clone() for p in model.parameters()]
    diagnosis = gradwatch.diagnose(model.rnn, x, print_report=False)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    assert all(p.grad is None for p in model.parameters())
    assert not model.rnn._forward_hooks
    assert {(d.layer, d.direction) for d in diagnosis.layers} == {(0, "forward"), (1, "forward")}


def test_printed_table_lists_every_layer(capsys):
    gradwatch.diagnose(nn.GRU(4, 8, bidirectional=True), torch.randn(10, 2, 4))
    out = capsys.readouterr().out
    assert "pre-flight diagnosis" in out and "reverse" in out and "forward" in out


def test_length_one_sequence_is_not_measurable_not_an_error():
    diagnosis = gradwatch.diagnose(nn.RNN(4, 8), torch.randn(1, 2, 4), print_report=False)
    assert diagnosis.layers[0].verdict is Verdict.UNKNOWN


def test_a_model_whose_forward_skips_the_rnn_is_a_clear_error():
    class Skips(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.RNN(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    with pytest.raises(RuntimeError, match="did not run any recurrent module"):
        gradwatch.diagnose(Skips(), torch.randn(3, 1, 2), print_report=False)


def test_printed_diagnosis_keeps_bracketed_evidence() -> None:
    """The message's "[sigma_max(W_hh) = ...]" stays in the printed table (rich would read it as markup)."""
    torch.manual_seed(0)
    rnn = torch.nn.RNN(3, 8)
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(0.2 * torch.nn.init.orthogonal_(torch.empty(8, 8)))
    diagnosis = gradwatch.diagnose(rnn, torch.randn(16, 2, 3), print_report=False)
    (layer,) = diagnosis.layers
    assert "[" in layer.message, layer.message
    text = " ".join(str(diagnosis).split())
    assert "".join(layer.message.split()) in "".join(text.replace("│", "").split())


def test_a_rule_that_needs_several_measurements_leaves_one_ordinary_reading_unknown():
    """Issue #28: with the training rule (patience 3) one measurement is too few: unknown, said so; an
    extreme reading (an exploding product beyond exploding_extreme_lag_norm) still decides, and says so."""
    training_rule = dataclasses.replace(gradwatch.DetectionConfig.for_diagnosis(), patience=3)
    lstm = gradwatch.diagnose(
        lstm_forget_bias_one(), torch.randn(50, 8, 4), print_report=False, detection=training_rule
    )
    (layer,) = lstm.layers
    assert layer.verdict is Verdict.UNKNOWN and not lstm.healthy
    assert "1 measurement; the rule needs 3" in layer.message and "lyapunov_max" in layer.message
    relu = gradwatch.diagnose(
        scaled_orthogonal_rnn("relu", 2.0), torch.randn(50, 8, 4), print_report=False, detection=training_rule
    )
    (layer,) = relu.layers
    assert layer.verdict is Verdict.EXPLODING
    assert layer.message.startswith("decided on one measurement, an extreme case")


def test_an_unmeasurable_layer_is_not_healthy():
    diagnosis = gradwatch.diagnose(nn.RNN(4, 8), torch.randn(1, 2, 4), print_report=False)
    assert not diagnosis.healthy and "too short" in diagnosis.layers[0].message


@pytest.mark.parametrize(("needed", "expected"), [(1, Verdict.HEALTHY), (2, Verdict.UNKNOWN)])
def test_one_measurement_decides_exactly_when_the_rule_needs_one(needed: int, expected: Verdict) -> None:
    """diagnose measures once: a rule that needs 1 judged measurement gives a real verdict, one that needs
    2 leaves the ordinary reading unknown and says it counted it."""
    rule = dataclasses.replace(gradwatch.DetectionConfig.for_diagnosis(), vanishing_patience=needed)
    assert rule.measurements_needed == needed
    diagnosis = gradwatch.diagnose(
        lstm_forget_bias_one(), torch.randn(50, 8, 4), print_report=False, detection=rule
    )
    (layer,) = diagnosis.layers
    assert layer.verdict is expected, layer.message
    if expected is Verdict.UNKNOWN:
        assert layer.message.startswith(f"unknown: 1 measurement; the rule needs {needed} (")


def test_the_training_rule_does_not_count_the_one_reading_inside_its_warm_up() -> None:
    """DetectionConfig() judges from step 100 on: diagnose's reading at step 0 is unknown and says why; an
    extreme reading still decides at once."""
    rule = gradwatch.DetectionConfig()
    diagnosis = gradwatch.diagnose(
        lstm_forget_bias_one(), torch.randn(50, 8, 4), print_report=False, detection=rule
    )
    (layer,) = diagnosis.layers
    assert layer.verdict is Verdict.UNKNOWN and not diagnosis.healthy
    warmup, needed = rule.vanishing_warmup_steps, rule.measurements_needed
    assert layer.message.startswith(
        f"unknown: 1 measurement, inside the {warmup}-step warm-up; the rule needs {needed} after it"
    )
    assert layer.message.count("measurement") == 1  # said once
    relu = gradwatch.diagnose(
        scaled_orthogonal_rnn("relu", 2.0), torch.randn(50, 8, 4), print_report=False, detection=rule
    )
    (layer,) = relu.layers
    assert layer.verdict is Verdict.EXPLODING
    assert layer.message.startswith("decided on one measurement, an extreme case")


@pytest.mark.parametrize(
    ("kind", "gain", "says", "never"),
    [
        ("tanh", 0.2, "the gradient reaches back about {reach:.3g} of the {horizon} steps", "whole horizon"),
        ("relu", 1.5, "the Jacobian product grows (lyapunov_max = {lyapunov:.3g} > 0.02", "not explode"),
        ("relu", 1.3, "the gradient reaches back {reach:.3g} steps, the whole horizon of {horizon}", "grows"),
    ],
    ids=["short-reach", "growing-product", "healthy-reading"],
)
def test_an_unknown_layer_describes_its_one_reading_truthfully(
    kind: str, gain: float, says: str, never: str
) -> None:
    """The training rule leaves the step-0 reading unknown; the message then says what that reading shows
    on its own (a short reach is not "the whole horizon", a growing product does not "not explode")."""
    torch.manual_seed(0)
    diagnosis = gradwatch.diagnose(
        scaled_orthogonal_rnn(kind, gain),
        torch.randn(50, 8, 4),
        print_report=False,
        detection=gradwatch.DetectionConfig(),
    )
    (layer,) = diagnosis.layers
    assert layer.verdict is Verdict.UNKNOWN
    metrics = layer.metrics
    assert metrics.gradient_reach is not None and metrics.horizon is not None
    short = metrics.gradient_reach < metrics.horizon
    assert short is (kind == "tanh")  # the reading's own verdict: a short reach only for the 0.2 x tanh
    expected = says.format(
        reach=metrics.gradient_reach, horizon=metrics.horizon, lyapunov=metrics.lyapunov_max
    )
    this_one = layer.message.partition("This one: ")[2]
    assert this_one.startswith(expected) and never not in this_one, layer.message


@pytest.mark.parametrize("rule", ["for-diagnosis", "training"])
def test_a_reading_whose_reach_cannot_be_judged_says_so_not_healthy(rule: str) -> None:
    """An identity-initialised relu RNN whose units are all dead at the first step: every product up to
    lag 32 has norm 1, the one over all 50 steps is exactly 0, so whether the gradient reaches the horizon
    of 49 steps is not measured. Unknown under either rule, and the message says why."""
    rnn = nn.RNN(1, 4, nonlinearity="relu")
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(torch.eye(4))
        rnn.weight_ih_l0.fill_(1.0)
        rnn.bias_ih_l0.fill_(0.5)
        rnn.bias_hh_l0.zero_()
    inputs = torch.zeros(50, 2, 1)
    inputs[0] = -10.0  # every unit dead at the first step (pre-activation -9.5)
    detection = gradwatch.DetectionConfig() if rule == "training" else None
    diagnosis = gradwatch.diagnose(rnn, inputs, print_report=False, detection=detection)
    (layer,) = diagnosis.layers
    assert layer.metrics.lag_norm["50"] == 0.0 and layer.metrics.lag_norm["32"] == pytest.approx(1.0)
    assert layer.verdict is Verdict.UNKNOWN and not diagnosis.healthy
    assert layer.message.startswith("unknown: 1 measurement, without a usable lag product; the rule needs ")
    assert "The gradient reach could not be measured at the horizon of 49 steps" in layer.message
    assert "healthy" not in layer.message and "whole horizon" not in layer.message

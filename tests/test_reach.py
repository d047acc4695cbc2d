"""Gradient reach (estimators/reach.py): hand-built lag profiles, and dense jacrev products of small RNNs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradwatch.diagnose import diagnose
from gradwatch.estimators.reach import (
    DEFAULT_REACH_FLOOR,
    gradient_reach,
    judged_horizon,
    measured_lags,
    product_norm_at,
    reach_at_horizon,
)
from tests.oracles.exact_metrics import default_lags, layer_weights, run_states, step_jacobians
from tests.oracles.reference_cases import lstm_forget_bias_one, scaled_orthogonal_rnn


def profile(rate: float, longest: int) -> dict[str, float | None]:
    """Lag norms exp(rate * tau) at the default lags 1, 2, 4, ..., longest: an exact exponential decay."""
    return {str(tau): math.exp(rate * tau) for tau in default_lags(longest)}


@pytest.mark.parametrize("rate", [-2.0, -0.44, -0.1, -0.05])
@pytest.mark.parametrize("floor", [1e-3, 1e-2])
def test_an_exponential_decay_reaches_log_floor_over_rate(rate: float, floor: float) -> None:
    # log-linear interpolation is exact for n(tau) = exp(rate * tau): the crossing is log(floor) / rate
    expected = math.log(floor) / rate
    lags = profile(rate, 150)
    assert gradient_reach(lags, floor) == pytest.approx(expected, rel=1e-12)
    assert product_norm_at(lags, 150) == pytest.approx(math.exp(rate * 150), rel=1e-9)
    crossing = min(150, math.floor(expected))
    assert product_norm_at(lags, crossing) == pytest.approx(math.exp(rate * crossing), rel=1e-9)


def test_a_product_that_never_falls_below_the_floor_reaches_the_whole_sequence() -> None:
    assert gradient_reach({"1": 0.9, "2": 0.8, "4": 0.5, "8": 0.2, "10": 0.05}) == 10.0
    assert gradient_reach(profile(0.3, 64)) == 64.0  # a growing product reaches too (not vanishing)


def test_the_one_step_product_below_the_floor_gives_a_reach_under_one_step() -> None:
    reach = gradient_reach({"1": 1e-6, "2": 1e-12, "3": 1e-18}, 1e-3)
    assert reach == pytest.approx(0.5)  # from lag 0 (identity, norm 1): log(1e-3) / log(1e-6)
    assert reach is not None and reach < 1


def test_a_zero_product_ends_the_reach_at_the_last_lag_above_the_floor() -> None:
    # underflow (or dead ReLU units) gives exactly 0: no interpolation into log(0)
    assert gradient_reach({"1": 0.5, "2": 0.3, "4": 0.0, "8": 0.0}) == 2.0
    assert product_norm_at({"1": 0.5, "2": 0.0, "8": 0.0}, 5) == 0.0


@pytest.mark.parametrize("bad", [None, math.inf, math.nan])
def test_an_unmeasured_or_overflowed_product_before_the_crossing_has_no_reach(bad: float | None) -> None:
    assert gradient_reach({"1": 2.0, "2": 4.0, "4": bad, "8": 1e-9}) is None
    assert product_norm_at({"1": 2.0, "2": 4.0, "4": bad, "8": 1e-9}, 6) is None
    # after the crossing it does not matter: the reach is already decided
    assert gradient_reach({"1": 0.1, "2": 0.01, "4": 1e-4, "8": bad}, 1e-3) == pytest.approx(3.0)


def test_keys_that_are_not_lags_are_ignored_and_no_lag_is_no_reach() -> None:
    assert measured_lags({"8": 0.1, "x": 1.0, "1": 0.5, "0": 1.0}) == [(1, 0.5), (8, 0.1)]
    assert gradient_reach({}) is None
    assert gradient_reach({"total": 0.5}) is None
    assert product_norm_at({"1": 0.5, "4": 0.1}, 5) is None  # beyond the longest measured lag


def test_a_zero_product_past_the_horizon_cannot_say_whether_the_gradient_reaches_it() -> None:
    # a trained relu RNN whose first step is all-inactive: ds_1/ds_0 = 0, so only the whole product is 0
    lags = {"1": 1.5, "2": 1.5, "4": 1.5, "8": 1.6, "16": 1.5, "30": 0.0}
    assert gradient_reach(lags) == 16.0  # the crossing is somewhere in (16, 30]: 16 is a lower bound
    assert reach_at_horizon(lags, 29, 1e-4) is None  # the default horizon T - 1 lies inside that bracket
    assert reach_at_horizon(lags, 30, 1e-4) == 16.0  # lag 30 itself is measured: it does not reach
    assert reach_at_horizon(lags, 12, 1e-4) == 16.0  # reached
    # a product already below the floor before the zero: the crossing is measured
    assert reach_at_horizon({"1": 0.1, "2": 0.01, "4": 1e-6, "8": 0.0}, 7, 1e-4) == pytest.approx(3.0)


@pytest.mark.parametrize("floor", [0, 1, 1.5, -1e-3, math.nan])
def test_the_floor_must_be_a_share_strictly_between_0_and_1(floor: float) -> None:
    with pytest.raises(ValueError, match=r"floor must be a number in \(0, 1\)"):
        gradient_reach({"1": 0.5}, floor)


@pytest.mark.parametrize(
    ("declared", "expected"),
    [(None, 149), (40, 40), (150, 150), (500, 150)],
    ids=["T-1", "short", "T", "long"],
)
def test_the_judged_horizon_is_the_declared_one_at_most_the_longest_lag(
    declared: int | None, expected: int
) -> None:
    assert judged_horizon(declared, profile(-0.1, 150)) == expected
    assert judged_horizon(declared, {}) is None


# --- against dense products --------------------------------------------------------------------------------

CASES = {
    "tanh 0.5 x orth": lambda: scaled_orthogonal_rnn("tanh", 0.5, hidden=16, inputs=2),
    "tanh default": lambda: nn.RNN(2, 16),
    "relu default": lambda: nn.RNN(2, 16, nonlinearity="relu"),
    "gru default": lambda: nn.GRU(2, 16),
    "lstm forget bias 1": lambda: lstm_forget_bias_one(hidden=16, inputs=2),
}


def exact_profile(module: nn.RNN | nn.LSTM | nn.GRU, inputs: torch.Tensor) -> dict[int, float]:
    """Median over sequences of the dense product norm ||J_{T-1} ... J_{T-tau}||_2 at EVERY lag 1..T."""
    weights = layer_weights(module).to(torch.float64)
    x = inputs.to(torch.float64)
    with torch.no_grad():
        states = run_states(weights, x)
    jacobians = step_jacobians(weights, x, states)
    steps, batch, size, _ = jacobians.shape
    product = torch.eye(size, dtype=torch.float64).expand(batch, size, size)
    norms = {}
    for tau in range(1, steps + 1):
        product = product @ jacobians[steps - tau]
        norms[tau] = float(torch.linalg.matrix_norm(product, ord=2).median())
    return norms


@pytest.mark.parametrize("case", list(CASES))
def test_the_measured_reach_matches_the_dense_products(case: str) -> None:
    torch.manual_seed(3)
    module = CASES[case]()
    steps = 40
    inputs = torch.rand(steps, 5, 2)
    exact = exact_profile(module, inputs)
    diagnosis = diagnose(module, inputs, print_report=False)
    measured = diagnosis.layers[0].metrics
    at_lags = {str(tau): exact[tau] for tau in default_lags(steps)}
    expected = gradient_reach(at_lags)
    assert expected is not None and measured.gradient_reach is not None
    # the estimate on gradwatch's lag norms against the same definition on the exact lag norms
    assert measured.gradient_reach == pytest.approx(expected, rel=0.02, abs=0.05)
    assert measured.horizon == steps - 1  # the longest dependency in T steps: first input to last output
    # and the interpolation against the exact first crossing over every integer lag
    crossing = next((tau for tau in range(1, steps + 1) if exact[tau] < DEFAULT_REACH_FLOOR), None)
    if crossing is None:
        assert expected == steps
    else:
        lags = default_lags(steps)
        below = max(t for t in [0, *lags] if t < crossing)
        above = min(t for t in lags if t >= crossing)
        assert below <= expected <= above
        assert abs(expected - crossing) <= max(1.0, 0.25 * crossing)


def test_reach_and_horizon_reach_prometheus_and_tensorboard() -> None:
    from prometheus_client import CollectorRegistry

    from gradwatch.records import Measurement, MeasurementMetrics
    from gradwatch.sinks.prometheus import PrometheusSink
    from gradwatch.sinks.tensorboard import measurement_scalars

    metrics = MeasurementMetrics(
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        -0.4,
        profile(-0.4, 50),
        {},
        gradient_reach=23.0,
        horizon=49,
    )
    measurement = Measurement(7, 0.0, "rnn", 0, "forward", metrics, run_id="r")
    scalars = dict(measurement_scalars(measurement))
    assert [scalars[tag] for tag in scalars if tag.endswith(("/gradient_reach", "/horizon"))] == [23.0, 49.0]
    sink = PrometheusSink(None, registry=CollectorRegistry(), run_id="r")
    try:
        sink.write(measurement)
        samples = {s.name: s.value for family in sink.registry.collect() for s in family.samples}
    finally:
        sink.close()
    assert samples["gradwatch_gradient_reach_steps"] == 23.0 and samples["gradwatch_horizon_steps"] == 49.0

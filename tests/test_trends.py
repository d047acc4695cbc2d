"""TrendDetector on exact metrics of seeded tiny RNNs (the brief's reference cases), hysteresis and state."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from gradwatch.estimators.reach import gradient_reach
from gradwatch.policy.evidence import Verdict
from gradwatch.policy.judge import Judgement, ReadingCounts
from gradwatch.policy.trends import DetectionConfig, TrendDetector, detector_gradient_norm
from gradwatch.records import AlertKind, Measurement, MeasurementMetrics
from tests.oracles.exact_metrics import exact_measurement, gradient_norms
from tests.oracles.reference_cases import (
    RecurrentRegressor,
    lstm_forget_bias_one,
    regression_batch,
    scaled_orthogonal_rnn,
)

BATCH = 6


pytestmark = pytest.mark.usefixtures("one_thread")


def measure(module: nn.RNN | nn.LSTM, steps: int, *, scale: float = 1.0, name: str = "rnn", step: int = 0):
    inputs = torch.randn(steps, BATCH, module.input_size) * scale
    return exact_measurement(module, inputs, name=name, step=step)


WARM = DetectionConfig().vanishing_warmup_steps
"""A step past the vanishing warm-up: a short reach there counts."""


def bad_and_healthy() -> tuple[Measurement, Measurement]:
    bad = measure(scaled_orthogonal_rnn("tanh", 0.2), 100, step=WARM)
    healthy = measure(lstm_forget_bias_one(), 25, step=WARM)  # reaches the whole 25 steps
    return bad, healthy


@pytest.mark.parametrize(
    ("build", "steps", "expected"),
    [
        (lambda: scaled_orthogonal_rnn("relu", 2.0), 30, AlertKind.EXPLODING),
        (lambda: scaled_orthogonal_rnn("tanh", 0.2), 100, AlertKind.VANISHING),
        (lstm_forget_bias_one, 150, AlertKind.VANISHING),  # a fresh LSTM reaches ~45 of 150 steps
        (lstm_forget_bias_one, 25, None),
    ],
    ids=[
        "relu-2x-orthogonal-explodes",
        "tanh-0.2x-orthogonal-T100-vanishes",
        "lstm-forget-bias-1-T150-vanishes",
        "lstm-forget-bias-1-T25-healthy",
    ],
)
@pytest.mark.parametrize(
    "config", [DetectionConfig(), DetectionConfig.for_diagnosis()], ids=["default", "diagnosis"]
)
def test_reference_cases(build, steps: int, expected: AlertKind | None, config: DetectionConfig) -> None:
    detector = TrendDetector(config)
    measurement = measure(build(), steps, step=WARM)
    needed = max(config.patience, config.vanishing_patience)
    alerts = [alert for _ in range(needed) for alert in detector.update(measurement)]
    assert [a.alert for a in alerts] == ([] if expected is None else [expected])
    if expected is AlertKind.EXPLODING:
        assert alerts[0].metric == "lyapunov_max"
        assert alerts[0].value == pytest.approx(measurement.metrics.lyapunov_max)
    if expected is AlertKind.VANISHING:
        reach = gradient_reach(measurement.metrics.lag_norm, config.vanishing_lag_norm)
        assert reach is not None and reach < steps - 1
        assert (alerts[0].metric, alerts[0].value, alerts[0].threshold) == (
            "gradient_reach",
            reach,
            steps - 1,
        )
        assert f"reaches back about {reach:.0f} of the {steps - 1} steps" in alerts[0].message.replace(
            f"{reach:.1f}", f"{reach:.0f}"
        )
    if expected is not None:
        assert str(measurement.step) in alerts[0].message and "Hint:" in alerts[0].message


def test_random_gain_09_has_large_per_step_norms_but_is_not_exploding() -> None:
    module = nn.RNN(4, 32)
    with torch.no_grad():
        module.weight_hh_l0.copy_(torch.randn(32, 32) * 0.9 / 32**0.5)
    measurement = measure(module, 60, scale=0.1)
    assert measurement.metrics.jacobian_sigma_max_mean > 1.2  # per-step norms well above 1 ...
    assert measurement.metrics.lyapunov_max < 0  # ... yet the product shrinks
    detector = TrendDetector(DetectionConfig.for_diagnosis())
    assert all(a.alert is not AlertKind.EXPLODING for a in detector.update(measurement))


def test_trained_orthogonal_tanh_rnn_raises_no_alert() -> None:
    generator = torch.Generator().manual_seed(1)
    model = RecurrentRegressor(scaled_orthogonal_rnn("tanh", 1.0, hidden=16))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    detector = TrendDetector()
    losses, alerts = [], []
    for step in range(50):
        x, y = regression_batch(generator, 20, BATCH, 4, scale=0.1)
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        losses.append(float(loss.detach()))
        grads = gradient_norms(model.rnn)
        alerts += detector.update(exact_measurement(model.rnn, x, step=step, grad_norm=grads))
        optimizer.step()
    assert alerts == []
    assert sum(losses[-10:]) < sum(losses[:10])  # it did train


def test_one_alert_per_episode_then_one_recovered() -> None:
    bad, healthy = bad_and_healthy()
    detector = TrendDetector()
    alerts = [a for _ in range(10) for a in detector.update(bad)]
    assert [a.alert for a in alerts] == [AlertKind.VANISHING]
    assert detector.verdict("rnn") is Verdict.VANISHING
    recovered = [a for _ in range(10) for a in detector.update(dataclasses.replace(healthy, module="rnn"))]
    assert [a.alert for a in recovered] == [AlertKind.RECOVERED]
    assert recovered[0].metric == "gradient_reach" and recovered[0].threshold == alerts[0].threshold
    assert recovered[0].value == 25.0 and "reach has grown" in recovered[0].message
    assert detector.verdict("rnn") is Verdict.HEALTHY


def test_patience_ignores_an_isolated_bad_reading() -> None:
    bad, healthy = bad_and_healthy()
    healthy = dataclasses.replace(healthy, module="rnn")
    detector = TrendDetector(DetectionConfig(vanishing_patience=3))
    sequence = [healthy, bad, bad, healthy, bad, healthy, bad, bad, bad]
    alerts = [(i, a.alert) for i, m in enumerate(sequence) for a in detector.update(m)]
    assert alerts == [(8, AlertKind.VANISHING)]


def test_layers_and_directions_have_independent_state() -> None:
    bad, _ = bad_and_healthy()
    detector = TrendDetector(DetectionConfig.for_diagnosis())
    keys = [("a", 0, "forward"), ("a", 1, "forward"), ("a", 0, "reverse"), ("b", 0, "forward")]
    alerts = [
        a
        for module, layer, direction in keys
        for a in detector.update(dataclasses.replace(bad, module=module, layer=layer, direction=direction))
    ]
    assert [(a.module, a.layer, a.direction) for a in alerts] == keys


def synthetic(grad: float, step: int, lyapunov: float = -0.1) -> Measurement:
    metrics = MeasurementMetrics(
        None, None, None, None, None, 1.0, 0.9, 0.0, lyapunov, {"1": 0.9, "19": 0.2}, {"weight_hh_l0": grad}
    )
    return Measurement(step=step, time=float(step), module="m", layer=0, direction="forward", metrics=metrics)


def test_gradient_norm_spike_is_exploding_after_warmup() -> None:
    generator = torch.Generator().manual_seed(3)
    noise = (1 + 0.1 * torch.randn(40, generator=generator)).tolist()
    detector = TrendDetector(DetectionConfig(patience=2))
    alerts = [a for step, g in enumerate(noise[:30]) for a in detector.update(synthetic(g, step))]
    assert alerts == []
    spikes = [a for step in (30, 31) for a in detector.update(synthetic(1000.0, step))]
    assert [(a.alert, a.metric, a.value) for a in spikes] == [(AlertKind.EXPLODING, "grad_norm", 1000.0)]
    assert spikes[0].threshold is not None and 10.0 <= spikes[0].threshold < 1000.0
    assert "90th percentile" in spikes[0].message  # a clip suggestion from the healthy history
    recovered = [a for step, g in enumerate(noise[30:], 32) for a in detector.update(synthetic(g, step))]
    assert [a.alert for a in recovered] == [AlertKind.RECOVERED]


def test_unknown_readings_neither_alert_nor_break_a_streak() -> None:
    bad, _ = bad_and_healthy()
    unknown = dataclasses.replace(
        bad, metrics=dataclasses.replace(bad.metrics, lyapunov_max=None, lag_norm={})
    )
    detector = TrendDetector(DetectionConfig(vanishing_patience=2))
    assert detector.update(unknown) == []
    assert detector.update(bad) == []
    assert detector.update(unknown) == []
    assert [a.alert for a in detector.update(bad)] == [AlertKind.VANISHING]


def test_growth_rate_falls_back_to_the_longest_lag_when_lyapunov_is_missing() -> None:
    bad, _ = bad_and_healthy()
    no_lyapunov = dataclasses.replace(bad, metrics=dataclasses.replace(bad.metrics, lyapunov_max=None))
    alerts = TrendDetector(DetectionConfig.for_diagnosis()).update(no_lyapunov)
    assert [a.alert for a in alerts] == [AlertKind.VANISHING]


def test_state_dict_round_trips_through_json_and_continues_identically() -> None:
    generator = torch.Generator().manual_seed(4)
    readings = [
        synthetic(g, s) for s, g in enumerate((1 + 0.1 * torch.randn(20, generator=generator)).tolist())
    ]
    readings += [synthetic(500.0, 20 + s) for s in range(4)]
    original = TrendDetector()
    for m in readings[:18]:
        original.update(m)
    restored = TrendDetector()
    restored.load_state_dict(json.loads(json.dumps(original.state_dict())))
    rest_original = [a for m in readings[18:] for a in original.update(m)]
    rest_restored = [a for m in readings[18:] for a in restored.update(m)]
    assert rest_original == rest_restored and len(rest_original) == 1


def test_reset_forgets_episodes() -> None:
    bad, _ = bad_and_healthy()
    detector = TrendDetector(DetectionConfig.for_diagnosis())
    assert len(detector.update(bad)) == 1
    detector.reset()
    assert detector.verdict("rnn") is Verdict.UNKNOWN  # never measured since the reset
    assert len(detector.update(bad)) == 1


@pytest.mark.parametrize(
    ("field", "value"),
    [("patience", 0), ("vanishing_lag_norm", 2.0), ("exploding_lag_norm", 0.5), ("gradient_ema_alpha", 1.0)],
    ids=["patience-0", "vanishing-lag-above-1", "exploding-lag-below-1", "alpha-1"],
)
def test_config_rejects_bad_values_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        DetectionConfig(**{field: value})


def test_bad_inputs_get_clear_errors() -> None:
    with pytest.raises(TypeError, match="Measurement"):
        TrendDetector().update({"step": 1})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="state_dict"):
        TrendDetector().load_state_dict({"nope": []})
    assert DetectionConfig.for_diagnosis(patience=2).patience == 2


def _growth_alerts(
    detector: TrendDetector, norms: list[float], start: int = 0
) -> list[tuple[int, AlertKind]]:
    return [
        (a.step, a.alert)
        for step, norm in enumerate(norms, start)
        for a in detector.observe_gradient_norms(step, "m", norm, time=float(step))
    ]


def test_gradient_growth_fires_before_the_nan_and_blames_the_learning_rate_when_jacobians_contract() -> None:
    """Issue #18.4: gradient norms 9, 4, 26, 66,563, 39,351,008 (steps 1-5) under vanishing Jacobians."""
    detector = TrendDetector()
    bad, _ = bad_and_healthy()  # a vanishing measurement of module "rnn"
    detector.update(dataclasses.replace(bad, module="m"))
    alerts = [
        a
        for step, norm in enumerate([9.0, 4.0, 26.0, 66_563.0, 39_351_008.0], 1)
        for a in detector.observe_gradient_norms(step, "m", norm, time=float(step))
    ]
    assert [(a.step, a.alert, a.metric) for a in alerts] == [(4, AlertKind.EXPLODING, "grad_norm_growth")]
    assert alerts[0].value == 66_563.0 and alerts[0].threshold == pytest.approx(9.0 * 1e3)
    assert "contract" in alerts[0].message and "not come from the recurrence" in alerts[0].message
    assert "learning rate" in alerts[0].message
    assert detector.growth_episode_open("m")


def test_gradient_growth_blames_the_recurrent_weight_when_jacobians_expand() -> None:
    detector = TrendDetector()
    exploding = exact_measurement(scaled_orthogonal_rnn("relu", 2.0), torch.randn(30, 8, 4), name="m")
    detector.update(exploding)
    (alert,) = [
        a
        for s, n in enumerate([1.0, 1.2, 0.9, 5e3])
        for a in detector.observe_gradient_norms(s, "m", n, time=0.0)
    ]
    assert "expand" in alert.message and "sigma_max(W_hh) = 2 > 1" in alert.message


def test_gradient_growth_is_silent_on_early_decline_and_noise_and_recovers_once() -> None:
    generator = torch.Generator().manual_seed(0)
    noise = torch.exp(0.5 * torch.randn(200, generator=generator)).tolist()  # ~x1.6 jitter (log-normal)
    decline = [100.0 * 0.95**step * noise[step] for step in range(100)]  # 2+ decades of normal decline
    detector = TrendDetector()
    assert _growth_alerts(detector, decline) == []
    level = decline[-1]
    spike = [level * 1e4] * 3 + [level * noise[i] for i in range(100, 110)]
    assert _growth_alerts(detector, spike, 100) == [(100, AlertKind.EXPLODING), (105, AlertKind.RECOVERED)]
    assert _growth_alerts(detector, [float("nan"), float("inf"), 0.0, None], 120) == []  # type: ignore[list-item]


def test_gradient_growth_state_round_trips_and_the_spike_test_does_not_alert_twice() -> None:
    detector = TrendDetector(DetectionConfig(patience=1))
    for step in range(12):
        detector.update(synthetic(1.0, step))
        detector.observe_gradient_norms(step, "m", 1.0, time=0.0)
    assert _growth_alerts(detector, [5e3], 12) == [(12, AlertKind.EXPLODING)]
    restored = TrendDetector(DetectionConfig(patience=1))
    restored.load_state_dict(json.loads(json.dumps(detector.state_dict())))
    assert restored.growth_episode_open("m")
    # The measurement of the same step sees the same spike: part of the open growth episode, no 2nd alert.
    assert restored.update(synthetic(5e3, 12)) == []
    assert DetectionConfig.for_diagnosis().gradient_growth_test is False


def test_latest_jacobian_reading_is_the_last_measurements_words_made_on_demand() -> None:
    """The reading is formatted only when asked for, and then says what it said when made eagerly."""
    from gradwatch.policy.explain import cause_and_hint

    detector = TrendDetector()
    readings = [synthetic(1.0 + 0.01 * s, s) for s in range(30)]
    exploding = synthetic(1.0, 30, lyapunov=0.5)
    exploding = dataclasses.replace(
        exploding, metrics=dataclasses.replace(exploding.metrics, lag_norm={"1": 2.0, "19": 1e6})
    )
    for m in readings:
        detector.update(m)
    suggested = detector.suggested_clip_norm("m")  # the healthy history before the exploding reading
    detector.update(exploding)
    reading = detector.latest_jacobian_reading("m")
    assert reading is not None and reading.step == 30 and reading.verdict is Verdict.EXPLODING
    assert suggested is not None
    assert (reading.cause, reading.hint) == cause_and_hint(exploding.metrics, Verdict.EXPLODING, suggested)
    assert f"{suggested:.3g}" in reading.hint
    assert detector.state_dict()["layers"][0]["state"]["latest"] == reading.to_json()
    detector.update(readings[0])
    healthy = detector.latest_jacobian_reading("m")
    assert healthy is not None and healthy.step == 0 and healthy.verdict is Verdict.HEALTHY
    assert (healthy.cause, healthy.hint) == cause_and_hint(readings[0].metrics, Verdict.HEALTHY, None)


def _random_stream(seed: int, count: int) -> list[Measurement]:
    """One layer's readings in step order: healthy, vanishing, exploding (some extreme), gradient spikes,
    readings without a verdict, and non-finite or missing gradient norms, in runs long enough to alert."""
    generator = torch.Generator().manual_seed(seed)
    draws = torch.rand(count, 4, generator=generator).tolist()
    stream = []
    regime = "healthy"
    for step, (switch, noise, pick, gradient) in enumerate(draws):
        if switch < 0.08:
            regime = ("healthy", "vanishing", "exploding", "extreme", "unknown")[int(pick * 5)]
        lyapunov, lags = {
            "healthy": (-0.01 * noise, {"1": 0.95, "32": 0.5}),
            "vanishing": (-0.5 - noise, {"1": 0.4, "32": 1e-9}),
            "exploding": (0.1 + noise, {"1": 1.5, "32": 1e3}),
            "extreme": (0.9, {"1": 3.0, "8": float("inf")}),
            "unknown": (None, {}),
        }[regime]
        grad: dict[str, float | None] = {"weight_hh_l0": 1.0 + 0.1 * noise, "bias_hh_l0": 0.1}
        if gradient < 0.03:
            grad = {"weight_hh_l0": 1e4}  # a spike
        elif gradient < 0.05:
            grad = {"weight_hh_l0": None}  # NaN/Inf in the gradient
        elif gradient < 0.07:
            grad = {}  # no gradient this step
        metrics = MeasurementMetrics(
            None, None, None, None, None, 1.0, 0.9, 0.0, None if pick < 0.2 else lyapunov, lags, grad
        )
        stream.append(
            Measurement(
                step=step, time=float(step), module="m", layer=0, direction="forward", metrics=metrics
            )
        )
    return stream


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("batch", [1, 7, 512])
def test_update_many_gives_the_alerts_and_state_of_update_on_each(seed: int, batch: int) -> None:
    stream = _random_stream(seed, 600)
    one_by_one, batched = TrendDetector(), TrendDetector()
    expected = [alert for measurement in stream for alert in one_by_one.update(measurement)]
    got = []
    for start in range(0, len(stream), batch):
        part = stream[start : start + batch]
        got += batched.update_many(
            ("m", 0, "forward"),
            [m.metrics.lyapunov_max for m in part],
            [m.metrics.lag_norm for m in part],
            [detector_gradient_norm(m.metrics.grad_norm) for m in part],
            part.__getitem__,
            steps=[m.step for m in part],
            horizons=[m.metrics.horizon for m in part],
        )
    assert {a.alert for a in expected} >= {AlertKind.EXPLODING, AlertKind.VANISHING, AlertKind.RECOVERED}
    assert got == expected
    assert batched.state_dict() == one_by_one.state_dict()
    assert batched.suggested_clip_norm("m") == one_by_one.suggested_clip_norm("m")


# --- issue #28: explosions before the overflow, a diverged run stays exploding, unknown is not healthy -----


def test_a_jump_of_orders_of_magnitude_alerts_on_its_step_whatever_the_history() -> None:
    """Issue #28: norms 1.2, 131, 2.05e7 (a contracting GRU, SGD lr 3): the jump alerts at step 2."""
    assert _growth_alerts(TrendDetector(), [1.2, 131.0, 2.05e7]) == [(2, AlertKind.EXPLODING)]
    assert _growth_alerts(TrendDetector(), [1.0, 5e3]) == [(1, AlertKind.EXPLODING)]  # one norm before it
    assert _growth_alerts(TrendDetector(), [5e7]) == []  # nothing to jump from
    # a short history is compared with its largest norm: normal early growth does not alert
    assert _growth_alerts(TrendDetector(), [1.0, 300.0, 2e5]) == []


def test_the_short_history_message_names_its_baseline() -> None:
    detector = TrendDetector()
    alerts = [
        a
        for s, n in enumerate([1.2, 131.0, 2.05e7])
        for a in detector.observe_gradient_norms(s, "m", n, time=0.0)
    ]
    (alert,) = alerts
    assert alert.metric == "grad_norm_growth" and alert.threshold == pytest.approx(131.0 * 1e3)
    assert "the largest 131 of the previous 2 steps" in alert.message


def _reading(step: int, lyapunov: float, lags: dict[str, float | None], grad: float | None) -> Measurement:
    metrics = MeasurementMetrics(
        None, None, None, None, None, 2.0, 0.9, 0.0, lyapunov, lags, {"weight_hh_l0": grad}
    )
    return Measurement(step=step, time=float(step), module="m", layer=0, direction="forward", metrics=metrics)


EXPLODING_READING = (0.3, {"1": 2.0, "32": 1e3})
HEALTHY_READING = (-0.05, {"1": 0.9, "32": 0.5})
VANISHING_READING = (-0.9, {"1": 0.5, "32": 1e-9})


@pytest.mark.parametrize(
    ("lyapunov", "lags", "grad"),
    [
        (*HEALTHY_READING, None),  # non-finite gradient elements (null in the log)
        (*HEALTHY_READING, float("inf")),
        (*HEALTHY_READING, 2.2e36),  # the dead relu run of the issue: 1e30-scale gradients
        (0.305, {"1": 2.0, "64": 0.0, "150": None}, 1.0),  # lambda still grows, the product overflowed
    ],
    ids=["null-gradient", "inf-gradient", "1e36-gradient", "overflowed-product"],
)
def test_a_diverged_run_stays_exploding_and_is_never_recovered(
    lyapunov: float, lags: dict[str, float | None], grad: float | None
) -> None:
    detector = TrendDetector()
    opened = [a for step in range(3) for a in detector.update(_reading(step, *EXPLODING_READING, 1.0))]
    assert [a.alert for a in opened] == [AlertKind.EXPLODING]
    later = [a for step in range(3, 30) for a in detector.update(_reading(step, lyapunov, lags, grad))]
    assert later == [] and detector.verdict("m") is Verdict.EXPLODING
    # the same readings from the log's columns (the report's replay) agree
    batched = TrendDetector()
    stream = [_reading(s, *EXPLODING_READING, 1.0) for s in range(3)]
    stream += [_reading(s, lyapunov, lags, grad) for s in range(3, 30)]
    got = batched.update_many(
        ("m", 0, "forward"),
        [m.metrics.lyapunov_max for m in stream],
        [m.metrics.lag_norm for m in stream],
        [detector_gradient_norm(m.metrics.grad_norm) for m in stream],
        stream.__getitem__,
        steps=[m.step for m in stream],
        horizons=[m.metrics.horizon for m in stream],
    )
    assert [a.alert for a in got] == [AlertKind.EXPLODING]
    # a finite, ordinary reading does end it
    recovered = [a for step in range(30, 33) for a in detector.update(_reading(step, *HEALTHY_READING, 1.0))]
    assert [a.alert for a in recovered] == [AlertKind.RECOVERED]


def test_diverged_gradient_norm_is_a_detection_config_field() -> None:
    detector = TrendDetector(DetectionConfig(diverged_gradient_norm=1e3))
    for step in range(3):
        detector.update(_reading(step, *EXPLODING_READING, 1.0))
    assert [a for s in range(3, 9) for a in detector.update(_reading(s, *HEALTHY_READING, 5e3))] == []
    with pytest.raises(ValueError, match="diverged_gradient_norm"):
        DetectionConfig(diverged_gradient_norm=float("inf"))


def test_judgement_is_unknown_until_the_rule_has_its_measurements() -> None:
    detector = TrendDetector()
    needed = detector.config.measurements_needed
    assert needed == max(detector.config.patience, detector.config.vanishing_patience)
    never = detector.judgement("m")
    assert never.verdict is Verdict.UNKNOWN and never.reason.startswith("never measured")
    for count in range(needed):
        judgement = detector.judgement("m")
        if count:
            reason = f"{count} measurement{'s' if count > 1 else ''}; the rule needs {needed}"
            assert judgement == Judgement(Verdict.UNKNOWN, reason, count)
        detector.update(_reading(WARM + count, *HEALTHY_READING, 1.0))
    assert detector.judgement("m") == Judgement(
        Verdict.HEALTHY, f"no episode open after {needed} measurements", needed
    )
    # unmeasurable readings (T = 1: no product) do not count
    fresh = TrendDetector()
    for step in range(WARM, WARM + 5):
        fresh.update(_reading(step, None, {}, 1.0))  # type: ignore[arg-type]
    assert fresh.judgement("m").verdict is Verdict.UNKNOWN and fresh.judged_measurements("m") == 0


def test_readings_inside_the_warm_up_do_not_count_towards_the_rule() -> None:
    """Steps 0, 50 and 90 with a 100-step warm-up: 3 readings, none the vanishing rule could judge."""
    detector = TrendDetector()
    for step in (0, 50, 90):
        assert detector.update(_reading(step, *VANISHING_READING, 1.0)) == []
    assert detector.reading_counts("m") == ReadingCounts(measured=3, judged=0, in_warmup=3)
    assert detector.judgement("m") == Judgement(
        Verdict.UNKNOWN, f"3 measurements, all inside the {WARM}-step warm-up; the rule needs 5 after it", 0
    )
    # more warm-up readings than the rule needs still decide nothing
    for step in range(91, 91 + detector.config.measurements_needed):
        detector.update(_reading(step, *HEALTHY_READING, 1.0))
    assert detector.verdict("m") is Verdict.UNKNOWN and detector.judged_measurements("m") == 0


@pytest.mark.parametrize("reading", ["healthy", "vanishing"])
def test_exactly_the_measurements_needed_past_the_warm_up_give_a_verdict(reading: str) -> None:
    """needed - 1 judged readings after the warm-up: unknown; the needed-th: a real verdict (healthy, or the
    vanishing episode opening), whatever came before inside the warm-up."""
    lyapunov, lags = HEALTHY_READING if reading == "healthy" else VANISHING_READING
    detector = TrendDetector()
    needed = detector.config.measurements_needed
    for step in (0, 50, 90):
        detector.update(_reading(step, lyapunov, lags, 1.0))
    alerts = []
    for count in range(needed):
        judgement = detector.judgement("m")
        assert judgement.verdict is Verdict.UNKNOWN and judgement.measurements == count
        if count:
            reason = f"{3 + count} measurements, {count} judged (3 inside the {WARM}-step warm-up); "
            assert judgement.reason == reason + f"the rule needs {needed} after the warm-up"
        alerts += detector.update(_reading(WARM + 10 * count, lyapunov, lags, 1.0))
    expected = Verdict.HEALTHY if reading == "healthy" else Verdict.VANISHING
    assert detector.verdict("m") is expected and detector.judged_measurements("m") == needed
    assert [a.alert.value for a in alerts] == ([] if reading == "healthy" else ["vanishing"])


def test_a_layer_measured_often_without_a_lag_product_says_so_once() -> None:
    detector = TrendDetector()
    for step in range(WARM, WARM + 12):
        detector.update(_reading(step, None, {"1": None, "32": None}, 1.0))  # type: ignore[arg-type]
    reason = detector.judgement("m").reason
    assert (
        reason
        == f"12 measurements, none with a usable lag product; the rule needs 5 after the {WARM}-step warm-up"
    )
    assert reason.count("measurement") == 1
    # an overflowed product (the reach cannot be measured) is not a usable one either
    overflow = TrendDetector()
    overflow.update(_reading(WARM, -0.05, {"1": float("inf"), "32": 0.5}, 1.0))
    assert overflow.judgement("m").reason.startswith("1 measurement, without a usable lag product;")


def test_the_reading_counts_survive_a_checkpoint() -> None:
    detector = TrendDetector()
    for step in (0, 50, WARM, WARM + 10):
        detector.update(_reading(step, *HEALTHY_READING, 1.0))
    detector.update(_reading(WARM + 20, None, {}, 1.0))  # type: ignore[arg-type]
    restored = TrendDetector()
    restored.load_state_dict(detector.state_dict())
    assert restored.reading_counts("m") == ReadingCounts(measured=5, judged=2, in_warmup=2)
    assert restored.judgement("m") == detector.judgement("m")


def test_one_extreme_reading_decides_before_the_rule_has_its_measurements() -> None:
    detector = TrendDetector()
    (alert,) = detector.update(_reading(0, 0.9, {"1": 3.0, "8": float("inf")}, 1.0))
    assert alert.alert is AlertKind.EXPLODING and detector.judgement("m").verdict is Verdict.EXPLODING


def test_an_open_growth_episode_is_the_module_s_judgement() -> None:
    detector = TrendDetector()
    _growth_alerts(detector, [1.0, 1.0, 5e5])
    judgement = detector.judgement("m")
    assert judgement.verdict is Verdict.EXPLODING and "jumped at step 2" in judgement.reason

"""PrometheusSink without external binaries: values, None handling, isolation, binding, TLS, auth, push."""

from __future__ import annotations

import base64
import gc
import math
import re
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Gauge
from prometheus_client.parser import text_string_to_metric_families

from gradwatch.records import Alert, AlertKind, Measurement, MeasurementMetrics, RunHeader
from gradwatch.sinks.base import LiveSink, Sink
from gradwatch.sinks.prometheus import JACOBIAN_STATS, LAYER_GAUGES, PrometheusSink
from tests.synthetic_run import MODULE, SyntheticRun, synthetic_run
from tests.tls_files import self_signed_certificate


@pytest.fixture
def sink() -> Iterator[PrometheusSink]:
    """A sink without HTTP server, on a fresh registry."""
    created = PrometheusSink(None, registry=CollectorRegistry(), run_id="run-a")
    yield created
    created.close()


def _feed(sink: PrometheusSink, run: SyntheticRun) -> None:
    for record in run.records:
        sink.write(record)
    sink.flush()


def _layer_labels(m: Measurement, **extra: str) -> dict[str, str]:
    labels = {
        "run": m.run_id,
        "rank": str(m.rank),
        "module": m.module,
        "layer": str(m.layer),
        "direction": m.direction,
    }
    labels.update(extra)
    return labels


def _closed_port() -> int:
    """A loopback port that nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _get(url: str, *, context: ssl.SSLContext | None = None, auth: tuple[str, str] | None = None) -> str:
    request = urllib.request.Request(url)
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    with urllib.request.urlopen(request, timeout=5, context=context) as response:
        return response.read().decode()


# --- values --------------------------------------------------------------------------------------------


def test_every_measurement_field_equals_the_run_log_value(sink: PrometheusSink) -> None:
    run = synthetic_run()
    _feed(sink, run)
    registry = sink.registry
    latest = run.latest_measurements()
    assert len(latest) == 4  # 2 layers x 2 directions
    for measurement in latest.values():
        logged = measurement.to_json()["metrics"]  # what the JSONL run log says
        for stat, field in JACOBIAN_STATS:
            value = registry.get_sample_value(
                "gradwatch_jacobian_sigma_max", _layer_labels(measurement, stat=stat)
            )
            assert value == logged[field], (stat, measurement.layer, measurement.direction)
        for spec in LAYER_GAUGES:
            value = registry.get_sample_value("gradwatch_" + spec.name, _layer_labels(measurement))
            assert value == logged.get(spec.field), spec.field  # a field written only when measured
        for lag, logged_norm in logged["lag_norm"].items():
            value = registry.get_sample_value("gradwatch_lag_norm", _layer_labels(measurement, lag=lag))
            assert value == logged_norm, lag
        for param, logged_norm in logged["grad_norm"].items():
            value = registry.get_sample_value("gradwatch_grad_norm", _layer_labels(measurement, param=param))
            assert value == logged_norm, param
    last_time = max(m.time for m in run.measurements)
    run_labels = {"run": "run-a", "rank": "0"}
    assert registry.get_sample_value("gradwatch_last_measurement_timestamp_seconds", run_labels) == last_time
    per_layer = registry.get_sample_value(
        "gradwatch_measurements_total", _layer_labels(next(iter(latest.values())))
    )
    assert per_layer == len(run.measurements) / 4


def test_counters_and_clip_gauges_follow_alerts_clips_and_errors(sink: PrometheusSink) -> None:
    _feed(sink, synthetic_run())
    get = sink.registry.get_sample_value
    base = {"run": "run-a", "rank": "0", "module": MODULE}
    vanishing = {**base, "layer": "0", "direction": "forward", "alert": "vanishing"}
    exploding = {**base, "layer": "1", "direction": "reverse", "alert": "exploding"}
    recovered = {**base, "layer": "1", "direction": "reverse", "alert": "recovered"}
    assert get("gradwatch_alerts_total", vanishing) == 1
    assert get("gradwatch_alerts_total", exploding) == 1
    assert get("gradwatch_alerts_total", recovered) == 1
    # Layer 0 forward is still vanishing; layer 1 reverse exploded and then recovered.
    assert get("gradwatch_alert_active", vanishing) == 1
    assert get("gradwatch_alert_active", {**vanishing, "alert": "exploding"}) == 0
    assert get("gradwatch_alert_active", exploding) == 0
    run = {"run": "run-a", "rank": "0"}
    assert get("gradwatch_clips_total", run) == 2
    assert get("gradwatch_clip_scale", run) == 5.0 / 41.0  # the latest clip
    assert get("gradwatch_clip_norm_before", run) == 41.0
    assert get("gradwatch_clip_max_norm", run) == 5.0
    assert get("gradwatch_errors_total", {**run, "where": "estimator:lag_norm"}) == 1
    assert get("gradwatch_training_step", run) == 20
    assert get("gradwatch_run_start_time_seconds", run) == synthetic_run().records[0].started  # type: ignore[union-attr]
    info = {**run, "gradwatch_version": "0.1.0", "torch_version": "2.13.0", "world_size": "1"}
    assert get("gradwatch_run_info", info) == 1


def _measurement(step: int, **overrides: object) -> Measurement:
    fields: dict[str, object] = {
        "jacobian_sigma_max_mean": 0.9,
        "jacobian_sigma_max_min": 0.5,
        "jacobian_sigma_max_max": 1.2,
        "jacobian_sigma_max_p95": 1.1,
        "jacobian_frac_above_one": 0.1,
        "weight_hh_sigma_max": 1.5,
        "activation_derivative_mean": 0.6,
        "activation_saturation_ratio": 0.02,
        "lyapunov_max": -0.1,
        "lag_norm": {"1": 0.9, "5": 0.6},
        "grad_norm": {"weight_hh_l0": 0.3},
    }
    fields.update(overrides)
    metrics = MeasurementMetrics(**fields)  # type: ignore[arg-type]
    return Measurement(step, 100.0 + step, "rnn", 0, "forward", metrics, run_id="run-a")


LABELS = {"run": "run-a", "rank": "0", "module": "rnn", "layer": "0", "direction": "forward"}


def test_none_removes_the_series_instead_of_leaving_a_stale_value(sink: PrometheusSink) -> None:
    sink.write(_measurement(1))
    assert sink.registry.get_sample_value("gradwatch_lyapunov_max", LABELS) == -0.1
    sink.write(_measurement(2, lyapunov_max=None, lag_norm={"1": 0.8, "5": None}))
    assert sink.registry.get_sample_value("gradwatch_lyapunov_max", LABELS) is None
    assert sink.registry.get_sample_value("gradwatch_lag_norm", {**LABELS, "lag": "5"}) is None
    assert sink.registry.get_sample_value("gradwatch_lag_norm", {**LABELS, "lag": "1"}) == 0.8
    sink.write(_measurement(3, lyapunov_max=-0.3))
    assert sink.registry.get_sample_value("gradwatch_lyapunov_max", LABELS) == -0.3


def test_mapping_keys_missing_from_the_latest_measurement_are_removed(sink: PrometheusSink) -> None:
    sink.write(_measurement(1, grad_norm={"weight_hh_l0": 0.3, "bias_hh_l0": 0.1}))
    sink.write(_measurement(2, grad_norm={"weight_hh_l0": 0.4}))
    assert sink.registry.get_sample_value("gradwatch_grad_norm", {**LABELS, "param": "weight_hh_l0"}) == 0.4
    assert sink.registry.get_sample_value("gradwatch_grad_norm", {**LABELS, "param": "bias_hh_l0"}) is None


@pytest.mark.parametrize(
    ("value", "check"),
    [(math.inf, math.isinf), (-math.inf, lambda v: v == -math.inf), (math.nan, math.isnan)],
    ids=["+inf", "-inf", "nan"],
)
def test_non_finite_values_are_exported_as_such(sink: PrometheusSink, value: float, check: object) -> None:
    sink.write(_measurement(1, lyapunov_max=value))
    exported = sink.registry.get_sample_value("gradwatch_lyapunov_max", LABELS)
    assert exported is not None and check(exported)  # type: ignore[operator]


def test_new_verdict_replaces_the_previous_one(sink: PrometheusSink) -> None:
    def alert(kind: AlertKind) -> Alert:
        return Alert(1, 1.0, "rnn", 0, "forward", kind, "lyapunov_max", 0.0, 0.0, "", run_id="run-a")

    sink.write(alert(AlertKind.VANISHING))
    sink.write(alert(AlertKind.NONFINITE))
    active = {k.value: sink.registry.get_sample_value("gradwatch_alert_active", {**LABELS, "alert": k.value})
              for k in (AlertKind.VANISHING, AlertKind.EXPLODING, AlertKind.NONFINITE)}  # fmt: skip
    assert active == {"vanishing": 0, "exploding": 0, "nonfinite": 1}


def test_step_gauge_tracks_observe_step_and_record_steps(sink: PrometheusSink) -> None:
    run = {"run": "run-a", "rank": "0"}
    sink.observe_step(7)
    assert sink.registry.get_sample_value("gradwatch_training_step", run) == 7
    sink.write(_measurement(5))  # an older measurement does not move the step back
    assert sink.registry.get_sample_value("gradwatch_training_step", run) == 7
    sink.write(_measurement(9))
    assert sink.registry.get_sample_value("gradwatch_training_step", run) == 9


def test_sink_without_run_id_adopts_the_header_and_drops_the_anonymous_series() -> None:
    sink = PrometheusSink(None, registry=CollectorRegistry())
    assert sink.registry.get_sample_value("gradwatch_training_step", {"run": "", "rank": "0"}) == 0
    sink.write(RunHeader("r9", 1.0, "0.1.0", "2.13.0", {}, (), rank=2, world_size=4))
    sink.observe_step(3)
    assert sink.registry.get_sample_value("gradwatch_training_step", {"run": "", "rank": "0"}) is None
    assert sink.registry.get_sample_value("gradwatch_training_step", {"run": "r9", "rank": "2"}) == 3
    sink.close()


def test_observe_step_is_cheap(sink: PrometheusSink) -> None:
    calls = 20_000
    started = time.perf_counter()
    for step in range(calls):
        sink.observe_step(step)
    per_call = (time.perf_counter() - started) / calls
    assert per_call < 20e-6, f"observe_step took {per_call * 1e6:.1f} us"


def test_sink_follows_the_sink_protocol(sink: PrometheusSink) -> None:
    assert isinstance(sink, Sink)


def test_write_after_close_is_a_clear_error(sink: PrometheusSink) -> None:
    sink.close()
    sink.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        sink.write(_measurement(1))


def test_write_rejects_non_records(sink: PrometheusSink) -> None:
    with pytest.raises(TypeError, match="gradwatch record"):
        sink.write({"kind": "measurement"})  # type: ignore[arg-type]


# --- live writes from the background worker ------------------------------------------------------------


def test_a_record_shown_live_is_not_applied_again_when_written_at_publication(sink: PrometheusSink) -> None:
    assert isinstance(sink, LiveSink)
    first = _measurement(1)
    sink.write_live(first)
    assert sink.registry.get_sample_value("gradwatch_measurements_total", LABELS) == 1
    assert sink.registry.get_sample_value("gradwatch_lyapunov_max", LABELS) == -0.1
    step = {"run": "run-a", "rank": "0"}
    assert sink.registry.get_sample_value("gradwatch_training_step", step) == 0  # left to the training thread
    sink.write(first)  # the same record, published on the training thread
    assert sink.registry.get_sample_value("gradwatch_measurements_total", LABELS) == 1
    assert sink.registry.get_sample_value("gradwatch_training_step", step) == 1
    sink.write(_measurement(1))  # an equal but distinct record is a new measurement
    sink.write(_measurement(2, lyapunov_max=-0.3))  # and so is one never shown live
    assert sink.registry.get_sample_value("gradwatch_measurements_total", LABELS) == 3
    assert sink.registry.get_sample_value("gradwatch_lyapunov_max", LABELS) == -0.3


def test_write_live_after_close_is_ignored_and_rejects_non_measurements(sink: PrometheusSink) -> None:
    with pytest.raises(TypeError, match="Measurement"):
        sink.write_live(RunHeader("run-a", 0.0, "0", "0", {}, ()))  # type: ignore[arg-type]
    sink.close()
    sink.write_live(_measurement(1))  # the monitor may close a failing sink while the worker delivers
    assert sink.registry.get_sample_value("gradwatch_measurements_total", LABELS) is None


def test_live_and_training_thread_writes_interleave_safely(sink: PrometheusSink) -> None:
    """The worker's write_live and the training thread's write share the mapping-key bookkeeping."""
    rounds = 300
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for i in range(rounds):
                sink.write_live(_measurement(i, lag_norm={str(1 + i % 3): 0.5}))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=worker)
    thread.start()
    for i in range(rounds):
        sink.write(_measurement(i, lag_norm={str(4 + i % 2): 0.5}))
    thread.join(timeout=30)
    assert not errors and not thread.is_alive()
    assert sink.registry.get_sample_value("gradwatch_measurements_total", LABELS) == 2 * rounds
    lags = {
        sample.labels["lag"]
        for family in sink.registry.collect()
        if family.name == "gradwatch_lag_norm"
        for sample in family.samples
    }
    assert len(lags) == 1  # only the latest measurement's keys remain, whichever thread wrote it


# --- registries ----------------------------------------------------------------------------------------


def test_two_sinks_and_the_users_metrics_do_not_collide() -> None:
    user_metric = Gauge("gradwatch_lyapunov_max", "the user's own metric of that name", registry=REGISTRY)
    first, second = PrometheusSink(0), PrometheusSink(0)
    try:
        first.write(_measurement(1, lyapunov_max=-0.5))
        second.write(_measurement(1, lyapunov_max=0.25))
        assert first.registry is not second.registry
        assert first.registry.get_sample_value("gradwatch_lyapunov_max", LABELS) == -0.5
        assert second.registry.get_sample_value("gradwatch_lyapunov_max", LABELS) == 0.25
        assert REGISTRY.get_sample_value("gradwatch_lyapunov_max", LABELS) is None
        assert first.url is not None and second.url is not None
        assert "0.25" not in _get(first.url) and "-0.5" not in _get(second.url)
    finally:
        REGISTRY.unregister(user_metric)
        first.close()
        second.close()


def test_sharing_one_registry_is_a_clear_error_and_leaves_it_usable() -> None:
    registry = CollectorRegistry()
    first = PrometheusSink(None, registry=registry)
    with pytest.raises(ValueError, match="own registry"):
        PrometheusSink(None, registry=registry)
    first.write(_measurement(1))  # the first sink's metrics are intact
    assert registry.get_sample_value("gradwatch_lyapunov_max", LABELS) == -0.1


# --- HTTP exporter -------------------------------------------------------------------------------------


def test_port_zero_picks_a_free_port_on_loopback_and_serves_the_metrics() -> None:
    sink = PrometheusSink(0, run_id="run-a")
    try:
        assert sink.port is not None and sink.port > 0
        assert sink.address == "127.0.0.1"
        assert sink.url == f"http://127.0.0.1:{sink.port}/metrics"
        sink.write(_measurement(1))
        families = {f.name: f for f in text_string_to_metric_families(_get(sink.url))}
        (sample,) = [s for s in families["gradwatch_lyapunov_max"].samples if s.labels == LABELS]
        assert sample.value == -0.1
    finally:
        sink.close()
    with socket.socket() as again:  # close() released the port (SO_REUSEADDR: only TIME_WAIT may remain)
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", sink.port))
        again.listen()


def test_port_in_use_raises_a_value_error_naming_port_and_fix() -> None:
    registry = CollectorRegistry()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=rf"port {port} .*already in use.*port 0"):
            PrometheusSink(port, registry=registry)
    # The failed sink left the caller's registry empty, so a retry on a free port works.
    retry = PrometheusSink(0, registry=registry)
    retry.close()


def test_explicit_address_is_honoured_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.skip("this Python has no IPv6 support")
    try:
        sink = PrometheusSink(0, address="::1")
    except ValueError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    try:
        assert sink.address == "::1"
        assert sink.url == f"http://[::1]:{sink.port}/metrics"
        assert "gradwatch_training_step" in _get(sink.url)
    finally:
        sink.close()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"port": 70000}, "port must be an integer"),
        ({"port": True}, "port must be an integer"),
        ({"port": 0, "rank": -1}, "rank must be"),
        ({"port": 0, "timeout": 0}, "timeout must be"),
        ({"port": 0, "certfile": "cert.pem"}, "both certfile and keyfile"),
        ({"port": None}, "would export nothing"),
        ({"port": 0, "basic_auth": ("user", "")}, "password must be non-empty"),
        ({"port": 0, "grouping_key": {"run": "x"}}, "must not set 'run'"),
        ({"port": 0, "address": "no-such-host.invalid"}, "cannot resolve"),
        ({"port": 0, "certfile": "/nonexistent.pem", "keyfile": "/nonexistent.key"}, "cannot load TLS"),
    ],
    ids=["port-range", "port-bool", "rank", "timeout", "cert-without-key", "nothing", "empty-password",
         "grouping-run", "bad-address", "missing-cert"],
)  # fmt: skip
def test_bad_arguments_are_rejected_clearly(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PrometheusSink(**kwargs)  # type: ignore[arg-type]


def test_tls_serves_https_with_the_given_certificate(tmp_path: Path) -> None:
    tls = self_signed_certificate(tmp_path)
    sink = PrometheusSink(0, certfile=str(tls.certfile), keyfile=str(tls.keyfile), run_id="run-a")
    try:
        assert sink.url is not None and sink.url.startswith("https://127.0.0.1:")
        trusting = ssl.create_default_context(cafile=str(tls.certfile))
        assert "gradwatch_training_step" in _get(sink.url, context=trusting)
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            _get(sink.url, context=ssl.create_default_context())  # an untrusted certificate is refused
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            _get(sink.url.replace("https://", "http://"))  # no plain-text fallback
    finally:
        sink.close()


def test_tls_scrapes_close_their_connections(tmp_path: Path) -> None:
    """Each served TLS connection is closed when its scrape ends, not left to the garbage collector (which
    raised ResourceWarning: unclosed SSLSocket, at random later moments)."""
    tls = self_signed_certificate(tmp_path)
    sink = PrometheusSink(0, certfile=str(tls.certfile), keyfile=str(tls.keyfile), run_id="run-a")
    trusting = ssl.create_default_context(cafile=str(tls.certfile))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            assert sink.url is not None
            for _ in range(3):
                assert "gradwatch_training_step" in _get(sink.url, context=trusting)
            time.sleep(0.2)  # the serving threads finish after the response is read
            gc.collect()
    finally:
        sink.close()
    leaked = [w for w in caught if issubclass(w.category, ResourceWarning) and "SSLSocket" in str(w.message)]
    assert leaked == []


def test_basic_auth_refuses_missing_or_wrong_credentials(tmp_path: Path) -> None:
    tls = self_signed_certificate(tmp_path)
    sink = PrometheusSink(
        0, certfile=str(tls.certfile), keyfile=str(tls.keyfile), basic_auth=("scraper", "s3cret")
    )
    trusting = ssl.create_default_context(cafile=str(tls.certfile))
    try:
        assert sink.url is not None
        for auth in (None, ("scraper", "wrong"), ("other", "s3cret")):
            with pytest.raises(urllib.error.HTTPError) as refused:
                _get(sink.url, context=trusting, auth=auth)
            assert refused.value.code == 401
            assert refused.value.headers["WWW-Authenticate"].startswith("Basic")
        assert "gradwatch_training_step" in _get(sink.url, context=trusting, auth=("scraper", "s3cret"))
    finally:
        sink.close()


# --- Pushgateway failures ------------------------------------------------------------------------------


def _settled(sink: PrometheusSink) -> None:
    """Wait for the pushes asked for so far (they run on the sink's pusher thread)."""
    assert sink._pusher is not None and sink._pusher.settle(10.0)


def test_push_to_a_closed_port_warns_once_counts_backs_off_and_never_raises() -> None:
    sink = PrometheusSink(
        None, push_gateway=f"http://127.0.0.1:{_closed_port()}", run_id="run-a", timeout=1.0
    )
    fake_now = [1000.0]
    sink._clock = lambda: fake_now[0]
    started = time.perf_counter()
    with pytest.warns(RuntimeWarning, match="could not push metrics") as caught:
        sink.write(_measurement(1))
        sink.flush()  # attempt 1 fails (on the pusher thread)
        _settled(sink)
        sink.flush()  # inside the 1 s back-off: no attempt
        _settled(sink)
        fake_now[0] += 1.5
        sink.flush()  # attempt 2 fails, back-off now 2 s
        _settled(sink)
        fake_now[0] += 1.5
        sink.flush()  # still inside: no attempt
        _settled(sink)
        sink.close()  # final attempt regardless of back-off
    elapsed = time.perf_counter() - started
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    assert sink.push_attempts == 3
    assert sink.push_failures == 3
    assert sink.registry.get_sample_value("gradwatch_push_failures_total", {"run": "run-a", "rank": "0"}) == 3
    assert elapsed < 1.0, f"failing pushes took {elapsed:.2f} s"


def test_a_failed_live_push_warns_on_the_training_thread_not_on_the_worker() -> None:
    sink = PrometheusSink(
        None, push_gateway=f"http://127.0.0.1:{_closed_port()}", run_id="run-a", timeout=1.0
    )
    fake_now = [1000.0]
    sink._clock = lambda: fake_now[0]
    worker_warnings: list[warnings.WarningMessage] = []

    def worker() -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sink.write_live(_measurement(1))  # asks for a push at once (on the pusher thread): fails
        worker_warnings.extend(caught)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(timeout=10)
    _settled(sink)
    assert sink.push_attempts == 1 and sink.push_failures == 1
    assert not [w for w in worker_warnings if "could not push" in str(w.message)]
    with pytest.warns(RuntimeWarning, match="could not push metrics"):
        sink.flush()  # inside the back-off: no new attempt, but the warning is shown here
    _settled(sink)
    assert sink.push_attempts == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # shown once only
        sink.flush()
        sink.close()
    assert sink.push_attempts == 2  # the final push at close() ignores the back-off


# --- from_spec -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expect_port", "expect_gateway"),
    [
        (0, True, None),
        ("0", True, None),
        ("127.0.0.1:0", True, None),
        ("localhost:0", True, None),
        ("push://127.0.0.1:{closed}", False, "http://127.0.0.1:{closed}"),
        ("push+https://127.0.0.1:{closed}", False, "https://127.0.0.1:{closed}"),
    ],
    ids=["int-0", "str-0", "host-port", "name-port", "push", "push-https"],
)
def test_from_spec_accepts_the_documented_forms(
    spec: object, expect_port: bool, expect_gateway: str | None
) -> None:
    closed = _closed_port()
    if isinstance(spec, str):
        spec = spec.format(closed=closed)
    sink = PrometheusSink.from_spec(spec, run_id="r", rank=1, registry=CollectorRegistry())  # type: ignore[arg-type]
    assert (sink.port is not None) == expect_port
    assert sink.push_gateway == (expect_gateway.format(closed=closed) if expect_gateway else None)
    assert (sink.run_id, sink.rank) == ("r", 1)
    if expect_port:
        assert sink.address == "127.0.0.1"
        sink.close()
    else:
        with pytest.warns(RuntimeWarning, match="could not push"):
            sink.close()  # the final push finds no gateway: a warning, not an exception


@pytest.mark.parametrize("spec", [False, "nonsense", "push://", "http://host:1", 3.5, "host:port"])
def test_from_spec_rejects_other_forms_and_lists_the_accepted_ones(spec: object) -> None:
    with pytest.raises(ValueError, match="push://host:port"):
        PrometheusSink.from_spec(spec)  # type: ignore[arg-type]


def test_every_exported_metric_is_documented() -> None:
    sink = PrometheusSink(None, registry=CollectorRegistry())
    for record in synthetic_run().records:
        sink.write(record)
    docs = (Path(__file__).resolve().parent.parent / "docs" / "grafana.md").read_text()
    names = {family.name for family in sink.registry.collect()}
    sink.close()
    # Written as `name` or `name{labels}`; counters under their exposed name with _total.
    undocumented = {n for n in names if not re.search(rf"`{n}(_total)?[`{{]", docs)}
    assert not undocumented, f"add these to docs/grafana.md: {sorted(undocumented)}"


def test_basic_auth_without_tls_off_loopback_logs_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ValueError):  # the address is not this machine's; the warning comes first
        PrometheusSink(0, address="192.0.2.1", basic_auth=("user", "password"))
    assert "without TLS" in caplog.text
    caplog.clear()
    PrometheusSink(0, basic_auth=("user", "password")).close()  # loopback: no warning
    assert "without TLS" not in caplog.text


def test_counters_exist_at_zero_from_the_first_scrape_for_every_listed_layer() -> None:
    """Issue #28: alerts/clips counters first appeared at 1, so rate() and increase() lost the first alert."""
    from gradwatch.records import AlertKind
    from tests.synthetic_run import synthetic_run

    run = synthetic_run()
    header = run.records[0]
    sink = PrometheusSink(None, registry=CollectorRegistry())
    sink.write(header)
    layers = [(MODULE, layer, direction) for layer in (0, 1) for direction in ("forward", "reverse")]
    registry = sink.registry
    for module, layer, direction in layers:
        labels = {"run": "run-a", "rank": "0", "module": module, "layer": str(layer), "direction": direction}
        for kind in AlertKind:
            assert registry.get_sample_value("gradwatch_alerts_total", {**labels, "alert": kind.value}) == 0
        for kind in ("vanishing", "exploding", "nonfinite"):
            assert registry.get_sample_value("gradwatch_alert_active", {**labels, "alert": kind}) == 0
        assert registry.get_sample_value("gradwatch_measurements_total", labels) == 0
    assert registry.get_sample_value("gradwatch_clips_total", {"run": "run-a", "rank": "0"}) == 0
    assert registry.get_sample_value("gradwatch_push_failures_total", {"run": "run-a", "rank": "0"}) == 0
    for record in run.records[1:]:
        sink.write(record)
    exploding = {"run": "run-a", "rank": "0", "module": MODULE, "layer": "1", "direction": "reverse"}
    assert registry.get_sample_value("gradwatch_alerts_total", {**exploding, "alert": "exploding"}) == 1
    assert registry.get_sample_value("gradwatch_clips_total", {"run": "run-a", "rank": "0"}) == 2
    sink.close()


def test_a_layer_the_header_does_not_list_gets_its_counters_at_its_first_measurement() -> None:
    from tests.synthetic_run import synthetic_run

    measurement = next(r for r in synthetic_run().records if isinstance(r, Measurement))
    sink = PrometheusSink(None, registry=CollectorRegistry())
    sink.write(measurement)
    labels = {"run": "run-a", "rank": "0", "module": measurement.module, "layer": "0", "direction": "forward"}
    assert sink.registry.get_sample_value("gradwatch_alerts_total", {**labels, "alert": "vanishing"}) == 0
    assert sink.registry.get_sample_value("gradwatch_measurements_total", labels) == 1
    sink.close()


def test_the_lyapunov_spectrum_and_its_condition_number_are_exported(sink: PrometheusSink) -> None:
    metrics = MeasurementMetrics(
        *([None] * 9), lyapunov_spectrum={"1": -0.01, "2": -0.2}, lyapunov_log10_condition=3.5
    )
    record = Measurement(5, 1.0, MODULE, 0, "forward", metrics, run_id="run-a")
    sink.write(record)
    sink.flush()
    registry = sink.registry
    for index, value in (("1", -0.01), ("2", -0.2)):
        got = registry.get_sample_value("gradwatch_lyapunov_spectrum", _layer_labels(record, index=index))
        assert got == value
    assert registry.get_sample_value("gradwatch_lyapunov_log10_condition", _layer_labels(record)) == 3.5

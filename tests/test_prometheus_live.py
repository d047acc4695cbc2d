"""PrometheusSink against the real things: a Prometheus server scraping it, and a Pushgateway it pushes to.

Every server is started here, on 127.0.0.1, a free port and a temporary directory, and stopped at the end;
nothing depends on system services. Missing binaries skip, or fail under GRADWATCH_REQUIRE_PROMETHEUS=1.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

import gradwatch
from gradwatch.records import Measurement
from gradwatch.sinks.prometheus import JACOBIAN_STATS, LAYER_GAUGES, PrometheusSink
from tests.prometheus_tools import (
    free_port,
    http_get,
    label_values,
    query,
    require_binary,
    running_server,
    wait_until,
)
from tests.synthetic_run import MODULE, SyntheticRun, synthetic_run
from tests.test_integrations import RULES, SCRAPE_CONFIG, dashboard_expressions
from tests.tls_files import self_signed_certificate

pytestmark = pytest.mark.prometheus

SCRAPE_INTERVAL = "250ms"
AUTH = ("prometheus", "scrape-secret")


@dataclass
class LiveStack:
    """A Prometheus scraping two sinks: ``plain`` (HTTP, run-a) and ``secure`` (HTTPS + basic auth, run-b)."""

    prometheus_url: str
    run: SyntheticRun
    secure_run: SyntheticRun


def _step_reached(prometheus_url: str, run_id: str, step: int) -> bool | None:
    result = query(prometheus_url, f'gradwatch_training_step{{run="{run_id}"}}')
    return True if result and float(result[0]["value"][1]) == step else None


def _write_config(directory: Path, plain: PrometheusSink, secure: PrometheusSink, ca_file: Path) -> Path:
    """The shipped prometheus.yml, pointed at the test's exporters, with a short interval."""
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    config["global"] = {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL}
    config["rule_files"] = [str(RULES)]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    jobs["gradwatch"]["static_configs"] = [{"targets": [f"127.0.0.1:{plain.port}"]}]
    secure_job = {
        "job_name": "gradwatch-secure",
        "scheme": "https",
        "tls_config": {"ca_file": str(ca_file)},
        "basic_auth": {"username": AUTH[0], "password": AUTH[1]},
        "static_configs": [{"targets": [f"127.0.0.1:{secure.port}"]}],
    }
    config["scrape_configs"] = [jobs["gradwatch"], secure_job]
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    prometheus = require_binary("prometheus")
    directory = tmp_path_factory.mktemp("prometheus")
    tls = self_signed_certificate(directory)
    run, secure_run = synthetic_run("run-a"), synthetic_run("run-b", seed=1)
    plain = PrometheusSink(0, run_id=run.run_id)
    secure = PrometheusSink(
        0, run_id=secure_run.run_id, certfile=str(tls.certfile), keyfile=str(tls.keyfile), basic_auth=AUTH
    )
    try:
        for record in secure_run.records:
            secure.write(record)
        halfway = next(i for i, r in enumerate(run.records) if getattr(r, "step", 0) > 10)
        for record in run.records[:halfway]:
            plain.write(record)
        config = _write_config(directory, plain, secure, tls.certfile)
        port = free_port()
        argv = [
            prometheus,
            f"--config.file={config}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ]
        with running_server(argv, port=port, log=directory / "prometheus.log") as server:
            # A first scrape of the half-way state, so counters have an earlier sample to rate() against.
            wait_until(
                lambda: _step_reached(server.url, run.run_id, 10), timeout=20, what="a scrape at step 10"
            )
            for record in run.records[halfway:]:
                plain.write(record)
            plain.observe_step(21)
            wait_until(
                lambda: _step_reached(server.url, run.run_id, 21), timeout=20, what="a scrape at step 21"
            )
            wait_until(
                lambda: _step_reached(server.url, secure_run.run_id, 20), timeout=20, what="the TLS scrape"
            )
            yield LiveStack(server.url, run, secure_run)
    finally:
        plain.close()
        secure.close()


def _series_by_labels(
    prometheus_url: str, run_id: str
) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every gradwatch series of the run as (name, labels without job/instance) -> value."""
    series = {}
    for item in query(prometheus_url, f'{{__name__=~"gradwatch_.+", run="{run_id}"}}'):
        labels = dict(item["metric"])
        name = labels.pop("__name__")
        labels.pop("job", None)
        labels.pop("instance", None)
        series[(name, frozenset(labels.items()))] = float(item["value"][1])
    return series


def _layer(m: Measurement, **extra: str) -> frozenset[tuple[str, str]]:
    labels = {"run": m.run_id, "rank": str(m.rank), "module": m.module, "layer": str(m.layer)}
    return frozenset({**labels, "direction": m.direction, **extra}.items())


def test_prometheus_holds_the_values_of_the_run_log(live: LiveStack) -> None:
    series = _series_by_labels(live.prometheus_url, live.run.run_id)
    checked = 0
    for measurement in live.run.latest_measurements().values():
        logged = measurement.to_json()["metrics"]
        expected = {
            ("gradwatch_jacobian_sigma_max", _layer(measurement, stat=s)): logged[f]
            for s, f in JACOBIAN_STATS
        }
        for spec in LAYER_GAUGES:
            expected["gradwatch_" + spec.name, _layer(measurement)] = logged.get(spec.field)
        for lag, value in logged["lag_norm"].items():
            expected["gradwatch_lag_norm", _layer(measurement, lag=lag)] = value
        for param, value in logged["grad_norm"].items():
            expected["gradwatch_grad_norm", _layer(measurement, param=param)] = value
        for key, value in expected.items():
            if value is None:
                assert key not in series, f"{key} should be absent (null in the run log)"
            else:
                assert series[key] == value, key
            checked += 1
    assert checked == 4 * (4 + 16 + 3 + 4)  # layer-directions x (stats + gauges + lags + params)
    run = frozenset({"run": "run-a", "rank": "0"}.items())
    assert series["gradwatch_clips_total", run] == 2
    assert series["gradwatch_training_step", run] == 21
    assert series["gradwatch_clip_scale", run] == 5.0 / 41.0
    exploding = _layer(live.run.measurements[-1], alert="exploding")  # the last one is layer 1 reverse
    assert series["gradwatch_alerts_total", exploding] == 1
    assert series["gradwatch_alert_active", exploding] == 0  # recovered at step 20


def test_prometheus_scrapes_the_tls_basic_auth_exporter(live: LiveStack) -> None:
    (up,) = query(live.prometheus_url, 'up{job="gradwatch-secure"}')
    assert up["value"][1] == "1"
    lyapunov = query(
        live.prometheus_url, 'gradwatch_lyapunov_max{run="run-b", layer="1", direction="reverse"}'
    )
    last = live.secure_run.latest_measurements()[(MODULE, 1, "reverse")]
    assert float(lyapunov[0]["value"][1]) == last.metrics.lyapunov_max


def test_dashboard_variables_list_the_runs_and_modules(live: LiveStack) -> None:
    assert {"run-a", "run-b"} <= set(label_values(live.prometheus_url, "run", "gradwatch_training_step"))
    modules = label_values(live.prometheus_url, "module", 'gradwatch_jacobian_sigma_max{run=~"run-a"}')
    assert modules == [MODULE]
    ranks = label_values(live.prometheus_url, "rank", 'gradwatch_training_step{run=~"run-a"}')
    assert ranks and all(rank.isdigit() for rank in ranks)  # the dashboard's Rank variable


def grafana_regex_escape(value: str) -> str:
    """How Grafana writes a multi-value variable's value into a PromQL regex string (escaped twice)."""
    return re.sub(r"([$^*{}\[\]'+?.()|])", r"\\\\\1", value)


def _substitute(expr: str, run_id: str, module_regex: str, rank_regex: str = ".*") -> str:
    """Fill in the dashboard's variables as Grafana does ($run is single-valued and not escaped)."""
    expr = expr.replace("$__rate_interval", "1m").replace("$__interval", "1s").replace("$__range", "5m")
    expr = expr.replace("$run", run_id).replace("$module", module_regex).replace("$rank", rank_regex)
    assert "$" not in expr, f"unsubstituted variable in {expr!r}"
    return expr


@pytest.mark.parametrize("rank_regex", [".*", "0"], ids=["all-ranks", "rank-0"])
@pytest.mark.parametrize(
    "module_regex", [".*", grafana_regex_escape(MODULE)], ids=["all-modules", "one-module"]
)
def test_every_dashboard_query_returns_data(live: LiveStack, module_regex: str, rank_regex: str) -> None:
    for title, template in dashboard_expressions():
        expr = _substitute(template, live.run.run_id, module_regex, rank_regex)
        # Recording rules need an evaluation after the data arrived; give them a few intervals.
        result = wait_until(
            lambda expr=expr: query(live.prometheus_url, expr) or None, timeout=10, what=f"data for {title!r}"
        )
        values = [float(item["value"][1]) for item in result]
        assert values and not all(math.isnan(v) for v in values), (title, expr)


# --- Pushgateway ---------------------------------------------------------------------------------------


@pytest.fixture
def pushgateway(tmp_path: Path) -> Iterator[str]:
    binary = require_binary("prometheus-pushgateway")
    port = free_port()
    argv = [binary, f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
    with running_server(argv, port=port, log=tmp_path / "pushgateway.log") as server:
        yield server.url


def _pushed(gateway: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = http_get(gateway + "/metrics").decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("gradwatch_")
    }


def test_push_mode_delivers_each_flush_and_the_final_state(pushgateway: str) -> None:
    run = synthetic_run("run-p", rank=1)
    sink = PrometheusSink.from_spec(pushgateway.replace("http://", "push://"), run_id="run-p", rank=1)
    assert sink.port is None  # no exporter in push mode
    for record in run.records:
        sink.write(record)
    sink.flush()
    assert sink._pusher is not None and sink._pusher.settle(10.0)  # pushed on the sink's own thread
    pushed = _pushed(pushgateway)
    job = {"job": "gradwatch", "instance": "", "run": "run-p", "rank": "1"}  # the gateway adds instance=""
    last = run.latest_measurements()[(MODULE, 0, "forward")]
    key = (
        "gradwatch_lyapunov_max",
        frozenset({**job, "module": MODULE, "layer": "0", "direction": "forward"}.items()),
    )
    assert pushed[key] == last.metrics.lyapunov_max
    step = ("gradwatch_training_step", frozenset(job.items()))
    assert pushed[step] == 20
    sink.observe_step(25)
    sink.close()  # the final push carries the last step
    assert _pushed(pushgateway)[step] == 25
    assert sink.push_failures == 0 and sink.push_attempts == 2


# --- background measurements reach Prometheus without another step ---------------------------------------


def _scraped_after(prometheus_url: str, expr: str, after: float) -> bool | None:
    """True once every series of ``expr`` holds a sample scraped after Unix time ``after``."""
    stamps = query(prometheus_url, f"timestamp({expr})")
    return True if stamps and all(float(s["value"][1]) > after for s in stamps) else None


def test_a_background_measurement_reaches_prometheus_without_another_step(tmp_path: Path) -> None:
    """Issue 12.3: one training step, then nothing on the training thread: the real Prometheus server must
    scrape the finished measurement's sigma_max from the exporter; at publication later (wait()) the
    measurements counter stays at 1 (shown live, not counted again)."""
    prometheus = require_binary("prometheus")
    torch.manual_seed(0)
    model = nn.LSTM(3, 8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = gradwatch.watch(model, optimizer, every=10, prometheus=0, background=True)
    try:
        sink = next(s for s in monitor.sinks if isinstance(s, PrometheusSink))
        config = yaml.safe_load(SCRAPE_CONFIG.read_text())
        config["global"] = {"scrape_interval": "100ms", "evaluation_interval": "100ms"}
        config.pop("rule_files", None)
        (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "gradwatch"]
        job["static_configs"] = [{"targets": [f"127.0.0.1:{sink.port}"]}]
        config["scrape_configs"] = [job]
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        argv = [
            prometheus,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ]
        run = f'run="{monitor.run_id}"'
        sigma_max = f'gradwatch_jacobian_sigma_max{{{run}, stat="max"}}'
        with running_server(argv, port=port, log=tmp_path / "prometheus.log") as server:
            wait_until(
                lambda: query(server.url, f"gradwatch_run_info{{{run}}}") or None,
                timeout=10,
                what="a first scrape of the exporter",
            )
            assert not query(server.url, sigma_max)
            out, _ = model(torch.randn(12, 4, 3))
            out.square().mean().backward()
            optimizer.step()  # step 0, measured in the background; the loop now "pauses"
            stepped = time.monotonic()
            (scraped,) = wait_until(
                lambda: query(server.url, sigma_max) or None,
                timeout=10,
                what="sigma_max of step 0 without another training step",
            )
            latency = time.monotonic() - stepped
            assert monitor.current_step == 1
            assert not [r for r in monitor._history if isinstance(r, Measurement)]  # not yet published
            assert latency < 2.0, f"Prometheus saw the measurement {latency:.2f} s after the step"

            monitor.wait()  # publication on this thread: run log, history, detector
            published = time.time()
            (record,) = [r for r in monitor.history if isinstance(r, Measurement)]
            assert float(scraped["value"][1]) == record.metrics.jacobian_sigma_max_max
            counter = f"gradwatch_measurements_total{{{run}}}"
            wait_until(
                lambda: _scraped_after(server.url, counter, published),
                timeout=10,
                what="a scrape after publication",
            )
            (count,) = query(server.url, counter)
            assert float(count["value"][1]) == 1  # shown live, written at publication, counted once
    finally:
        monitor.close()


def test_increase_sees_the_first_alert_and_the_first_clips(live: LiveStack) -> None:
    """Issue #28: the counters are scraped at 0 before the first alert (step 15) and clips, so increase()
    counts them; a series born at 1 has nothing to increase from."""
    exploding = query(
        live.prometheus_url,
        f'increase(gradwatch_alerts_total{{run="{live.run.run_id}", alert="exploding"}}[1h])',
    )
    by_layer = {(s["metric"]["layer"], s["metric"]["direction"]): float(s["value"][1]) for s in exploding}
    assert by_layer[("1", "reverse")] >= 1.0  # the one exploding alert
    assert all(value == 0 for key, value in by_layer.items() if key != ("1", "reverse"))
    (clips,) = query(live.prometheus_url, f'increase(gradwatch_clips_total{{run="{live.run.run_id}"}}[1h])')
    assert float(clips["value"][1]) >= 2.0

"""The exporter under hostile names and failing collectors (#30): every scrape serves what it can.

A lone surrogate in a module name (a real run can have one) used to make every scrape an HTTP 500 with a
traceback on the training process's stderr, silently. Label values are now always encodable, and a
collector or metric family the exporter cannot serve is left out of that scrape and reported as a fault
like any other: one GradWatchWarning, one error record, counted in ``monitor.fault_counts``.
"""

from __future__ import annotations

import json
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from prometheus_client import Gauge
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

import gradwatch
from gradwatch.policy.alerts import GradWatchWarning
from gradwatch.records import Measurement, MeasurementMetrics
from gradwatch.sinks.prometheus import ExportFault, PrometheusSink, label_value
from tests.prometheus_tools import (
    free_port,
    http_get,
    label_values,
    query,
    require_binary,
    running_server,
    wait_until,
)

OPENMETRICS = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
MODULE = "enc\ud800"
RUN_ID = "run-\udcff"


def _scrape(url: str, accept: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.status, response.read().decode("utf-8")


def _samples(body: str) -> dict[str, list[dict[str, str]]]:
    families = text_string_to_metric_families(body.replace("# EOF\n", ""))
    return {family.name: [sample.labels for sample in family.samples] for family in families}


def _model() -> nn.Module:
    model = nn.Module()
    model.add_module(MODULE, nn.GRU(3, 4))
    return model


def _train(model: nn.Module, monitor: gradwatch.Monitor, steps: int) -> None:
    for _ in range(steps):
        out, _ = getattr(model, MODULE)(torch.randn(5, 2, 3))
        out.sum().backward()
        monitor.step()


def test_label_values_are_always_encodable_and_otherwise_unchanged() -> None:
    assert label_value("encoder.rnn") == "encoder.rnn"
    assert label_value("é中🙂 \x1b") == "é中🙂 \x1b"
    assert label_value("enc\ud800") == "enc\\ud800"
    assert label_value("a\udcff\ud800b") == "a\\udcff\\ud800b"


def test_a_lone_surrogate_module_and_run_id_are_exported_written_out(tmp_path: Path) -> None:
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradWatchWarning)  # no fault at all: the labels are sanitised
        with gradwatch.watch(
            model, every=1, prometheus=0, run_id=RUN_ID, log=tmp_path / "run.jsonl"
        ) as monitor:
            _train(model, monitor, 2)
            for accept in (None, OPENMETRICS):  # Prometheus itself asks for OpenMetrics
                status, body = _scrape(str(monitor.prometheus_url), accept)
                assert status == 200
                sigma = _samples(body)["gradwatch_jacobian_sigma_max"]
                assert {labels["module"] for labels in sigma} == {"enc\\ud800"}
                assert {labels["run"] for labels in sigma} == {"run-\\udcff"}
            _train(model, monitor, 1)
            assert monitor.fault_counts == {}


class _BrokenCollector:
    def collect(self) -> Iterator[Metric]:
        raise RuntimeError("collector bug")


def test_a_failing_collector_is_one_fault_and_the_rest_is_still_served(tmp_path: Path) -> None:
    model = _model()
    log = tmp_path / "run.jsonl"
    with gradwatch.watch(model, every=1, prometheus=0, log=log) as monitor:
        sink = next(s for s in monitor.sinks if isinstance(s, PrometheusSink))
        sink.registry.register(_BrokenCollector())
        # a family written around the sink's sanitising (a user's metric in the same registry)
        Gauge("user_metric", "A user's metric.", ["name"], registry=sink.registry).labels("x\ud800").set(1)
        _train(model, monitor, 1)
        for accept in (None, OPENMETRICS):
            status, body = _scrape(str(monitor.prometheus_url), accept)
            assert status == 200
            families = _samples(body)
            assert "user_metric" not in families  # left out, alone
            assert {"gradwatch_jacobian_sigma_max", "gradwatch_training_step"} <= set(families)
        with pytest.warns(GradWatchWarning, match="exporter") as caught:
            _train(model, monitor, 1)  # the faults are reported on the training thread, at the step
        assert len([w for w in caught if issubclass(w.category, GradWatchWarning)]) == 1
        assert monitor.fault_counts == {"exporter": 4}  # 2 scrapes x (the collector, the family)
        _scrape(str(monitor.prometheus_url))
        with warnings.catch_warnings():
            warnings.simplefilter("error", GradWatchWarning)  # said once
            _train(model, monitor, 1)
        assert monitor.fault_counts == {"exporter": 6}
        status, body = _scrape(str(monitor.prometheus_url))
        errors = [labels for labels in _samples(body)["gradwatch_errors"] if labels["where"] == "exporter"]
        assert status == 200 and len(errors) == 1
    records = [json.loads(line) for line in log.read_text().splitlines()]
    (error,) = [r for r in records if r["kind"] == "error"]
    assert error["where"] == "exporter" and "collector bug" in error["message"]
    assert [r["module"] for r in records if r["kind"] == "measurement"] == [MODULE] * 3


def test_a_failing_collector_raises_in_strict_mode() -> None:
    model = _model()
    with gradwatch.watch(model, every=1, prometheus=0, strict=True) as monitor:
        sink = next(s for s in monitor.sinks if isinstance(s, PrometheusSink))
        sink.registry.register(_BrokenCollector())
        _scrape(str(monitor.prometheus_url))
        with pytest.raises(gradwatch.GradWatchFault, match="collector bug"):
            _train(model, monitor, 1)


@pytest.mark.prometheus
def test_real_prometheus_scrapes_a_run_with_a_lone_surrogate_and_a_broken_collector(tmp_path: Path) -> None:
    prometheus = require_binary("prometheus")
    model = _model()
    with gradwatch.watch(model, every=1, prometheus=0, run_id=RUN_ID) as monitor:
        sink = next(s for s in monitor.sinks if isinstance(s, PrometheusSink))
        sink.registry.register(_BrokenCollector())
        _train(model, monitor, 2)
        exporter = str(monitor.prometheus_url).split("//")[1].split("/")[0]
        config = {
            "global": {"scrape_interval": "250ms"},
            "scrape_configs": [{"job_name": "gradwatch", "static_configs": [{"targets": [exporter]}]}],
        }
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        argv = [
            prometheus,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ]
        with running_server(argv, port=port, log=tmp_path / "prometheus.log") as server:
            wait_until(
                lambda: query(server.url, "gradwatch_jacobian_sigma_max") or None,
                timeout=20,
                what="a scrape with the run's metrics",
            )
            (up,) = query(server.url, 'up{job="gradwatch"}')
            assert up["value"][1] == "1"  # the scrape succeeds, with the broken collector left out
            assert label_values(server.url, "module", "gradwatch_jacobian_sigma_max") == ["enc\\ud800"]
            assert label_values(server.url, "run", "gradwatch_training_step") == ["run-\\udcff"]
        with pytest.warns(GradWatchWarning, match="collector bug"):
            _train(model, monitor, 1)
        assert monitor.fault_counts["exporter"] >= 1


@pytest.mark.prometheus
def test_a_push_sends_what_it_can_and_keeps_the_fault_for_the_training_thread(tmp_path: Path) -> None:
    binary = require_binary("prometheus-pushgateway")
    port = free_port()
    argv = [binary, f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
    with running_server(argv, port=port, log=tmp_path / "pushgateway.log") as gateway:
        sink = PrometheusSink(None, push_gateway=gateway.url, run_id=RUN_ID, timeout=5.0)
        sink.registry.register(_BrokenCollector())
        metrics = MeasurementMetrics(*[0.5] * 9)
        sink.write(Measurement(3, 1.0, MODULE, 0, "forward", metrics, run_id=RUN_ID))
        sink.flush()  # asks the pusher thread for a push and returns at once: wait for it to arrive

        def pushed_metrics() -> str | None:
            body = http_get(gateway.url + "/metrics").decode()
            return body if "gradwatch_lyapunov_max" in body else None

        pushed = wait_until(pushed_metrics, timeout=10, what="the flush's push at the gateway")
        sink.close()
    assert sink.push_failures == 0 and sink.push_attempts == 2  # the flush and the final push
    ours = [labels for labels in _samples(pushed)["gradwatch_lyapunov_max"] if labels["job"] == "gradwatch"]
    assert ("enc\\ud800", "run-\\udcff") in [(labels["module"], labels["run"]) for labels in ours]
    faults = sink.take_faults()
    assert [where for where, _ in faults] == ["exporter"] * 2  # one per push
    assert all(isinstance(fault, ExportFault) and "collector bug" in str(fault) for _, fault in faults)
    assert sink.take_faults() == []

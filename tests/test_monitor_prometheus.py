"""watch(prometheus=...) end to end: a real Prometheus server scrapes a short training run's exporter."""

from __future__ import annotations

import json
import socket
import urllib.request

import pytest
import torch
import yaml
from torch import nn

import gradwatch
from tests.prometheus_tools import free_port, query, require_binary, running_server, wait_until


def _train(
    model: nn.Module, monitor: gradwatch.Monitor, optimizer: torch.optim.Optimizer, steps: int
) -> None:
    for _ in range(steps):
        out, _ = model(torch.randn(12, 4, 3))
        optimizer.zero_grad()
        out.square().mean().backward()
        optimizer.step()


def test_exporter_port_zero_is_reported_and_serves_the_run(tmp_path):
    torch.manual_seed(0)
    model = nn.GRU(3, 8, num_layers=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.watch(model, optimizer, every=2, prometheus=0, log=tmp_path / "run.jsonl") as monitor:
        url = monitor.prometheus_url
        assert url is not None and url.startswith("http://127.0.0.1:") and not url.endswith(":0/metrics")
        _train(model, monitor, optimizer, 3)
        body = urllib.request.urlopen(url, timeout=5).read().decode()
    assert f'run="{monitor.run_id}"' in body
    assert "gradwatch_training_step" in body and "gradwatch_jacobian_sigma_max" in body


def test_port_in_use_is_an_error_at_watch_time():
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        with pytest.raises(ValueError, match=str(port)):
            gradwatch.watch(nn.LSTM(2, 2), prometheus=port)


def test_two_monitors_have_separate_registries():
    a = gradwatch.watch(nn.LSTM(2, 3), prometheus=0)
    b = gradwatch.watch(nn.GRU(2, 3), prometheus=0)
    try:
        assert a.prometheus_url != b.prometheus_url
        body_b = urllib.request.urlopen(b.prometheus_url, timeout=5).read().decode()
        assert a.run_id not in body_b and b.run_id in body_b
    finally:
        a.close()
        b.close()


@pytest.mark.prometheus
def test_real_prometheus_scrapes_the_values_of_the_run_log(tmp_path):
    prometheus = require_binary("prometheus")
    torch.manual_seed(0)
    model = nn.LSTM(3, 8, num_layers=2, bidirectional=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    log = tmp_path / "run.jsonl"
    monitor = gradwatch.watch(model, optimizer, every=2, prometheus=0, log=log)
    try:
        _train(model, monitor, optimizer, 5)  # measures at steps 0, 2, 4
        monitor.wait()  # step 4's measurement: exported at once, in the run log once published
        exporter_port = int(monitor.prometheus_url.rsplit(":", 1)[1].split("/")[0])
        config = {
            "global": {"scrape_interval": "250ms"},
            "scrape_configs": [
                {"job_name": "gradwatch", "static_configs": [{"targets": [f"127.0.0.1:{exporter_port}"]}]}
            ],
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
            run = monitor.run_id
            wait_until(
                lambda: query(server.url, f'gradwatch_training_step{{run="{run}"}}') or None,
                timeout=20,
                what="the first scrape of the training run",
            )
            last = {}
            for line in log.read_text().splitlines():
                record = json.loads(line)
                if record["kind"] == "measurement":
                    last[(record["layer"], record["direction"])] = record["metrics"]
            assert len(last) == 4
            for (layer, direction), metrics in last.items():
                selector = f'run="{run}", layer="{layer}", direction="{direction}"'
                (mean,) = query(server.url, f'gradwatch_jacobian_sigma_max{{{selector}, stat="mean"}}')
                assert float(mean["value"][1]) == pytest.approx(metrics["jacobian_sigma_max_mean"], rel=1e-12)
                (lyapunov,) = query(server.url, f"gradwatch_lyapunov_max{{{selector}}}")
                assert float(lyapunov["value"][1]) == pytest.approx(metrics["lyapunov_max"], rel=1e-12)
            (step,) = query(server.url, f'gradwatch_training_step{{run="{run}"}}')
            assert float(step["value"][1]) == 4
    finally:
        monitor.close()

"""integrations/: the Grafana dashboard, Prometheus config and rules, and the compose file hang together."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from gradwatch.policy.config import DetectionConfig
from gradwatch.policy.thresholds import (
    apply_thresholds,
    dump_dashboard,
    panel_key,
    panel_thresholds,
    vanishing_growth_rate,
)
from gradwatch.records import AlertKind
from gradwatch.sinks.prometheus import PrometheusSink
from tests.prometheus_tools import require_binary
from tests.synthetic_run import synthetic_run

INTEGRATIONS = Path(__file__).resolve().parent.parent / "integrations"
DASHBOARD = INTEGRATIONS / "grafana" / "gradwatch.json"
RULES = INTEGRATIONS / "prometheus" / "gradwatch-rules.yml"
RULES_TEST = INTEGRATIONS / "prometheus" / "gradwatch-rules.test.yml"
SCRAPE_CONFIG = INTEGRATIONS / "prometheus" / "prometheus.yml"
COMPOSE = INTEGRATIONS / "docker-compose.yml"
PROVISIONING = INTEGRATIONS / "grafana" / "provisioning"

METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def dashboard_expressions() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of the dashboard."""
    return [(panel["title"], target["expr"]) for panel in dashboard_panels() for target in panel["targets"]]


def exported_family_names() -> set[str]:
    """Every sample name a sink exports after a full synthetic run."""
    sink = PrometheusSink(None, registry=CollectorRegistry())
    for record in synthetic_run().records:
        sink.write(record)
    names = {sample.name for family in sink.registry.collect() for sample in family.samples}
    sink.close()
    return names


def recording_rule_names() -> set[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["record"] for group in groups for rule in group["rules"] if "record" in rule}


def alert_names() -> set[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule}


def referenced_metrics(expr: str) -> set[str]:
    return {token for token in METRIC_NAME.findall(expr) if "gradwatch_" in token}


# --- dashboard -----------------------------------------------------------------------------------------


def test_dashboard_has_run_and_module_variables_from_label_values() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    assert variables["run"]["query"]["query"] == "label_values(gradwatch_training_step, run)"
    assert variables["module"]["query"]["query"].startswith("label_values(gradwatch_jacobian_sigma_max{")
    assert variables["module"]["multi"] and variables["module"]["allValue"] == ".*"


def test_every_panel_queries_the_datasource_variable_and_filters_by_run() -> None:
    panels = dashboard_panels()
    assert len({p["id"] for p in dashboard()["panels"]}) == len(dashboard()["panels"]), (
        "panel ids must be unique"
    )
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            assert 'run=~"$run"' in target["expr"], (panel["title"], target["expr"])


def test_panels_lie_on_the_24_column_grid_without_overlap() -> None:
    occupied: set[tuple[int, int]] = set()
    for panel in dashboard()["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {(grid["x"] + dx, grid["y"] + dy) for dx in range(grid["w"]) for dy in range(grid["h"])}
        assert not cells & occupied, f"panel {panel['title']!r} overlaps another"
        occupied |= cells


@pytest.mark.parametrize(
    "required",
    [
        "gradwatch_jacobian_sigma_max",
        "gradwatch_jacobian_above_one_ratio",
        "gradwatch_lag_norm",
        "gradwatch_lyapunov_max",
        "gradwatch_weight_hh_sigma_max",
        "gradwatch_activation_saturation_ratio",
        "gradwatch_grad_norm",
        "run_module_layer_direction:gradwatch_alerts:rate5m",
        "run:gradwatch_clips:rate5m",
    ],
)
def test_dashboard_shows_the_required_metric(required: str) -> None:
    assert any(required in referenced_metrics(expr) for _, expr in dashboard_expressions())


def test_dashboard_only_uses_exported_metrics_or_recording_rules() -> None:
    known = exported_family_names() | recording_rule_names()
    for title, expr in dashboard_expressions():
        unknown = referenced_metrics(expr) - known
        assert not unknown, f"panel {title!r} uses {unknown}, which neither the sink nor the rules produce"


def test_lyapunov_panel_draws_the_detector_thresholds() -> None:
    (panel,) = [p for p in dashboard_panels() if p["title"] == "Top Lyapunov exponent"]
    defaults = panel["fieldConfig"]["defaults"]
    assert defaults["custom"]["thresholdsStyle"]["mode"] == "line"
    config = DetectionConfig()
    vanishing = vanishing_growth_rate(config)  # the vanishing rule's line on lambda, where it has one
    assert [step["value"] for step in defaults["thresholds"]["steps"]] == [
        None,
        *([vanishing] if vanishing is not None else []),
        config.exploding_growth_rate,
    ]


def test_dashboard_thresholds_are_generated_from_detection_config() -> None:
    """Issue #28: the dashboard drew lambda -0.2 / 0.05 while the detector used -0.8 / 0.02. Fails on drift;
    ``python -m gradwatch.policy.thresholds`` regenerates them."""
    text = DASHBOARD.read_text(encoding="utf-8")
    generated = json.loads(text)
    titles = apply_thresholds(generated)
    assert len(titles) == len(panel_thresholds())
    assert dump_dashboard(generated) == text, "run: python -m gradwatch.policy.thresholds"


def test_dashboard_thresholds_follow_the_config_they_are_generated_from() -> None:
    config = DetectionConfig(exploding_growth_rate=0.1, vanishing_lag_norm=1e-2, exploding_lag_norm=1e3)
    board = dashboard()
    apply_thresholds(board, config)
    steps = {
        panel_key(p): p["fieldConfig"]["defaults"]["thresholds"]["steps"]
        for p in board["panels"]
        if "targets" in p
    }
    assert [s["value"] for s in steps["timeseries", "gradwatch_lyapunov_max"]][-1] == 0.1
    assert [s["value"] for s in steps["timeseries", "gradwatch_lag_norm"]] == [None, 1e-2, 1e3]
    with pytest.raises(ValueError, match="no panel"):
        apply_thresholds({"panels": []})


def test_the_vanishing_and_exploding_alerts_are_the_detector_verdict() -> None:
    """One judge: the alert rules hold no threshold of their own (DetectionConfig decides)."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    rules = {rule["alert"]: rule for group in groups for rule in group["rules"] if "alert" in rule}
    for name, verdict in (
        ("GradwatchVanishingGradients", AlertKind.VANISHING),
        ("GradwatchExplodingGradients", AlertKind.EXPLODING),
    ):
        assert rules[name]["expr"] == f'gradwatch_alert_active{{alert="{verdict.value}"}} == 1'
        assert "for" not in rules[name]  # the detector's patience already applies
    for rule in rules.values():  # no alert compares a measured metric with a threshold of its own
        thresholds = re.findall(r"gradwatch_(?:lyapunov_max|lag_norm)\S*\s*[<>]=?\s*-?[0-9.]", rule["expr"])
        assert not thresholds, f"{rule['alert']}: {rule['expr']} (use gradwatch_alert_active)"


# --- rules and config ----------------------------------------------------------------------------------


def test_rules_alert_on_vanishing_exploding_and_non_finite() -> None:
    assert {"GradwatchVanishingGradients", "GradwatchExplodingGradients", "GradwatchNonFiniteGradients"} <= (
        alert_names()
    )


def test_rules_only_use_exported_metrics() -> None:
    known = exported_family_names() | recording_rule_names()
    groups = yaml.safe_load(RULES.read_text())["groups"]
    for rule in (rule for group in groups for rule in group["rules"]):
        unknown = referenced_metrics(rule["expr"]) - known
        assert not unknown, f"rule {rule.get('record') or rule.get('alert')} uses unknown {unknown}"


def test_scrape_config_targets_the_default_exporter_and_loads_the_rules() -> None:
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["gradwatch"]["static_configs"][0]["targets"] == ["localhost:9400"]
    assert jobs["gradwatch-pushgateway"]["honor_labels"] is True
    assert config["rule_files"] == [RULES.name]


def test_compose_mounts_existing_files_and_provisions_the_dashboard() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"prometheus", "grafana", "pushgateway"} <= set(services)
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (INTEGRATIONS / source).exists(), f"{name} mounts missing {source}"
        listen = [arg for arg in service.get("command", []) if "listen-address" in arg]
        assert all("127.0.0.1:" in arg for arg in listen), f"{name} must listen on loopback only"
    assert services["grafana"]["environment"]["GF_SERVER_HTTP_ADDR"] == "127.0.0.1"
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "gradwatch.yml").read_text())["providers"][0]
    mounted = [
        v.split(":")[1] for v in services["grafana"]["volumes"] if v.startswith("./grafana/gradwatch.json")
    ]
    assert mounted and Path(mounted[0]).parent == Path(provider["options"]["path"])
    datasource = yaml.safe_load((PROVISIONING / "datasources" / "gradwatch.yml").read_text())["datasources"][
        0
    ]
    assert datasource["type"] == "prometheus" and datasource["url"].endswith(":9090")


# --- promtool ------------------------------------------------------------------------------------------


def _promtool(
    *args: str, stdin: bytes | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[bytes]:
    promtool = require_binary("promtool")
    return subprocess.run(
        [promtool, *args], input=stdin, capture_output=True, cwd=cwd, timeout=60, check=False
    )


def test_promtool_check_metrics_is_clean_on_the_exposition() -> None:
    sink = PrometheusSink(None, registry=CollectorRegistry())
    for record in synthetic_run().records:
        sink.write(record)
    exposition = generate_latest(sink.registry)
    sink.close()
    result = _promtool("check", "metrics", stdin=exposition)
    output = (result.stdout + result.stderr).decode()
    assert result.returncode == 0 and output == "", output


def test_promtool_check_metrics_would_flag_a_bad_name() -> None:
    """The check above can fail: promtool does complain about a counter without _total."""
    bad = b"# HELP gradwatch_clips Clips.\n# TYPE gradwatch_clips counter\ngradwatch_clips 1\n"
    result = _promtool("check", "metrics", stdin=bad)
    assert "_total" in (result.stdout + result.stderr).decode()


def test_promtool_check_rules_passes() -> None:
    result = _promtool("check", "rules", str(RULES))
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


def test_promtool_rule_unit_tests_pass() -> None:
    result = _promtool("test", "rules", RULES_TEST.name, cwd=RULES_TEST.parent)
    output = (result.stdout + result.stderr).decode()
    assert result.returncode == 0 and "SUCCESS" in output, output


def test_promtool_check_config_passes() -> None:
    result = _promtool("check", "config", str(SCRAPE_CONFIG))
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


def test_dashboard_keeps_ddp_ranks_apart() -> None:
    """A rank variable, every raw-series query filtered on it, and every per-series legend naming the rank:
    two DDP ranks of one layer never share a legend entry."""
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    rank = variables["rank"]
    assert rank["query"]["query"] == 'label_values(gradwatch_training_step{run=~"$run"}, rank)'
    assert rank["multi"] and rank["includeAll"] and rank["allValue"] == ".*"
    for panel in dashboard_panels():
        for target in panel["targets"]:
            raw = [m for m in referenced_metrics(target["expr"]) if ":" not in m]
            if raw:  # recording rules aggregate over ranks; exported series carry a rank label
                assert 'rank=~"$rank"' in target["expr"], (panel["title"], target["expr"])
                if panel["type"] == "timeseries":
                    assert "{{rank}}" in target["legendFormat"], (panel["title"], target["legendFormat"])


def test_saturation_panel_shows_the_mean_derivative_as_a_number_not_a_percent() -> None:
    (panel,) = [p for p in dashboard_panels() if "saturation" in p["title"].lower()]
    refs = {t["refId"]: t["expr"] for t in panel["targets"]}
    assert "gradwatch_activation_saturation_ratio" in refs["A"]
    assert "gradwatch_activation_derivative_mean" in refs["B"]
    assert panel["fieldConfig"]["defaults"]["unit"] == "percentunit"  # the share of saturated units
    (override,) = [
        o for o in panel["fieldConfig"]["overrides"] if o["matcher"] == {"id": "byFrameRefID", "options": "B"}
    ]
    properties = {p["id"]: p["value"] for p in override["properties"]}
    assert properties["unit"] == "none" and properties["custom.axisPlacement"] == "right"


def test_promtool_fires_the_shipped_alerts_exactly_while_the_detector_says_so(tmp_path: Path) -> None:
    """The rules against DetectionConfig end to end: a layer's measurements (one a minute) go through the
    default detector and a PrometheusSink; promtool evaluates the shipped rules on what the sink exported
    and the vanishing alert fires at exactly the minutes the detector's verdict is vanishing."""
    from gradwatch.policy.judge import Verdict
    from gradwatch.policy.trends import TrendDetector
    from gradwatch.records import Measurement, MeasurementMetrics

    def reading(minute: int, lyapunov: float, lags: dict[str, float | None]) -> Measurement:
        metrics = MeasurementMetrics(0.9, 0.5, 1.0, 1.0, 0.1, 1.0, 0.6, 0.05, lyapunov, lags, {"w": 1.0})
        step = 1000 + 50 * minute  # past any vanishing warm-up
        return Measurement(step, 60.0 * minute, "enc", 0, "forward", metrics, run_id="r1")

    healthy, vanishing = (-0.05, {"1": 0.9, "32": 0.5}), (-1.0, {"1": 0.4, "32": 1e-9})
    # below the old rule's -0.2 but healthy for the detector, then a vanishing stretch, then healthy again
    plan = [(-0.3, {"1": 0.9, "32": 0.01})] * 4 + [vanishing] * 6 + [healthy] * 15  # room to recover
    detector, sink = TrendDetector(), PrometheusSink(None, registry=CollectorRegistry())
    labels = {"run": "r1", "rank": "0", "module": "enc", "layer": "0", "direction": "forward"}
    values, verdicts = [], []
    for minute, (lyapunov, lags) in enumerate(plan):
        measurement = reading(minute, lyapunov, lags)
        sink.write(measurement)
        for alert in detector.update(measurement):
            sink.write(alert)
        value = sink.registry.get_sample_value("gradwatch_alert_active", {**labels, "alert": "vanishing"})
        values.append(str(int(value)) if value is not None else "_")
        verdicts.append(detector.verdict("enc"))
    sink.close()
    assert Verdict.VANISHING in verdicts and verdicts[-1] is not Verdict.VANISHING
    matchers = ",".join(f'{k}="{v}"' for k, v in labels.items())
    series = f'gradwatch_alert_active{{{matchers},alert="vanishing"}}'
    (rule,) = [
        rule
        for group in yaml.safe_load(RULES.read_text())["groups"]
        for rule in group["rules"]
        if rule.get("alert") == "GradwatchVanishingGradients"
    ]
    expected = {
        "exp_labels": {"severity": "warning", **labels, "alert": "vanishing"},
        "exp_annotations": {
            "summary": "Vanishing gradients in enc layer 0 (forward), run r1",
            "description": rule["annotations"]["description"],
        },
    }
    tests = [
        {
            "eval_time": f"{minute}m",
            "alertname": "GradwatchVanishingGradients",
            "exp_alerts": [expected] if verdict is Verdict.VANISHING else [],
        }
        for minute, verdict in enumerate(verdicts)
    ]
    spec = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": series, "values": " ".join(values)}],
                "alert_rule_test": tests,
            }
        ],
    }
    test_file = tmp_path / "detector.test.yml"
    test_file.write_text(yaml.safe_dump(spec))
    result = _promtool("test", "rules", str(test_file))
    output = (result.stdout + result.stderr).decode()
    assert result.returncode == 0 and "SUCCESS" in output, output

"""The detector's thresholds as the monitoring stack shows them, generated from :class:`DetectionConfig`.

One judge everywhere: the Prometheus alerts (integrations/prometheus/gradwatch-rules.yml) fire on
``gradwatch_alert_active``, the detector's own verdict, so they hold no threshold of their own; the Grafana
dashboard draws the detector's thresholds on the panels of the metrics they apply to. Those panel
thresholds are generated here; ``python -m gradwatch.policy.thresholds [DASHBOARD]`` rewrites them in the
dashboard JSON, and tests/test_integrations.py fails when the shipped dashboard drifts from them.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gradwatch.policy.config import DetectionConfig

Steps = list[dict[str, Any]]


def _steps(*pairs: tuple[float | None, str]) -> Steps:
    return [{"color": color, "value": value} for value, color in pairs]


def vanishing_growth_rate(config: DetectionConfig) -> float | None:
    """The vanishing rule's threshold on lambda, where the rule has one (a memory horizon); None when
    vanishing is judged on the lag norms alone."""
    rate = getattr(config, "vanishing_growth_rate", None)
    return rate if isinstance(rate, float) else None


def panel_thresholds(config: DetectionConfig | None = None) -> dict[tuple[str, str], Steps]:
    """(panel type, the metric its first query reads) -> Grafana threshold steps, from ``config``.

    The top Lyapunov exponent: above ``exploding_growth_rate`` (and below the vanishing rule's threshold on
    lambda, if it has one); the product norms across lags: below ``vanishing_lag_norm`` and above
    ``exploding_lag_norm``. A layer is judged on several (and on patience), so a line crossed on one panel
    alone is not yet a verdict; ``gradwatch_alert_active`` is the verdict.
    """
    config = config or DetectionConfig()
    vanishing, exploding = vanishing_growth_rate(config), config.exploding_growth_rate
    stat: list[tuple[float | None, str]] = (
        [(None, "blue"), (vanishing, "green")] if vanishing else [(None, "green")]
    )
    lines: list[tuple[float | None, str]] = [(None, "transparent")] + (
        [(vanishing, "yellow")] if vanishing else []
    )
    return {
        ("stat", "run_module:gradwatch_lyapunov_max:max"): _steps(*stat, (exploding, "red")),
        ("timeseries", "gradwatch_lyapunov_max"): _steps(*lines, (exploding, "red")),
        ("timeseries", "gradwatch_lag_norm"): _steps(
            (None, "transparent"), (config.vanishing_lag_norm, "yellow"), (config.exploding_lag_norm, "red")
        ),
    }


def panel_descriptions(config: DetectionConfig | None = None) -> dict[tuple[str, str], str]:
    """(panel type, metric) -> the panel's description, naming the thresholds it draws."""
    config = config or DetectionConfig()
    vanishing, exploding = vanishing_growth_rate(config), config.exploding_growth_rate
    below = f"blue below {vanishing:g}, " if vanishing else ""
    line = f"{vanishing:g} (yellow) and " if vanishing else ""
    rule = (
        "The lines are the detector's thresholds (DetectionConfig); its verdict, which weighs them with the "
        "other metrics and patience, is gradwatch_alert_active (docs/alerts.md)."
    )
    return {
        ("stat", "run_module:gradwatch_lyapunov_max:max"): (
            f"Largest top Lyapunov exponent lambda over the selected modules: {below}red above "
            f"{exploding:g}. {rule}"
        ),
        ("timeseries", "gradwatch_lyapunov_max"): (
            f"Mean log growth per step of the Jacobian product (0: neither grows nor shrinks); lines at "
            f"{line}{exploding:g} (red). {rule}"
        ),
        ("timeseries", "gradwatch_lag_norm"): (
            "||ds_T/ds_{T-lag}||_2, mean over sequences: how much a gradient from lag steps back is scaled "
            f"(log scale); lines at {config.vanishing_lag_norm:g} (yellow) and {config.exploding_lag_norm:g} "
            f"(red). {rule}"
        ),
    }


def panel_key(panel: dict[str, Any]) -> tuple[str, str] | None:
    """(type, metric) of a dashboard panel: the metric name its first query reads, None for rows."""
    targets = panel.get("targets") or []
    if panel.get("type") == "row" or not targets:
        return None
    expr = str(targets[0].get("expr", ""))
    # the metric: from the outermost aggregation inwards, the first name before a label matcher "{"
    name = expr.split("{", 1)[0].rsplit("(", 1)[-1].strip()
    return (str(panel.get("type")), name)


def apply_thresholds(dashboard: dict[str, Any], config: DetectionConfig | None = None) -> list[str]:
    """Set the generated thresholds (and descriptions) on ``dashboard``'s panels in place; returns the
    titles it set.

    Raises ``ValueError`` naming a generated panel the dashboard lacks.
    """
    wanted = panel_thresholds(config)
    descriptions = panel_descriptions(config)
    done: list[str] = []
    found: set[tuple[str, str]] = set()
    for panel in dashboard.get("panels", []):
        key = panel_key(panel)
        if key in wanted:
            defaults = panel.setdefault("fieldConfig", {}).setdefault("defaults", {})
            defaults.setdefault("thresholds", {"mode": "absolute"})["steps"] = wanted[key]
            panel["description"] = descriptions[key]
            found.add(key)
            done.append(str(panel.get("title")))
    missing = set(wanted) - found
    if missing:
        raise ValueError(f"the dashboard has no panel for {sorted(missing)}: its thresholds have no place")
    return done


def dump_dashboard(dashboard: dict[str, Any]) -> str:
    """The dashboard JSON as the repository keeps it (2-space indent, UTF-8, a final newline)."""
    return json.dumps(dashboard, indent=2, ensure_ascii=False) + "\n"


DEFAULT_DASHBOARD = Path("integrations") / "grafana" / "gradwatch.json"


def main(argv: Sequence[str] | None = None) -> int:
    """Rewrite the thresholds of the dashboard file (default: integrations/grafana/gradwatch.json)."""
    args = list(sys.argv[1:] if argv is None else argv)
    path = Path(args[0]) if args else DEFAULT_DASHBOARD
    dashboard = json.loads(path.read_text(encoding="utf-8"))
    titles = apply_thresholds(dashboard)
    path.write_text(dump_dashboard(dashboard), encoding="utf-8")
    sys.stdout.write(f"{path}: thresholds of {', '.join(titles)} set from DetectionConfig()\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

"""Renderers on their own: escaping, self-contained HTML charts, valid JSON for non-finite values."""

from __future__ import annotations

import dataclasses
import html
import io
import json
import math
import re

import pytest

from gradwatch.records import Alert, AlertKind, Measurement, MeasurementMetrics, Record, RunHeader
from gradwatch.report.formatting import format_number
from gradwatch.report.render_html import (
    PROFILE_SNAPSHOTS,
    Thresholds,
    axis_labels,
    chart_svg,
    falls_below,
    lag_profile_svg,
    render_html,
)
from gradwatch.report.render_json import REPORT_JSON_SCHEMA, render_json
from gradwatch.report.render_markdown import escape_markdown, render_markdown
from gradwatch.report.render_text import make_console, render_text
from gradwatch.report.summary import summarize
from tests.report_logs import make_run


def test_markdown_escape_neutralises_markup() -> None:
    assert escape_markdown("a|b") == r"a\|b"
    assert escape_markdown("<img src=x>") == r"\<img src=x\>"
    assert escape_markdown("**x** [l](u) `c`") == r"\*\*x\*\* \[l\](u) \`c\`"
    assert escape_markdown("two\nlines") == "two lines"


def test_markdown_details_summary_is_html_escaped() -> None:
    text = render_markdown(summarize(make_run("healthy", module="<b>x</b>")))
    assert "<summary>&lt;b&gt;x&lt;/b&gt; · layer 0 · forward: healthy</summary>" in text


def test_html_chart_marks_alerts_and_reference_line() -> None:
    layer = summarize(make_run("exploding")).runs[0].layers[0]
    sigma = next(m for m in layer.metrics if m.name == "jacobian_sigma_max_mean")
    svg = chart_svg(sigma, [(500, "exploding", "step 500: <boom>")])
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert 'class="alert-mark"' in svg and "&lt;boom&gt;" in svg and "<boom>" not in svg
    assert re.search(r'class="reference"[^>]*><title>σ = 1</title>', svg)  # the sigma = 1 line
    assert "(log axis)" not in svg  # 0.95 .. 3: less than a decade, a linear axis
    lag = next(m for m in layer.metrics if m.name == "lag_norm")
    assert "(log axis)" in chart_svg(lag, [])  # 0.2 .. 1e6: many decades
    outside = chart_svg(sigma, [(10**6, "exploding", "late")])
    assert "alert-mark" not in outside  # an alert outside the plotted steps is not drawn


def test_html_chart_breaks_lines_at_missing_values() -> None:
    layer = summarize(make_run("nonfinite")).runs[0].layers[0]
    lyapunov = next(m for m in layer.metrics if m.name == "lyapunov_max")
    assert lyapunov.series[-1][1] is None
    svg = chart_svg(lyapunov, [])
    assert svg.count("<polyline") == 1
    points = re.search(r'points="([^"]+)"', svg)
    assert points is not None and len(points.group(1).split()) == lyapunov.count


def test_html_escapes_every_log_string() -> None:
    evil = '<img src=x onerror="alert(1)">'
    records: list[Record] = [
        RunHeader(evil, 0.0, evil, evil, {}, ({"name": evil, "type": evil},)),
        Measurement(0, 0.0, evil, 0, "forward", make_run("healthy")[1].metrics, run_id=evil),  # type: ignore[union-attr]
        Alert(0, 0.0, evil, 0, "forward", AlertKind.EXPLODING, evil, 1.0, 0.5, evil, run_id=evil),
    ]
    page = render_html(summarize(records))
    assert "<img" not in page and 'onerror="' not in page
    assert page.count("&lt;img src=x onerror=&quot;alert(1)&quot;&gt;") >= 6


def test_json_output_is_valid_with_non_finite_values() -> None:
    metrics = MeasurementMetrics(
        math.inf, None, None, math.nan, None, None, None, None, -math.inf, grad_norm={"w": math.nan}
    )
    records: list[Record] = [
        RunHeader("r", math.inf, "0", "0", {"lr": math.nan, "deep": [[[[1.0]]]]}, ()),
        Measurement(0, 0.0, "rnn", 0, "forward", metrics, run_id="r"),
        Measurement(10, 0.0, "rnn", 0, "forward", metrics, run_id="r"),
    ]
    text = render_json(summarize(records))
    data = json.loads(text)  # strict JSON: would fail on NaN/Infinity tokens
    assert "NaN" not in text and "Infinity" not in text
    assert data["schema"] == REPORT_JSON_SCHEMA
    assert data["runs"][0]["header"]["config"] == {"lr": None, "deep": [[[[1.0]]]]}
    sigma = data["runs"][0]["layers"][0]["metrics"]["jacobian_sigma_max_mean"]
    assert sigma["count"] == 0 and sigma["first"] is None and sigma["trend_per_1000_steps"] is None


def test_long_series_are_binned_for_the_chart() -> None:
    from gradwatch.report.render_html import MAX_CHART_POINTS

    layer = summarize(make_run("vanishing", measurements=3 * MAX_CHART_POINTS, every=1)).runs[0].layers[0]
    lyapunov = next(m for m in layer.metrics if m.name == "lyapunov_max")
    points = re.search(r'points="([^"]+)"', chart_svg(lyapunov, []))
    assert points is not None and len(points.group(1).split()) == MAX_CHART_POINTS


@pytest.mark.parametrize(
    ("low", "high", "expected"),
    [
        (1.998, 2.004, ("1.998", "2.004")),  # a nearly flat series: 3 digits would read "2" at both ends
        (2.0, 2.01, ("2", "2.01")),
        (1.06e3, 9.43e3, ("1.06e+03", "9.43e+03")),
        (0.5, 1.5, ("0.5", "1.5")),
    ],
    ids=["flat-needs-4-digits", "three-digits-suffice", "scientific", "plain"],
)
def test_html_axis_labels_tell_the_ends_apart(low: float, high: float, expected: tuple[str, str]) -> None:
    assert axis_labels(low, high) == expected


# --- messages are shown whole (#31) ---------------------------------------------------------------------

LONG_HINT = "Hint: initialise W_hh orthogonally (torch.nn.init.orthogonal_) and keep [sigma_max(W_hh) = 1.0]"


def _run_with_long_alert() -> list[Record]:
    records = make_run("exploding")
    message = "sigma_max(J_t) grows at every step " + "because of the recurrent weight; " * 12 + LONG_HINT
    assert len(message) > 400  # longer than any cut a report ever made
    alert = next(r for r in records if isinstance(r, Alert))
    return [*records, dataclasses.replace(alert, step=alert.step + 1, message=message)]


@pytest.mark.parametrize("output", ["text", "markdown", "html"])
def test_every_format_shows_an_alert_message_whole_with_its_hint(output: str) -> None:
    report = summarize(_run_with_long_alert())
    if output == "text":
        console = make_console(io.StringIO(), color=False)
        render_text(report, console)
        # the text renderer wraps the message inside its table cell: compare without borders and spaces
        page = re.sub(r"[│┃\s]", "", console.file.getvalue())
        assert re.sub(r"\s", "", LONG_HINT) in page
    elif output == "markdown":
        assert escape_markdown(LONG_HINT) in render_markdown(report)
    else:
        assert html.escape(LONG_HINT, quote=True) in render_html(report)


def test_a_crafted_huge_message_is_still_bounded() -> None:
    records = _run_with_long_alert()
    records[-1] = dataclasses.replace(records[-1], message="x" * 100_000)  # type: ignore[type-var]
    page = render_html(summarize(records))
    assert "x" * 3990 in page and "x" * 4001 not in page


# --- the one picture per layer: the lag-norm profile (#31) ----------------------------------------------


def test_falls_below_interpolates_in_log_log() -> None:
    # norm 1 at tau 1, 1e-6 at tau 100: the log-log line reaches 1e-3 half-way, at tau 10
    assert falls_below([(1, 1.0), (100, 1e-6)], 1e-3) == pytest.approx(10.0)
    assert falls_below([(1, 1.0), (8, 0.5)], 1e-3) is None
    assert falls_below([(1, 1e-4), (8, 1e-5)], 1e-3) == 1.0


def test_lag_profile_marks_norm_one_thresholds_and_reach() -> None:
    records = make_run("vanishing")
    header = records[0]
    assert isinstance(header, RunHeader)
    config = {"horizon": 16, "detection": {"vanishing_lag_norm": 1e-4, "exploding_lag_norm": 50.0}}
    records[0] = dataclasses.replace(header, config=config)
    run = summarize(records).runs[0]
    layer = run.layers[0]
    assert [tau for tau, _series in layer.lag_series] == [1, 8, 32]
    svg = lag_profile_svg(layer, Thresholds.of(run))
    assert svg.count("<polyline") == PROFILE_SNAPSHOTS  # evenly spaced steps over training
    assert "step 0" in svg and f"step {layer.last_step}" in svg
    for label in ("norm 1", "vanishing &lt; 1.00e-04", "exploding &gt; 50", "horizon 16", "reach ≈"):
        assert label in svg, label
    # the newest profile: 0.2**1, 0.2**8 = 2.6e-6 ... falls below 1e-4 between tau 1 and 8
    newest = [(tau, series[-1][1]) for tau, series in layer.lag_series]
    below = falls_below([(t, v) for t, v in newest if v is not None], 1e-4)
    assert below is not None and 1 < below < 8 and f"reach ≈ {format_number(below)} steps" in svg


def test_lag_profile_shows_a_recorded_reach_field() -> None:
    run = summarize(make_run("healthy")).runs[0]
    layer = run.layers[0]
    reach = dataclasses.replace(layer.metrics[0], name="gradient_reach", label="reach (steps)", last=12.0)
    others = tuple(m for m in layer.metrics if m.name != "gradient_reach")
    with_reach = dataclasses.replace(layer, metrics=(*others, reach))
    svg = lag_profile_svg(with_reach, Thresholds.of(run))
    assert "reach 12" in svg and "reach ≈" not in svg


def test_html_headline_is_the_verdict_and_charts_draw_the_run_thresholds() -> None:
    page = render_html(summarize(make_run("exploding")))
    first_layer = page.index("<section class=layer")
    assert re.search(r'class="headline"><span class="verdict"[^>]*>exploding</span>', page[first_layer:])
    assert "<h2>Runs</h2>" not in page  # one run: no index
    assert (
        "exploding &gt; 0.02" in page
    )  # the lambda threshold (vanishing is judged on the reach, not lambda)
    assert "λ = 0" in page and "training step" in page and "lag τ (steps back, log axis)" in page


def test_shares_are_charted_on_their_whole_range() -> None:
    """A saturation ratio wandering 0.57 -> 0.62 is drawn on 0..1, not blown up to fill the chart."""
    layer = summarize(make_run("healthy")).runs[0].layers[0]
    ratio = next(m for m in layer.metrics if m.name == "activation_saturation_ratio")
    wiggle = dataclasses.replace(
        ratio, series=tuple((s, 0.57 + 0.05 * (i % 2)) for i, (s, _v) in enumerate(ratio.series))
    )
    ticks = re.findall(r'class="tick"[^>]*text-anchor="end">([^<]+)<', chart_svg(wiggle, []))
    assert ticks[0] == "0" and ticks[-1] == "1"
    sigma = next(m for m in layer.metrics if m.name == "weight_hh_sigma_max")  # not a share: its own range
    flat = dataclasses.replace(
        sigma, series=tuple((s, 2.0 + 0.003 * (i % 2)) for i, (s, _v) in enumerate(sigma.series))
    )
    sigma_ticks = [
        float(t) for t in re.findall(r'class="tick"[^>]*text-anchor="end">([^<]+)<', chart_svg(flat, []))
    ]
    assert min(sigma_ticks) <= 1.0 <= max(sigma_ticks)  # the sigma = 1 line keeps 2.000 -> 2.003 flat

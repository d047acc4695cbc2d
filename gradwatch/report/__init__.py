"""Read run logs tolerantly, summarise them with pure functions, and render text/json/markdown/html."""

from gradwatch.report.command import exit_status, make_report, parse_fail_on, render
from gradwatch.report.follow import Follower, follow
from gradwatch.report.reader import LogContents, LogTail, Problem, read_logs
from gradwatch.report.render_json import REPORT_JSON_SCHEMA
from gradwatch.report.streaming import StreamingSummary
from gradwatch.report.summary import (
    LayerSummary,
    MetricSummary,
    Report,
    ReportOptions,
    RunSummary,
    StepRange,
    build_report,
    summarize,
)
from gradwatch.report.verdict import LayerVerdict, Verdict, fallback_verdict, judge_layer

__all__ = [
    "REPORT_JSON_SCHEMA",
    "Follower",
    "LayerSummary",
    "LayerVerdict",
    "LogContents",
    "LogTail",
    "MetricSummary",
    "Problem",
    "Report",
    "ReportOptions",
    "RunSummary",
    "StepRange",
    "StreamingSummary",
    "Verdict",
    "build_report",
    "exit_status",
    "fallback_verdict",
    "follow",
    "judge_layer",
    "make_report",
    "parse_fail_on",
    "read_logs",
    "render",
    "summarize",
]

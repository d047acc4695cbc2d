"""The ``gradwatch`` command line: argument parsing only; the work lives in the package."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from gradwatch._version import __version__
from gradwatch.demo.choices import CELLS, DEFAULT_PORT, SCENARIOS
from gradwatch.report import command
from gradwatch.report.follow import follow as follow_logs
from gradwatch.report.formatting import printable
from gradwatch.report.metrics import METRIC_NAMES
from gradwatch.report.render_text import make_console, render_text
from gradwatch.report.summary import ReportOptions, StepRange, why_no_measurements
from gradwatch.report.verdict import Verdict


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gradwatch")
def main() -> None:
    """gradwatch: vanishing/exploding-gradient monitor for PyTorch RNNs."""


class _OutputError(click.ClickException):
    exit_code = 2


def _parse_steps(_ctx: click.Context, _param: click.Parameter, value: str | None) -> StepRange:
    if value is None:
        return StepRange()
    try:
        return StepRange.parse(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _parse_fail_on(
    _ctx: click.Context, _param: click.Parameter, value: tuple[str, ...]
) -> frozenset[Verdict]:
    try:
        return command.parse_fail_on(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _export_tensorboard(paths: list[str], output: Path | None, *, follow: bool) -> int:
    """``--format tensorboard``: convert the logs to event files under ``-o DIR``; 2 if nothing was read."""
    from gradwatch.report.tensorboard_export import export_tensorboard

    if output is None or follow:
        raise click.UsageError("--format tensorboard needs -o DIR (the event file directory) and no --follow")
    try:
        result = export_tensorboard(paths, output)
    except (ValueError, ImportError, OSError) as exc:
        raise _OutputError(f"cannot write TensorBoard events to {str(output)!r}: {exc}") from None
    for problem in result.problems:
        click.echo(printable(f"gradwatch report: {problem}"), err=True)
    for run, count in result.runs.items():
        renamed = result.renamed.get(run)
        note = "" if renamed is None else f" (run id {renamed!r} made a safe directory name)"
        click.echo(printable(f"gradwatch report: {count} record(s) -> {output / run}{note}"), err=True)
    if not result.runs:
        click.echo("gradwatch report: no usable record was read", err=True)
        return command.EXIT_NOTHING_READ
    return command.EXIT_OK


@main.command("report")
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["text", "json", "markdown", "html", "tensorboard"]),
    default="text",
    show_default=True,
    help="Output format (tensorboard: event files in the directory given by -o).",
)
@click.option(
    "--output",
    "-o",
    type=click.Path(path_type=Path),
    help="Write the report to this file instead of stdout (--format tensorboard: this directory).",
)
@click.option(
    "--module", "modules", multiple=True, help="Only modules matching this name or glob (repeatable)."
)
@click.option("--steps", callback=_parse_steps, help="Only steps A <= step < B, written A:B, A: or :B.")
@click.option(
    "--metric",
    "metrics",
    multiple=True,
    type=click.Choice(METRIC_NAMES),
    help="Only these metrics in tables and charts (repeatable).",
)
@click.option("--merge-ranks", is_flag=True, help="Merge the ranks of one run_id (DDP) into one report.")
@click.option(
    "--fail-on",
    multiple=True,
    callback=_parse_fail_on,
    help=(
        "Exit with status 1 if a layer's verdict is one of these: vanishing,exploding,nonfinite,unknown "
        "(comma-separated, repeatable; an empty value is an error). An unknown verdict (fewer "
        "measurements than the rule needs, or never measured) fails only when unknown is named."
    ),
)
@click.option("--follow", is_flag=True, help="Live view that refreshes as the logs grow (Ctrl-C to stop).")
@click.option(
    "--follow-interval",
    type=click.FloatRange(min=0.01),
    default=1.0,
    show_default=True,
    help="Seconds between two reads of the growing logs in --follow mode.",
)
@click.option(
    "--follow-timeout", type=click.FloatRange(min=0), default=None, help="Stop following after seconds."
)
@click.option(
    "--jobs",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Worker processes for logs of 64 MB or more, a file or a piece of a big file each (0: one per CPU; "
    "1: read in this process).",
)
@click.pass_context
def report(
    ctx: click.Context,
    paths: tuple[str, ...],
    output_format: str,
    output: Path | None,
    modules: tuple[str, ...],
    steps: StepRange,
    metrics: tuple[str, ...],
    merge_ranks: bool,
    fail_on: frozenset[Verdict],
    follow: bool,
    follow_interval: float,
    follow_timeout: float | None,
    jobs: int,
) -> None:
    """Summarise gradwatch run logs (files, directories of *.jsonl, globs) and give a verdict per layer."""
    if output_format == "tensorboard":
        if modules or steps != StepRange() or metrics or merge_ranks or fail_on:
            raise click.UsageError(
                "--format tensorboard converts whole logs: --module, --steps, --metric, --merge-ranks and "
                "--fail-on do not apply (filter in TensorBoard)"
            )
        ctx.exit(_export_tensorboard(list(paths), output, follow=follow))
    options = ReportOptions(
        modules=modules,
        steps=steps,
        metrics=metrics or None,
        merge_ranks=merge_ranks,
        series=output_format == "html",  # only the HTML charts draw the per-step series
    )
    stdout = sys.stdout  # click.get_text_stream is deprecated since click 8.5
    if follow:
        # the live view is text; with another --format and no -o it goes to stderr, so that stdout gets
        # only the final report in that format (json stays parseable)
        live_stream = stdout if output_format == "text" or output is not None else sys.stderr
        result = follow_logs(
            list(paths),
            console=make_console(live_stream),
            options=options,
            interval=follow_interval,
            timeout=follow_timeout,
        )
    else:
        result = command.make_report(list(paths), options, jobs=jobs)
    for line in command.diagnostics(result):
        click.echo(f"gradwatch report: {line}", err=True)
    if output is not None:
        try:
            with output.open("w", encoding="utf-8") as handle:
                command.write_report(result, output_format, handle)
        except OSError as exc:
            raise _OutputError(f"cannot write the report to {str(output)!r}: {exc.strerror or exc}") from None
    elif output_format != "text":
        command.write_report(result, output_format, stdout)
    elif not follow:  # --follow has shown the text report live already
        render_text(result, make_console(stdout))
    status = command.exit_status(result, fail_on)
    if status == command.EXIT_NOTHING_READ:
        click.echo("gradwatch report: no usable record was read", err=True)
    elif status == command.EXIT_FAIL_ON:
        for run, layer in result.matches(fail_on):
            what = (
                f"{layer.title} is {layer.verdict.verdict.value} ({layer.verdict.reason})"
                if layer is not None
                else f"no layer was measured, so its verdict is unknown ({why_no_measurements(run)})"
            )
            click.echo(printable(f"gradwatch report: {run.title}: {what}"), err=True)
    ctx.exit(status)


@main.command("demo")
@click.option("--cell", type=click.Choice(CELLS), default="rnn", show_default=True, help="Recurrent cell.")
@click.option(
    "--scenario",
    type=click.Choice(SCENARIOS),
    default=None,
    help="Which gradient regime the initialisation sets up (see docs/demo.md). Default: the vanishing model, "
    "then the healthy one, with both verdicts beside both outcomes.",
)
@click.option("--steps", type=click.IntRange(min=1), default=400, show_default=True, help="Training steps.")
@click.option(
    "--seq-len", type=click.IntRange(min=2), default=None, help="Sequence length (default: the scenario's)."
)
@click.option(
    "--every", type=click.IntRange(min=1), default=10, show_default=True, help="Measure every N steps."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the model and the data.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=DEFAULT_PORT,
    show_default=True,
    help="Prometheus exporter port on localhost (0 = any free port).",
)
@click.option("--no-prometheus", is_flag=True, help="Do not start the Prometheus exporter.")
@click.option(
    "--log-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("runs"),
    show_default=True,
    help="Directory for the run log (JSON lines).",
)
def demo(
    cell: str,
    scenario: str | None,
    steps: int,
    seq_len: int | None,
    every: int,
    seed: int,
    port: int,
    no_prometheus: bool,
    log_dir: Path,
) -> None:
    """Train a small RNN on the adding problem with gradwatch on: live Jacobian norms, alerts, report."""
    from gradwatch.demo import (  # imports torch: only for the demo
        DemoInterrupted,
        DemoOptions,
        DemoSetupError,
        run_comparison,
        run_demo,
    )

    options = DemoOptions(
        cell=cell,
        scenario=scenario or "vanishing",
        steps=steps,
        seq_len=seq_len,
        every=every,
        seed=seed,
        port=None if no_prometheus else port,
        log_dir=log_dir,
    )
    try:
        console = make_console(sys.stdout)  # not click.get_text_stream: deprecated since click 8.5
        if scenario is None:
            run_comparison(options, console)
        else:
            run_demo(options, console)
    except (DemoSetupError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    except DemoInterrupted:  # the demo has said where the partial run log is
        sys.exit(130)  # 128 + SIGINT, as a shell reports Ctrl-C


if __name__ == "__main__":  # pragma: no cover
    main()

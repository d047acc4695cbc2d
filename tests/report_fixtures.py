"""Pytest fixtures for the report tests (load with ``pytest_plugins = ["tests.report_fixtures"]``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.report_logs import RUN_KINDS, RunKind, make_run, write_log

LogFactory = Callable[..., Path]


@pytest.fixture
def cli_runner() -> CliRunner:
    """A click runner with stdout and stderr kept apart (``result.stdout`` / ``result.stderr``)."""
    return CliRunner()


@pytest.fixture
def make_log(tmp_path: Path) -> LogFactory:
    """``make_log(kind, name=None, crash_mid_line=False, **make_run_kwargs)`` -> path of a new log file."""

    def factory(
        kind: RunKind, name: str | None = None, *, crash_mid_line: bool = False, **kwargs: object
    ) -> Path:
        path = tmp_path / (name or f"{kind}.jsonl")
        return write_log(path, make_run(kind, **kwargs), crash_mid_line=crash_mid_line)  # type: ignore[arg-type]

    return factory


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    """A directory with one log per run kind."""
    directory = tmp_path / "runs"
    directory.mkdir()
    for kind in RUN_KINDS:
        write_log(directory / f"{kind}.jsonl", make_run(kind))
    return directory

"""``--format tensorboard`` never writes outside ``-o`` (#30): a run id read from a log is one safe name."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from gradwatch.cli import main
from gradwatch.report.tensorboard_export import export_tensorboard, run_directory_name
from tests.report_logs import make_run, write_log

pytest.importorskip("tensorboard", reason="the TensorBoard export needs the tensorboard extra")

HOSTILE_RUN_IDS = (
    "../../escaped",
    "..",
    ".",
    "a/../../b",
    "..\\..\\windows",
    "C:\\Users\\x",
    "-rf",
    ".hidden",
    "\x1b]0;title\x07",
    "run\ud800",
    "CON",
    "x" * 300,
)


@pytest.mark.parametrize("run_id", HOSTILE_RUN_IDS)
def test_a_run_id_becomes_one_safe_directory_name(run_id: str) -> None:
    name = run_directory_name(run_id)
    assert name and name not in (".", "..") and name[0] not in ".-_"
    assert "/" not in name and "\\" not in name and os.sep not in name and ":" not in name
    assert name.isascii() and name.isprintable() and len(name) <= 89
    assert name != run_id  # mapped, with the hash of the original appended
    assert len(name) > 9 and name[-9] == "-" and all(c in "0123456789abcdef" for c in name[-8:])


def test_ordinary_run_ids_keep_their_name_and_distinct_ids_never_share_one() -> None:
    for run_id in ("20261207-180102-ab12cd34", "exp_3.lr-0.1", "baseline"):
        assert run_directory_name(run_id) == run_id
    assert run_directory_name("") == "unnamed-run"
    lookalikes = ("a/b", "a\\b", "a:b", "a b", "a_b-x", "/a/b", "a/b/")
    assert len({run_directory_name(run_id) for run_id in lookalikes}) == len(lookalikes)


def _files_under(root: Path) -> set[Path]:
    return {path for path in root.rglob("*")}


def test_the_export_writes_only_inside_the_output_directory(tmp_path: Path) -> None:
    work = tmp_path / "deep" / "work"
    work.mkdir(parents=True)
    absolute = tmp_path / "absolute-target"
    run_ids = (*HOSTILE_RUN_IDS, str(absolute), "ordinary-run")
    log = work / "runs.jsonl"
    records = [record for run_id in run_ids for record in make_run("healthy", run_id=run_id, measurements=2)]
    records += make_run("healthy", run_id="../../escaped", rank=3, measurements=2)
    write_log(log, records)
    out = work / "tb"
    before = _files_under(tmp_path)
    result = CliRunner().invoke(main, ["report", "--format", "tensorboard", "-o", str(out), str(log)])
    assert result.exit_code == 0, result.output
    created = _files_under(tmp_path) - before
    assert created and all(path == out or out in path.parents for path in created), sorted(map(str, created))
    assert not absolute.exists() and not (tmp_path / "escaped").exists()
    run_dirs = {path for path in out.iterdir()}
    assert len(run_dirs) == len(run_ids)  # one directory per run, none shared
    assert (out / "ordinary-run").is_dir()
    escaped = out / run_directory_name("../../escaped")
    assert (escaped / "rank3").is_dir()  # a rank > 0 is a subdirectory of its run's
    assert f"-> {escaped} (run id '../../escaped' made a safe directory name)" in result.stderr
    assert "\x1b" not in result.stderr and "\\x1b]0;title\\x07" in result.stderr


def test_the_export_result_maps_each_renamed_directory_to_its_run_id(tmp_path: Path) -> None:
    log = write_log(tmp_path / "run.jsonl", make_run("healthy", run_id="../up", measurements=2))
    result = export_tensorboard([str(log)], tmp_path / "tb")
    name = run_directory_name("../up")
    assert result.runs == {name: 2} and result.renamed == {name: "../up"}

"""DDP on CPU (gloo, two processes): every rank measures its own batch and writes its own log.

One spawn runs every scenario in order (a process start costs seconds on 2 cores); the tests then read the
logs. Every wait is bounded: the process group has a timeout and the spawn is joined with a deadline.
"""

from __future__ import annotations

import json
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from click.testing import CliRunner
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import gradwatch
from gradwatch.cli import main as cli_main
from gradwatch.distributed import shared_run_id
from gradwatch.records import Measurement, RunHeader, record_from_json

WORLD_SIZE = 2
STEPS = 4
JOIN_TIMEOUT_S = 120.0
GROUP_TIMEOUT = timedelta(seconds=60)


class SkippableRnn(nn.Module):
    """LSTM -> linear; ``skip_rnn`` makes a batch bypass the RNN (its parameters get no gradient)."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(3, 6, batch_first=True)
        self.bypass = nn.Linear(3, 6)
        self.head = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor, skip_rnn: bool = False) -> torch.Tensor:
        features = self.bypass(x) if skip_rnn else self.rnn(x)[0]
        return self.head(features).squeeze(-1)


def _train(
    rank: int,
    log: Path,
    *,
    every: int,
    skip_steps: tuple[int, ...] = (),
    log_ranks: str = "all",
    global_view: bool = False,
) -> None:
    """A few DDP steps; each rank draws its own batches (its shard of the data)."""
    torch.manual_seed(0)  # identical initial weights on every rank (DDP also broadcasts them)
    model = DistributedDataParallel(SkippableRnn(), find_unused_parameters=True)  # `bypass` is unused
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    monitor = gradwatch.watch(
        model,
        optimizer,
        every=every,
        log=log,
        log_ranks=log_ranks,  # type: ignore[arg-type]
        global_view=global_view,
    )
    data = torch.Generator().manual_seed(100 + rank)
    for step in range(STEPS):
        x = torch.randn(4, 7, 3, generator=data)
        y = torch.randn(4, 7, generator=data)
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x, skip_rnn=step in skip_steps), y)
        loss.backward()
        optimizer.step()
    monitor.close()


def _worker(rank: int, port: int, root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE, timeout=GROUP_TIMEOUT
    )
    try:
        base = Path(root)
        _train(rank, base / "all" / "exp.jsonl", every=1)
        # Rank 0 measures every step, rank 1 every other one; rank 1's step 1 batch skips the RNN.
        _train(
            rank, base / "uneven" / "exp.jsonl", every=1 if rank == 0 else 2, skip_steps=(1,) if rank else ()
        )
        _train(rank, base / "zero" / "exp.jsonl", every=1, log_ranks="zero")
        _train(rank, base / "global" / "exp.jsonl", every=1, global_view=True)
        # Rank 1 measures only every other step: rank 0 combines what arrives within the bound.
        _train(rank, base / "global-uneven" / "exp.jsonl", every=1 if rank == 0 else 2, global_view=True)
        dist.barrier()
        if rank == 1:  # rank 0 never publishes this run id: rank 1 must give up after the bound, keep its own
            started = time.monotonic()
            run_id = shared_run_id("rank1-own-id", timeout_s=1.0)
            (base / "fallback.json").write_text(json.dumps([run_id, time.monotonic() - started]))
        dist.barrier()  # rank 0 (which hosts the store) stays up meanwhile
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def ddp_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    for name in ("all", "uneven", "zero", "global", "global-uneven"):
        (root / name).mkdir()
    # fork, not spawn: the children inherit the imported torch (a fresh import costs seconds per process).
    # The parent runs torch with one thread (conftest), so no thread pool is forked mid-flight.
    import torch._dynamo  # noqa: F401  (DDP imports it on construction: import it once, before forking)

    context = mp.start_processes(
        _worker, args=(_free_port(), str(root)), nprocs=WORLD_SIZE, join=False, start_method="fork"
    )
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    try:
        while not context.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                pytest.fail(f"the DDP workers did not finish within {JOIN_TIMEOUT_S:.0f} s (deadlock?)")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return root


def _read(path: Path) -> list:
    return [record_from_json(json.loads(line)) for line in path.read_text().splitlines()]


def _measured_steps(records: list) -> list[int]:
    return [r.step for r in records if isinstance(r, Measurement)]


def test_each_rank_writes_its_own_log_with_one_shared_run_id(ddp_logs: Path) -> None:
    rank0 = _read(ddp_logs / "all" / "exp.jsonl")
    rank1 = _read(ddp_logs / "all" / "exp.rank1.jsonl")
    header0, header1 = rank0[0], rank1[0]
    assert isinstance(header0, RunHeader) and isinstance(header1, RunHeader)
    assert (header0.rank, header1.rank, header0.world_size, header1.world_size) == (0, 1, 2, 2)
    assert header0.run_id == header1.run_id
    assert [m["name"] for m in header0.modules] == [
        "rnn"
    ]  # found inside DDP's .module, named as in the model
    assert _measured_steps(rank0) == _measured_steps(rank1) == list(range(STEPS))
    assert {r.rank for r in rank1 if isinstance(r, Measurement)} == {1}


def test_ranks_measure_their_own_batches(ddp_logs: Path) -> None:
    """Same weights (DDP keeps them in sync) but different data: the step-0 Jacobian statistics differ."""
    first = [
        next(r for r in _read(ddp_logs / "all" / name) if isinstance(r, Measurement))
        for name in ("exp.jsonl", "exp.rank1.jsonl")
    ]
    assert first[0].metrics.weight_hh_sigma_max == pytest.approx(
        first[1].metrics.weight_hh_sigma_max, rel=1e-6
    )
    assert first[0].metrics.jacobian_sigma_max_mean != first[1].metrics.jacobian_sigma_max_mean
    # DDP averages the gradients: both ranks see the same gradient norms.
    assert first[0].metrics.grad_norm == pytest.approx(first[1].metrics.grad_norm, rel=1e-5)


def test_ranks_with_different_schedules_and_skipped_rnn_do_not_deadlock(ddp_logs: Path) -> None:
    rank0 = _read(ddp_logs / "uneven" / "exp.jsonl")
    rank1 = _read(ddp_logs / "uneven" / "exp.rank1.jsonl")
    assert _measured_steps(rank0) == [0, 1, 2, 3]
    assert _measured_steps(rank1) == [0, 2]


def test_log_ranks_zero_writes_only_rank_zero(ddp_logs: Path) -> None:
    assert sorted(p.name for p in (ddp_logs / "zero").iterdir()) == ["exp.jsonl"]
    assert _measured_steps(_read(ddp_logs / "zero" / "exp.jsonl")) == list(range(STEPS))


def test_report_merges_the_ranks_of_one_run(ddp_logs: Path) -> None:
    cli_runner = CliRunner()
    logs = [str(ddp_logs / "all" / "exp.jsonl"), str(ddp_logs / "all" / "exp.rank1.jsonl")]
    merged = cli_runner.invoke(cli_main, ["report", *logs, "--merge-ranks", "--format", "json"])
    apart = cli_runner.invoke(cli_main, ["report", *logs, "--format", "json"])
    assert merged.exit_code == apart.exit_code == 0, merged.output + apart.output
    merged_runs = json.loads(merged.stdout)["runs"]
    assert len(merged_runs) == 1 and merged_runs[0]["merged_ranks"] is True
    assert len(json.loads(apart.stdout)["runs"]) == 2


def test_log_ranks_is_validated() -> None:
    with pytest.raises(ValueError, match="log_ranks must be 'all'"):
        gradwatch.watch(nn.LSTM(2, 3), log_ranks="some")  # type: ignore[arg-type]


def test_a_rank_waits_for_rank_zeros_run_id_only_within_the_bound(ddp_logs: Path) -> None:
    run_id, waited = json.loads((ddp_logs / "fallback.json").read_text())
    assert run_id == "rank1-own-id"
    assert 0.9 <= waited < 10.0


def test_outside_torch_distributed_the_own_run_id_is_kept() -> None:
    assert shared_run_id("solo") == "solo"


def test_an_explicit_run_id_is_used_and_validated() -> None:
    with gradwatch.watch(nn.LSTM(2, 3), run_id="my-run") as monitor:
        assert monitor.run_id == "my-run"
    with pytest.raises(ValueError, match="run_id must be a non-empty string"):
        gradwatch.watch(nn.LSTM(2, 3), run_id="")


def test_global_view_combines_the_ranks_on_rank_zero(ddp_logs: Path) -> None:
    rank0 = _read(ddp_logs / "global" / "exp.jsonl")
    rank1 = _read(ddp_logs / "global" / "exp.rank1.jsonl")
    by_rank = {
        r: {m.step: m for m in records if isinstance(m, Measurement) and m.rank == r}
        for r, records in ((0, rank0), (1, rank1), (-1, rank0))
    }
    assert sorted(by_rank[-1]) == list(range(STEPS))
    assert not any(isinstance(m, Measurement) and m.rank == -1 for m in rank1)
    for step, combined in by_rank[-1].items():
        a, b = by_rank[0][step].metrics, by_rank[1][step].metrics
        c = combined.metrics
        assert c.jacobian_sigma_max_mean == pytest.approx(
            (a.jacobian_sigma_max_mean + b.jacobian_sigma_max_mean) / 2
        )
        assert c.jacobian_sigma_max_max == max(a.jacobian_sigma_max_max, b.jacobian_sigma_max_max)
        assert c.jacobian_sigma_max_min == min(a.jacobian_sigma_max_min, b.jacobian_sigma_max_min)
        assert c.sequences == a.sequences + b.sequences


def test_global_view_with_uneven_schedules_does_not_hang(ddp_logs: Path) -> None:
    rank0 = _read(ddp_logs / "global-uneven" / "exp.jsonl")
    combined = {m.step: m for m in rank0 if isinstance(m, Measurement) and m.rank == -1}
    assert sorted(combined) == list(range(STEPS))  # rank 0 measured every step and always combined
    assert {combined[s].metrics.sequences for s in combined if s % 2 == 0} == {8}  # both ranks (4 + 4)
    assert {combined[s].metrics.sequences for s in combined if s % 2 == 1} == {4}  # rank 0 alone


def test_merged_report_ignores_the_global_view_records(ddp_logs: Path) -> None:
    logs = [str(ddp_logs / "global" / "exp.jsonl"), str(ddp_logs / "global" / "exp.rank1.jsonl")]
    separate = CliRunner().invoke(cli_main, ["report", *logs, "--format", "json"])
    merged = CliRunner().invoke(cli_main, ["report", *logs, "--format", "json", "--merge-ranks"])
    assert separate.exit_code == 0 and merged.exit_code == 0
    assert sorted(run["ranks"][0] for run in json.loads(separate.stdout)["runs"]) == [-1, 0, 1]
    (run,) = json.loads(merged.stdout)["runs"]
    assert -1 not in run["ranks"]

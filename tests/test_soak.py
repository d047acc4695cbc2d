"""Long and violent runs: 10,000 steps without leaks, and training processes killed with SIGKILL mid-run.

Both use a tiny model (LSTM, H=8, T=8, B=4) and cheap estimator settings: they test the monitor's
lifecycle (hooks, memory, the log), not the accuracy of the estimates, which other tests check.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.records import Measurement, RunHeader
from gradwatch.report.command import make_report
from gradwatch.report.reader import read_logs
from gradwatch.report.summary import ReportOptions

REPO = Path(__file__).resolve().parents[1]
CHEAP = gradwatch.EstimatorSettings(
    method="power", max_iter=2, lags=(1,), lag_max_iter=2, weight_max_iter=2, lyapunov=False
)

SOAK_STEPS = 10_000
EVERY = 10
WARM_UP_STEPS = 1_000
RSS_GROWTH_LIMIT = 16 * 2**20  # bytes between the end of warm-up and the end of the run


class TinyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(4, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0]).squeeze(-1)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hook_count(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    return sum(len(m._forward_hooks) for m in model.modules()) + len(optimizer._optimizer_step_pre_hooks)


@pytest.mark.slow
def test_soak_ten_thousand_steps_stays_flat_and_logs_everything(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    log = tmp_path / "soak.jsonl"
    hooks_before = _hook_count(model, optimizer)
    monitor = gradwatch.watch(
        model, optimizer, every=EVERY, log=log, probe="live", estimator=CHEAP, history_size=64, fsync="never"
    )
    hooks_watched = _hook_count(model, optimizer)
    assert hooks_watched == hooks_before  # nothing on the model or the optimizer: gradwatch hooks are global
    recorder = monitor._recorders["rnn"]  # internal on purpose: the leak check follows the recorded tensors
    batches = [(torch.randn(8, 4, 4), torch.randn(8, 4)) for _ in range(16)]
    rss_after_warm_up = 0
    pending: list[weakref.ref[torch.Tensor]] = []  # tensors of the last checked measured step
    checked = 0
    for step in range(SOAK_STEPS):
        inputs, targets = batches[step % len(batches)]
        x, y = inputs.clone(), targets.clone()  # fresh tensors each step, as a data loader makes them
        optimizer.zero_grad()
        output = model(x)
        loss = nn.functional.mse_loss(output, y)
        loss.backward()
        watch_this = step % 1000 == 0  # a measured step (every 10th) whose tensors must not survive
        if watch_this:
            assert recorder.fused_call is not None
            recorded = [recorder.fused_call.inputs, recorder.fused_call.output, recorder.fused_call.h_n]
            step_refs = [weakref.ref(t) for t in (x, y, output, loss, *recorded)]
            del recorded
        optimizer.step()
        if pending:  # the step after a checked measured step has ended: nothing of that step is alive
            assert [r() is None for r in pending] == [True] * len(pending), f"step {step}"
            pending = []
            checked += 1
        if watch_this:
            pending = step_refs
        del x, y, output, loss
        if step == WARM_UP_STEPS:
            rss_after_warm_up = _rss_bytes()
        if step % 1000 == 999:
            assert _hook_count(model, optimizer) == hooks_watched
    rss_growth = _rss_bytes() - rss_after_warm_up
    monitor.close()
    assert _hook_count(model, optimizer) == hooks_before

    assert checked == SOAK_STEPS // 1000
    assert rss_growth < RSS_GROWTH_LIMIT, f"RSS grew by {rss_growth / 2**20:.1f} MiB after warm-up"
    assert len(monitor.history) == 64
    contents = read_logs([str(log)])
    assert not contents.problems
    steps = [r.step for r in contents.records if isinstance(r, Measurement)]
    assert steps == list(range(0, SOAK_STEPS, EVERY))
    assert sum(isinstance(r, RunHeader) for r in contents.records) == 1


CHILD = textwrap.dedent(
    """
    import sys
    import torch
    from torch import nn
    import gradwatch

    torch.set_num_threads(1)
    sys.stdin.readline()  # wait until the test says go (so imports of all children overlap)
    torch.manual_seed(int(sys.argv[2]))
    rnn, head = nn.LSTM(4, 8), nn.Linear(8, 1)
    optimizer = torch.optim.SGD([*rnn.parameters(), *head.parameters()], lr=1e-3)
    cheap = gradwatch.EstimatorSettings(
        method="power", max_iter=2, lags=(1,), lag_max_iter=2, weight_max_iter=2, lyapunov=False
    )
    gradwatch.watch(rnn, optimizer, every=1, log=sys.argv[1], fsync="never", probe="live", estimator=cheap)
    x, y = torch.randn(8, 4, 4), torch.randn(8, 4)
    step = 0
    while True:
        optimizer.zero_grad()
        nn.functional.mse_loss(head(rnn(x)[0]).squeeze(-1), y).backward()
        optimizer.step()
        step += 1
        if step == 3:
            print("ready", flush=True)
    """
)
KILLS = 5


@pytest.mark.slow
def test_processes_killed_mid_run_leave_a_readable_log(tmp_path: Path) -> None:
    log = tmp_path / "killed.jsonl"
    rng = random.Random(1234)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(log), str(seed)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            text=True,
        )
        for seed in range(KILLS)
    ]
    try:
        for child in children:  # one after the other: each run appends to the log the previous one left
            assert child.stdin is not None and child.stdout is not None
            child.stdin.write("go\n")
            child.stdin.flush()
            assert child.stdout.readline() == "ready\n"
            try:
                child.wait(timeout=rng.uniform(0.05, 0.6))  # dies at a random moment of the run
            except subprocess.TimeoutExpired:
                os.kill(child.pid, signal.SIGKILL)
            assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()

    contents = read_logs([str(log)])
    headers = [r for r in contents.records if isinstance(r, RunHeader)]
    assert len(headers) == KILLS and len({h.run_id for h in headers}) == KILLS
    # A cut line can only be the last line a process wrote; it is reported, and everything else is read.
    assert len(contents.problems) <= KILLS
    assert all("truncated" in p.message or "not valid JSON" in p.message for p in contents.problems)
    for header in headers:
        steps = [r.step for r in contents.records if isinstance(r, Measurement) and r.run_id == header.run_id]
        assert len(steps) >= 3 and steps == list(range(len(steps)))  # nothing lost before the kill
    report = make_report([str(log)], ReportOptions())
    assert len(report.runs) == KILLS

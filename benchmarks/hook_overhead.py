"""Per-forward cost of gradwatch's hooks on a model with ~200 small non-RNN submodules plus an LSTM.

gradwatch attaches through one process-wide forward hook (nothing goes on the module, so pickles and copies
are clean). While any global module hook exists, torch sends *every* module call through its slow path, so
the hook is installed only on measured steps. This prints the forward time of the bare model, of the watched
model on an unmeasured step (no hook installed: the ratio should be ~1), and on a measured step with the
recorder armed by hand but not recording (the cost of the global hook dispatch alone, paid only on measured
steps), with torch's default thread count and with 1 thread. Timings interleave the variants in rounds
(rotating their order) and report the median per forward. "bare" and "watched, unmeasured step" run the very
same code path (no hook anywhere); their difference is the machine's noise.

    PYTHONPATH=$PWD python3 -m benchmarks.hook_overhead [--rounds 15 --calls 40]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import gradwatch
from gradwatch.capture import hooks


class ManySmallModules(nn.Module):
    """100 x (Linear(16, 16) + Tanh) = 200 small submodules, then an LSTM(16, 32)."""

    def __init__(self, blocks: int = 100) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(blocks))
        self.rnn = nn.LSTM(16, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.rnn(x)[0]


def _per_call(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def measure(threads: int, rounds: int, calls: int) -> dict[str, float]:
    """Median seconds per forward for bare / watched-unmeasured / global-hook-installed."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = ManySmallModules()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    x = torch.randn(10, 4, 16)
    monitor = gradwatch.watch(model, optimizer, every=1_000_000, probe="live", background=False)
    recorder = monitor._recorders["rnn"]
    forward = model.__call__

    def step() -> None:  # closes step 0 (measured); the following steps are unmeasured
        optimizer.zero_grad()
        model(x).sum().backward()
        optimizer.step()

    step()
    assert not hooks.global_hook_installed(), "an unmeasured step should have no global hook"
    module = monitor._watched[0].module

    def bare() -> None:  # the monitor detached: the model as if never watched
        hooks.detach(module, recorder)

    def unmeasured() -> None:
        hooks.attach(module, recorder, "benchmark")

    def hook_installed() -> None:  # what a measured step does, without recording: dispatch cost only
        hooks.attach(module, recorder, "benchmark")
        recorder._armed = True
        hooks._refresh_global_hook()

    variants: dict[str, Callable[[], None]] = {
        "bare": bare,
        "watched, unmeasured step": unmeasured,
        "global hook installed": hook_installed,
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    with torch.no_grad():
        for _ in range(3):
            forward(x)
        for round_index in range(rounds):
            for name in names[round_index % 3 :] + names[: round_index % 3]:  # rotate the order
                hooks.detach(module, recorder)
                recorder._armed = False
                variants[name]()
                assert hooks.global_hook_installed() == (name == "global hook installed")
                times[name].append(_per_call(lambda: forward(x), calls))
    hooks.detach(module, recorder)
    recorder._armed = False
    hooks.attach(module, recorder, "benchmark")
    monitor.close()
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=40)
    args = parser.parse_args()
    default_threads = torch.get_num_threads()
    print(f"torch {torch.__version__}; model: 200 small non-RNN submodules + LSTM(16, 32), input (10, 4, 16)")
    for threads in dict.fromkeys((default_threads, 1)):
        result = measure(threads, args.rounds, args.calls)
        bare = result["bare"]
        print(f"threads={threads}")
        for name, seconds in result.items():
            print(f"  {name:<28} {seconds * 1e6:9.1f} us/forward   ratio {seconds / bare:.3f}")


if __name__ == "__main__":
    main()

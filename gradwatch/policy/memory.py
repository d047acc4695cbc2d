"""How much memory a background measurement may hold beside the training steps.

A job handed to the background worker keeps its tensors (the step Jacobians' coefficients and a private copy
of W_hh) alive while the next training steps allocate their activations and gradients, and the worker adds
its own working set on top (Krylov bases, lag sweeps) in an allocator arena of its own. Inline, the same work
reuses the memory the finished backward pass freed. So a job whose tensors are large next to the process's
peak memory (an LSTM/GRU with H >= 1024 on a CPU) raises the peak by several times its size; such a
measurement runs inline instead (the same job, the same numbers), said once.

Calibration (``python3 -m benchmarks.memory_large_h`` and ``benchmarks.overhead``, docs/performance.md):
the worker's working set was 0.6-1.1x the job's own tensors (LSTM/GRU, H = 1024 and 2048) and up to 1.9x at
H = 512, and the monitor's steady state (kept probe, warm starts, the replay) adds 2-7% of the peak in every
mode; a job is sent to the worker only while ``WORKING_SET_FACTOR`` x its bytes stay within
``BACKGROUND_MEMORY_SHARE`` of the peak, so the whole excess stays within the 10% goal.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

BACKGROUND_MEMORY_SHARE = 0.06
"""A background job with its working set may hold at most this share of the process's peak memory so far."""
WORKING_SET_FACTOR = 3.0
"""The job's tensors plus the worker's working set, in units of the job's tensors: measured 1.6-2.1 at
H = 1024/2048, and up to 2.9 for an LSTM at H = 512 with 2 threads (its 11 MiB job raised the peak by
+11-14% on the worker against +7% inline; docs/performance.md "Issue #32, third round")."""


def peak_memory_bytes(device: torch.device) -> int | None:
    """The peak memory so far where the job's tensors live: the process's peak RSS on the CPU (Linux and
    macOS), the caching allocator's peak on CUDA; None where it cannot be read (Windows, other devices)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if device.type != "cpu":
        return None
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


@dataclass(frozen=True)
class BudgetDecision:
    """Whether a job may run on the worker, and the figures that decided it (for the one notice)."""

    fits: bool
    job_bytes: int
    peak_bytes: int | None

    @property
    def limit_bytes(self) -> float | None:
        return None if self.peak_bytes is None else BACKGROUND_MEMORY_SHARE * self.peak_bytes

    def message(self, step: int) -> str:
        return (
            f"gradwatch: the background measurement of step {step} would hold {self.job_bytes / 2**20:.0f} "
            f"MiB of its own (with the worker's working set about {WORKING_SET_FACTOR:.0f}x that) beside the "
            f"training steps, more than {BACKGROUND_MEMORY_SHARE:.0%} of this process's peak memory so far "
            f"({(self.peak_bytes or 0) / 2**20:.0f} MiB); such measurements run inline, inside "
            "optimizer.step(), where they reuse the memory the backward pass freed (the same numbers, the "
            "time on the training thread). Pass background=False to choose this yourself"
        )


def background_budget(job_bytes: int, peak_bytes: int | None) -> BudgetDecision:
    """A job fits when its tensors times the working-set factor stay within the budget share of the peak;
    with no peak to compare with (unknown), it runs on the worker as asked."""
    fits = peak_bytes is None or WORKING_SET_FACTOR * job_bytes <= BACKGROUND_MEMORY_SHARE * peak_bytes
    return BudgetDecision(fits, job_bytes, peak_bytes)

"""The adding problem (Hochreiter & Schmidhuber 1997): a long-range regression task generated in process.

Each sequence has two channels: channel 0 holds values drawn from U(0, 1), channel 1 marks exactly two
time steps with 1. The target is the sum of the two marked values. The marks fall anywhere in the
sequence, so the network must carry a value across up to T - 1 steps: exactly the gradient path through
the product of step Jacobians that vanishes or explodes. Predicting the mean (1.0) gives MSE 1/6.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

INPUT_SIZE = 2
BASELINE_MSE = 1.0 / 6.0
"""MSE of always predicting 1.0: the variance of a sum of two U(0, 1) values (2 x 1/12)."""


@dataclass(frozen=True)
class AddingBatch:
    """Inputs ``(seq_len, batch, 2)`` (time first, as nn.RNN expects) and targets ``(batch, 1)``."""

    inputs: Tensor
    targets: Tensor


def adding_problem_batch(generator: torch.Generator, seq_len: int, batch_size: int) -> AddingBatch:
    """One batch of the adding problem with two distinct marked steps per sequence."""
    if seq_len < 2:
        raise ValueError(f"the adding problem needs seq_len >= 2 (two marked steps), got {seq_len}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    values = torch.rand(seq_len, batch_size, generator=generator)
    # The first two entries of a random permutation of the time steps: two distinct marked positions.
    marked = torch.rand(seq_len, batch_size, generator=generator).argsort(dim=0)[:2]
    markers = torch.zeros(seq_len, batch_size).scatter_(0, marked, 1.0)
    targets = (values * markers).sum(dim=0).unsqueeze(-1)
    return AddingBatch(torch.stack([values, markers], dim=-1), targets)

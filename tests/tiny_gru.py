"""A GRU regressor small enough for lifecycle tests, and a loop that trains it on random batches."""

from __future__ import annotations

import torch
from torch import nn


class SeqModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(3, 5)
        self.head = nn.Linear(5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0]).squeeze(-1)


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    """``steps`` optimizer steps on random (6, 2, 3) batches."""
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(6, 2, 3)).pow(2).mean().backward()
        optimizer.step()

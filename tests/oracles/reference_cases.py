"""Seeded tiny RNNs for the detector tests and the calibration script (the brief's reference cases)."""

from __future__ import annotations

import torch
from torch import nn


def scaled_orthogonal_rnn(nonlinearity: str, gain: float, hidden: int = 32, inputs: int = 4) -> nn.RNN:
    """nn.RNN whose W_hh is gain x a random orthogonal matrix."""
    module = nn.RNN(inputs, hidden, nonlinearity=nonlinearity)
    with torch.no_grad():
        nn.init.orthogonal_(module.weight_hh_l0)
        module.weight_hh_l0.mul_(gain)
    return module


def lstm_forget_bias_one(hidden: int = 32, inputs: int = 4) -> nn.LSTM:
    """Untrained nn.LSTM whose forget-gate biases sum to 1 (bias_ih forget slice 1, bias_hh's 0)."""
    module = nn.LSTM(inputs, hidden)
    with torch.no_grad():
        module.bias_ih_l0[hidden : 2 * hidden] = 1.0
        module.bias_hh_l0[hidden : 2 * hidden] = 0.0
    return module


def regression_batch(generator: torch.Generator, steps: int, batch: int, inputs: int, scale: float) -> tuple:
    """Small-input regression task: the target is the mean over time of the first input channel."""
    x = torch.randn(steps, batch, inputs, generator=generator) * scale
    return x, x[..., :1].mean(0) / scale


def adding_problem_batch(generator: torch.Generator, steps: int, batch: int) -> tuple:
    """The adding problem: channel 0 holds U(0,1) values, channel 1 marks two of them; target their sum."""
    values = torch.rand(steps, batch, generator=generator)
    marker = torch.zeros(steps, batch)
    for b in range(batch):
        first, second = torch.randperm(steps, generator=generator)[:2]
        marker[first, b] = 1.0
        marker[second, b] = 1.0
    return torch.stack([values, marker], dim=-1), (values * marker).sum(0).unsqueeze(-1)


class RecurrentRegressor(nn.Module):
    """An nn.RNN followed by a linear readout of the last hidden state."""

    def __init__(self, rnn: nn.RNN) -> None:
        super().__init__()
        self.rnn = rnn
        self.readout = nn.Linear(rnn.hidden_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.rnn(x)
        return self.readout(hidden[-1])

"""Seeded recurrent models for the lecture's reference cases (shared by diagnosis and monitor tests)."""

from __future__ import annotations

import torch
from torch import nn


def scaled_orthogonal_rnn(gain: float, nonlinearity: str = "tanh", hidden: int = 32, inputs: int = 4) -> nn.RNN:
    """nn.RNN with W_hh = gain x a random orthogonal matrix: sigma_max(W_hh) = gain exactly."""
    rnn = nn.RNN(inputs, hidden, nonlinearity=nonlinearity)
    with torch.no_grad():
        nn.init.orthogonal_(rnn.weight_hh_l0)
        rnn.weight_hh_l0.mul_(gain)
    return rnn


def lstm_forget_bias_one(hidden: int = 32, inputs: int = 4) -> nn.LSTM:
    """The recommended healthy default: an untrained LSTM whose forget-gate bias sums to 1."""
    lstm = nn.LSTM(inputs, hidden)
    with torch.no_grad():
        lstm.bias_ih_l0[hidden : 2 * hidden] = 1.0
        lstm.bias_hh_l0[hidden : 2 * hidden] = 0.0
    return lstm


class Regressor(nn.Module):
    """RNN -> linear read-out of the last step."""

    def __init__(self, rnn: nn.Module, hidden: int) -> None:
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[-1]).squeeze(-1)

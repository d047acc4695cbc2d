"""The built-in recurrent cells written out in plain PyTorch, on a flat state vector.

Conventions (used by replay and by the analytic Jacobians):

* ``s`` is the *state* whose step Jacobian J_t = ds_t/ds_{t-1} we study. For RNN and GRU, s = h.
  For LSTM, s = [h; c] concatenated on the last axis (size P + H, where P = proj_size or H): the cell
  state carries the long-range gradient path, so leaving it out would hide exactly what the LSTM fixes.
* Gate order and formulas follow ``torch.nn.LSTM`` / ``torch.nn.GRU`` documentation:
  LSTM rows of W are [i, f, g, o]; GRU rows are [r, z, n] with n = tanh(W_in x + b_in + r * (W_hn h + b_hn)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

CellKind = Literal["rnn_tanh", "rnn_relu", "lstm", "gru"]
CELL_KINDS: tuple[CellKind, ...] = ("rnn_tanh", "rnn_relu", "lstm", "gru")


@dataclass(frozen=True)
class CellWeights:
    """One layer and direction of a built-in RNN, as plain tensors (already in the compute dtype)."""

    kind: CellKind
    weight_ih: Tensor  # (gates * H, I)
    weight_hh: Tensor  # (gates * H, P) with P = proj_size or H
    bias_ih: Tensor | None  # (gates * H,)
    bias_hh: Tensor | None  # (gates * H,)
    weight_hr: Tensor | None = None  # LSTM projection (P, H)

    @property
    def hidden_size(self) -> int:
        """H: the number of units per gate."""
        return self.weight_hh.shape[0] // gate_count(self.kind)

    @property
    def output_size(self) -> int:
        """P: the size of h (proj_size for a projected LSTM, else H)."""
        return self.weight_hh.shape[1]

    @property
    def state_size(self) -> int:
        """D: the size of the flat state s (P + H for LSTM, H otherwise)."""
        return self.output_size + (self.hidden_size if self.kind == "lstm" else 0)

    def to(self, dtype: torch.dtype) -> CellWeights:
        def cast(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(dtype)

        return CellWeights(
            self.kind,
            self.weight_ih.to(dtype),
            self.weight_hh.to(dtype),
            cast(self.bias_ih),
            cast(self.bias_hh),
            cast(self.weight_hr),
        )


def gate_count(kind: CellKind) -> int:
    return {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}[kind]


def split_state(weights: CellWeights, s: Tensor) -> tuple[Tensor, Tensor | None]:
    """Split a flat state into (h, c); c is None except for LSTM."""
    if weights.kind != "lstm":
        return s, None
    p = weights.output_size
    return s[..., :p], s[..., p:]


def join_state(h: Tensor, c: Tensor | None) -> Tensor:
    return h if c is None else torch.cat([h, c], dim=-1)


def input_preactivation(weights: CellWeights, x: Tensor) -> Tensor:
    """W_ih x + b_ih for any leading shape: computed once for a whole sequence."""
    out = x @ weights.weight_ih.T
    return out if weights.bias_ih is None else out + weights.bias_ih


def hidden_preactivation(weights: CellWeights, h: Tensor) -> Tensor:
    """W_hh h + b_hh."""
    out = h @ weights.weight_hh.T
    return out if weights.bias_hh is None else out + weights.bias_hh


def cell_step_from_preactivation(weights: CellWeights, xi: Tensor, s: Tensor) -> Tensor:
    """One step s_{t-1} -> s_t, given xi = W_ih x_t + b_ih (so replay can batch the input matmul)."""
    h, c = split_state(weights, s)
    hh = hidden_preactivation(weights, h)
    kind = weights.kind
    if kind == "rnn_tanh":
        return torch.tanh(xi + hh)
    if kind == "rnn_relu":
        return torch.relu(xi + hh)
    if kind == "lstm":
        assert c is not None
        i, f, g, o = (xi + hh).chunk(4, dim=-1)
        c_next = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_next = torch.sigmoid(o) * torch.tanh(c_next)
        if weights.weight_hr is not None:
            h_next = h_next @ weights.weight_hr.T
        return torch.cat([h_next, c_next], dim=-1)
    # GRU
    xr, xz, xn = xi.chunk(3, dim=-1)
    hr, hz, hn = hh.chunk(3, dim=-1)
    r = torch.sigmoid(xr + hr)
    z = torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    return (1 - z) * n + z * h


def cell_step(weights: CellWeights, x: Tensor, s: Tensor) -> Tensor:
    """One step of the cell: s_t = step(x_t, s_{t-1}) on flat states (leading dims broadcast)."""
    return cell_step_from_preactivation(weights, input_preactivation(weights, x), s)

"""The demo's scenarios: the cell, initialisation and sequence length that make gradients vanish or explode.

The lecture's step Jacobian is J_t = diag(f'(a_t)) W_hh: a product of such factors vanishes when both
factors keep ||J_t|| below 1 and explodes when W_hh is large enough to keep it above 1 (especially with
ReLU, whose f' is 1 on active units). Each scenario picks the initialisation that puts the network in
that regime; the numbers were calibrated against the real detector (docs/demo.md, tests/test_demo.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from gradwatch.demo.choices import CELLS, SCENARIOS, CellName, ScenarioName
from gradwatch.demo.task import INPUT_SIZE

GATE_COUNT: dict[CellName, int] = {"rnn": 1, "lstm": 4, "gru": 3}
"""How many hidden-size blocks the fused weight_hh_l0 stacks (LSTM: i, f, g, o; GRU: r, z, n)."""


@dataclass(frozen=True)
class Scenario:
    """How one (scenario, cell) pair is set up, and what the monitor is expected to say about it."""

    name: ScenarioName
    cell: CellName
    requested_cell: CellName
    recurrent_gain: float
    """Every hidden-size block of W_hh is ``recurrent_gain`` x a random orthogonal matrix."""
    seq_len: int
    expected_verdict: str
    why: str
    """The lecture's explanation of the expected verdict, in one or two sentences."""
    nonlinearity: Literal["tanh", "relu"] = "tanh"
    gate_bias: float | None = None
    """LSTM: forget-gate bias; GRU: update-gate (z) bias. None keeps PyTorch's default initialisation."""
    reset_gate_bias: float | None = None
    """GRU only: reset-gate (r) bias; None keeps the default."""
    learning_rate: float = 0.01
    """The optimizer's learning rate."""
    optimizer: Literal["adam", "sgd"] = "adam"
    """Adam lets the healthy models learn the task within the demo; the exploding scenarios use plain SGD
    with a small rate (Adam's normalised steps train the explosion away)."""
    clip: float | None = 1.0
    """Gradient clipping max norm the demo trains with (None: no clipping)."""
    identity: bool = False
    """W_hh starts as ``recurrent_gain`` x the identity instead of a random orthogonal matrix (IRNN)."""

    @property
    def adjusted(self) -> bool:
        """True when this scenario trains another cell than the one asked for."""
        return self.cell != self.requested_cell

    def describe(self) -> str:
        """One line naming the model and its initialisation."""
        model = f"nn.RNN({self.nonlinearity})" if self.cell == "rnn" else f"nn.{self.cell.upper()}"
        parts = [f"{model}, W_hh = {self.recurrent_gain:g} x {'identity' if self.identity else 'orthogonal'}"]
        if self.gate_bias is not None:
            gate = "forget" if self.cell == "lstm" else "update (z)"
            parts.append(f"{gate}-gate bias {self.gate_bias:g}")
        if self.reset_gate_bias is not None:
            parts.append(f"reset-gate bias {self.reset_gate_bias:g}")
        parts.append(f"sequence length {self.seq_len}")
        parts.append(f"{'Adam' if self.optimizer == 'adam' else 'SGD'} lr {self.learning_rate:g}")
        if self.clip is not None:
            parts.append(f"gradients clipped at norm {self.clip:g}")
        return ", ".join(parts)


# (scenario, cell) -> settings. Calibrated with the real detector at hidden size 32, batch 32: healthy and
# vanishing with Adam lr 0.01 (the healthy models learn the task in the demo's 400 steps), exploding with SGD.
_TABLE: dict[tuple[ScenarioName, CellName], dict[str, object]] = {}


def _register(name: ScenarioName, cell: CellName, why: str, **settings: object) -> None:
    _TABLE[(name, cell)] = {"why": why, **settings}


_HEALTHY_RNN = (
    "ReLU with W_hh = identity (IRNN, Le et al. 2015) makes J_t = diag(f') on the active units: the product "
    "of Jacobians keeps its norm near 1 and the gradient reaches back over the whole sequence."
)
_register(
    "healthy",
    "rnn",
    _HEALTHY_RNN,
    nonlinearity="relu",
    recurrent_gain=1.0,
    identity=True,
    seq_len=30,
    learning_rate=0.003,
)
_register(
    "healthy",
    "lstm",
    "forget-gate bias 1 keeps the cell state (f ~ 0.73) so the gradient path through c_t decays slowly "
    "and soon reaches back over the whole sequence.",
    recurrent_gain=1.0,
    gate_bias=1.0,
    seq_len=30,
    learning_rate=0.02,  # at 1e-2 it reaches back 30 steps but has not learned by step 400 (seed 0)
)
_register(
    "healthy",
    "gru",
    "the update gate interpolates between h_{t-1} and the candidate, so J_t contains a diagonal share "
    "diag(z_t) that keeps the product of Jacobians from collapsing.",
    recurrent_gain=1.0,
    seq_len=30,
)
_register(
    "vanishing",
    "rnn",
    "W_hh = 0.2 x orthogonal bounds ||J_t|| <= 0.2 x max f' <= 0.2 (tanh' <= 1): the product over 50 steps "
    "is below 0.2^29, so the error signal from the marked early steps never arrives.",
    recurrent_gain=0.2,
    seq_len=30,
    learning_rate=0.003,
)
_register(
    "vanishing",
    "lstm",
    "forget-gate bias -5 (f ~ 0.007) erases the cell state at every step and W_hh = 0.2 x orthogonal damps "
    "the hidden path: the gated path that normally carries gradients is cut.",
    recurrent_gain=0.2,
    gate_bias=-5.0,
    seq_len=30,
)
_register(
    "vanishing",
    "gru",
    "update-gate bias -8 (z ~ 3e-4) makes h_t almost all candidate, i.e. a tanh RNN with W_hh = 0.2 x "
    "orthogonal: ||J_t|| stays far below 1 and the product vanishes (Adam lr 1e-3: at 1e-2 it learns the "
    "gate bias away within 300 steps, and the monitor says 'recovered').",
    recurrent_gain=0.2,
    gate_bias=-8.0,
    seq_len=50,
    learning_rate=0.001,
)
_register(
    "exploding",
    "rnn",
    "ReLU has f' = 1 on every active unit, so J_t = W_hh on them: with W_hh = 2 x orthogonal the product "
    "of Jacobians grows like 2^k with the lag. Clipping keeps the run finite, not the products bounded.",
    nonlinearity="relu",
    recurrent_gain=2.0,
    seq_len=30,
    learning_rate=0.005,
    optimizer="sgd",
    clip=1.0,
)
_register(
    "exploding",
    "lstm",
    "forget-gate bias 5 (f ~ 0.99) keeps the cell state and W_hh = 4 x orthogonal feeds it back amplified: "
    "the product of Jacobians grows with the lag. Clipping keeps the run finite, not the products bounded.",
    recurrent_gain=4.0,
    gate_bias=5.0,
    seq_len=50,
    learning_rate=0.005,
    optimizer="sgd",
    clip=1.0,
)

ADJUSTED: dict[tuple[ScenarioName, CellName], tuple[CellName, str]] = {
    ("exploding", "gru"): (
        "rnn",
        "a GRU's state is a convex mix of h_{t-1} and a tanh candidate, so it stays in [-1, 1]; a large "
        "W_hh makes its dynamics chaotic rather than steadily growing, and then not even the monitor's "
        "replay can follow it (measured: replay errors of 2e-3 at W_hh = 3 x orthogonal). The exploding "
        "scenario trains the ReLU nn.RNN instead",
    ),
}
"""Combinations that make no sense as asked, with the cell used instead and why."""


def scenario_for(name: str, cell: str, seq_len: int | None = None) -> Scenario:
    """The settings of scenario ``name`` for ``cell`` (``seq_len`` overrides the calibrated length)."""
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}")
    if cell not in CELLS:
        raise ValueError(f"unknown cell {cell!r}; choose from {', '.join(CELLS)}")
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2):
        raise ValueError(
            f"seq_len must be an integer >= 2 (the adding problem marks two steps), got {seq_len!r}"
        )
    requested: CellName = cell
    scenario: ScenarioName = name
    used, note = ADJUSTED.get((scenario, requested), (requested, ""))
    settings = dict(_TABLE[(scenario, used)])
    why = str(settings.pop("why"))
    if note:
        why = f"{note}. {why}"
    if seq_len is not None:
        settings["seq_len"] = seq_len
    return Scenario(
        name=scenario,
        cell=used,
        requested_cell=requested,
        expected_verdict=scenario,
        why=why,
        # the scenario table's rows hold exactly DemoSetup's remaining fields:
        **settings,  # type: ignore[arg-type]
    )


class AddingRegressor(nn.Module):
    """A one-layer recurrent module followed by a linear readout of its last hidden state."""

    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        self.rnn = rnn
        self.readout = nn.Linear(rnn.hidden_size, 1)

    def forward(self, inputs: Tensor) -> Tensor:
        outputs, _ = self.rnn(inputs)
        return self.readout(outputs[-1])


def build_model(scenario: Scenario, hidden_size: int = 32) -> AddingRegressor:
    """The scenario's network, initialised from torch's global RNG (seed it first for a repeatable run)."""
    if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
        raise ValueError(f"hidden_size must be a positive integer, got {hidden_size!r}")
    rnn: nn.RNNBase
    if scenario.cell == "rnn":
        rnn = nn.RNN(INPUT_SIZE, hidden_size, nonlinearity=scenario.nonlinearity)
    elif scenario.cell == "lstm":
        rnn = nn.LSTM(INPUT_SIZE, hidden_size)
    else:
        rnn = nn.GRU(INPUT_SIZE, hidden_size)
    with torch.no_grad():
        weight_hh = rnn.get_parameter("weight_hh_l0")
        for block in weight_hh.split(hidden_size, dim=0):  # one orthogonal matrix per gate, as torch's
            if scenario.identity:  # orthogonal_ would give one per layer
                nn.init.eye_(block)
            else:
                nn.init.orthogonal_(block)
        weight_hh.mul_(scenario.recurrent_gain)
        if scenario.cell == "rnn" and scenario.nonlinearity == "relu":
            # Zero biases: a positive drift would add to the explosion, a negative one would kill units.
            rnn.get_parameter("bias_ih_l0").zero_()
            rnn.get_parameter("bias_hh_l0").zero_()
        _set_gate_bias(rnn, scenario, hidden_size)
    return AddingRegressor(rnn)


def _set_gate_bias(rnn: nn.RNNBase, scenario: Scenario, hidden_size: int) -> None:
    """Put a gate's total bias (bias_ih + bias_hh) at the scenario's value: all in bias_ih, 0 in bias_hh."""
    gate_blocks = {"lstm": {"gate_bias": 1}, "gru": {"reset_gate_bias": 0, "gate_bias": 1}}
    for field_name, block in gate_blocks.get(scenario.cell, {}).items():
        value = getattr(scenario, field_name)
        if value is None:
            continue
        rows = slice(block * hidden_size, (block + 1) * hidden_size)
        rnn.get_parameter("bias_ih_l0")[rows] = value
        rnn.get_parameter("bias_hh_l0")[rows] = 0.0

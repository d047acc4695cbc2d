"""Matrix-free step Jacobians against dense torch.func.jacrev Jacobians of cell_step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from gradwatch.estimators.cells import CellWeights, cell_step
from gradwatch.estimators.jacobian import (
    AnalyticStepJacobians,
    FunctionStepJacobians,
    StepJacobians,
    builtin_step_jacobians,
    function_step_jacobians,
    select_operators,
)
from tests._estimator_cases import CellCase, dense_step_jacobians, random_cell_weights, random_sequences

CASES = [
    CellCase("rnn_tanh", 6),
    CellCase("rnn_tanh", 6, bias=False),
    CellCase("rnn_relu", 6),
    CellCase("lstm", 5),
    CellCase("lstm", 5, bias=False),
    CellCase("lstm", 6, proj_size=3),
    CellCase("gru", 6),
    CellCase("gru", 6, bias=False),
]
IMPLEMENTATIONS = ["analytic", "function"]


def make_jacobians(implementation: str, weights: CellWeights, x: Tensor, s_prev: Tensor) -> StepJacobians:
    if implementation == "analytic":
        return builtin_step_jacobians(weights, x, s_prev)
    return function_step_jacobians(lambda xi, s: cell_step(weights, xi, s), x, s_prev)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CASES, ids=[c.case_id for c in CASES])
def test_products_match_jacrev_in_both_time_modes(case: CellCase, implementation: str) -> None:
    generator = torch.Generator().manual_seed(0)
    weights = random_cell_weights(case, generator)
    x, s_prev = random_sequences(case, weights, steps=4, batch=3, generator=generator)
    dense = dense_step_jacobians(weights, x, s_prev)  # (T, B, D, D)
    jac = make_jacobians(implementation, weights, x, s_prev)
    assert isinstance(jac, StepJacobians)
    assert (jac.time_steps, jac.batch_size, jac.state_size) == tuple(s_prev.shape)
    v = torch.randn(2, *s_prev.shape, generator=generator, dtype=s_prev.dtype)  # two extra leading vectors
    torch.testing.assert_close(jac.jvp(v), torch.einsum("tbij,ntbj->ntbi", dense, v))
    torch.testing.assert_close(jac.vjp(v), torch.einsum("tbij,ntbi->ntbj", dense, v))
    for t in range(x.shape[0]):
        torch.testing.assert_close(jac.jvp(v[:, t], t), torch.einsum("bij,nbj->nbi", dense[t], v[:, t]))
        torch.testing.assert_close(jac.vjp(v[0, t], t), torch.einsum("bij,bi->bj", dense[t], v[0, t]))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CASES, ids=[c.case_id for c in CASES])
def test_selected_operators_are_the_dense_jacobians_at_those_flat_positions(
    case: CellCase, implementation: str
) -> None:
    generator = torch.Generator().manual_seed(3)
    weights = random_cell_weights(case, generator)
    x, s_prev = random_sequences(case, weights, steps=4, batch=3, generator=generator)
    dense = dense_step_jacobians(weights, x, s_prev).flatten(0, 1)  # (T * B, D, D), flat index t * B + b
    jac = make_jacobians(implementation, weights, x, s_prev)
    index = torch.tensor([11, 0, 5, 6])  # unordered, across time steps and sequences
    subset = select_operators(jac, index)
    assert subset is not None
    assert (subset.time_steps, subset.batch_size, subset.state_size) == (1, 4, s_prev.shape[-1])
    v = torch.randn(4, s_prev.shape[-1], generator=generator, dtype=s_prev.dtype)
    torch.testing.assert_close(subset.jvp(v, 0), torch.einsum("nij,nj->ni", dense[index], v))
    torch.testing.assert_close(subset.vjp(v, 0), torch.einsum("nij,ni->nj", dense[index], v))
    # The original operators are untouched.
    full = torch.randn(*s_prev.shape, generator=generator, dtype=s_prev.dtype)
    torch.testing.assert_close(
        jac.jvp(full).flatten(0, 1), torch.einsum("nij,nj->ni", dense, full.flatten(0, 1))
    )


def test_operators_without_select_are_not_selected() -> None:
    class Plain:
        pass

    assert select_operators(Plain(), torch.tensor([0])) is None  # type: ignore[arg-type]


def test_lstm_gate_values_are_the_cell_to_cell_diagonal_and_derivatives_are_tanh_prime() -> None:
    case = CellCase("lstm", 5, proj_size=3)
    generator = torch.Generator().manual_seed(1)
    weights = random_cell_weights(case, generator)
    x, s_prev = random_sequences(case, weights, steps=3, batch=2, generator=generator)
    jac = builtin_step_jacobians(weights, x, s_prev)
    dense = dense_step_jacobians(weights, x, s_prev)
    projection = weights.output_size
    # dc_{t+1}/dc_t = diag(f): the forget gate is exactly the diagonal of the cell-to-cell block.
    cell_block = dense[..., projection:, projection:]
    torch.testing.assert_close(jac.gate_values(), torch.diagonal(cell_block, dim1=-2, dim2=-1))
    assert (
        torch.count_nonzero(cell_block - torch.diag_embed(torch.diagonal(cell_block, dim1=-2, dim2=-1))) == 0
    )
    gates = F.linear(x, weights.weight_ih, weights.bias_ih) + F.linear(
        s_prev[..., :projection], weights.weight_hh, weights.bias_hh
    )
    candidate = gates.chunk(4, dim=-1)[2].detach().requires_grad_(True)
    (expected,) = torch.autograd.grad(torch.tanh(candidate).sum(), candidate)
    torch.testing.assert_close(jac.activation_derivatives(), expected)


def test_gru_gate_values_are_the_update_gate_and_derivatives_are_tanh_prime_of_n() -> None:
    case = CellCase("gru", 4)
    generator = torch.Generator().manual_seed(2)
    weights = random_cell_weights(case, generator)
    x, s_prev = random_sequences(case, weights, steps=3, batch=2, generator=generator)
    module = torch.nn.GRUCell(case.input_size, case.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        module.weight_ih.copy_(weights.weight_ih)
        module.weight_hh.copy_(weights.weight_hh)
        module.bias_ih.copy_(weights.bias_ih)
        module.bias_hh.copy_(weights.bias_hh)
    jac = builtin_step_jacobians(weights, x, s_prev)
    input_part = F.linear(x, weights.weight_ih, weights.bias_ih).chunk(3, dim=-1)
    hidden_part = F.linear(s_prev, weights.weight_hh, weights.bias_hh).chunk(3, dim=-1)
    update = torch.sigmoid(input_part[1] + hidden_part[1])
    reset = torch.sigmoid(input_part[0] + hidden_part[0])
    candidate = torch.tanh(input_part[2] + reset * hidden_part[2])
    torch.testing.assert_close(jac.gate_values(), update)
    torch.testing.assert_close(jac.activation_derivatives(), 1 - candidate**2)
    # The gates reproduce torch's own GRUCell output: h' = (1 - z) n + z h.
    with torch.no_grad():
        torch.testing.assert_close(
            module(x[1], s_prev[1]), (1 - update[1]) * candidate[1] + update[1] * s_prev[1]
        )


@pytest.mark.parametrize("kind", ["rnn_tanh", "rnn_relu"])
def test_rnn_activation_derivatives_and_no_gates(kind: str) -> None:
    case = CellCase(kind, 6)  # type: ignore[arg-type]
    generator = torch.Generator().manual_seed(3)
    weights = random_cell_weights(case, generator)
    x, s_prev = random_sequences(case, weights, steps=3, batch=2, generator=generator)
    jac = builtin_step_jacobians(weights, x, s_prev)
    preactivation = F.linear(x, weights.weight_ih, weights.bias_ih) + F.linear(
        s_prev, weights.weight_hh, weights.bias_hh
    )
    preactivation = preactivation.detach().requires_grad_(True)
    activation = torch.tanh if kind == "rnn_tanh" else torch.relu
    (expected,) = torch.autograd.grad(activation(preactivation).sum(), preactivation)
    torch.testing.assert_close(jac.activation_derivatives(), expected)
    assert jac.gate_values() is None


def flat_lstm_cell_step(cell: torch.nn.LSTMCell):
    hidden = cell.hidden_size

    def step(x: Tensor, s: Tensor) -> Tensor:
        h, c = cell(x, (s[:, :hidden], s[:, hidden:]))
        return torch.cat([h, c], dim=-1)

    return step


@pytest.mark.parametrize("module_kind", ["lstm_cell", "gru_cell"])
def test_function_path_on_torch_cells_is_right_on_every_call(module_kind: str) -> None:
    """Regression guard: torch.func.linearize gives wrong results from the second call on these cells."""
    torch.manual_seed(4)
    if module_kind == "lstm_cell":
        cell: torch.nn.Module = torch.nn.LSTMCell(3, 4)
        step = flat_lstm_cell_step(cell)  # type: ignore[arg-type]
        state_size = 8
    else:
        cell = torch.nn.GRUCell(3, 4)
        step = cell
        state_size = 4
    x = torch.randn(3, 2, 3)
    s_prev = torch.randn(3, 2, state_size)
    jac = function_step_jacobians(step, x, s_prev)
    dense = torch.stack(
        [
            torch.stack(
                [
                    torch.func.jacrev(lambda s, t=t, b=b: step(x[t, b : b + 1], s[None])[0])(s_prev[t, b])
                    for b in range(2)
                ]
            )
            for t in range(3)
        ]
    )
    for _ in range(3):
        v = torch.randn(3, 2, state_size)
        out = jac.jvp(v)
        assert not out.requires_grad  # the user's parameters require grad; no graph must be built
        torch.testing.assert_close(out, torch.einsum("tbij,tbj->tbi", dense, v))
        torch.testing.assert_close(jac.vjp(v), torch.einsum("tbij,tbi->tbj", dense, v))
    assert jac.activation_derivatives() is None
    assert jac.gate_values() is None


def test_analytic_products_build_no_autograd_graph() -> None:
    case = CellCase("lstm", 4)
    generator = torch.Generator().manual_seed(5)
    weights = random_cell_weights(case, generator)
    trainable = CellWeights(
        case.kind,
        weights.weight_ih.requires_grad_(True),
        weights.weight_hh.requires_grad_(True),
        weights.bias_ih,
        weights.bias_hh,
    )
    x, s_prev = random_sequences(case, weights, steps=2, batch=2, generator=generator)
    jac = builtin_step_jacobians(trainable, x, s_prev)
    assert isinstance(jac, AnalyticStepJacobians)
    v = torch.randn(2, 2, 8, dtype=torch.float64)
    assert not jac.jvp(v).requires_grad
    assert not jac.vjp(v).requires_grad


def test_analytic_jacobians_follow_the_state_dtype() -> None:
    case = CellCase("gru", 4)
    weights = random_cell_weights(case, torch.Generator().manual_seed(6))  # float64 weights
    x, s_prev = random_sequences(case, weights, steps=2, batch=2, generator=torch.Generator().manual_seed(7))
    jac = builtin_step_jacobians(weights, x.float(), s_prev.float())
    assert jac.dtype == torch.float32
    assert jac.jvp(torch.ones(2, 2, 4)).dtype == torch.float32


@pytest.mark.parametrize(
    ("x_shape", "s_shape", "message"),
    [
        ((3, 2), (3, 2, 4), "time-major"),
        ((3, 2, 5), (3, 4), "s_prev"),
        ((3, 2, 5), (4, 2, 4), "agree"),
        ((3, 2, 5), (3, 2, 7), "state size"),
        ((3, 2, 6), (3, 2, 4), "input size"),
        ((0, 2, 5), (0, 2, 4), "at least one"),
    ],
    ids=["x-rank", "s-rank", "mismatch", "state-size", "input-size", "empty"],
)
def test_bad_shapes_raise_clear_errors(x_shape: tuple, s_shape: tuple, message: str) -> None:
    weights = random_cell_weights(CellCase("gru", 4), torch.Generator().manual_seed(8), dtype=torch.float32)
    with pytest.raises(ValueError, match=message):
        builtin_step_jacobians(weights, torch.zeros(x_shape), torch.zeros(s_shape))


def test_bad_vectors_and_time_indices_raise_clear_errors() -> None:
    weights = random_cell_weights(
        CellCase("rnn_tanh", 4), torch.Generator().manual_seed(9), dtype=torch.float32
    )
    jac = builtin_step_jacobians(weights, torch.zeros(3, 2, 5), torch.zeros(3, 2, 4))
    with pytest.raises(ValueError, match=r"\(\.\.\., T, B, D\)"):
        jac.jvp(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="t must be"):
        jac.vjp(torch.zeros(2, 4), 3)
    with pytest.raises(ValueError, match=r"\(\.\.\., B, D\)"):
        jac.jvp(torch.zeros(2, 5), 1)
    function_jac = FunctionStepJacobians(lambda x, s: s[:, :2], torch.zeros(3, 2, 5), torch.zeros(3, 2, 4))
    with pytest.raises(ValueError, match="same shape"):
        function_jac.jvp(torch.zeros(3, 2, 4))
    with pytest.raises(TypeError, match="callable"):
        function_step_jacobians("not a cell", torch.zeros(3, 2, 5), torch.zeros(3, 2, 4))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="CellWeights"):
        builtin_step_jacobians({"kind": "gru"}, torch.zeros(3, 2, 5), torch.zeros(3, 2, 4))  # type: ignore[arg-type]


@pytest.mark.parametrize("case", CASES, ids=[c.case_id for c in CASES])
def test_owning_recurrent_weights_keeps_the_products_and_holds_no_input_weights(case: CellCase) -> None:
    """A background job's Jacobians: private W_hh/W_hr copies (the optimizer may change the originals
    in place afterwards), no W_ih or biases (only needed for the coefficients), same products as jacrev."""
    generator = torch.Generator().manual_seed(5)
    weights = random_cell_weights(case, generator)
    x, s_prev = random_sequences(case, weights, steps=4, batch=3, generator=generator)
    dense = dense_step_jacobians(weights, x, s_prev)
    owned = builtin_step_jacobians(weights, x, s_prev).owning_recurrent_weights()
    kept = owned.weights
    assert kept.weight_ih.is_meta and kept.weight_ih.shape == weights.weight_ih.shape
    assert all(b is None or b.is_meta for b in (kept.bias_ih, kept.bias_hh))
    assert kept.weight_hh.untyped_storage().data_ptr() != weights.weight_hh.untyped_storage().data_ptr()
    originals = (weights.weight_ih, weights.weight_hh, weights.bias_ih, weights.bias_hh, weights.weight_hr)
    for original in originals:
        if original is not None:
            original.add_(1.0)  # an optimizer step after the job was prepared
    v = torch.randn(2, *s_prev.shape, generator=generator, dtype=s_prev.dtype)
    torch.testing.assert_close(owned.jvp(v), torch.einsum("tbij,ntbj->ntbi", dense, v))
    torch.testing.assert_close(owned.vjp(v), torch.einsum("tbij,ntbi->ntbj", dense, v))

"""Matrix-free step Jacobians of a recurrent layer over a whole batch of sequences.

Index convention (used by every estimator in this package):

* states s_0 .. s_T, inputs x_0 .. x_{T-1}, s_{t+1} = step(x_t, s_t);
* J_t = ds_{t+1}/ds_t evaluated at (x_t, s_t), for t = 0 .. T-1;
* tensors are time-major: x (T, B, I), s_prev (T, B, D) = s_0 .. s_{T-1}, mask (T, B) bool where True marks
  a real step; sequences are left-aligned and sequence b has L_b = mask[:, b].sum() real steps.

Flat states follow :mod:`gradwatch.estimators.cells`: s = h for RNN/GRU, s = [h; c] for LSTM.

``jvp(v, t=None)`` takes v of shape (..., T, B, D) and applies J_t to v[..., t, :, :] for every t at once;
``jvp(v, t)`` with an int t takes v of shape (..., B, D) and applies J_t only (the product sweeps use it).
``vjp`` is the same with J_t^T. Leading dimensions "..." are extra vectors (several lags, say).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Protocol, cast, runtime_checkable

import torch
from torch import Tensor

from gradwatch.estimators.cells import (
    CellWeights,
    hidden_preactivation,
    input_preactivation,
    split_state,
)

StepFunction = Callable[[Tensor, Tensor], Tensor]


@runtime_checkable
class StepJacobians(Protocol):
    """The step Jacobians J_0 .. J_{T-1} of one layer and direction, as batched matrix-free products."""

    time_steps: int
    batch_size: int
    state_size: int
    dtype: torch.dtype
    device: torch.device

    def jvp(self, v: Tensor, t: int | None = None) -> Tensor:
        """J_t v (see the module docstring for the two shape modes)."""
        ...

    def vjp(self, u: Tensor, t: int | None = None) -> Tensor:
        """J_t^T u (see the module docstring for the two shape modes)."""
        ...

    def activation_derivatives(self) -> Tensor | None:
        """(T, B, H) derivative f'(a) of the candidate nonlinearity, or None when unknown."""
        ...

    def gate_values(self) -> Tensor | None:
        """(T, B, H) LSTM forget gate f or GRU update gate z, or None for cells without such a gate."""
        ...


def _flat_rows(tensor: Tensor, index: Tensor) -> Tensor:
    """(T, B, ...) -> (1, len(index), ...): the (t, b) pairs at flat positions t * B + b, as one step."""
    return tensor.reshape(1, -1, *tensor.shape[2:])[:, index]


def select_operators(jac: StepJacobians, index: Tensor) -> StepJacobians | None:
    """The operators at flat (t, b) positions ``index`` as a one-step batch of len(index) "sequences"
    (jvp(v, 0) then applies each to its own row), or None if ``jac`` cannot select (a user's own class)."""
    select = getattr(jac, "select", None)
    return select(index) if callable(select) else None


def _check_sequence_tensors(x: Tensor, s_prev: Tensor, state_size: int | None) -> None:
    """Shapes (T, B, I) and (T, B, D) with matching T, B and a floating dtype, or a clear error."""
    if not isinstance(x, Tensor) or x.ndim != 3:
        raise ValueError(
            f"x must be a time-major tensor (T, B, I), got shape {tuple(getattr(x, 'shape', ()))}"
        )
    if not isinstance(s_prev, Tensor) or s_prev.ndim != 3:
        raise ValueError(
            f"s_prev must be a time-major tensor (T, B, D) of states s_0..s_(T-1), "
            f"got shape {tuple(getattr(s_prev, 'shape', ()))}"
        )
    if x.shape[:2] != s_prev.shape[:2]:
        raise ValueError(f"x {tuple(x.shape)} and s_prev {tuple(s_prev.shape)} must agree on (T, B)")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"need at least one time step and one sequence, got (T, B) = {tuple(x.shape[:2])}")
    if not s_prev.is_floating_point():
        raise TypeError(f"s_prev must be a floating-point tensor, got dtype {s_prev.dtype}")
    if state_size is not None and s_prev.shape[2] != state_size:
        raise ValueError(
            f"s_prev has state size {s_prev.shape[2]}, the cell's flat state has size {state_size}"
        )


class _TimeIndexing:
    """Shape checks and coefficient selection shared by the two implementations."""

    time_steps: int
    batch_size: int
    state_size: int

    def _check_vector(self, v: Tensor, t: int | None, name: str) -> None:
        if t is None:
            expected = (self.time_steps, self.batch_size, self.state_size)
            if v.ndim < 3 or tuple(v.shape[-3:]) != expected:
                raise ValueError(
                    f"{name} must have shape (..., T, B, D) = (..., {expected}), got {tuple(v.shape)}"
                )
            return
        if not isinstance(t, int) or not 0 <= t < self.time_steps:
            raise ValueError(f"t must be None or an int in [0, {self.time_steps - 1}], got {t!r}")
        expected_step = (self.batch_size, self.state_size)
        if v.ndim < 2 or tuple(v.shape[-2:]) != expected_step:
            raise ValueError(
                f"{name} must have shape (..., B, D) = (..., {expected_step}) when t is an int, "
                f"got {tuple(v.shape)}"
            )


@dataclass(frozen=True)
class _LstmCoefficients:
    """Per-(t, b) derivative coefficients of one LSTM step, see AnalyticStepJacobians.

    The four gate coefficients are packed into one (T, B, 4H) tensor in W_hh's gate order (i, f, g, o), so a
    product multiplies all of them with one call instead of four (a lag sweep makes thousands of products
    of a few rows, where the number of calls, not the FLOPs, sets the time).
    """

    gate_coefficients: Tensor  # (T, B, 4H): [g i(1-i), c f(1-f), i (1-g^2), tanh(c') o(1-o)]
    forget_gate: Tensor  # (T, B, H) f: dc' per unit of dc (the constant error carousel)
    cell_to_hidden: Tensor  # (T, B, H) o (1 - tanh(c')^2): dh per unit of dc'
    candidate_derivative: Tensor  # (T, B, H) 1 - g^2


@dataclass(frozen=True)
class _GruCoefficients:
    """Per-(t, b) derivative coefficients of one GRU step, the three gate ones packed as for the LSTM."""

    # (T, B, 3H), gates r, z, n: [(1-z)(1-n^2) (W_hn h + b_hn) r(1-r), (h-n) z(1-z), (1-z)(1-n^2) r]
    gate_coefficients: Tensor
    update_gate: Tensor  # (T, B, H) z: the direct path dh' = z dh
    candidate_derivative: Tensor  # (T, B, H) 1 - n^2


class AnalyticStepJacobians(_TimeIndexing):
    """Exact step Jacobians of the built-in cells, one matmul with W_hh (and W_hr) per product.

    All nonlinearity derivatives are computed once for every (t, b) in one batched pass; a product then is
    ``coefficients * (v @ W_hh^T)`` (jvp) or ``(coefficients * u) @ W_hh`` (vjp):

    * RNN: J = diag(f'(a)) W_hh, a = W_ih x + b_ih + W_hh h + b_hh.
    * LSTM (s = [h; c]): dc' = f dc + g i(1-i) dz_i + c f(1-f) dz_f + i (1-g^2) dz_g,
      dh' = W_hr (tanh(c') o(1-o) dz_o + o (1-tanh(c')^2) dc'), dz = W_hh dh (W_hr = I without projection).
    * GRU: dh' = z dh + (h-n) z(1-z) dq_z + (1-z)(1-n^2) (r dq_n + (W_hn h + b_hn) r(1-r) dq_r),
      dq = W_hh dh.

    ``activation_derivatives`` is the derivative of the *candidate* nonlinearity, the lecture's f': RNN f'(a);
    LSTM tanh'(pre-activation of g); GRU tanh'(pre-activation of n). ``gate_values``: LSTM forget gate f,
    GRU update gate z (both multiply the direct path from s_t to s_{t+1}); None for RNN.
    """

    def __init__(self, weights: CellWeights, x: Tensor, s_prev: Tensor) -> None:
        _check_sequence_tensors(x, s_prev, weights.state_size)
        if weights.weight_ih.shape[1] != x.shape[2]:
            raise ValueError(f"x has input size {x.shape[2]}, weight_ih expects {weights.weight_ih.shape[1]}")
        self.weights = weights.to(s_prev.dtype)
        self.time_steps, self.batch_size, self.state_size = s_prev.shape
        self.dtype = s_prev.dtype
        self.device = s_prev.device
        self.kind = weights.kind
        with torch.no_grad():
            self._precompute(x.to(s_prev.dtype), s_prev)

    def _precompute(self, x: Tensor, s_prev: Tensor) -> None:
        weights = self.weights
        h, c = split_state(weights, s_prev)
        preactivation = input_preactivation(weights, x)
        recurrent = hidden_preactivation(weights, h)
        self._rnn_derivative: Tensor | None = None
        self._lstm: _LstmCoefficients | None = None
        self._gru: _GruCoefficients | None = None
        if self.kind == "rnn_tanh":
            self._rnn_derivative = 1 - torch.tanh(preactivation + recurrent) ** 2
        elif self.kind == "rnn_relu":
            self._rnn_derivative = ((preactivation + recurrent) > 0).to(s_prev.dtype)
        elif self.kind == "lstm":
            assert c is not None
            i, f, g, o = (preactivation + recurrent).chunk(4, dim=-1)
            i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
            c_next = f * c + i * g
            tanh_c = torch.tanh(c_next)
            candidate_derivative = 1 - g**2
            self._lstm = _LstmCoefficients(
                gate_coefficients=torch.cat(
                    [g * i * (1 - i), c * f * (1 - f), i * candidate_derivative, tanh_c * o * (1 - o)], dim=-1
                ),
                forget_gate=f,
                cell_to_hidden=o * (1 - tanh_c**2),
                candidate_derivative=candidate_derivative,
            )
        elif self.kind == "gru":
            x_reset, x_update, x_candidate = preactivation.chunk(3, dim=-1)
            h_reset, h_update, h_candidate = recurrent.chunk(3, dim=-1)
            r = torch.sigmoid(x_reset + h_reset)
            z = torch.sigmoid(x_update + h_update)
            n = torch.tanh(x_candidate + r * h_candidate)
            through_candidate = (1 - z) * (1 - n**2)
            self._gru = _GruCoefficients(
                gate_coefficients=torch.cat(
                    [
                        through_candidate * h_candidate * r * (1 - r),
                        (h - n) * z * (1 - z),
                        through_candidate * r,
                    ],
                    dim=-1,
                ),
                update_gate=z,
                candidate_derivative=1 - n**2,
            )
        else:  # pragma: no cover - CellWeights.kind is a Literal
            raise ValueError(f"unknown cell kind {self.kind!r}; expected rnn_tanh, rnn_relu, lstm or gru")

    def owning_recurrent_weights(self) -> AnalyticStepJacobians:
        """A copy that owns private copies of the only weights its products read (W_hh, W_hr), for a
        background job: the optimizer updates the originals in place. W_ih and the biases served only to
        compute the coefficients (done at construction) and are not kept (shape-only meta tensors), which
        halves the weights a job holds when the input size equals the hidden size."""
        weights = self.weights
        owned = copy.copy(self)
        owned.weights = CellWeights(
            weights.kind,
            weights.weight_ih.to("meta"),
            weights.weight_hh.detach().clone(),
            None if weights.bias_ih is None else weights.bias_ih.to("meta"),
            None if weights.bias_hh is None else weights.bias_hh.to("meta"),
            None if weights.weight_hr is None else weights.weight_hr.detach().clone(),
        )
        return owned

    def select(self, index: Tensor) -> AnalyticStepJacobians:
        """Only the operators at flat (t, b) positions ``index``, as one step of len(index) sequences.

        Lanczos uses it to drop converged operators: the coefficients are gathered once per compaction,
        and every later product costs len(index) rows instead of T * B.
        """
        subset = copy.copy(self)
        subset.time_steps, subset.batch_size = 1, int(index.numel())
        if self._rnn_derivative is not None:
            subset._rnn_derivative = _flat_rows(self._rnn_derivative, index)
        if self._lstm is not None:
            subset._lstm = _LstmCoefficients(
                **{f.name: _flat_rows(getattr(self._lstm, f.name), index) for f in fields(_LstmCoefficients)}
            )
        if self._gru is not None:
            subset._gru = _GruCoefficients(
                **{f.name: _flat_rows(getattr(self._gru, f.name), index) for f in fields(_GruCoefficients)}
            )
        return subset

    def select_sequences(self, sequences: Tensor) -> AnalyticStepJacobians:
        """Only the sequences ``sequences`` (batch indices), every time step: (T, len(sequences))."""
        subset = copy.copy(self)
        subset.batch_size = int(sequences.numel())

        def pick(tensor: Tensor) -> Tensor:
            return tensor.index_select(1, sequences.to(tensor.device))

        if self._rnn_derivative is not None:
            subset._rnn_derivative = pick(self._rnn_derivative)
        if self._lstm is not None:
            subset._lstm = _LstmCoefficients(
                **{f.name: pick(getattr(self._lstm, f.name)) for f in fields(_LstmCoefficients)}
            )
        if self._gru is not None:
            subset._gru = _GruCoefficients(
                **{f.name: pick(getattr(self._gru, f.name)) for f in fields(_GruCoefficients)}
            )
        return subset

    @staticmethod
    def _at(coefficient: Tensor, t: int | None) -> Tensor:
        return coefficient if t is None else coefficient[t]

    @torch.no_grad()
    def jvp(self, v: Tensor, t: int | None = None) -> Tensor:
        self._check_vector(v, t, "v")
        return self._jvp(v, t)

    @torch.no_grad()
    def vjp(self, u: Tensor, t: int | None = None) -> Tensor:
        self._check_vector(u, t, "u")
        return self._vjp(u, t)

    def _jvp(self, v: Tensor, t: int | None) -> Tensor:
        """J_t v without the shape checks (the product sweeps call it thousands of times per measurement)."""
        weights = self.weights
        if self._rnn_derivative is not None:
            return self._at(self._rnn_derivative, t) * (v @ weights.weight_hh.T)
        hidden = weights.hidden_size
        if self._lstm is not None:
            k = self._lstm
            dh, dc = v[..., : weights.output_size], v[..., weights.output_size :]
            # dz = W_hh dh; every gate's coefficient times its block of dz in one call, then
            # dc' = f dc + (i, f, g blocks summed) and dh' = (o block) + o (1 - tanh(c')^2) dc'.
            scaled = (dh @ weights.weight_hh.T).mul_(self._at(k.gate_coefficients, t))
            blocks = scaled.unflatten(-1, (4, hidden))
            dc_next = blocks[..., :3, :].sum(dim=-2).addcmul_(self._at(k.forget_gate, t), dc)
            dh_next = torch.addcmul(blocks[..., 3, :], self._at(k.cell_to_hidden, t), dc_next)
            if weights.weight_hr is not None:
                dh_next = dh_next @ weights.weight_hr.T
            return torch.cat([dh_next, dc_next], dim=-1)
        assert self._gru is not None
        k2 = self._gru
        scaled = (v @ weights.weight_hh.T).mul_(self._at(k2.gate_coefficients, t))
        return scaled.unflatten(-1, (3, hidden)).sum(dim=-2).addcmul_(self._at(k2.update_gate, t), v)

    def _vjp(self, u: Tensor, t: int | None) -> Tensor:
        """J_t^T u without the shape checks."""
        weights = self.weights
        if self._rnn_derivative is not None:
            return (self._at(self._rnn_derivative, t) * u) @ weights.weight_hh
        if self._lstm is not None:
            k = self._lstm
            uh, uc = u[..., : weights.output_size], u[..., weights.output_size :]
            if weights.weight_hr is not None:
                uh = uh @ weights.weight_hr  # h' = W_hr h_raw, so the cotangent of h_raw is W_hr^T uh
            uc_total = torch.addcmul(uc, self._at(k.cell_to_hidden, t), uh)
            # The i, f, g gates feed dc' (cotangent uc_total), the o gate feeds dh' (cotangent uh).
            gate_cotangent = torch.cat([uc_total, uc_total, uc_total, uh], dim=-1).mul_(
                self._at(k.gate_coefficients, t)
            )
            return torch.cat(
                [gate_cotangent @ weights.weight_hh, uc_total.mul_(self._at(k.forget_gate, t))], dim=-1
            )
        assert self._gru is not None
        k2 = self._gru
        gate_cotangent = torch.cat([u, u, u], dim=-1).mul_(self._at(k2.gate_coefficients, t))
        return torch.addcmul(gate_cotangent @ weights.weight_hh, self._at(k2.update_gate, t), u)

    def activation_derivatives(self) -> Tensor | None:
        if self._rnn_derivative is not None:
            return self._rnn_derivative
        if self._lstm is not None:
            return self._lstm.candidate_derivative
        assert self._gru is not None
        return self._gru.candidate_derivative

    def gate_values(self) -> Tensor | None:
        if self._lstm is not None:
            return self._lstm.forget_gate
        if self._gru is not None:
            return self._gru.update_gate
        return None


StepProduct = Callable[[Tensor, int], Tensor]


def step_products(jac: StepJacobians) -> tuple[StepProduct, StepProduct]:
    """(J_t v, J_t^T u) for one step t at a time, as the product sweeps call them: the built-in cells'
    products without the per-call shape checks (the sweep shapes its vectors itself), anything else's
    public ``jvp``/``vjp``."""
    if isinstance(jac, AnalyticStepJacobians):
        return jac._jvp, jac._vjp
    return jac.jvp, jac.vjp


def builtin_step_jacobians(weights: CellWeights, x: Tensor, s_prev: Tensor) -> AnalyticStepJacobians:
    """Analytic step Jacobians of a built-in cell (rnn_tanh, rnn_relu, lstm incl. proj_size, gru)."""
    if not isinstance(weights, CellWeights):
        raise TypeError(f"weights must be a CellWeights, got {type(weights).__name__}")
    return AnalyticStepJacobians(weights, x, s_prev)


class FunctionStepJacobians(_TimeIndexing):
    """Step Jacobians of any cell ``step(x, s) -> s_next`` ((N, I), (N, D) -> (N, D)) by torch.func.

    The cell must process rows independently (as every RNN cell does): all (t, b) pairs and all extra
    leading vectors are flattened into the cell's own batch dimension, so one jvp/vjp call covers them.
    (torch.func.vmap is avoided on purpose: it fails on nn.LSTM/GRU, and torch.func.linearize gives silently
    wrong results from its second call on nn.LSTMCell/GRUCell.)
    """

    def __init__(self, step: StepFunction, x: Tensor, s_prev: Tensor) -> None:
        if not callable(step):
            raise TypeError(f"step must be a callable (x, s) -> s_next, got {type(step).__name__}")
        _check_sequence_tensors(x, s_prev, None)
        self.step = step
        self.x = x.detach()
        self.s_prev = s_prev.detach()
        self.time_steps, self.batch_size, self.state_size = s_prev.shape
        self.dtype = s_prev.dtype
        self.device = s_prev.device

    def _primals(self, t: int | None, copies: int) -> tuple[Tensor, Tensor]:
        """x and s flattened to (copies * rows, .), repeated once per extra leading vector."""
        x = self.x if t is None else self.x[t]
        s = self.s_prev if t is None else self.s_prev[t]
        x = x.reshape(-1, x.shape[-1]).repeat(copies, 1)
        s = s.reshape(-1, s.shape[-1]).repeat(copies, 1)
        return x, s

    def _flatten(self, v: Tensor, t: int | None) -> tuple[Tensor, int]:
        trailing = 3 if t is None else 2
        leading = v.shape[:-trailing]
        copies = 1
        for size in leading:
            copies *= size
        return v.reshape(-1, self.state_size), copies

    def _checked_output(self, out: Tensor, rows: int) -> Tensor:
        if out.shape != (rows, self.state_size):
            raise ValueError(
                f"the step function must map states (N, {self.state_size}) to states of the same shape, "
                f"got output shape {tuple(out.shape)} for N = {rows}"
            )
        return out

    def jvp(self, v: Tensor, t: int | None = None) -> Tensor:
        self._check_vector(v, t, "v")
        flat, copies = self._flatten(v, t)
        x, s = self._primals(t, copies)
        with torch.no_grad():
            _, tangent = cast(
                tuple[Tensor, Tensor],  # torch.func.jvp's stubs do not narrow to one primal
                torch.func.jvp(lambda state: self.step(x, state), (s,), (flat.to(s.dtype),)),
            )
        return self._checked_output(tangent, flat.shape[0]).reshape(v.shape)

    def vjp(self, u: Tensor, t: int | None = None) -> Tensor:
        self._check_vector(u, t, "u")
        flat, copies = self._flatten(u, t)
        x, s = self._primals(t, copies)
        with torch.no_grad():
            out, pullback = cast(
                tuple[Tensor, Callable[[Tensor], tuple[Tensor]]],  # one primal: one cotangent
                torch.func.vjp(lambda state: self.step(x, state), s),
            )
            self._checked_output(out, flat.shape[0])
            (cotangent,) = pullback(flat.to(out.dtype))
        return cotangent.reshape(u.shape)

    def select(self, index: Tensor) -> FunctionStepJacobians:
        """Only the operators at flat (t, b) positions ``index``, as one step of len(index) sequences."""
        return FunctionStepJacobians(self.step, _flat_rows(self.x, index), _flat_rows(self.s_prev, index))

    def select_sequences(self, sequences: Tensor) -> FunctionStepJacobians:
        """Only the sequences ``sequences`` (batch indices), every time step: (T, len(sequences))."""
        index = sequences.to(self.x.device)
        return FunctionStepJacobians(
            self.step, self.x.index_select(1, index), self.s_prev.index_select(1, index)
        )

    def activation_derivatives(self) -> Tensor | None:
        return None

    def gate_values(self) -> Tensor | None:
        return None


def function_step_jacobians(step: StepFunction, x: Tensor, s_prev: Tensor) -> FunctionStepJacobians:
    """Step Jacobians of a user-written cell given as a step function on flat states (see the class)."""
    return FunctionStepJacobians(step, x, s_prev)

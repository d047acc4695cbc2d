"""Odd models and data: each is measured correctly (checked against dense Jacobians) or skipped quietly.

Every run uses ``strict=True`` and turns GradWatchWarning into an error, so any fault inside gradwatch fails
the test. Where a measurement is made, sigma_max(J_t) is compared with an independent reference:
``torch.func.jacrev`` of the matching nn.*Cell step on the same inputs, and ``matrix_norm(ord=2)``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

import gradwatch
from gradwatch.records import Measurement

CELL_OF = {nn.RNN: nn.RNNCell, nn.GRU: nn.GRUCell, nn.LSTM: nn.LSTMCell}


@contextmanager
def _no_gradwatch_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("error", gradwatch.GradWatchWarning)
        yield


def _cell_like(rnn: nn.Module) -> nn.Module:
    """The nn.*Cell computing one step of a one-layer, one-direction fused RNN with the same weights."""
    kwargs = {"nonlinearity": rnn.nonlinearity} if isinstance(rnn, nn.RNN) else {}
    cell = CELL_OF[type(rnn)](rnn.input_size, rnn.hidden_size, bias=rnn.bias, **kwargs)
    cell.load_state_dict({name[: -len("_l0")]: value for name, value in rnn.state_dict().items()})
    return cell


def exact_step_sigmas(
    cell: nn.Module, inputs: Tensor, state0: tuple[Tensor, ...], lengths: list[int]
) -> list[float]:
    """sigma_max(ds_t/ds_{t-1}) for every real (t, sequence); inputs (T, B, I), each state0 part (B, H)."""
    sizes = [part.shape[-1] for part in state0]
    sigmas = []
    for b, length in enumerate(lengths):
        flat = torch.cat([part[b] for part in state0]).detach()

        def step(s: Tensor, x: Tensor) -> Tensor:
            parts = tuple(p.unsqueeze(0) for p in s.split(sizes))
            out = cell(x.unsqueeze(0), parts[0] if len(parts) == 1 else parts)
            return torch.cat([o.squeeze(0) for o in (out if isinstance(out, tuple) else (out,))])

        for t in range(length):
            jacobian = torch.func.jacrev(step)(flat, inputs[t, b])
            sigmas.append(float(torch.linalg.matrix_norm(jacobian.detach(), ord=2)))
            flat = step(flat, inputs[t, b]).detach()
    return sigmas


def _assert_matches(measurement: Measurement, sigmas: list[float]) -> None:
    metrics = measurement.metrics
    assert metrics.jacobian_sigma_max_mean == pytest.approx(sum(sigmas) / len(sigmas), rel=1e-3)
    assert metrics.jacobian_sigma_max_max == pytest.approx(max(sigmas), rel=1e-3)
    assert metrics.jacobian_sigma_max_min == pytest.approx(min(sigmas), rel=1e-3)


@dataclass(frozen=True)
class FusedCase:
    """A one-layer fused RNN and the arguments of its (last) call on the measured step."""

    make: Callable[[], nn.Module]
    call: Callable[[nn.Module], tuple[Tensor, tuple[Tensor, ...], list[int]]]
    """Runs the module like a training step does; returns (time-major inputs, initial state, lengths)."""


def _zeros_state(rnn: nn.Module, batch: int) -> tuple[Tensor, ...]:
    h = torch.zeros(batch, rnn.hidden_size)
    return (h, h.clone()) if isinstance(rnn, nn.LSTM) else (h,)


def _plain_call(
    time_steps: int, batch: int
) -> Callable[[nn.Module], tuple[Tensor, tuple[Tensor, ...], list[int]]]:
    def call(rnn: nn.Module) -> tuple[Tensor, tuple[Tensor, ...], list[int]]:
        x = torch.randn(time_steps, batch, rnn.input_size)
        loss = rnn(x)[0].sum()
        if loss.requires_grad:  # an all-frozen RNN (a frozen encoder): nothing to backpropagate here
            loss.backward()
        return x, _zeros_state(rnn, batch), [time_steps] * batch

    return call


def _packed_length_one(rnn: nn.Module) -> tuple[Tensor, tuple[Tensor, ...], list[int]]:
    lengths = [1, 4, 1]
    x = torch.randn(4, 3, rnn.input_size)
    packed = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
    rnn(packed)[0].data.sum().backward()
    return x, _zeros_state(rnn, 3), lengths


def _all_packed_length_one(rnn: nn.Module) -> tuple[Tensor, tuple[Tensor, ...], list[int]]:
    x = torch.randn(1, 2, rnn.input_size)
    rnn(pack_padded_sequence(x, torch.tensor([1, 1])))[0].data.sum().backward()
    return x, _zeros_state(rnn, 2), [1, 1]


def _called_three_times(rnn: nn.Module) -> tuple[Tensor, tuple[Tensor, ...], list[int]]:
    loss = rnn(torch.randn(5, 3, rnn.input_size))[0].sum()
    loss = loss + rnn(torch.randn(2, 1, rnn.input_size))[0].sum()
    last = torch.randn(3, 2, rnn.input_size)
    (loss + rnn(last)[0].sum()).backward()
    return last, _zeros_state(rnn, 2), [3, 3]  # the last call of the step is the one measured


def _non_contiguous_state(rnn: nn.Module) -> tuple[Tensor, tuple[Tensor, ...], list[int]]:
    x = torch.randn(rnn.input_size, 4, 6).permute(2, 1, 0)  # (T=6, B=4, I), not contiguous
    h = torch.randn(rnn.hidden_size, 4, 1).permute(2, 1, 0)  # (1, B, H), not contiguous
    c = torch.randn(rnn.hidden_size, 4, 1).permute(2, 1, 0)
    assert not (x.is_contiguous() or h.is_contiguous() or c.is_contiguous())
    state = (h, c) if isinstance(rnn, nn.LSTM) else h
    rnn(x, state)[0].sum().backward()
    return x, (h[0], c[0]) if isinstance(rnn, nn.LSTM) else (h[0],), [6] * 4


def _frozen(make: Callable[[], nn.Module], names: tuple[str, ...]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        rnn = make()
        for name in names:
            getattr(rnn, name).requires_grad_(False)
        return rnn

    return build


FUSED_CASES = {
    "length-1-sequences": FusedCase(lambda: nn.LSTM(3, 5), _plain_call(1, 3)),
    "batch-of-1": FusedCase(lambda: nn.GRU(3, 5), _plain_call(6, 1)),
    "hidden-size-1": FusedCase(lambda: nn.RNN(3, 1), _plain_call(6, 2)),
    "hidden-size-1-lstm": FusedCase(lambda: nn.LSTM(3, 1), _plain_call(6, 2)),
    "packed-length-1-entries": FusedCase(lambda: nn.LSTM(3, 5), _packed_length_one),
    "packed-all-length-1": FusedCase(lambda: nn.GRU(3, 4), _all_packed_length_one),
    "called-three-times": FusedCase(lambda: nn.GRU(3, 4), _called_three_times),
    "non-contiguous-hx-lstm": FusedCase(lambda: nn.LSTM(3, 5), _non_contiguous_state),
    "non-contiguous-hx-gru": FusedCase(lambda: nn.GRU(3, 5), _non_contiguous_state),
    "frozen-recurrent-weight": FusedCase(
        _frozen(lambda: nn.LSTM(3, 5), ("weight_hh_l0",)), _plain_call(5, 2)
    ),
    "all-frozen": FusedCase(
        _frozen(lambda: nn.GRU(3, 4), ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")),
        _plain_call(5, 2),
    ),
}


@pytest.mark.parametrize("case", list(FUSED_CASES.values()), ids=list(FUSED_CASES))
def test_odd_fused_inputs_are_measured_exactly(case: FusedCase) -> None:
    rnn = case.make()
    reference_cell = _cell_like(
        rnn
    )  # weights as of the forward pass (the monitor measures before the update)
    optimizer = torch.optim.SGD(rnn.parameters(), lr=0.1)
    with _no_gradwatch_warnings(), gradwatch.watch(rnn, optimizer, every=1, strict=True) as monitor:
        inputs, state0, lengths = case.call(rnn)
        optimizer.step()
    measurements = [r for r in monitor.history if isinstance(r, Measurement)]
    assert len(measurements) == 1
    keep = min(len(lengths), 8)  # max_sequences
    sigmas = exact_step_sigmas(
        reference_cell, inputs[:, :keep], tuple(s[:keep] for s in state0), lengths[:keep]
    )
    _assert_matches(measurements[0], sigmas)
    assert measurements[0].metrics.sequences == keep
    frozen = {name for name, p in rnn.named_parameters() if not p.requires_grad}
    grads = measurements[0].metrics.grad_norm
    # a frozen leaf has no gradient and so no entry (null in a run log means NaN/Inf elements)
    assert frozen.isdisjoint(grads) and all(v is not None and math.isfinite(v) for v in grads.values())
    assert set(grads) | frozen == {name for name, _ in rnn.named_parameters()}


def test_hidden_size_one_matches_the_closed_form() -> None:
    """For a tanh RNN with one unit, J_t = w_hh (1 - h_t^2): a scalar, so sigma_max(J_t) = |J_t|."""
    rnn = nn.RNN(2, 1)
    x = torch.randn(7, 1, 2)
    with torch.no_grad():
        states, _ = rnn(x)
    expected = (rnn.weight_hh_l0.abs() * (1 - states.squeeze(-1) ** 2)).flatten().tolist()
    with _no_gradwatch_warnings(), gradwatch.watch(rnn, every=1, strict=True) as monitor:
        rnn(x)[0].sum().backward()
        monitor.step()
    (measurement,) = [r for r in monitor.history if isinstance(r, Measurement)]
    assert measurement.metrics.jacobian_sigma_max_mean == pytest.approx(sum(expected) / 7, rel=1e-4)
    assert measurement.metrics.jacobian_sigma_max_max == pytest.approx(max(expected), rel=1e-4)
    assert measurement.metrics.weight_hh_sigma_max == pytest.approx(abs(rnn.weight_hh_l0.item()), rel=1e-5)


def test_eval_and_no_grad_passes_are_not_measured_and_do_not_fail() -> None:
    rnn = nn.LSTM(3, 4, dropout=0.0)
    with _no_gradwatch_warnings(), gradwatch.watch(rnn, every=1, strict=True, probe="live") as monitor:
        rnn.eval()
        with torch.no_grad():
            rnn(torch.randn(5, 2, 3))
        monitor.step()
        with torch.inference_mode():
            rnn(torch.randn(5, 2, 3))
        monitor.step()
        rnn.train()
        x = torch.randn(4, 3, 3)
        rnn(x)[0].sum().backward()
        monitor.step()
    measured = [r for r in monitor.history if isinstance(r, Measurement)]
    assert [r.step for r in measured] == [2]
    sigmas = exact_step_sigmas(_cell_like(rnn), x, _zeros_state(rnn, 3), [4, 4, 4])
    _assert_matches(measured[0], sigmas)


@pytest.mark.parametrize("shape", [(5, 0, 3), (0, 2, 3)], ids=["empty-batch", "zero-length"])
def test_empty_inputs_are_left_to_torch_and_the_monitor_goes_on(shape: tuple[int, int, int]) -> None:
    rnn = nn.GRU(3, 4)
    with _no_gradwatch_warnings(), gradwatch.watch(rnn, every=1, strict=True, probe="live") as monitor:
        try:
            rnn(torch.randn(*shape))[0].sum().backward()
            torch_rejected = False
        except RuntimeError as exc:  # torch's own error for T=0; gradwatch adds nothing to it
            assert "gradwatch" not in str(exc)
            torch_rejected = True
        monitor.step()
        x = torch.randn(3, 2, 3)
        rnn(x)[0].sum().backward()
        monitor.step()
    assert torch_rejected == (shape[0] == 0)
    measured = [r for r in monitor.history if isinstance(r, Measurement)]
    assert [r.step for r in measured] == [1]
    _assert_matches(measured[0], exact_step_sigmas(_cell_like(rnn), x, _zeros_state(rnn, 2), [3, 3]))


class CellLoop(nn.Module):
    def __init__(self, cell: nn.Module) -> None:
        super().__init__()
        self.cell = cell

    def forward(self, x: Tensor, state: tuple[Tensor, ...] | Tensor | None) -> Tensor:
        for t in range(x.shape[0]):
            state = self.cell(x[t], state)
        return state[0] if isinstance(state, tuple) else state  # type: ignore[return-value]


@pytest.mark.parametrize(
    ("make", "time_steps", "batch", "non_contiguous"),
    [
        (lambda: nn.LSTMCell(3, 4), 1, 2, False),
        (lambda: nn.GRUCell(3, 1), 5, 1, False),
        (lambda: nn.LSTMCell(3, 4), 4, 3, True),
        (lambda: nn.RNNCell(3, 4), 0, 2, False),
    ],
    ids=["lstmcell-one-step", "grucell-hidden-1-batch-1", "lstmcell-non-contiguous-hx", "never-called"],
)
def test_odd_cell_loops(
    make: Callable[[], nn.Module], time_steps: int, batch: int, non_contiguous: bool
) -> None:
    cell = make()
    hidden = cell.hidden_size
    x = torch.randn(time_steps, batch, 3)
    parts = [
        torch.randn(hidden, batch).t() if non_contiguous else torch.randn(batch, hidden) for _ in range(2)
    ]
    state0 = tuple(parts) if isinstance(cell, nn.LSTMCell) else (parts[0],)
    with _no_gradwatch_warnings(), gradwatch.watch(cell, every=1, strict=True) as monitor:
        out = CellLoop(cell)(x, state0 if len(state0) > 1 else state0[0])
        if time_steps:
            out.sum().backward()
        monitor.step()
    measured = [r for r in monitor.history if isinstance(r, Measurement)]
    if time_steps == 0:
        assert measured == []
        return
    (measurement,) = measured
    _assert_matches(measurement, exact_step_sigmas(cell, x, state0, [time_steps] * batch))
    assert math.isfinite(measurement.metrics.jacobian_sigma_max_mean or math.nan)

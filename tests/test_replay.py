"""Replay of fused RNN modules and cells must reproduce what torch computed, for every option."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from gradwatch.capture.hooks import CallRecorder
from gradwatch.capture.modules import find_rnn_modules
from gradwatch.capture.replay import (
    check_cell_replay,
    check_fused_replay,
    replay_fused,
    reverse_within_lengths,
    trace_builtin_cell,
)

FUSED_GRID = [
    (cls, layers, bidirectional, batch_first, proj, bias, packed, given_state)
    for cls, layers, bidirectional, batch_first, proj, bias, packed, given_state in itertools.product(
        [nn.RNN, nn.LSTM, nn.GRU],
        [1, 2],
        [False, True],
        [False, True],
        [0, 3],
        [True, False],
        [False, True],
        [False, True],
    )
    if not (proj and cls is not nn.LSTM)
]


def _record(module: nn.Module, *args: object) -> CallRecorder:
    watched = find_rnn_modules(module)[0]
    recorder = CallRecorder(watched, max_sequences=3)
    recorder.armed = True
    handle = module.register_forward_hook(recorder, with_kwargs=True)
    module(*args)
    handle.remove()
    return recorder


@pytest.mark.parametrize(
    "cls,layers,bidirectional,batch_first,proj,bias,packed,given_state",
    FUSED_GRID,
    ids=lambda v: getattr(v, "__name__", str(v)),
)
def test_fused_replay_reproduces_module(
    cls, layers, bidirectional, batch_first, proj, bias, packed, given_state
):
    kwargs = {"proj_size": proj} if cls is nn.LSTM else {}
    module = cls(
        5, 6, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first, bias=bias, **kwargs
    )
    steps, batch, dirs = 7, 4, 2 if bidirectional else 1
    x = torch.randn(batch, steps, 5) if batch_first else torch.randn(steps, batch, 5)
    args: list[object] = [x]
    if packed:
        args = [
            pack_padded_sequence(x, torch.tensor([7, 3, 5, 1]), batch_first=batch_first, enforce_sorted=False)
        ]
    if given_state:
        h0 = torch.randn(layers * dirs, batch, proj or 6)
        args.append((h0, torch.randn(layers * dirs, batch, 6)) if cls is nn.LSTM else h0)
    recorder = _record(module, *args)
    call = recorder.fused_call
    assert call is not None and call.inputs.shape[1] == 3  # max_sequences respected
    kind = find_rnn_modules(module)[0].cell_kind
    replay = replay_fused(module, kind, call)
    check = check_fused_replay(module, call, replay)
    assert check.ok, check
    assert len(replay.traces) == layers * dirs
    if packed:
        lengths = call.lengths.tolist()
        for trace in replay.traces:
            assert trace.mask.sum(0).tolist() == lengths


def test_replay_with_inter_layer_dropout_checks_first_layer_only():
    module = nn.LSTM(4, 5, num_layers=2, dropout=0.5).train()
    recorder = _record(module, torch.randn(6, 3, 4))
    replay = replay_fused(module, "lstm", recorder.fused_call)
    check = check_fused_replay(module, recorder.fused_call, replay)
    assert check.ok and "first layer" in check.compared


def test_unbatched_input_is_replayed():
    module = nn.GRU(3, 4, num_layers=2)
    recorder = _record(module, torch.randn(5, 3))
    replay = replay_fused(module, "gru", recorder.fused_call)
    assert check_fused_replay(module, recorder.fused_call, replay).ok


def test_half_precision_module_replays_in_float32():
    module = nn.LSTM(4, 5).to(torch.bfloat16)
    recorder = _record(module, torch.randn(6, 2, 4, dtype=torch.bfloat16))
    replay = replay_fused(module, "lstm", recorder.fused_call)
    assert replay.output.dtype == torch.float32
    assert check_fused_replay(module, recorder.fused_call, replay).ok


def test_corrupted_weights_fail_the_check():
    module = nn.RNN(3, 4)
    recorder = _record(module, torch.randn(5, 2, 3))
    with torch.no_grad():
        module.weight_hh_l0.mul_(3)  # replay now uses other weights than the recorded call
    replay = replay_fused(module, "rnn_tanh", recorder.fused_call)
    assert not check_fused_replay(module, recorder.fused_call, replay).ok


def test_reverse_within_lengths_is_an_involution_that_keeps_padding():
    x = torch.arange(12.0).reshape(4, 3, 1)
    lengths = torch.tensor([4, 2, 1])
    flipped = reverse_within_lengths(x, lengths)
    assert flipped[:, 0, 0].tolist() == [9.0, 6.0, 3.0, 0.0]
    assert flipped[:, 1, 0].tolist() == [4.0, 1.0, 7.0, 10.0]
    assert torch.equal(reverse_within_lengths(flipped, lengths), x)


@pytest.mark.parametrize("cls", [nn.RNNCell, nn.LSTMCell, nn.GRUCell], ids=lambda c: c.__name__)
def test_cell_chain_is_recorded_and_replayed(cls):
    cell = cls(3, 4)
    watched = find_rnn_modules(cell)[0]
    recorder = CallRecorder(watched, max_sequences=2)
    recorder.armed = True
    cell.register_forward_hook(recorder, with_kwargs=True)
    state = None
    for _ in range(6):
        out = cell(torch.randn(5, 3), state)
        state = out
    assert len(recorder.cell_calls) == 6
    trace = trace_builtin_cell(cell, watched.cell_kind, recorder.cell_calls, recompute=False)
    assert check_cell_replay(trace).ok
    recomputed = trace_builtin_cell(cell, watched.cell_kind, recorder.cell_calls, recompute=True)
    torch.testing.assert_close(recomputed.states, trace.states, atol=1e-5, rtol=1e-5)


def test_broken_chain_starts_a_new_segment():
    cell = nn.GRUCell(3, 4)
    recorder = CallRecorder(find_rnn_modules(cell)[0], max_sequences=2)
    recorder.armed = True
    cell.register_forward_hook(recorder, with_kwargs=True)
    h = None
    for _ in range(3):
        h = cell(torch.randn(2, 3), h)
    h = torch.randn(2, 4)  # a fresh state: a new sequence
    for _ in range(2):
        h = cell(torch.randn(2, 3), h)
    assert len(recorder.cell_calls) == 2


def test_exploding_recurrence_drift_is_accepted_but_wrong_weights_are_not():
    torch.manual_seed(0)
    module = nn.GRU(4, 16)
    with torch.no_grad():
        module.weight_hh_l0.mul_(12.0)  # chaotic: rounding differences grow along the sequence
    recorder = _record(module, 3 * torch.randn(200, 3, 4))
    replay = replay_fused(module, "gru", recorder.fused_call)
    check = check_fused_replay(module, recorder.fused_call, replay)
    assert check.ok
    with torch.no_grad():
        module.weight_hh_l0.mul_(1.5)
    wrong = replay_fused(module, "gru", recorder.fused_call)
    assert not check_fused_replay(module, recorder.fused_call, wrong).ok

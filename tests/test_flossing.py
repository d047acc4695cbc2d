"""gradwatch.floss: exponents move toward the target, nothing else of the model or the user's RNG changes,
clear errors for what it cannot floss."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch import Tensor, nn

import gradwatch
from gradwatch.estimators.cells import cell_step
from gradwatch.estimators.spectrum import orthonormalise
from gradwatch.flossing import FlossError, _layer_weights, _run_layer, floss

KINDS = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}


class Tagger(nn.Module):
    """Embedding-free sequence model: Linear in -> recurrent module -> LayerNorm + BatchNorm -> head."""

    def __init__(
        self, kind: str, layers: int = 2, bidirectional: bool = False, batch_first: bool = False
    ) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.rnn = KINDS[kind](4, 8, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first)
        width = 8 * (2 if bidirectional else 1)
        self.norm = nn.LayerNorm(width)
        self.bn = nn.BatchNorm1d(width)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(width, 1)

    def forward(self, x: Tensor) -> Tensor:
        out = self.rnn(self.inp(x))[0]
        last = self.drop(self.norm(out[-1] if not self.rnn.batch_first else out[:, -1]))
        return self.head(self.bn(last))


def _batches(count: int = 2, steps: int = 20, batch: int = 4, seed: int = 0) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(steps, batch, 3, generator=generator) for _ in range(count)]


def _distance(values: tuple[float, ...], target: float = 0.0) -> float:
    return sum((v - target) ** 2 for v in values) / len(values)


@pytest.mark.parametrize(
    ("kind", "bidirectional"),
    [("rnn", False), ("gru", False), ("lstm", False), ("lstm", True)],
    ids=["rnn", "gru", "lstm", "lstm-bidirectional"],
)
def test_floss_moves_every_layers_exponents_toward_zero(kind: str, bidirectional: bool) -> None:
    torch.manual_seed(0)
    model = Tagger(kind, layers=2, bidirectional=bidirectional)
    with torch.no_grad():  # a strongly contracting start, far from 0, so the move is unmistakable
        for name, p in model.rnn.named_parameters():
            if name.startswith("weight_hh"):
                p.mul_(0.3)
    result = floss(model, _batches(), steps=30, exponents=3, lr=1e-2)
    expected = [
        (layer, d) for layer in range(2) for d in (("forward", "reverse") if bidirectional else ("forward",))
    ]
    assert [(entry.layer, entry.direction) for entry in result.layers] == expected
    assert result.loss_after < 0.5 * result.loss_before
    for entry in result.layers:
        assert len(entry.before) == len(entry.after) == 3
        assert _distance(entry.after) < 0.5 * _distance(entry.before), entry
    assert set(result.parameters) == {f"rnn.{name}" for name, _ in model.rnn.named_parameters()}
    assert "rnn" in result.summary() and "->" in result.summary()


def test_floss_pushes_toward_a_given_target() -> None:
    torch.manual_seed(1)
    model = Tagger("rnn", layers=1)
    result = floss(model, _batches(), steps=40, exponents=2, lr=1e-2, target=-0.2)
    (entry,) = result.layers
    assert _distance(entry.after, -0.2) < 0.5 * _distance(entry.before, -0.2)


def test_other_parameters_buffers_grads_modes_and_the_global_rng_are_untouched() -> None:
    torch.manual_seed(2)
    model = Tagger("lstm", layers=2)
    model.train()
    model.eval_flag = None  # type: ignore[assignment]  # an arbitrary attribute must survive too
    model.head.weight.grad = torch.full_like(model.head.weight, 7.0)
    model.rnn.weight_hh_l0.grad = torch.full_like(model.rnn.weight_hh_l0, 3.0)
    others = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("rnn.")}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    recurrent = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("rnn.")}
    rng = torch.random.get_rng_state()
    floss(model, iter(_batches(3)), steps=5, exponents=2)
    assert torch.equal(torch.random.get_rng_state(), rng)
    for name, value in others.items():
        assert torch.equal(dict(model.named_parameters())[name], value), name
    for name, value in buffers.items():
        assert torch.equal(dict(model.named_buffers())[name], value), name
    assert any(not torch.equal(dict(model.named_parameters())[n], v) for n, v in recurrent.items())
    assert torch.equal(model.head.weight.grad, torch.full_like(model.head.weight, 7.0))
    assert torch.equal(model.rnn.weight_hh_l0.grad, torch.full_like(model.rnn.weight_hh_l0, 3.0))
    assert model.rnn.bias_hh_l1.grad is None
    assert all(m.training for m in model.modules())


def test_batch_first_and_unbatched_inputs_read_the_same_spectrum_as_time_major() -> None:
    torch.manual_seed(3)
    time_major = Tagger("gru", layers=1)
    batch_first = Tagger("gru", layers=1, batch_first=True)
    batch_first.load_state_dict(time_major.state_dict())
    batch = _batches(1)[0]
    first = floss(time_major, batch, steps=0, exponents=2).layers[0].before
    second = floss(batch_first, batch.transpose(0, 1), steps=0, exponents=2).layers[0].before
    assert first == pytest.approx(second, abs=1e-5)
    rnn = nn.RNN(3, 5)
    single = floss(rnn, batch[:, :1].squeeze(1), steps=0, exponents=2).layers[0].before
    assert len(single) == 2


def test_initial_state_and_keyword_batches_are_used() -> None:
    """A batch (x, h0) is read with its h0: a large h0 saturates tanh, a different spectrum."""
    torch.manual_seed(4)
    rnn = nn.RNN(3, 6)
    x = _batches(1, steps=4)[0]
    zero = floss(rnn, (x,), steps=0, exponents=2).layers[0].before
    saturated = floss(rnn, (x, torch.full((1, 4, 6), 30.0)), steps=0, exponents=2).layers[0].before
    keyword = (
        floss(rnn, {"input": x, "hx": torch.full((1, 4, 6), 30.0)}, steps=0, exponents=2).layers[0].before
    )
    assert zero != pytest.approx(saturated, abs=1e-3)
    assert saturated == pytest.approx(keyword)


def test_unsupported_models_get_a_clear_error() -> None:
    with pytest.raises(FlossError, match=r"at least one torch\.nn\.RNN, nn\.GRU or nn\.LSTM"):
        floss(nn.Sequential(nn.Linear(3, 3)), _batches())
    with pytest.raises(FlossError, match=r"cell \(LSTMCell\).*cannot floss"):
        floss(nn.ModuleDict({"cell": nn.LSTMCell(3, 4)}), _batches())
    with pytest.raises(FlossError, match=r"torch\.nn\.Module"):
        floss("model", _batches())  # type: ignore[arg-type]
    rnn = nn.LSTM(3, 4)
    packed = nn.utils.rnn.pack_padded_sequence(_batches(1)[0], [20, 20, 20, 20])
    with pytest.raises(FlossError, match="PackedSequence"):
        floss(rnn, (packed,), steps=1)
    with pytest.raises(FlossError, match="empty"):
        floss(rnn, [], steps=1)
    with pytest.raises(FlossError, match="steps must be"):
        floss(rnn, _batches(), steps=-1)
    with pytest.raises(FlossError, match="lr must be"):
        floss(rnn, _batches(), lr=0.0)
    with pytest.raises(FlossError, match="transient"):
        floss(rnn, _batches(), steps=1, transient=20)
    frozen = nn.GRU(3, 4).requires_grad_(False)
    with pytest.raises(FlossError, match="no trainable parameters"):
        floss(frozen, _batches())


def test_a_model_with_a_cell_beside_an_rnn_flosses_the_rnn_and_warns_once() -> None:
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.GRU(3, 4)
            self.decoder = nn.GRUCell(4, 4)

        def forward(self, x: Tensor) -> Tensor:
            out, h = self.encoder(x)
            return self.decoder(out[-1], h[0])

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = floss(Mixed(), _batches(), steps=1, exponents=2)
    assert [str(w.message) for w in caught if "decoder" in str(w.message)]
    assert [entry.module for entry in result.layers] == ["encoder"]


def test_floss_is_public() -> None:
    assert gradwatch.floss is floss
    assert "floss" in gradwatch.__all__ and "FlossResult" in gradwatch.__all__


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_the_flossing_exponents_are_the_qr_of_the_dense_product_and_their_gradient_is_exact(
    kind: str,
) -> None:
    """What floss differentiates: sum_t log|diag R_t| / T of the layer's own trajectory equals log|diag R|
    of torch.linalg.qr of the dense jacrev product times the same start frame, and autograd's gradient of
    it in the parameters passes torch.autograd.gradcheck (float64, through the trajectory and every QR)."""
    torch.manual_seed(5)
    module = KINDS[kind](2, 3).double()
    weights = _layer_weights(module, "rnn_tanh" if kind == "rnn" else kind, 0, "forward")  # type: ignore[arg-type]
    steps, batch = 5, 2
    x = torch.randn(steps, batch, 2, dtype=torch.float64)
    s0 = 0.1 * torch.randn(batch, weights.state_size, dtype=torch.float64)
    frame, _ = orthonormalise(torch.randn(batch, weights.state_size, 2, dtype=torch.float64))
    run = _run_layer(weights, x, s0, frame, transient=0)
    for b in range(batch):
        product = torch.eye(weights.state_size, dtype=torch.float64)
        for t in range(steps):
            step = torch.func.jacrev(lambda s, t=t, b=b: cell_step(weights, x[t, b], s))(
                run.s_prev[t, b].detach()
            )
            product = step.detach() @ product
        _, r = torch.linalg.qr(product @ frame[b])
        expected = torch.log(torch.diagonal(r).abs()) / steps
        assert run.exponents[b].detach().tolist() == pytest.approx(expected.tolist(), abs=1e-10)

    def exponents_of(weight_hh: Tensor, bias_ih: Tensor) -> Tensor:
        live = dataclasses.replace(weights, weight_hh=weight_hh, bias_ih=bias_ih)
        return _run_layer(live, x, s0, frame, transient=1).exponents

    inputs = (weights.weight_hh.detach().clone(), weights.bias_ih.detach().clone())  # type: ignore[union-attr]
    inputs = tuple(t.requires_grad_(True) for t in inputs)
    assert torch.autograd.gradcheck(exponents_of, inputs, eps=1e-6, atol=1e-6)

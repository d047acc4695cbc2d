"""Real training code nobody here wrote, in the shapes its authors wrote it: PyTorch's seq2seq translation
tutorial (an attention decoder stepping nn.GRU one token at a time), its two char-RNN tutorials (hand-written
cells whose forward returns ``(output, hidden)``), salesforce/awd-lstm-lm's WeightDrop (which calls
``self.module.forward``) and its NT-ASGD switch (a new torch.optim.ASGD mid-run).

Each pattern is measured or told (one warning, ``unknown``), checked against exact Jacobians written out
here (torch.func.jacrev through torch's own modules + matrix_norm(ord=2)), and leaves the user's losses and
gradients bit for bit as they are without gradwatch.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gradwatch
from gradwatch.policy.alerts import GradWatchWarning
from gradwatch.records import Measurement

EXACT = gradwatch.EstimatorSettings(rtol=1e-12)  # iterate to convergence: compared with exact norms
SOS_TOKEN = 0

pytestmark = pytest.mark.usefixtures("one_thread")


# --- the seq2seq translation tutorial (intermediate_source/seq2seq_translation_tutorial.py) --------------


class EncoderRNN(nn.Module):
    def __init__(self, input_size: int, hidden_size: int, dropout_p: float = 0.1) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.embedding = nn.Embedding(input_size, hidden_size)
        self.gru = nn.GRU(hidden_size, hidden_size, batch_first=True)
        self.dropout = nn.Dropout(dropout_p)

    def forward(self, input: Tensor) -> tuple[Tensor, Tensor]:
        embedded = self.dropout(self.embedding(input))
        output, hidden = self.gru(embedded)
        return output, hidden


class BahdanauAttention(nn.Module):
    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.Wa = nn.Linear(hidden_size, hidden_size)
        self.Ua = nn.Linear(hidden_size, hidden_size)
        self.Va = nn.Linear(hidden_size, 1)

    def forward(self, query: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
        scores = self.Va(torch.tanh(self.Wa(query) + self.Ua(keys)))
        scores = scores.squeeze(2).unsqueeze(1)
        weights = F.softmax(scores, dim=-1)
        context = torch.bmm(weights, keys)
        return context, weights


class AttnDecoderRNN(nn.Module):
    def __init__(self, hidden_size: int, output_size: int, max_length: int, dropout_p: float = 0.1) -> None:
        super().__init__()
        self.max_length = max_length
        self.embedding = nn.Embedding(output_size, hidden_size)
        self.attention = BahdanauAttention(hidden_size)
        self.gru = nn.GRU(2 * hidden_size, hidden_size, batch_first=True)
        self.out = nn.Linear(hidden_size, output_size)
        self.dropout = nn.Dropout(dropout_p)

    def forward(
        self, encoder_outputs: Tensor, encoder_hidden: Tensor, target_tensor: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        batch_size = encoder_outputs.size(0)
        decoder_input = torch.empty(batch_size, 1, dtype=torch.long).fill_(SOS_TOKEN)
        decoder_hidden = encoder_hidden
        decoder_outputs = []
        attentions = []
        for i in range(self.max_length):
            decoder_output, decoder_hidden, attn_weights = self.forward_step(
                decoder_input, decoder_hidden, encoder_outputs
            )
            decoder_outputs.append(decoder_output)
            attentions.append(attn_weights)
            if target_tensor is not None:
                decoder_input = target_tensor[:, i].unsqueeze(1)  # Teacher forcing
            else:
                _, topi = decoder_output.topk(1)
                decoder_input = topi.squeeze(-1).detach()
        decoder_outputs_cat = F.log_softmax(torch.cat(decoder_outputs, dim=1), dim=-1)
        return decoder_outputs_cat, decoder_hidden, torch.cat(attentions, dim=1)

    def forward_step(self, input: Tensor, hidden: Tensor, encoder_outputs: Tensor) -> tuple[Tensor, ...]:
        embedded = self.dropout(self.embedding(input))
        query = hidden.permute(1, 0, 2)
        context, attn_weights = self.attention(query, encoder_outputs)
        input_gru = torch.cat((embedded, context), dim=2)
        output, hidden = self.gru(input_gru, hidden)
        output = self.out(output)
        return output, hidden, attn_weights


class Translator(nn.Module):
    """The tutorial trains encoder and decoder with two optimizers; one model here, for one watch()."""

    def __init__(self, words: int = 11, hidden: int = 5, max_length: int = 9) -> None:
        super().__init__()
        self.encoder = EncoderRNN(words, hidden)
        self.decoder = AttnDecoderRNN(hidden, words, max_length)

    def forward(self, input_tensor: Tensor, target_tensor: Tensor | None) -> Tensor:
        encoder_outputs, encoder_hidden = self.encoder(input_tensor)
        decoder_outputs, _, _ = self.decoder(encoder_outputs, encoder_hidden, target_tensor)
        return decoder_outputs


def translation_batches(
    steps: int, batch: int = 3, words: int = 11, length: int = 9
) -> list[tuple[Tensor, ...]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (
            torch.randint(1, words, (batch, 6), generator=generator),
            torch.randint(1, words, (batch, length), generator=generator),
        )
        for _ in range(steps)
    ]


def train_translator(
    monitored: bool, *, teacher_forcing: bool = True, steps: int = 3, **options: Any
) -> tuple[list[float], list[Tensor], list[Measurement], Translator]:
    torch.manual_seed(0)
    model = Translator().double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = gradwatch.watch(model, optimizer, **options) if monitored else None
    losses, records = [], []
    for input_tensor, target_tensor in translation_batches(steps):
        optimizer.zero_grad()
        decoder_outputs = model(input_tensor, target_tensor if teacher_forcing else None)
        loss = F.nll_loss(decoder_outputs.view(-1, decoder_outputs.size(-1)), target_tensor.view(-1))
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    if monitor is not None:
        records = [r for r in monitor.history if isinstance(r, Measurement)]
        monitor.close()
    return losses, [p.detach().clone() for p in model.parameters()], records, model


def gru_step_function(gru: nn.GRU) -> Callable[[Tensor, Tensor], Tensor]:
    """h_t = gru(x_t, h_{t-1}) for one sequence and one token, through torch's own nn.GRU."""
    return lambda x, h: gru(x.view(1, 1, -1), h.view(1, 1, -1))[1].view(-1)


def exact_chain_metrics(
    step: Callable[[Tensor, Tensor], Tensor], inputs: Tensor, h0: Tensor
) -> dict[str, Any]:
    """Dense J_t by jacrev along s_t = step(x_t, s_{t-1}) for every sequence (inputs (T, B, I), h0 (B, D)):
    sigma_max per step, the median lag norms over sequences and the top Lyapunov exponent."""
    steps, batch = inputs.shape[:2]
    jacobians = []
    with torch.enable_grad():
        for b in range(batch):
            h, per_step = h0[b], []
            for t in range(steps):
                per_step.append(torch.func.jacrev(lambda s, x=inputs[t, b]: step(x, s))(h).detach())
                h = step(inputs[t, b], h).detach()
            jacobians.append(torch.stack(per_step))
    jac = torch.stack(jacobians, dim=1)  # (T, B, D, D)
    sigmas = torch.linalg.matrix_norm(jac, ord=2)
    lags = [2**k for k in range(steps.bit_length()) if 2**k < steps] + [steps]
    lag_norms, product = {}, torch.eye(jac.shape[-1], dtype=jac.dtype).expand(batch, -1, -1)
    for tau in range(1, steps + 1):
        product = product @ jac[steps - tau]
        if tau in lags:
            lag_norms[str(tau)] = float(torch.linalg.matrix_norm(product, ord=2).median())
    lyapunov = torch.log(torch.linalg.matrix_norm(product, ord=2)) / steps
    return {"sigmas": sigmas, "lag_norm": lag_norms, "lyapunov_max": float(lyapunov.median())}


def assert_matches_exact(record: Measurement, exact: dict[str, Any], rel: float = 1e-6) -> None:
    m = record.metrics
    sigmas = exact["sigmas"]
    assert m.time_steps == sigmas.shape[0]
    assert m.jacobian_sigma_max_mean == pytest.approx(float(sigmas.mean()), rel=rel)
    assert m.jacobian_sigma_max_max == pytest.approx(float(sigmas.max()), rel=rel)
    assert m.jacobian_sigma_max_min == pytest.approx(float(sigmas.min()), rel=rel)
    assert m.lag_norm.keys() == exact["lag_norm"].keys()
    for tau, value in exact["lag_norm"].items():
        assert m.lag_norm[tau] == pytest.approx(value, rel=1e-5), tau
    assert m.lyapunov_max == pytest.approx(exact["lyapunov_max"], rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("teacher_forcing", [True, False], ids=["teacher-forcing", "own-predictions"])
def test_a_decoder_stepped_one_token_at_a_time_is_measured_as_one_sequence(teacher_forcing: bool) -> None:
    """The tutorial's decoder calls nn.GRU once per token: the calls chain into one 9-step sequence whose
    step norms, lag products and Lyapunov exponent match jacrev along the decoded sequence."""
    torch.manual_seed(0)
    model = Translator().double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    calls: list[tuple[Tensor, Tensor]] = []
    spy = model.decoder.gru.register_forward_hook(
        lambda m, a, o: calls.append((a[0].detach(), a[1].detach()))
    )
    input_tensor, target_tensor = translation_batches(1)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradWatchWarning)  # a chained decoder needs no warning
        with gradwatch.watch(model, optimizer, every=1, probe="live", estimator=EXACT, background=False) as m:
            optimizer.zero_grad()
            out = model(input_tensor, target_tensor if teacher_forcing else None)
            F.nll_loss(out.view(-1, out.size(-1)), target_tensor.view(-1)).backward()
            weights = {n: p.detach().clone() for n, p in model.decoder.gru.named_parameters()}
            optimizer.step()
            records = {r.module: r for r in m.history if isinstance(r, Measurement)}
    spy.remove()
    assert set(records) == {"encoder.gru", "decoder.gru"}
    reference = nn.GRU(10, 5, batch_first=True).double()
    reference.load_state_dict(weights)
    inputs = torch.stack([x[:, 0] for x, _h in calls])  # (9, B, 2H): what the decoder fed each call
    exact = exact_chain_metrics(gru_step_function(reference), inputs, calls[0][1][0])
    assert_matches_exact(records["decoder.gru"], exact)
    assert records["decoder.gru"].metrics.time_steps == 9 and len(calls) == 9


def test_the_decoder_trains_bit_for_bit_as_without_gradwatch() -> None:
    bare_losses, bare_params, _, _ = train_translator(False)
    losses, params, records, _ = train_translator(True, every=1, background=False)
    assert losses == bare_losses
    assert all(torch.equal(a, b) for a, b in zip(params, bare_params, strict=True))
    assert {r.metrics.time_steps for r in records if r.module == "decoder.gru"} == {9}


class UnchainedDecoder(nn.Module):
    """A decoder that re-normalises its state between calls: no call starts from a state a call returned."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(3, 4)

    def forward(self, x: Tensor) -> Tensor:
        hidden = torch.zeros(1, x.shape[1], 4)
        outputs = []
        for t in range(x.shape[0]):
            output, hidden = self.gru(x[t : t + 1], hidden)
            hidden = hidden / (1 + hidden.norm())
            outputs.append(output)
        return torch.cat(outputs)


@pytest.mark.parametrize("probe", ["fixed", "live"])
def test_calls_that_are_not_chained_are_said_once_with_the_model_named(probe: str) -> None:
    torch.manual_seed(0)
    model = UnchainedDecoder()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradwatch.watch(model, optimizer, every=1, probe=probe, background=False) as monitor:
            for _ in range(3):
                optimizer.zero_grad()
                model(torch.randn(6, 2, 3)).pow(2).mean().backward()
                optimizer.step()
            records = [r for r in monitor.history if isinstance(r, Measurement)]
    messages = [str(w.message) for w in caught if issubclass(w.category, GradWatchWarning)]
    said = [m for m in messages if "not chained" in m]
    assert len(said) == 1
    assert "gru (GRU) of UnchainedDecoder (run " in said[0] and "called 6 times" in said[0]
    assert "verdict is unknown" in said[0] and "no Lyapunov exponent" not in said[0]
    assert records and all(r.metrics.time_steps == 1 and r.metrics.lag_norm == {} for r in records)

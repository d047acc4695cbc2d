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

# every pair and every lag iterated to convergence: compared with exact norms
EXACT = gradwatch.EstimatorSettings(mode="full", rtol=1e-12)
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
    sigma_max per step, the mean lag norms over sequences and the top Lyapunov exponent."""
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
            lag_norms[str(tau)] = float(torch.linalg.matrix_norm(product, ord=2).mean())
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


# --- the char-RNN tutorials (char_rnn_classification_tutorial.py, char_rnn_generation_tutorial.py) ------

N_LETTERS, N_HIDDEN, N_CATEGORIES = 7, 6, 3


class ClassifierRNN(nn.Module):
    """char_rnn_classification_tutorial.py's ``RNN``: forward(input, hidden) -> (output, hidden)."""

    def __init__(self, input_size: int, hidden_size: int, output_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.i2h = nn.Linear(input_size + hidden_size, hidden_size)
        self.i2o = nn.Linear(input_size + hidden_size, output_size)
        self.softmax = nn.LogSoftmax(dim=1)

    def forward(self, input: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor]:
        combined = torch.cat((input, hidden), 1)
        hidden = self.i2h(combined)
        output = self.i2o(combined)
        output = self.softmax(output)
        return output, hidden

    def initHidden(self) -> Tensor:
        return torch.zeros(1, self.hidden_size, dtype=torch.float64)


class GeneratorRNN(nn.Module):
    """char_rnn_generation_tutorial.py's ``RNN``: forward(category, input, hidden) -> (output, hidden)."""

    def __init__(self, input_size: int, hidden_size: int, output_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.i2h = nn.Linear(N_CATEGORIES + input_size + hidden_size, hidden_size)
        self.i2o = nn.Linear(N_CATEGORIES + input_size + hidden_size, output_size)
        self.o2o = nn.Linear(hidden_size + output_size, output_size)
        self.dropout = nn.Dropout(0.1)
        self.softmax = nn.LogSoftmax(dim=1)

    def forward(self, category: Tensor, input: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor]:
        input_combined = torch.cat((category, input, hidden), 1)
        hidden = self.i2h(input_combined)
        output = self.i2o(input_combined)
        output_combined = torch.cat((hidden, output), 1)
        output = self.o2o(output_combined)
        output = self.dropout(output)
        output = self.softmax(output)
        return output, hidden

    def initHidden(self) -> Tensor:
        return torch.zeros(1, self.hidden_size, dtype=torch.float64)


def one_hot(index: int, size: int) -> Tensor:
    tensor = torch.zeros(1, size, dtype=torch.float64)
    tensor[0][index] = 1
    return tensor


def char_examples(count: int, length: int = 5) -> list[tuple[Tensor, Tensor, Tensor]]:
    """(category, line (T, 1, letters), targets) as the tutorials' randomTrainingExample builds them."""
    generator = torch.Generator().manual_seed(3)
    out = []
    for _ in range(count):
        category = int(torch.randint(N_CATEGORIES, (1,), generator=generator))
        letters = torch.randint(N_LETTERS, (length,), generator=generator)
        line = torch.stack([one_hot(int(i), N_LETTERS) for i in letters])
        targets = torch.cat([letters[1:], torch.tensor([N_LETTERS - 1])])
        out.append((torch.tensor([category]), line, targets))
    return out


def train_char_rnn(
    kind: str, registration: dict[str, Any] | None, steps: int = 3, **options: Any
) -> tuple[
    list[float], list[Tensor], list[Measurement], list[tuple[Tensor, Tensor]], list[dict[str, Tensor]]
]:
    """The tutorials' train(): zero_grad, one call per letter, backward, p.data.add_(-lr * grad); with
    gradwatch, the one watch() line and monitor.step() (there is no optimizer). Returns the losses, the
    final parameters, the records, the (x_t, hidden) each call was given and the parameters at each step."""
    torch.manual_seed(0)
    cls = ClassifierRNN if kind == "classification" else GeneratorRNN
    rnn = cls(N_LETTERS, N_HIDDEN, N_CATEGORIES if kind == "classification" else N_LETTERS).double()
    if registration is not None:
        gradwatch.register_cell(cls, **registration)
    criterion = nn.NLLLoss()
    losses, calls, weights = [], [], []
    spy = rnn.register_forward_hook(lambda m, a, o: calls.append((a[-2].detach(), a[-1].detach())))
    try:
        monitor = gradwatch.watch(rnn, **options) if registration is not None else None
        for category_index, line, targets in char_examples(steps):
            hidden = rnn.initHidden()
            rnn.zero_grad()
            weights.append({n: p.detach().clone() for n, p in rnn.named_parameters()})
            if kind == "classification":
                for i in range(line.size()[0]):
                    output, hidden = rnn(line[i], hidden)
                loss = criterion(output, category_index)
            else:
                category = one_hot(int(category_index), N_CATEGORIES)
                loss = torch.zeros((), dtype=torch.float64)
                for i in range(line.size()[0]):
                    output, hidden = rnn(category, line[i], hidden)
                    loss = loss + criterion(output, targets[i : i + 1])
            loss.backward()
            if monitor is not None:
                monitor.step()
            for p in rnn.parameters():
                p.data.add_(p.grad.data, alpha=-0.005)
            losses.append(loss.item())
        records = [] if monitor is None else [r for r in monitor.history if isinstance(r, Measurement)]
        if monitor is not None:
            monitor.close()
    finally:
        spy.remove()
        gradwatch.unregister_cell(cls)
    return losses, [p.detach().clone() for p in rnn.parameters()], records, calls, weights


CHAR_RNN_REGISTRATIONS = [
    ("classification", {"returns": 1}),
    ("classification", {"state": "hidden", "returns": "hidden"}),
    ("classification", {"step": lambda cell, x, hidden: cell(x, hidden)[1]}),
    ("generation", {"state": "hidden", "returns": "hidden"}),
    ("generation", {"state": 2, "returns": 1}),
]


@pytest.mark.parametrize(
    ("kind", "registration"),
    CHAR_RNN_REGISTRATIONS,
    ids=[
        "classify-returns1",
        "classify-by-name",
        "classify-step",
        "generate-by-name",
        "generate-by-position",
    ],
)
def test_the_char_rnn_tutorials_are_measured_exactly(kind: str, registration: dict[str, Any]) -> None:
    """Step norms and lag products of the tutorials' RNN classes against jacrev of d hidden_t / d hidden_{t-1}
    through the class itself, at the recorded inputs; losses and weights bit for bit as without gradwatch."""
    bare_losses, bare_params, _, _, _ = train_char_rnn(kind, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradWatchWarning)
        losses, params, records, calls, weights = train_char_rnn(
            kind, registration, every=1, probe="live", estimator=EXACT
        )
    assert losses == bare_losses
    assert all(torch.equal(a, b) for a, b in zip(params, bare_params, strict=True))
    assert [r.step for r in records] == [0, 1, 2]
    length = 5
    for record in records:
        reference = (ClassifierRNN if kind == "classification" else GeneratorRNN)(
            N_LETTERS, N_HIDDEN, N_CATEGORIES if kind == "classification" else N_LETTERS
        ).double()
        reference.load_state_dict(weights[record.step])
        reference.eval()
        step_calls = calls[record.step * length : (record.step + 1) * length]
        category = one_hot(int(char_examples(3)[record.step][0]), N_CATEGORIES)[0]

        def step(
            x: Tensor, h: Tensor, reference: nn.Module = reference, category: Tensor = category
        ) -> Tensor:
            if kind == "classification":
                return reference(x[None], h[None])[1][0]
            return reference(category[None], x[None], h[None])[1][0]

        inputs = torch.stack([x for x, _h in step_calls])  # (T, 1, letters)
        exact = exact_chain_metrics(step, inputs, step_calls[0][1])
        assert_matches_exact(record, exact)


def test_a_hand_written_rnn_registered_plainly_is_told_which_names_to_give() -> None:
    """The documented first try: register_cell(RNN) on forward(category, input, hidden) -> (output, hidden)
    fails at the first capture with one warning that names state= and returns=."""
    with pytest.warns(
        GradWatchWarning, match=r"register_cell\(GeneratorRNN, state='hidden', returns='hidden'\)"
    ):
        _, _, records, _, _ = train_char_rnn("generation", {}, every=1)
    assert records == []


def test_register_cell_rejects_malformed_state_and_returns() -> None:
    with pytest.raises(TypeError, match="argument position"):
        gradwatch.register_cell(ClassifierRNN, state=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not both"):
        gradwatch.register_cell(ClassifierRNN, state=1, state_first=True)
    gradwatch.unregister_cell(ClassifierRNN)


# --- #30 item 10: a user cell whose forward updates a buffer -------------------------------------------


class CountingCell(nn.Module):
    """Counts its calls in a buffer and an attribute, and lets the count shape what it computes."""

    def __init__(self) -> None:
        super().__init__()
        self.x2h = nn.Linear(3, 4)
        self.h2h = nn.Linear(4, 4)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.attribute_calls = 0

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        with torch.no_grad():
            self.calls += 1
        self.attribute_calls += 1
        return torch.tanh(self.x2h(x) + self.h2h(h) * (1 + 1e-3 * self.calls))


class CountingModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cell = CountingCell()

    def forward(self, x: Tensor) -> Tensor:
        h = x.new_zeros(x.shape[1], 4)
        for t in range(x.shape[0]):
            h = self.cell(x[t], h)
        return h.pow(2).mean()


@pytest.mark.parametrize("background", [False, True])
def test_a_cell_that_counts_its_calls_trains_bit_for_bit_as_without_gradwatch(background: bool) -> None:
    def run(monitored: bool) -> tuple[list[float], int, int, int]:
        torch.manual_seed(0)
        model = CountingModel()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        gradwatch.register_cell(CountingCell)
        measured = 0
        try:
            monitor = gradwatch.watch(model, optimizer, every=1, background=background) if monitored else None
            losses = []
            generator = torch.Generator().manual_seed(5)
            for _ in range(4):
                optimizer.zero_grad()
                loss = model(torch.randn(6, 2, 3, generator=generator))
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
            if monitor is not None:
                measured = len([r for r in monitor.history if isinstance(r, Measurement)])
                monitor.close()
        finally:
            gradwatch.unregister_cell(CountingCell)
        return losses, int(model.cell.calls), model.cell.attribute_calls, measured

    bare_losses, bare_calls, bare_attribute, _ = run(False)
    losses, calls, attribute, measured = run(True)
    assert (losses, calls, attribute) == (bare_losses, bare_calls, bare_attribute)
    assert calls == 24 and measured == 4


# --- salesforce/awd-lstm-lm: WeightDrop (weight_drop.py), RNNModel (model.py), NT-ASGD (main.py) --------


class WeightDrop(nn.Module):
    """weight_drop.py's WeightDrop: the raw weight on the wrapped module, ``self.module.forward(*args)``."""

    def __init__(self, module: nn.Module, weights: list[str], dropout: float = 0, variational: bool = False):
        super().__init__()
        self.module = module
        self.weights = weights
        self.dropout = dropout
        self.variational = variational
        self._setup()

    def widget_demagnetizer_y2k_edition(*args: Any, **kwargs: Any) -> None:
        return

    def _setup(self) -> None:
        if issubclass(type(self.module), torch.nn.RNNBase):
            self.module.flatten_parameters = self.widget_demagnetizer_y2k_edition
        for name_w in self.weights:
            w = getattr(self.module, name_w)
            del self.module._parameters[name_w]
            self.module.register_parameter(name_w + "_raw", nn.Parameter(w.data))

    def _setweights(self) -> None:
        for name_w in self.weights:
            raw_w = getattr(self.module, name_w + "_raw")
            w = torch.nn.functional.dropout(raw_w, p=self.dropout, training=self.training)
            setattr(self.module, name_w, w)

    def forward(self, *args: Any) -> Any:
        self._setweights()
        return self.module.forward(*args)


class AwdRNNModel(nn.Module):
    """model.py's RNNModel (LSTM, wdrop > 0), without its embedding and locked dropouts."""

    def __init__(self, ntoken: int = 13, ninp: int = 4, nhid: int = 5, nlayers: int = 2, wdrop: float = 0.5):
        super().__init__()
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnns = [
            torch.nn.LSTM(ninp if i == 0 else nhid, nhid if i != nlayers - 1 else ninp, 1, dropout=0)
            for i in range(nlayers)
        ]
        self.rnns = [WeightDrop(rnn, ["weight_hh_l0"], dropout=wdrop) for rnn in self.rnns]
        self.rnns = torch.nn.ModuleList(self.rnns)
        self.decoder = nn.Linear(ninp, ntoken)
        self.ninp, self.nhid, self.nlayers = ninp, nhid, nlayers

    def forward(self, input: Tensor, hidden: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, list]:
        raw_output = self.encoder(input)
        new_hidden = []
        for i, rnn in enumerate(self.rnns):
            raw_output, new_h = rnn(raw_output, hidden[i])
            new_hidden.append(new_h)
        result = self.decoder(raw_output.view(raw_output.size(0) * raw_output.size(1), raw_output.size(2)))
        return result, new_hidden

    def init_hidden(self, bsz: int) -> list[tuple[Tensor, Tensor]]:
        weight = next(self.parameters()).data
        return [
            (
                weight.new(1, bsz, self.nhid if i != self.nlayers - 1 else self.ninp).zero_(),
                weight.new(1, bsz, self.nhid if i != self.nlayers - 1 else self.ninp).zero_(),
            )
            for i in range(self.nlayers)
        ]


def repackage_hidden(h: Any) -> Any:
    if isinstance(h, Tensor):
        return h.detach()
    return tuple(repackage_hidden(v) for v in h)


def train_awd(
    monitored: bool, *, steps: int = 6, switch_at: int | None = None, spy: bool = False, **options: Any
) -> dict[str, Any]:
    """main.py's train(): repackage_hidden, zero_grad, forward, backward, clip_grad_norm_, step; at
    ``switch_at`` the NT-ASGD switch: ``optimizer = torch.optim.ASGD(model.parameters(), t0=0, lambd=0.)``."""
    torch.manual_seed(0)
    model = AwdRNNModel().double()
    optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=1.0, weight_decay=1.2e-6)
    monitor = gradwatch.watch(model, optimizer, **options) if monitored else None
    calls: list[dict[str, Any]] = []
    if spy:
        for index, rnn in enumerate(model.rnns):
            rnn.register_forward_hook(
                lambda m, a, o, index=index: calls.append(
                    {
                        "layer": index,
                        "x": a[0].detach(),
                        "h0": tuple(t.detach() for t in a[1]),
                        "weights": {
                            **{n: p.detach().clone() for n, p in m.module.named_parameters()},
                            "weight_hh_l0": m.module.weight_hh_l0.detach().clone(),
                        },
                    }
                )
            )
    generator = torch.Generator().manual_seed(2)
    data = torch.randint(13, (60, 2), generator=generator)
    hidden = model.init_hidden(2)
    losses = []
    for i in range(steps):
        if switch_at is not None and i == switch_at:
            optimizer = torch.optim.ASGD(model.parameters(), lr=1.0, t0=0, lambd=0.0, weight_decay=1.2e-6)
        model.train()
        batch, targets = data[i * 7 : i * 7 + 7], data[i * 7 + 1 : i * 7 + 8]
        hidden = repackage_hidden(hidden)
        optimizer.zero_grad()
        output, hidden = model(batch, hidden)
        loss = F.cross_entropy(output, targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        optimizer.step()
        losses.append(loss.item())
    out: dict[str, Any] = {"losses": losses, "params": [p.detach().clone() for p in model.parameters()]}
    out["calls"] = calls
    if monitor is not None:
        out["history"] = list(monitor.history)
        out["step"] = monitor.current_step
        monitor.close()
    return out


def lstm_step_function(weights: dict[str, Tensor], hidden: int) -> Callable[[Tensor, Tensor], Tensor]:
    """s_t = [h_t; c_t] of one nn.LSTM step with these weights (the dropped W_hh), through torch's nn.LSTM."""
    lstm = nn.LSTM(weights["weight_ih_l0"].shape[1], hidden).double()
    with torch.no_grad():
        for name, value in weights.items():
            getattr(lstm, name.removesuffix("_raw")).copy_(value)

    def step(x: Tensor, s: Tensor) -> Tensor:
        _, (h, c) = lstm(x.view(1, 1, -1), (s[:hidden].view(1, 1, -1), s[hidden:].view(1, 1, -1)))
        return torch.cat([h.view(-1), c.view(-1)])

    return step


def test_weight_drop_calling_module_forward_is_measured_at_the_dropped_weights() -> None:
    """WeightDrop's ``self.module.forward(*args)`` fires no hook of the LSTM: the wrapper's call is taken as
    the LSTM's, at the dropped W_hh it set, and checked against jacrev through nn.LSTM with those weights."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradWatchWarning)
        run = train_awd(True, steps=2, spy=True, every=1, probe="live", estimator=EXACT, background=False)
    records = [r for r in run["history"] if isinstance(r, Measurement)]
    assert {(r.step, r.module) for r in records} == {(s, f"rnns.{i}.module") for s in (0, 1) for i in (0, 1)}
    for record in records:
        call = run["calls"][record.step * 2 + int(record.module.split(".")[1])]
        hidden = call["h0"][0].shape[-1]
        step = lstm_step_function(call["weights"], hidden)
        h0 = torch.cat([call["h0"][0][0], call["h0"][1][0]], dim=-1)
        assert_matches_exact(record, exact_chain_metrics(step, call["x"], h0))
        assert set(record.metrics.grad_norm) >= {"weight_hh_l0_raw", "weight_ih_l0"}


def test_weight_drop_trains_bit_for_bit_as_without_gradwatch() -> None:
    bare = train_awd(False)
    watched = train_awd(True, every=1)
    assert watched["losses"] == bare["losses"]
    assert all(torch.equal(a, b) for a, b in zip(watched["params"], bare["params"], strict=True))
    assert len([r for r in watched["history"] if isinstance(r, Measurement)]) == 6 * 2


class HiddenForwardModel(nn.Module):
    """Calls its LSTM's .forward itself, with arguments that are not its own: nothing gradwatch can follow."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Embedding(9, 3)
        self.rnn = nn.LSTM(3, 4)
        self.head = nn.Linear(4, 9)

    def forward(self, tokens: Tensor) -> Tensor:
        out, _ = self.rnn.forward(self.encoder(tokens))
        return self.head(out)


@pytest.mark.parametrize(
    ("every", "steps", "told_at"),
    [(2, 7, 2), (50, 3, 2)],
    ids=["at-the-second-measured-step", "at-close-of-a-short-run"],
)
def test_a_module_never_recorded_while_training_goes_on_is_told_once(
    tmp_path: Any, every: int, steps: int, told_at: int
) -> None:
    from click.testing import CliRunner

    from gradwatch.cli import main
    from gradwatch.records import ErrorRecord

    torch.manual_seed(0)
    model = HiddenForwardModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    log = tmp_path / "run.jsonl"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradwatch.watch(model, optimizer, every=every, log=log, background=False) as monitor:
            for _ in range(steps):
                optimizer.zero_grad()
                tokens = torch.randint(9, (5, 2))
                F.cross_entropy(model(tokens).view(-1, 9), tokens.view(-1)).backward()
                optimizer.step()
        history = list(monitor.history)
    told = [str(w.message) for w in caught if "not recorded" in str(w.message)]
    assert len(told) == 1
    assert "rnn (LSTM) of HiddenForwardModel (run " in told[0] and ".forward(...)" in told[0]
    assert "verdict is unknown" in told[0]
    (error,) = [r for r in history if isinstance(r, ErrorRecord)]
    assert error.module == "rnn" and error.step == told_at
    text = CliRunner().invoke(main, ["report", str(log)], catch_exceptions=False).stdout
    assert "probably stopped" not in text and "not recorded" in text


def test_the_nt_asgd_switch_is_followed_and_every_step_measured() -> None:
    """main.py replaces SGD by a new torch.optim.ASGD over model.parameters() mid-run: the monitor follows
    it (the step counter goes on, every step is measured) and training is bit for bit as without it."""
    bare = train_awd(False, switch_at=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradWatchWarning)
        watched = train_awd(True, switch_at=3, every=1, background=False)
    assert watched["losses"] == bare["losses"]
    assert all(torch.equal(a, b) for a, b in zip(watched["params"], bare["params"], strict=True))
    assert watched["step"] == 6
    steps = sorted({r.step for r in watched["history"] if isinstance(r, Measurement)})
    assert steps == [0, 1, 2, 3, 4, 5]


def test_two_optimizers_over_different_modules_are_never_swapped() -> None:
    """The seq2seq tutorial steps an encoder and a decoder optimizer: only the one given to watch() closes
    the steps, so each training step is counted once."""
    torch.manual_seed(0)
    model = Translator().double()
    encoder_optimizer = torch.optim.SGD(model.encoder.parameters(), lr=0.1)
    decoder_optimizer = torch.optim.SGD(model.decoder.parameters(), lr=0.1)
    with (
        warnings.catch_warnings(),
        gradwatch.watch(model, encoder_optimizer, every=1, background=False) as monitor,
    ):
        warnings.simplefilter("error", GradWatchWarning)  # the decoder's steps are no stray steps
        for input_tensor, target_tensor in translation_batches(3):
            encoder_optimizer.zero_grad()
            decoder_optimizer.zero_grad()
            out = model(input_tensor, target_tensor)
            F.nll_loss(out.view(-1, out.size(-1)), target_tensor.view(-1)).backward()
            encoder_optimizer.step()
            decoder_optimizer.step()
        assert monitor.current_step == 3 and monitor.optimizer is encoder_optimizer


class UncopyableCell(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.x2h = nn.Linear(3, 4)
        self.h2h = nn.Linear(4, 4)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        return torch.tanh(self.x2h(x) + self.h2h(h))

    def __deepcopy__(self, memo: dict[int, Any]) -> UncopyableCell:
        raise TypeError("cannot pickle '_thread.lock' object")


def test_a_cell_that_cannot_be_copied_is_disabled_with_one_clear_warning() -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cell = UncopyableCell()

        def forward(self, x: Tensor) -> Tensor:
            h = x.new_zeros(x.shape[1], 4)
            for t in range(x.shape[0]):
                h = self.cell(x[t], h)
            return h.pow(2).mean()

    torch.manual_seed(0)
    model = Model()
    gradwatch.register_cell(UncopyableCell)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        with (
            pytest.warns(GradWatchWarning, match="private copy") as caught,
            gradwatch.watch(model, optimizer, every=1, background=False) as monitor,
        ):
            for _ in range(3):
                optimizer.zero_grad()
                model(torch.randn(5, 2, 3)).backward()
                optimizer.step()
            records = [r for r in monitor.history if isinstance(r, Measurement)]
    finally:
        gradwatch.unregister_cell(UncopyableCell)
    assert records == []
    assert len([w for w in caught if "private copy" in str(w.message)]) == 1
    assert monitor.fault_counts == {"estimator:cell": 1}


def test_an_optimizer_stepping_part_of_the_watched_parameters_instead_is_told_at_once() -> None:
    """A replacement over one layer only is not followed (it would miss the others): gradwatch says after
    two of its steps that the followed optimizer stopped stepping, once."""
    torch.manual_seed(0)
    model = AwdRNNModel().double()
    optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    data = torch.randint(13, (60, 2), generator=torch.Generator().manual_seed(2))
    with (
        warnings.catch_warnings(record=True) as caught,
        gradwatch.watch(model, optimizer, every=1, background=False) as monitor,
    ):
        warnings.simplefilter("always")
        hidden = model.init_hidden(2)
        for i in range(6):
            if i == 2:
                optimizer = torch.optim.ASGD(model.rnns[0].parameters(), lr=1.0, t0=0, lambd=0.0)
            hidden = repackage_hidden(hidden)
            optimizer.zero_grad()
            output, hidden = model(data[i * 7 : i * 7 + 7], hidden)
            F.cross_entropy(output, data[i * 7 + 1 : i * 7 + 8].reshape(-1)).backward()
            optimizer.step()
        step = monitor.current_step
    told = [str(w.message) for w in caught if "has not stepped" in str(w.message)]
    assert step == 2 and len(told) == 1
    assert "does not follow (ASGD) steps watched parameters" in told[0]
    assert "the SGD it counts steps from has not stepped for 2 of its steps" in told[0]


# --- chained calls of every fused kind equal one call on the whole sequence ------------------------------


FUSED_KINDS = {
    "rnn": lambda: nn.RNN(3, 5, num_layers=2),
    "lstm": lambda: nn.LSTM(3, 5, num_layers=2),
    "lstm-proj": lambda: nn.LSTM(3, 5, num_layers=2, proj_size=2),
    "gru-batch-first": lambda: nn.GRU(3, 5, num_layers=2, batch_first=True),
}


class StepByStep(nn.Module):
    """Feeds its RNN one time step per call (teacher forcing), the state carried by hand."""

    def __init__(self, rnn: nn.Module, chunk: int) -> None:
        super().__init__()
        self.rnn, self.chunk = rnn, chunk

    def forward(self, x: Tensor) -> Tensor:  # x: (T, B, I)
        batch_first = getattr(self.rnn, "batch_first", False)
        state, outputs = None, []
        for t in range(0, x.shape[0], self.chunk):
            piece = x[t : t + self.chunk]
            output, state = self.rnn(piece.transpose(0, 1) if batch_first else piece, state)
            outputs.append(output.transpose(0, 1) if batch_first else output)
        return torch.cat(outputs).pow(2).mean()


@pytest.mark.parametrize("kind", list(FUSED_KINDS))
@pytest.mark.parametrize("chunk", [1, 3])
def test_chained_calls_are_measured_as_the_same_module_on_the_whole_sequence(kind: str, chunk: int) -> None:
    """Every layer's record of the step-by-step calls equals the record of one call on the whole sequence
    (the first call starts from no state: zeros, as the one call)."""
    x = torch.randn(9, 2, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def measure(chunk_size: int) -> dict[tuple[int, str], Any]:
        torch.manual_seed(0)
        model = StepByStep(FUSED_KINDS[kind]().double(), chunk_size)
        with gradwatch.watch(model, every=1, probe="live", estimator=EXACT, background=False) as monitor:
            model(x).backward()
            monitor.step()
            return {(r.layer, r.direction): r.metrics for r in monitor.history if isinstance(r, Measurement)}

    chained, whole = measure(chunk), measure(9)
    assert chained.keys() == whole.keys() == {(0, "forward"), (1, "forward")}
    for key, metrics in whole.items():
        assert chained[key].time_steps == metrics.time_steps == 9
        assert chained[key].lag_norm == pytest.approx(metrics.lag_norm, rel=1e-9)
        assert chained[key].jacobian_sigma_max_mean == pytest.approx(
            metrics.jacobian_sigma_max_mean, rel=1e-9
        )
        assert chained[key].lyapunov_max == pytest.approx(metrics.lyapunov_max, rel=1e-9)


class WeightDroppedCellModel(nn.Module):
    """WeightDrop around an nn.LSTMCell stepped in a loop: every step's call goes through .forward."""

    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.cell = WeightDrop(nn.LSTMCell(3, 4), ["weight_hh"], dropout=dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = c = x.new_zeros(x.shape[1], 4)
        for t in range(x.shape[0]):
            h, c = self.cell(x[t], (h, c))
        return h.pow(2).mean()


def test_weight_drop_around_a_cell_in_a_loop_is_measured_exactly() -> None:
    x = torch.randn(6, 2, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)

    def run(monitored: bool) -> tuple[list[float], list[Tensor], list[Measurement], dict[str, Tensor]]:
        torch.manual_seed(0)
        model = WeightDroppedCellModel(dropout=0.0).double()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        weights = {
            n.removesuffix("_raw"): p.detach().clone() for n, p in model.cell.module.named_parameters()
        }
        monitor = (
            gradwatch.watch(model, optimizer, every=1, probe="live", estimator=EXACT, background=False)
            if monitored
            else None
        )
        losses = []
        for _ in range(2):
            optimizer.zero_grad()
            loss = model(x)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        records = [] if monitor is None else [r for r in monitor.history if isinstance(r, Measurement)]
        if monitor is not None:
            monitor.close()
        return losses, [p.detach().clone() for p in model.parameters()], records, weights

    bare_losses, bare_params, _, _ = run(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradWatchWarning)
        losses, params, records, weights = run(True)
    assert losses == bare_losses
    assert all(torch.equal(a, b) for a, b in zip(params, bare_params, strict=True))
    assert [(r.step, r.module, r.metrics.time_steps) for r in records] == [
        (0, "cell.module", 6),
        (1, "cell.module", 6),
    ]
    reference = nn.LSTMCell(3, 4).double()
    reference.load_state_dict(weights)

    def step(x_t: Tensor, s: Tensor) -> Tensor:
        h, c = reference(x_t[None], (s[None, :4], s[None, 4:]))
        return torch.cat([h[0], c[0]])

    assert_matches_exact(records[0], exact_chain_metrics(step, x, torch.zeros(2, 8, dtype=torch.float64)))

"""A character-level LSTM language model, monitored by gradwatch, with clipping (ZClip or a fixed norm).

Trains on any text file; by default on the source of Python's own ``json`` package, so nothing is
downloaded. Each step samples ``--batch`` random windows of ``--seq-len`` characters and predicts every
next character. gradwatch measures every ``--every`` steps, clips before each optimizer step
(``--clip auto`` is ZClip, a number is ``clip_grad_norm_``'s max norm, ``--clip none`` turns it off) and
writes the run log to ``--log``. At the end it prints a short sample of generated text.

Run: ``python3 examples/char_rnn.py --steps 500`` then ``gradwatch report runs/char_rnn.jsonl``.
"""

from __future__ import annotations

import argparse
import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

import gradwatch


@dataclass(frozen=True)
class Corpus:
    """A text as a tensor of character ids, with the vocabulary that maps them back."""

    ids: Tensor
    vocabulary: str

    @classmethod
    def from_text(cls, text: str) -> Corpus:
        if len(text) < 2:
            raise ValueError("the training text needs at least two characters")
        vocabulary = "".join(sorted(set(text)))
        index = {char: i for i, char in enumerate(vocabulary)}
        return cls(torch.tensor([index[char] for char in text]), vocabulary)

    def batch(self, seq_len: int, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Random windows: inputs (batch, seq_len) and the same windows shifted by one character."""
        seq_len = min(seq_len, len(self.ids) - 1)
        starts = torch.randint(0, len(self.ids) - seq_len, (batch_size,), generator=generator)
        windows = torch.stack([self.ids[s : s + seq_len + 1] for s in starts.tolist()])
        return windows[:, :-1], windows[:, 1:]


class CharLSTM(nn.Module):
    """Embedding -> LSTM -> linear logits over the vocabulary."""

    def __init__(self, vocabulary_size: int, embedding: int = 32, hidden: int = 128, layers: int = 1) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary_size, embedding)
        self.lstm = nn.LSTM(embedding, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, vocabulary_size)

    def forward(
        self, ids: Tensor, state: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        out, state = self.lstm(self.embed(ids), state)
        return self.head(out), state


@torch.no_grad()
def sample(model: CharLSTM, corpus: Corpus, length: int, generator: torch.Generator) -> str:
    """Generate ``length`` characters, starting from the text's first character (temperature 0.8)."""
    model.eval()
    ids = corpus.ids[:1].view(1, 1)
    state = None
    out = []
    for _ in range(length):
        logits, state = model(ids, state)
        probabilities = torch.softmax(logits[0, -1] / 0.8, dim=-1)
        ids = torch.multinomial(probabilities, 1, generator=generator).view(1, 1)
        out.append(corpus.vocabulary[int(ids)])
    model.train()
    return "".join(out)


def parse_clip(text: str) -> float | str | None:
    """``auto`` (ZClip), ``none``, or a positive max norm."""
    if text.lower() in ("auto", "none"):
        return None if text.lower() == "none" else "auto"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--clip must be 'auto', 'none' or a positive number, got {text!r}"
        ) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"--clip must be a positive max norm, got {value}")
    return value


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("text", nargs="?", type=Path, help="training text (default: the json package source)")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--every", type=int, default=50, help="gradwatch: measure every N steps")
    parser.add_argument(
        "--clip", type=parse_clip, default="auto", help="'auto' (ZClip), 'none' or a max norm"
    )
    parser.add_argument("--log", default="runs/char_rnn.jsonl", help="gradwatch run log")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    source = args.text or Path(inspect.getsourcefile(json) or "")
    corpus = Corpus.from_text(source.read_text(encoding="utf-8"))
    print(f"training on {source} ({len(corpus.ids)} characters, vocabulary {len(corpus.vocabulary)})")
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    model = CharLSTM(len(corpus.vocabulary))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    monitor = gradwatch.watch(
        model, optimizer, every=args.every, log=args.log, clip=args.clip, clip_scope="all"
    )

    loss = torch.tensor(float("nan"))
    for step in range(args.steps):
        inputs, targets = corpus.batch(args.seq_len, args.batch, generator)
        logits, _ = model(inputs)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()  # gradwatch clips (and measures) in the optimizer's step pre-hook
        if (step + 1) % 100 == 0 or step + 1 == args.steps:
            print(
                f"step {step + 1}: loss {loss.item():.3f} (nats/char), clipped {monitor.clip_count} step(s)"
            )
    monitor.close()
    print("sample:", repr(sample(model, corpus, 120, generator)))
    print(f"run log: {args.log}  (gradwatch report {args.log})")
    return loss.item()


if __name__ == "__main__":
    main()

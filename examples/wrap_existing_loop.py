"""Add gradwatch to a training loop you already have: one line (plus the import).

The loop below is plain PyTorch: a 2-layer LSTM with dropout predicts the next value of a noisy sine wave,
reading one long stream in chunks (truncated backpropagation through time, the hidden state carried from
one batch to the next), clips gradients with ``clip_grad_norm_`` and evaluates under ``torch.no_grad()``.
The whole diff that adds the monitor::

    +import gradwatch
     ...
     optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    +monitor = gradwatch.watch(model, optimizer, every=args.every, log=args.log)

Nothing else changes: the monitor measures from the optimizer's step hook, every ``every`` steps, and leaves
``model.eval()``/``no_grad()`` passes alone. ``monitor.close()`` at the end is optional (it removes the
hooks; the run log is flushed line by line). Then: ``gradwatch report runs/wrap_existing_loop.jsonl``.

Run: ``python3 examples/wrap_existing_loop.py --steps 300``
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import Tensor, nn

import gradwatch


class NextValueModel(nn.Module):
    """LSTM over a scalar sequence with a linear head predicting the next value at every step."""

    def __init__(self, hidden_size: int = 32, num_layers: int = 2, dropout: float = 0.2) -> None:
        super().__init__()
        self.lstm = nn.LSTM(1, hidden_size, num_layers=num_layers, dropout=dropout, batch_first=True)
        self.head = nn.Linear(hidden_size, 1)

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor] | None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        out, state = self.lstm(x, state)
        return self.head(out), state


def sine_stream(length: int, batch: int, generator: torch.Generator) -> Tensor:
    """``batch`` noisy sine waves of random phase and period, shape (batch, length, 1)."""
    t = torch.arange(length, dtype=torch.float32)
    phase = torch.rand(batch, 1, generator=generator) * 2 * math.pi
    period = 20 + 20 * torch.rand(batch, 1, generator=generator)
    clean = torch.sin(2 * math.pi * t / period + phase)
    return (clean + 0.05 * torch.randn(batch, length, generator=generator)).unsqueeze(-1)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps (chunks)")
    parser.add_argument("--chunk", type=int, default=35, help="truncated-BPTT chunk length")
    parser.add_argument("--every", type=int, default=25, help="gradwatch: measure every N steps")
    parser.add_argument("--log", default="runs/wrap_existing_loop.jsonl", help="gradwatch run log")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    train = sine_stream(args.steps * args.chunk + 1, 16, generator)
    valid = sine_stream(10 * args.chunk + 1, 16, generator)
    model = NextValueModel()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    monitor = gradwatch.watch(model, optimizer, every=args.every, log=args.log)

    state: tuple[Tensor, Tensor] | None = None
    valid_loss = math.nan
    for step in range(args.steps):
        model.train()
        start = step * args.chunk
        x, y = train[:, start : start + args.chunk], train[:, start + 1 : start + args.chunk + 1]
        if state is not None:
            state = (state[0].detach(), state[1].detach())  # carry the state, cut the graph (TBPTT)
        prediction, state = model(x, state)
        loss = nn.functional.mse_loss(prediction, y)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
        optimizer.step()
        if (step + 1) % 50 == 0 or step + 1 == args.steps:
            model.eval()
            with torch.no_grad():
                prediction, _ = model(valid[:, :-1], None)
                valid_loss = nn.functional.mse_loss(prediction, valid[:, 1:]).item()
            print(f"step {step + 1}: train loss {loss.item():.4f}, valid loss {valid_loss:.4f}")
    monitor.close()
    print(f"run log: {args.log}  (gradwatch report {args.log})")
    return valid_loss


if __name__ == "__main__":
    main()

"""Train a small LSTM with PyTorch Lightning while gradwatch watches it.

pip install 'gradwatch[lightning]'
python examples/lightning_lstm.py --steps 200 --log runs/lightning.jsonl
gradwatch report runs/lightning.jsonl
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradwatch.lightning import GradWatchCallback


class LstmRegressor(pl.LightningModule):
    """Predicts the running mean of a noisy sequence: a task with long-range dependencies."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.lstm = nn.LSTM(1, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out).squeeze(-1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def running_mean_data(sequences: int, length: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(sequences, length, 1, generator=generator)
    y = x.squeeze(-1).cumsum(dim=1) / torch.arange(1, length + 1)
    return TensorDataset(x, y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--log", default="runs/lightning.jsonl")
    parser.add_argument("--every", type=int, default=10)
    args = parser.parse_args()

    trainer = pl.Trainer(
        max_steps=args.steps,
        accelerator="auto",
        gradient_clip_val=1.0,  # Lightning clips after gradwatch has measured the raw gradients
        accumulate_grad_batches=2,  # gradwatch measures once per optimizer step
        callbacks=[GradWatchCallback(log=args.log, every=args.every)],
        logger=False,
        enable_checkpointing=False,
    )
    loader = DataLoader(running_mean_data(2048, 50), batch_size=32, shuffle=True)
    trainer.fit(LstmRegressor(), loader)
    print(f"run log: {args.log}  (gradwatch report {args.log})")


if __name__ == "__main__":
    main()

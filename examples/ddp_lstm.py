"""DDP training of a small LSTM, watched by gradwatch on every rank (CPU/gloo or GPU/NCCL).

    torchrun --standalone --nproc-per-node 2 examples/ddp_lstm.py --run-log runs/ddp.jsonl
    gradwatch report runs/ddp.jsonl runs/ddp.rank1.jsonl --merge-ranks

Each rank measures its own batches; rank 0 writes runs/ddp.jsonl, rank r writes runs/ddp.rank<r>.jsonl
(``--log-ranks zero``: rank 0 only). All ranks share rank 0's run id, so the report can merge them.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import gradwatch


class LstmRegressor(nn.Module):
    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.lstm = nn.LSTM(1, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out).squeeze(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--run-log", default="runs/ddp.jsonl")
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--log-ranks", choices=["all", "zero"], default="all")
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)
    device_ids = [device.index] if use_cuda else None
    model = DistributedDataParallel(LstmRegressor().to(device), device_ids=device_ids)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    monitor = gradwatch.watch(model, optimizer, every=args.every, log=args.run_log, log_ranks=args.log_ranks)

    data = torch.Generator().manual_seed(1000 + rank)  # each rank its own shard
    for _ in range(args.steps):
        x = torch.randn(32, 50, 1, generator=data).to(device)
        y = x.squeeze(-1).cumsum(dim=1) / torch.arange(1, 51, device=device)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    monitor.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

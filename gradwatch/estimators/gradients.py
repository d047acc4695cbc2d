"""Per-parameter gradient norms and the count of non-finite gradient elements, with one host sync."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class GradientStats:
    """Gradient norms of the named parameters that have a gradient (tensors, still on the device)."""

    names: tuple[str, ...]
    norms: Tensor  # (len(names),) 2-norm of each gradient
    gradients: tuple[Tensor, ...] = field(default=(), repr=False)  # kept for the exact non-finite count

    @property
    def nonfinite_count(self) -> Tensor:
        """0-dim int64: NaN/Inf elements over all gradients (one extra pass over them)."""
        if not self.gradients:
            return torch.zeros((), dtype=torch.int64, device=self.norms.device)
        device = self.norms.device
        return torch.stack([(~torch.isfinite(g)).sum().to(device) for g in self.gradients]).sum()

    def to_host(self) -> tuple[dict[str, float], int]:
        """({name: norm}, non-finite count) as plain Python values; one host transfer when all is finite.

        A NaN or Inf element makes its gradient's norm NaN or Inf, so finite norms prove a zero count and
        the per-element pass is skipped (it used to double the cost of the per-step check). Only a
        non-finite norm (a bad element, or finite values whose norm overflows) pays for the exact count.
        """
        values = self.norms.double().cpu().tolist()
        count = 0
        if not all(math.isfinite(v) for v in values):
            count = int(self.nonfinite_count)
        return dict(zip(self.names, values, strict=True)), count


def _dense(gradient: Tensor) -> Tensor:
    """Sparse gradients (nn.Embedding(sparse=True)) contribute their stored values."""
    return gradient.coalesce().values() if gradient.is_sparse else gradient


@torch.no_grad()
def gradient_norms(named_params: Mapping[str, Tensor]) -> GradientStats:
    """Norms of every ``param.grad`` (parameters whose grad is None are skipped), via torch._foreach_norm."""
    if not isinstance(named_params, Mapping):
        raise TypeError(
            f"named_params must be a mapping name -> parameter, got {type(named_params).__name__}"
        )
    names: list[str] = []
    gradients: list[Tensor] = []
    for name, parameter in named_params.items():
        if not isinstance(parameter, Tensor):
            raise TypeError(f"parameter {name!r} must be a tensor, got {type(parameter).__name__}")
        if parameter.grad is not None:
            names.append(name)
            gradients.append(_dense(parameter.grad.detach()))
    if not gradients:
        device = next((p.device for p in named_params.values()), torch.device("cpu"))
        return GradientStats((), torch.zeros(0, device=device))
    device = gradients[0].device
    # float32 on one device: grads may mix dtypes (AMP) and devices (model parallel).
    norms = torch.stack([n.to(device=device, dtype=torch.float32) for n in torch._foreach_norm(gradients)])
    return GradientStats(tuple(names), norms, tuple(gradients))

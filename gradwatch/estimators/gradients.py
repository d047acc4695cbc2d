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
        """({name: norm}, NaN/Inf element count) as plain Python values (see ``to_host_per_parameter``)."""
        norms, counts = self.to_host_per_parameter()
        return norms, sum(counts.values())

    def to_host_per_parameter(self) -> tuple[dict[str, float], dict[str, int]]:
        """({name: norm}, {name: NaN/Inf element count}); one host transfer when every norm is finite.

        A NaN or Inf element makes its gradient's norm NaN or Inf, so finite norms prove zero counts and
        the per-element pass is skipped (it used to double the cost of the per-step check). Only a
        non-finite norm pays for the exact count, and only for its own gradients: one with finite
        elements whose float32 norm overflowed (|g| > ~1e19 everywhere, the strongest explosion signal)
        gets its norm recomputed without overflow (float64, scaled by its largest element).
        """
        values = self.norms.double().cpu().tolist()
        counts = dict.fromkeys(self.names, 0)
        suspects = [i for i, v in enumerate(values) if not math.isfinite(v)]
        if suspects and self.gradients:
            device = self.norms.device
            exact = [_count_and_norm(self.gradients[i]) for i in suspects]
            host = torch.stack([torch.stack(pair).to(device) for pair in exact]).cpu().tolist()
            for i, (count, norm) in zip(suspects, host, strict=True):
                counts[self.names[i]] = int(count)
                if count == 0:
                    values[i] = norm
        return dict(zip(self.names, values, strict=True)), counts


def _count_and_norm(gradient: Tensor) -> tuple[Tensor, Tensor]:
    """(NaN/Inf element count, overflow-free 2-norm) of one gradient, both float64 0-dim on its device.

    The norm is max|g| * ||g / max|g|||, in float64: no square can overflow, whatever the gradient's dtype.
    It is only meaningful when the count is 0.
    """
    count = (~torch.isfinite(gradient)).sum().double()
    wide = gradient.double()
    largest = wide.abs().amax() if wide.numel() else torch.zeros((), dtype=torch.float64, device=wide.device)
    scale = torch.where(largest > 0, largest, torch.ones_like(largest))
    return count, largest * torch.linalg.vector_norm(wide / scale)


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

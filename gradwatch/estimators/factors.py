"""The lecture's two factors of a step Jacobian J = diag(f'(a)) W_hh: the nonlinearity's derivatives and
the recurrent weight's spectral norm (sigma_max(J) <= max|f'| * sigma_max(W_hh))."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from gradwatch.estimators.power_iteration import (
    SpectralMethod,
    SpectralNormEstimate,
    spectral_norm,
    warm_or_random_start,
)

DEFAULT_SATURATION_THRESHOLD = 0.05


class ActivationStatistics(NamedTuple):
    """Summaries of |f'(a)| over real steps, sequences and units (0-dim tensors; NaN without real steps)."""

    mean: Tensor  # mean |f'|
    saturation_ratio: Tensor  # share of units with |f'| < threshold (for relu: the dead-unit share)


@torch.no_grad()
def activation_statistics(
    derivatives: Tensor, mask: Tensor, saturation_threshold: float = DEFAULT_SATURATION_THRESHOLD
) -> ActivationStatistics:
    """Mean |f'| and the share of saturated units, counting only the real steps (mask (T, B) True)."""
    if not isinstance(derivatives, Tensor) or derivatives.ndim != 3:
        raise ValueError(
            f"derivatives must be a tensor (T, B, H), got shape {tuple(getattr(derivatives, 'shape', ()))}"
        )
    if (
        not isinstance(mask, Tensor)
        or mask.dtype != torch.bool
        or tuple(mask.shape) != tuple(derivatives.shape[:2])
    ):
        raise ValueError(
            f"mask must be a bool tensor of shape (T, B) = {tuple(derivatives.shape[:2])}, "
            f"got {getattr(mask, 'dtype', None)} {tuple(getattr(mask, 'shape', ()))}"
        )
    if not saturation_threshold >= 0:
        raise ValueError(f"saturation_threshold must be a non-negative float, got {saturation_threshold!r}")
    weight = mask.to(derivatives.dtype).unsqueeze(-1)  # (T, B, 1): 1 on real steps
    count = weight.sum() * derivatives.shape[-1]
    magnitude = derivatives.abs()
    # where() rather than multiply: 0 * NaN on a padded step must not poison the sum.
    total = torch.where(weight > 0, magnitude, torch.zeros_like(magnitude)).sum()
    saturated = (weight > 0) & (magnitude < saturation_threshold)
    return ActivationStatistics(total / count, saturated.sum().to(derivatives.dtype) / count)


def weight_spectral_norm(
    weight_hh: Tensor,
    *,
    v0: Tensor | None = None,
    method: SpectralMethod = "lanczos",
    max_iter: int = 32,
    rtol: float = 1e-5,
    generator: torch.Generator | None = None,
) -> SpectralNormEstimate:
    """sigma_max(W_hh) matrix-free; LSTM/GRU pass the stacked (gates * H, P) matrix as stored by torch.

    The stacked matrix maps h to all gate pre-activations at once, so its norm bounds every gate's
    sensitivity to h. ``v0`` (P,) is a warm start (ignored unless shape, dtype and device fit).
    """
    if not isinstance(weight_hh, Tensor) or weight_hh.ndim != 2 or 0 in weight_hh.shape:
        raise ValueError(
            "weight_hh must be a non-empty matrix (rows, P), "
            f"got shape {tuple(getattr(weight_hh, 'shape', ()))}"
        )
    if not weight_hh.is_floating_point():
        raise TypeError(f"weight_hh must be a floating-point tensor, got dtype {weight_hh.dtype}")
    matrix = weight_hh.detach()
    columns = matrix.shape[1]
    start, _ = warm_or_random_start(
        v0, (columns,), dtype=matrix.dtype, device=matrix.device, generator=generator
    )
    return spectral_norm(
        method, lambda v: matrix @ v, lambda u: matrix.T @ u, start, max_iter=max_iter, rtol=rtol
    )

"""PyTorch Lightning adapter: ``Trainer(callbacks=[GradWatchCallback(log="runs/exp.jsonl")])``.

A thin callback over :func:`gradwatch.watch`. Lightning calls ``optimizer.step`` itself (through closures,
precision plugins and strategies), so the monitor is created without the optimizer hook and one training
step is closed from ``on_before_optimizer_step``: once per optimizer step, after gradient accumulation and
AMP unscaling, and before Lightning's own ``gradient_clip_val`` clipping (the measurement sees the raw
gradients). Needs ``pip install 'gradwatch[lightning]'``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from gradwatch.monitor import Monitor, watch

try:  # Lightning 2.x ships as `lightning` (unified) and as the standalone `pytorch_lightning`
    from lightning.pytorch import Callback, LightningModule, Trainer
except ImportError:  # pragma: no cover - depends on which Lightning package is installed
    try:
        from pytorch_lightning import Callback, LightningModule, Trainer  # type: ignore[assignment]
    except ImportError as exc:
        raise ImportError(
            "gradwatch.lightning needs PyTorch Lightning (>= 2.2): pip install 'gradwatch[lightning]'"
        ) from exc

if TYPE_CHECKING:
    from torch.optim import Optimizer


# watch() options that the callback decides itself.
_RESERVED_OPTIONS = ("optimizer", "model")


class GradWatchCallback(Callback):
    """Watch the recurrent modules of the LightningModule during ``trainer.fit``.

    Takes the keyword options of :func:`gradwatch.watch` (``log``, ``every``, ``clip``, ``prometheus`` ...).
    The monitor exists from ``on_fit_start`` (after ``configure_model`` and the strategy's device move and
    wrapping) until ``teardown``; it is :attr:`monitor`. Its state goes into Lightning checkpoints.
    """

    def __init__(self, log: str | os.PathLike[str] | None = None, **watch_options: Any) -> None:
        super().__init__()
        for name in _RESERVED_OPTIONS:
            if name in watch_options:
                raise TypeError(
                    f"GradWatchCallback does not take {name!r}: it watches the LightningModule and closes "
                    "each step from on_before_optimizer_step"
                )
        if str(watch_options.get("nonfinite", "warn")) in ("skip", "NonFinitePolicy.SKIP"):
            raise ValueError(
                "nonfinite='skip' is not available in GradWatchCallback (Lightning owns optimizer.step); use "
                "nonfinite='warn' or 'raise', or let Lightning's AMP GradScaler skip non-finite steps"
            )
        self.log_path = log
        self.watch_options = watch_options
        self.monitor: Monitor | None = None
        self._pending_state: dict[str, Any] | None = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.monitor is not None:
            return
        self.monitor = watch(pl_module, None, log=self.log_path, **self.watch_options)
        if self._pending_state is not None:
            self.monitor.load_state_dict(self._pending_state)
            self._pending_state = None

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer
    ) -> None:
        if self.monitor is None:
            return
        if _scaler_will_skip(trainer, optimizer):
            # The AMP GradScaler found inf/NaN and will skip optimizer.step(): not a training step, and not a
            # non-finite gradient of the model (the loss scale was too high). Plain PyTorch behaves the same:
            # scaler.step() never calls optimizer.step(), so the monitor's step pre-hook never runs.
            return
        self.monitor.step()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.monitor is not None:
            self._pending_state = self.monitor.state_dict()  # a checkpoint saved after fit() still has it
            self.monitor.close()
            self.monitor = None

    def state_dict(self) -> dict[str, Any]:
        """Monitor.state_dict(): tensors and plain values only, so Lightning loads it ``weights_only``."""
        return self.monitor.state_dict() if self.monitor is not None else dict(self._pending_state or {})

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Hand the state to Monitor.load_state_dict, which converts the plain warm starts back itself."""
        if not state_dict:
            return
        state = dict(state_dict)
        if self.monitor is not None:
            self.monitor.load_state_dict(state)
        else:  # Lightning restores callbacks before on_fit_start creates the monitor
            self._pending_state = state


def _scaler_will_skip(trainer: Trainer, optimizer: Optimizer) -> bool:
    """True when Lightning's AMP GradScaler is active and this step's (unscaled) gradients are not finite."""
    plugin = getattr(trainer, "precision_plugin", None)
    scaler = getattr(plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return False
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            if parameter.grad is not None:
                by_device.setdefault(parameter.grad.device, []).append(parameter.grad)
    # GradScaler.unscale_ made the same check (one flag per device); it skips the step if any flag is set.
    return any(
        not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) for grads in by_device.values()
    )

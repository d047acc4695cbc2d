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

from gradwatch.attach import watch
from gradwatch.faults import warn_or_log
from gradwatch.monitor import Monitor
from gradwatch.policy.alerts import GradWatchWarning
from gradwatch.records import ClipEvent, Measurement, Record
from gradwatch.sinks.tensorboard import clip_scalars, measurement_scalars

try:  # Lightning 2.x ships as `lightning` (unified) and as the standalone `pytorch_lightning`
    from lightning.pytorch import Callback, LightningModule, Trainer
except ImportError:  # pragma: no cover - depends on which Lightning package is installed
    try:
        # the same three classes from the older package name:
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
    ``log_to_trainer=True`` also sends every measurement's scalars (the tags of
    :func:`gradwatch.sinks.tensorboard.measurement_scalars`) and clip events to the Trainer's loggers
    (``logger.log_metrics``), at the ``trainer.global_step`` of the optimizer step that was measured.
    """

    def __init__(
        self, log: str | os.PathLike[str] | None = None, *, log_to_trainer: bool = False, **watch_options: Any
    ) -> None:
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
        if not isinstance(log_to_trainer, bool):
            raise TypeError(f"log_to_trainer must be True or False, got {log_to_trainer!r}")
        self.log_path = log
        self.log_to_trainer = log_to_trainer
        self.watch_options = watch_options
        self._trainer_records = _RecordBuffer()
        self._global_steps: dict[int, int] = {}  # gradwatch step -> trainer.global_step when it was closed
        self.monitor: Monitor | None = None
        self._pending_state: dict[str, Any] | None = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.monitor is not None:
            return
        options = dict(self.watch_options)
        if self.log_to_trainer:
            options["sinks"] = [*options.get("sinks", ()), self._trainer_records]
        self.monitor = watch(pl_module, None, log=self.log_path, **options)
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
        self._global_steps[self.monitor.current_step] = trainer.global_step
        self.monitor.step()
        if self.log_to_trainer:
            self._log_to_trainer(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.monitor is not None and self.log_to_trainer:
            self.monitor.wait()  # a measurement still running in the background reaches the loggers too
            self._log_to_trainer(trainer)

    def _log_to_trainer(self, trainer: Trainer) -> None:
        """Send the buffered records' scalars to every logger of the Trainer, one call per measured step.

        A background measurement arrives a few steps after the step it measured; it is logged at the global
        step that step had. A failing logger degrades to a warning (strict=True raises)."""
        by_step: dict[int, dict[str, float]] = {}
        for record in self._trainer_records.drain():
            if isinstance(record, Measurement):
                scalars = measurement_scalars(record)
            elif isinstance(record, ClipEvent):
                scalars = clip_scalars(record)
            else:
                continue
            global_step = self._global_steps.get(record.step, trainer.global_step)
            by_step.setdefault(global_step, {}).update(scalars)
        if self.monitor is not None:  # keep only the steps whose records may still come
            current = self.monitor.current_step
            self._global_steps = {k: v for k, v in self._global_steps.items() if k >= current - 1000}
        for global_step, metrics in sorted(by_step.items()):
            for logger in trainer.loggers:
                try:
                    logger.log_metrics(metrics, step=global_step)
                except Exception as exc:
                    if self.watch_options.get("strict", False):
                        raise
                    warn_or_log(  # under -W error too: a notice, never a reason to stop training
                        f"gradwatch: logging to {type(logger).__name__} failed: {exc!r}", GradWatchWarning
                    )

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


class _RecordBuffer:
    """A sink that keeps records until the callback hands them to the Trainer's loggers."""

    def __init__(self) -> None:
        self._records: list[Record] = []

    def write(self, record: Record) -> None:
        if isinstance(record, (Measurement, ClipEvent)):
            self._records.append(record)

    def drain(self) -> list[Record]:
        records, self._records = self._records, []
        return records

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return "TrainerLoggerSink()"


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

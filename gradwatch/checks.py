"""Input checks, in one place: every argument of ``watch()`` and every WatchConfig field is checked here, so a
typo fails at ``watch()`` (before training starts) with a message naming the problem and what is accepted."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch

from gradwatch.background import spare_core_for_worker
from gradwatch.capture.modules import WatchedModule
from gradwatch.estimators.layer import EstimatorSettings
from gradwatch.policy.alerts import AlertCallback
from gradwatch.policy.config import DetectionConfig
from gradwatch.policy.nonfinite import NonFinitePolicy
from gradwatch.sinks.base import Sink
from gradwatch.sinks.jsonl import FSYNC_POLICIES

if TYPE_CHECKING:
    from gradwatch.monitor import WatchConfig


def check_horizon(horizon: object) -> None:
    """``horizon``: None (the measured sequence length) or a positive int number of steps."""
    if horizon is not None and (isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1):
        raise ValueError(
            f"horizon must be None (judge at the measured sequence length) or the dependency range of the "
            f"task in steps, a positive integer such as 150; got {horizon!r}"
        )


def check_config(config: WatchConfig) -> None:
    """The fields of a WatchConfig (called by its ``__post_init__``)."""
    if isinstance(config.every, bool) or not isinstance(config.every, int) or config.every < 1:
        raise ValueError(f"every must be a positive integer (measure every N steps), got {config.every!r}")
    budget = config.time_budget
    if budget is not None and (
        isinstance(budget, bool)
        or not isinstance(budget, (int, float))
        or not math.isfinite(budget)
        or not 0 < budget <= 1
    ):
        raise ValueError(
            f"time_budget must be None or the share of the training time measurements may take, "
            f"a number in (0, 1] such as 0.02; got {budget!r}"
        )
    if (
        isinstance(config.max_sequences, bool)
        or not isinstance(config.max_sequences, int)
        or config.max_sequences < 1
    ):
        raise ValueError(f"max_sequences must be a positive integer, got {config.max_sequences!r}")
    if config.probe not in ("fixed", "live"):
        raise ValueError(
            f"probe must be 'fixed' (re-measure the sequences seen at the first measurement) or 'live' "
            f"(measure each measured step's own batch), got {config.probe!r}"
        )
    check_horizon(config.horizon)
    if not isinstance(config.history_size, int) or config.history_size < 0:
        raise ValueError(f"history_size must be a non-negative integer, got {config.history_size!r}")
    if config.clip_scope not in ("monitored", "all"):
        raise ValueError(
            f"clip_scope must be 'monitored' (the watched RNN parameters) or 'all' (every model "
            f"parameter), got {config.clip_scope!r}"
        )
    if config.clip_mode not in ("always", "exploding"):
        raise ValueError(
            f"clip_mode must be 'always' or 'exploding' (only during an exploding episode), "
            f"got {config.clip_mode!r}"
        )
    if not isinstance(config.estimator, EstimatorSettings):
        raise TypeError(
            f"estimator must be a gradwatch.EstimatorSettings, got {type(config.estimator).__name__}"
        )
    if not isinstance(config.global_view, bool):
        raise TypeError(f"global_view must be True or False, got {config.global_view!r}")
    if not isinstance(config.detection, DetectionConfig):
        raise TypeError(
            f"detection must be a gradwatch.DetectionConfig, got {type(config.detection).__name__}"
        )


def check_optimizer(optimizer: object) -> None:
    """The optimizer whose ``step()`` closes each training step, or None."""
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer (or None, then call monitor.step() after "
            f"backward), got {type(optimizer).__name__}"
        )


def check_watch_options(
    optimizer: object, *, nonfinite: NonFinitePolicy, strict: object, seed: object, fsync: object
) -> None:
    """Options that are checked nowhere else, so that a typo fails at watch() rather than later (or never)."""
    if nonfinite is NonFinitePolicy.SKIP and optimizer is None:
        raise ValueError("nonfinite='skip' needs the optimizer: watch(model, optimizer, nonfinite='skip')")
    check_optimizer(optimizer)
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be True or False, got {strict!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    if fsync not in FSYNC_POLICIES:
        raise ValueError(
            f"fsync must be one of {', '.join(map(repr, FSYNC_POLICIES))} (when to fsync the run log), "
            f"got {fsync!r}"
        )


def check_optimizer_holds_watched(optimizer: torch.optim.Optimizer, modules: Sequence[WatchedModule]) -> None:
    """The hooked optimizer closes each step; one that holds none of the watched parameters steps on its own
    schedule and is no sign that the watched weights just got their gradients."""
    watched = {
        id(p): f"{w.name}.{local}" if local in dict(w.module.named_parameters()) else local
        for w in modules
        for local, p in (
            dict(w.module.named_parameters())
            if w.kind == "custom"
            else {n: q for leaves in w.weight_leaves.values() for n, q in leaves.items()}
        ).items()
    }
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if watched and not held & set(watched):
        names = sorted(watched.values())
        shown = ", ".join(names[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")
        raise ValueError(
            f"the optimizer passed to watch() holds none of the watched parameters ({shown}); gradwatch "
            "closes each step from that optimizer's step(). Pass the optimizer that holds them, or "
            "optimizer=None and call monitor.step() after loss.backward()"
        )


def resolve_background(
    background: object, modules: Sequence[WatchedModule], *, global_view: bool, clip_mode: str
) -> bool:
    """The background setting: explicit True/False, or None = on only where it helps and is safe: built-in
    RNNs on the CPU when the worker's threads fit on cores that training leaves idle
    (:func:`gradwatch.background.spare_core_for_worker`); user cells call the live module, CUDA work would
    queue behind training on the same stream, the global view exchanges at the measured step, and
    clip_mode="exploding" should react to a verdict at once."""
    if background is not None and not isinstance(background, bool):
        raise TypeError(f"background must be True, False or None (choose automatically), got {background!r}")
    if background and global_view:
        raise ValueError(
            "background=True cannot be combined with global_view=True: the ranks exchange their "
            "measurements at the measured step; use one or the other"
        )
    if background is not None:
        return background
    if global_view or clip_mode == "exploding":
        return False
    for watched in modules:
        if watched.kind == "custom":
            return False
        if any(p.device.type != "cpu" for p in watched.module.parameters()):
            return False
    return spare_core_for_worker()


def check_run_id(run_id: object) -> None:
    if run_id is not None and (not isinstance(run_id, str) or not run_id):
        raise ValueError(f"run_id must be a non-empty string (or None for a new one), got {run_id!r}")


MAX_RUN_NAME_CHARS = 200


def check_run_name(name: object) -> None:
    """A run name is a non-empty string of printable characters (it is shown in reports and file lists)."""
    if name is None:
        return
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"name must be a non-empty string (or None), got {name!r:.80}")
    if len(name) > MAX_RUN_NAME_CHARS or not name.isprintable():
        raise ValueError(
            f"name must be printable and at most {MAX_RUN_NAME_CHARS} characters, got {name!r:.80}"
        )


def check_sinks(sinks: Iterable[Sink]) -> list[Sink]:
    """User sinks: anything with write(record), flush() and close() (the Sink protocol)."""
    user_sinks = list(sinks)
    for sink in user_sinks:
        if not all(callable(getattr(sink, m, None)) for m in ("write", "flush", "close")):
            raise TypeError(f"sinks must have write(record), flush() and close(); {sink!r} does not")
    return user_sinks


def alert_callbacks(on_alert: AlertCallback | Sequence[AlertCallback] | None) -> list[AlertCallback]:
    if on_alert is None:
        return []
    callbacks = [on_alert] if callable(on_alert) else list(on_alert)
    for fn in callbacks:
        if not callable(fn):
            raise TypeError(f"on_alert must be a callable fn(alert) or a list of them, got {fn!r}")
    return callbacks

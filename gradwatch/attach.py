"""``gradwatch.watch()``: checks every argument, builds the sinks and the :class:`Monitor` that coordinates
the run (monitor.py). Every configuration error is raised here, before training starts."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from gradwatch.capture import hooks as _hooks
from gradwatch.capture.modules import (
    find_rnn_modules,
    is_compile_wrapper,
    no_rnn_message,
    unwrap_model,
)
from gradwatch.checks import (
    alert_callbacks,
    check_optimizer_holds_watched,
    check_run_id,
    check_run_name,
    check_sinks,
    check_watch_options,
    resolve_background,
)
from gradwatch.distributed import (
    LogRanks,
    check_log_ranks,
    distributed_rank,
    shared_run_id,
    writes_log,
)
from gradwatch.estimators.layer import (
    EstimatorSettings,
    estimator_settings,
)
from gradwatch.measure import (
    ProbeMode,
)
from gradwatch.monitor import ClipMode, ClipScope, Monitor, WatchConfig, new_run_id
from gradwatch.policy.alerts import AlertCallback
from gradwatch.policy.clipping import ClipPolicy, make_clip_policy
from gradwatch.policy.config import DetectionConfig
from gradwatch.policy.nonfinite import NonFinitePolicy
from gradwatch.policy.schedule import DEFAULT_TIME_BUDGET
from gradwatch.sinks.base import Sink
from gradwatch.sinks.jsonl import FsyncPolicy, JsonlSink
from gradwatch.sinks.logs import LoggingSink


def rank_log_path(path: str | os.PathLike[str], rank: int) -> Path:
    """``runs/exp.jsonl`` for rank 0, ``runs/exp.rank1.jsonl`` for rank 1, ..."""
    p = Path(path)
    return p if rank == 0 else p.with_name(f"{p.stem}.rank{rank}{p.suffix or '.jsonl'}")


def watch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    every: int | None = None,
    time_budget: float | None = None,
    log: str | os.PathLike[str] | None = None,
    max_sequences: int = 8,
    probe: ProbeMode = "fixed",
    on_alert: AlertCallback | Sequence[AlertCallback] | None = None,
    clip: ClipPolicy | float | str | None = None,
    clip_scope: ClipScope = "monitored",
    clip_mode: ClipMode = "always",
    nonfinite: NonFinitePolicy | str = "warn",
    prometheus: int | str | bool | None = None,
    tensorboard: str | os.PathLike[str] | None = None,
    sinks: Iterable[Sink] = (),
    detection: DetectionConfig | None = None,
    estimator: EstimatorSettings | str | None = None,
    strict: bool = False,
    seed: int = 0,
    fsync: FsyncPolicy = "header",
    history_size: int = 10_000,
    run_id: str | None = None,
    name: str | None = None,
    log_ranks: LogRanks = "all",
    global_view: bool = False,
    background: bool | None = None,
    horizon: int | None = None,
) -> Monitor:
    """Attach a monitor to every recurrent module of ``model``: one line, no change to the training loop.

    With an ``optimizer`` each ``optimizer.step()`` closes a training step; without one, call
    ``monitor.step()`` after ``loss.backward()``. The monitor measures on step 0 and every ``every`` steps
    after it. Every configuration error is raised here, before training starts.

    Args:
        model: the model to watch; every nn.RNN/LSTM/GRU, their Cell variants and registered user cells
            inside it are watched (DistributedDataParallel, DataParallel and ``torch.compile`` wrappers are
            unwrapped). A model without any raises ValueError.
        optimizer: the ``torch.optim.Optimizer`` that holds the watched parameters; its ``step()`` closes
            each training step (a new optimizer that later steps all of them instead, as AWD-LSTM's switch
            to ASGD, is followed). Default None: call ``monitor.step()`` after ``loss.backward()``.
        every: measure on step 0 and every ``every`` steps after it; a positive int. Default None: every
            50 steps within a 2% time budget (below).
        time_budget: the share of the training time measurements may take, in (0, 1]: a multiple of
            ``every`` that comes sooner after the last measurement than its cost allows is skipped
            (``gradwatch.policy.schedule``; logged once at INFO). Default None: 0.02 when ``every`` is
            None too, else no budget, so ``every=N`` measures exactly every N steps. Under
            torch.distributed every rank keeps the fixed schedule (the ranks measure the same steps).
        log: path of the JSON-lines run log (``gradwatch report`` reads it); rank r > 0 writes
            ``NAME.rank<r>.jsonl``. Default None: no log.
        max_sequences: at most this many sequences of the batch are measured; a positive int. Default 8.
        probe: ``"fixed"`` re-measures the sequences seen at the first measurement with the current weights
            (trends then depend on the weights alone; a probe shorter than FIXED_PROBE_MIN_STEPS = 8 steps
            is replaced by the next longer measured batch); ``"live"`` measures each measured step's own
            batch. Default ``"fixed"``.
        on_alert: a callable ``fn(alert)`` or a list of them, called for every alert after it is written
            and warned. Default None.
        clip: gradient clipping: None (off), a max norm as for ``clip_grad_norm_`` (a positive number),
            ``"auto"`` (ZClip, adaptive) or a ClipPolicy. Default None.
        clip_scope: ``"monitored"`` (the watched RNN parameters) or ``"all"`` (every model parameter).
            Default ``"monitored"``.
        clip_mode: ``"always"`` or ``"exploding"`` (only while a layer's verdict is exploding).
            Default ``"always"``.
        nonfinite: what a NaN/Inf gradient does: ``"warn"`` (alert once per episode), ``"raise"``
            (NonFiniteGradientError) or ``"skip"`` (the optimizer step does not happen; needs the
            optimizer); a string or NonFinitePolicy. Default ``"warn"``.
        prometheus: a Prometheus exporter: a port (0 = any free one; ``monitor.prometheus_url`` has the
            real one), ``"host:port"``, ``"push://host:port"`` (Pushgateway), or True (port 9400).
            Default None: none.
        tensorboard: a directory for TensorBoard event files (rank r > 0 writes ``DIR/rank<r>``; needs
            ``pip install 'gradwatch[tensorboard]'``). Default None.
        sinks: more sinks, each with ``write(record)``, ``flush()`` and ``close()``
            (:class:`~gradwatch.sinks.base.Sink`); they get every record after the built-in ones.
            Default none.
        detection: the thresholds of the vanishing/exploding detector, a DetectionConfig. Default None:
            ``DetectionConfig()``.
        estimator: ``"economy"`` (sigma_max(J_t) on a stratified sample of (t, sequence) pairs, lags and
            lambda on the longest sequences; error bounds in docs/estimators.md), ``"full"`` (every pair
            and sequence), or an EstimatorSettings (iterations, tolerance, lags, chunking). Default None:
            ``"economy"``.
        strict: True re-raises every fault inside gradwatch as GradWatchFault (for tests and debugging);
            False degrades it to one GradWatchWarning and an error record. Default False.
        seed: the seed of the estimators' own random generator (never the global one); an int. Default 0.
        fsync: when the run log is fsynced: ``"header"`` (fsync the header line), ``"always"`` (every
            line) or ``"never"`` (flush to the OS only). Default ``"header"``.
        history_size: how many records ``monitor.history`` keeps in memory; a non-negative int, 0 keeps
            all. Default 10_000 (a measurement record is about 2.8 KB: ~28 MB in all).
        run_id: the run's id in every record; a non-empty string. Default None: a new sortable id (under
            torch.distributed, rank 0's, shared by every rank).
        name: a name for the run, to tell runs apart ("lstm-lr3e-4", "baseline"): written in the run header,
            shown by every report format and the TensorBoard export beside the run id; a non-empty string.
            Default None: the run is known by its run id.
        log_ranks: under torch.distributed every rank measures its own batch; ``"all"`` writes one log per
            rank, ``"zero"`` only rank 0's. Default ``"all"``.
        global_view: True adds, on rank 0, records of rank -1 that combine every rank's measurement
            (exchanged at the measured step). Default False.
        background: True runs the estimators on a worker thread beside the next training steps: the
            Prometheus exporter (any :class:`~gradwatch.sinks.base.LiveSink`) shows each measurement as
            soon as it is done; the run log, logging, alerts and callbacks get it at the next step
            boundary, in step order (``monitor.wait()`` delivers it at once). False measures inside the
            step. Default None: chosen automatically, on when every watched module is a built-in RNN on
            the CPU, ``global_view`` is off and a core is spare. True with ``global_view=True`` raises.

        horizon: the dependency range of the task in steps (how far back the target depends on the input),
            a positive int. Vanishing is judged there: the gradient must reach back ``horizon`` steps
            (``gradient_reach``). Longer than the measured sequences: judged at their length. Default None:
            the measured sequence length.

    Returns:
        The :class:`Monitor`; use it as a context manager or call ``close()`` to remove every hook.
    """
    if every is None and time_budget is None:
        time_budget = DEFAULT_TIME_BUDGET
    config = WatchConfig(
        every=50 if every is None else every,
        time_budget=time_budget,
        max_sequences=max_sequences,
        probe=probe,
        strict=strict,
        seed=seed,
        history_size=history_size,
        nonfinite=NonFinitePolicy.parse(nonfinite),
        clip=None if clip is None else (clip if isinstance(clip, (str, int, float)) else repr(clip)),
        clip_scope=clip_scope,
        clip_mode=clip_mode,
        global_view=global_view,
        horizon=horizon,
        estimator=estimator_settings(estimator),
        detection=detection or DetectionConfig(),
    )
    check_watch_options(optimizer, nonfinite=config.nonfinite, strict=strict, seed=seed, fsync=fsync)
    clip_policy = None if clip is None else make_clip_policy(clip)
    callbacks = alert_callbacks(on_alert)
    modules = find_rnn_modules(model)
    if not modules:
        raise ValueError(no_rnn_message(model))
    if optimizer is not None:
        check_optimizer_holds_watched(optimizer, modules)
    config = replace(
        config,
        background=resolve_background(background, modules, global_view=global_view, clip_mode=clip_mode),
    )
    log_ranks = check_log_ranks(log_ranks)
    check_run_id(run_id)
    check_run_name(name)
    rank, _ = distributed_rank()
    run_id = run_id or shared_run_id(new_run_id())
    user_sinks = check_sinks(sinks)
    all_sinks: list[Sink] = [LoggingSink()]
    try:
        if log is not None and writes_log(log_ranks, rank):
            all_sinks.append(JsonlSink(rank_log_path(log, rank), fsync=fsync))
        if prometheus is not None and prometheus is not False:
            from gradwatch.sinks.prometheus import PrometheusSink

            all_sinks.append(PrometheusSink.from_spec(prometheus, run_id=run_id, rank=rank))
        if tensorboard is not None and writes_log(log_ranks, rank):
            from gradwatch.sinks.tensorboard import TensorBoardSink

            all_sinks.append(TensorBoardSink(tensorboard if rank == 0 else Path(tensorboard, f"rank{rank}")))
    except Exception:
        for sink in all_sinks:
            sink.close()
        raise
    all_sinks += user_sinks
    try:
        monitor = Monitor(
            unwrap_model(model),
            optimizer,
            config=config,
            sinks=all_sinks,
            modules=modules,
            run_id=run_id,
            on_alert=callbacks,
            clip=clip_policy,
            name=name,
        )
        if is_compile_wrapper(model):  # its first trace may come on an unmeasured step
            for recorder in monitor._recorders.values():
                _hooks.keep_for_compile(recorder)
        return monitor
    except Exception:
        for sink in all_sinks[: len(all_sinks) - len(user_sinks)]:  # ours only: release files and ports
            with contextlib.suppress(Exception):
                sink.close()
        raise

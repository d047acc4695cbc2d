"""``gradwatch.watch()``: wires capture -> estimators -> records -> detection -> sinks, and owns the schedule.

A *step* is one optimizer step (or one ``monitor.step()`` call when no optimizer is given). On step 0 and
every ``every`` steps after it the monitor measures: forward hooks record the step's inputs, and just before
the optimizer applies the gradients (a step pre-hook) the monitor replays each recurrent layer, estimates
its Jacobian norms and writes the records. On every step it checks the gradients for non-finite values and,
if asked, clips them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import uuid
import weakref
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle

from gradwatch._version import __version__
from gradwatch.background import BackgroundWorker, spare_core_for_worker
from gradwatch.capture import hooks as _hooks
from gradwatch.capture.hooks import CallRecorder, CellCall, FusedCall
from gradwatch.capture.modules import (
    WatchedModule,
    find_rnn_modules,
    is_compile_wrapper,
    no_rnn_message,
    unwrap_model,
)
from gradwatch.capture.replay import (
    LayerTrace,
    check_cell_against_module,
    check_cell_replay,
    check_fused_replay,
    deterministic_mode,
    fused_parameter_names,
    replay_fused,
    rerun_fused,
    trace_builtin_cell,
    trace_custom_cell,
)
from gradwatch.distributed import (
    GlobalView,
    LogRanks,
    check_log_ranks,
    distributed_rank,
    shared_run_id,
    writes_log,
)
from gradwatch.estimators.cells import CellWeights
from gradwatch.estimators.gradients import gradient_norms
from gradwatch.estimators.jacobian import StepJacobians, builtin_step_jacobians, function_step_jacobians
from gradwatch.estimators.layer import (
    BACKGROUND_CHUNK_ENTRIES,
    EstimatorSettings,
    WarmStart,
    estimate_layer,
    layer_metrics,
)
from gradwatch.faults import FaultPolicy, GradWatchFault
from gradwatch.policy.alerts import AlertCallback, NonFiniteGradientError, emit_alert
from gradwatch.policy.clipping import ClipPolicy, apply_clip, make_clip_policy
from gradwatch.policy.evidence import Verdict
from gradwatch.policy.explain import explain_nonfinite_context
from gradwatch.policy.nonfinite import NonFinitePolicy, NonFiniteTracker, enforce_nonfinite_policy
from gradwatch.policy.trends import DetectionConfig, TrendDetector
from gradwatch.records import (
    Alert,
    Measurement,
    MeasurementMetrics,
    Record,
    RunHeader,
)
from gradwatch.resume import (
    probe_from_state,
    probe_to_state,
    warm_start_from_state,
    warm_start_to_state,
)
from gradwatch.sinks.base import LiveSink, Sink
from gradwatch.sinks.fanout import SinkFanOut, write_live
from gradwatch.sinks.jsonl import FSYNC_POLICIES, FsyncPolicy, JsonlSink
from gradwatch.sinks.logs import LoggingSink

logger = logging.getLogger("gradwatch")

#: probe="fixed" keeps a probe for good only once it has this many time steps (its longest kept sequence):
#: lags 1, 2, 4, 7 then reach back far enough for a verdict (a vanishing one needs a lag norm < 1e-3). A
#: shorter probe is kept for now and replaced by the next measured batch that is longer, until one has it.
FIXED_PROBE_MIN_STEPS = 8
#: A probe shorter than this has no lag norm and no Lyapunov exponent: no verdict at all (one warning).
VERDICT_MIN_STEPS = 2

ProbeMode = Literal["fixed", "live"]
ClipScope = Literal["monitored", "all"]
ClipMode = Literal["always", "exploding"]
LayerKey = tuple[str, int, str]  # (module name, layer, direction)


@dataclass(frozen=True)
class WatchConfig:
    """The validated settings of a monitor; its JSON form goes into the run header."""

    every: int = 50
    max_sequences: int = 8
    probe: ProbeMode = "fixed"
    strict: bool = False
    seed: int = 0
    history_size: int = 100_000
    nonfinite: NonFinitePolicy = NonFinitePolicy.WARN
    clip: str | None = None  # description of the clip policy, for the run header
    clip_scope: ClipScope = "monitored"
    clip_mode: ClipMode = "always"
    global_view: bool = False
    background: bool = False
    estimator: EstimatorSettings = field(default_factory=EstimatorSettings)
    detection: DetectionConfig = field(default_factory=DetectionConfig)

    def __post_init__(self) -> None:
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"every must be a positive integer (measure every N steps), got {self.every!r}")
        if (
            isinstance(self.max_sequences, bool)
            or not isinstance(self.max_sequences, int)
            or self.max_sequences < 1
        ):
            raise ValueError(f"max_sequences must be a positive integer, got {self.max_sequences!r}")
        if self.probe not in ("fixed", "live"):
            raise ValueError(
                f"probe must be 'fixed' (re-measure the sequences seen at the first measurement) or 'live' "
                f"(measure each measured step's own batch), got {self.probe!r}"
            )
        if not isinstance(self.history_size, int) or self.history_size < 0:
            raise ValueError(f"history_size must be a non-negative integer, got {self.history_size!r}")
        if self.clip_scope not in ("monitored", "all"):
            raise ValueError(
                f"clip_scope must be 'monitored' (the watched RNN parameters) or 'all' (every model "
                f"parameter), got {self.clip_scope!r}"
            )
        if self.clip_mode not in ("always", "exploding"):
            raise ValueError(
                f"clip_mode must be 'always' or 'exploding' (only during an exploding episode), "
                f"got {self.clip_mode!r}"
            )

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["nonfinite"] = self.nonfinite.value
        for part in ("estimator", "detection"):
            data[part] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in data[part].items()}
        return data


@dataclass
class _LayerJob:
    """One layer and direction, frozen at the measured step, ready for the estimators."""

    module: str
    layer: int
    direction: str
    jacobians: StepJacobians
    mask: torch.Tensor
    recurrent_weight: torch.Tensor | None
    generator: torch.Generator
    grads: dict[str, float | None]
    grad_nonfinite: int = 0  # NaN/Inf gradient elements of this layer's parameters


@dataclass
class _ModuleJob:
    name: str
    layers: list[_LayerJob]  # still to estimate
    ready: list[Measurement]  # already estimated on the training thread (user cells)


@dataclass
class _MeasurementJob:
    step: int
    time: float
    modules: list[_ModuleJob]


@dataclass
class _MeasurementResult:
    step: int
    records: list[Measurement]
    faults: list[tuple[str, Exception]]  # (module, what its estimate raised)
    live_faults: list[tuple[Sink, Exception]] = field(default_factory=list)  # (sink, what write_live raised)


def _copy_weights(weights: CellWeights) -> CellWeights:
    """Private copies of a layer's weights: the optimizer updates the originals in place."""
    return replace(
        weights,
        **{
            name: getattr(weights, name).detach().clone()
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")
            if getattr(weights, name) is not None
        },
    )


class Monitor:
    """Watches the recurrent modules of one model. Create it with :func:`gradwatch.watch`."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        config: WatchConfig,
        sinks: Sequence[Sink] = (),
        modules: Sequence[WatchedModule] | None = None,
        run_id: str | None = None,
        on_alert: Sequence[AlertCallback] = (),
        clip: ClipPolicy | None = None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.config = config
        self._watched = list(modules) if modules is not None else find_rnn_modules(model)
        if not self._watched:
            raise ValueError(no_rnn_message(model))
        self.rank, self.world_size = distributed_rank()
        self.run_id = run_id or new_run_id()
        self.detector = TrendDetector(config.detection)
        self.clip_policy = clip
        self._nonfinite = NonFiniteTracker()
        self._global_view = (
            GlobalView(self.run_id, self.rank, self.world_size)
            if config.global_view and self.world_size > 1
            else None
        )
        self._on_alert = list(on_alert)
        self.clip_count = 0
        self._background: BackgroundWorker[_MeasurementResult] | None = (
            BackgroundWorker() if config.background else None
        )
        self._step = 0
        self._closed = False
        self.faults = FaultPolicy(
            strict=config.strict,
            rank=self.rank,
            run_id=self.run_id,
            current_step=lambda: self._step,
            report=lambda record: self._out.emit(record),
            on_module_disabled=self._module_disabled,
            on_part_disabled=self._part_disabled,
        )
        """Decides what a fault inside gradwatch does (warn, disable, or re-raise in strict mode)."""
        self._out = SinkFanOut(sinks, self.faults, history_size=config.history_size)
        self._history = self._out.history
        self._warm_starts: dict[LayerKey, WarmStart] = {}
        self._probes: dict[str, FusedCall | list[CellCall]] = {}
        self._probe_steps: dict[str, int] = {}  # time steps of each kept probe (see FIXED_PROBE_MIN_STEPS)
        self._generator: torch.Generator | None = None
        self._recorders: dict[str, CallRecorder] = {}
        self._handles: list[RemovableHandle] = []  # hooks placed on user objects (none at present)
        self._attached: list[tuple[nn.Module, CallRecorder]] = []  # routed by gradwatch's global hooks
        self._layer_parameters = self._map_layer_parameters()
        self._module_gradient_names: dict[str, list[str]] | None = None  # built on first use
        self._parameters = {
            name: p for key in self._layer_parameters for name, p in self._layer_parameters[key].items()
        }

        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer (or None, then call monitor.step() after "
                f"backward), got {type(optimizer).__name__}"
            )
        for watched in self._watched:  # one monitor per module: refuse before attaching anything
            owner = _hooks.attached_owner(watched.module)
            if owner is not None:
                raise ValueError(_hooks.already_watched_message(watched.module, owner))
        recorders = [
            CallRecorder(
                watched, config.max_sequences, on_fault=partial(self._fault, "capture", watched.name)
            )
            for watched in self._watched
        ]
        try:
            owner = f"monitor {self.run_id} (modules {', '.join(self.watched_modules)})"
            for watched, recorder in zip(self._watched, recorders, strict=True):
                self._recorders[watched.name] = recorder
                _hooks.attach(watched.module, recorder, owner)
                self._attached.append((watched.module, recorder))
            if optimizer is not None:
                _attach_optimizer(optimizer, self)
            self._arm(self._is_measured(self._step))
        except Exception:
            self._detach()
            raise
        if self.prometheus_url is not None:
            logger.info("gradwatch: Prometheus metrics at %s", self.prometheus_url)
        self._emit(
            RunHeader(
                run_id=self.run_id,
                started=time.time(),
                gradwatch=__version__,
                torch=torch.__version__,
                config=config.to_json(),
                modules=tuple(w.describe() for w in self._watched),
                rank=self.rank,
                world_size=self.world_size,
            )
        )
        self._flush()

    # --- public ---------------------------------------------------------------------------------------

    @property
    def history(self) -> deque[Record]:
        """The records the sinks got, oldest first (up to ``history_size``); waits for a measurement still
        running in the background, so it is complete up to the last finished step."""
        self.wait()
        return self._history

    def wait(self) -> None:
        """Deliver a measurement still running in the background: its records, detector updates and
        alerts. A no-op without one (and with ``background=False``)."""
        if self._background is not None and self._background.busy:
            self._deliver(self._collect(wait=True))

    @property
    def current_step(self) -> int:
        """The index of the step in progress (the number of completed steps)."""
        return self._step

    @property
    def watched_modules(self) -> list[str]:
        return [w.name for w in self._watched]

    @property
    def sinks(self) -> list[Sink]:
        return self._out.sinks

    @property
    def fault_counts(self) -> dict[str, int]:
        """How often each part of gradwatch failed ("capture:rnn", "sink:JsonlSink(...)", "clip", ...)."""
        return self.faults.counts

    @property
    def prometheus_url(self) -> str | None:
        """The scrape URL of the Prometheus exporter (with the real port when ``prometheus=0``), if any."""
        return self._out.url

    def step(self) -> None:
        """Close a training step by hand (call it after ``loss.backward()``) when no optimizer was given."""
        if self.optimizer is not None:
            raise RuntimeError(
                "this monitor closes each step from the optimizer's step() already; "
                "calling monitor.step() as well would count every step twice"
            )
        self._end_of_step(None)

    def close(self) -> None:
        """Remove every hook, flush and close the sinks. Idempotent; the model behaves as before."""
        if self._closed:
            return
        pending_error: Exception | None = None
        try:
            self.wait()  # the last measurement's records go out before the sinks close
        except Exception as exc:  # strict mode, or an alert callback raising on purpose: raised after
            pending_error = exc  # the monitor is closed properly
        finally:
            self._closed = True
            if self._background is not None:
                self._background.shutdown()
        self._detach()
        for recorder in self._recorders.values():
            recorder.reset()
        self._probes.clear()
        self._out.close()
        if pending_error is not None:
            raise pending_error

    def _detach(self) -> None:
        """Stop routing the model's forward calls and the optimizer's steps here (nothing stays behind)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module, recorder in self._attached:
            recorder.armed = False
            recorder.traced_by_compile = False
            _hooks.detach(module, recorder)
        self._attached.clear()
        if self.optimizer is not None:
            _detach_optimizer(self.optimizer, self)

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter exit
        with contextlib.suppress(Exception):
            if not self._closed:
                self._out.flush_quietly()

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue where this one stopped: step counter, detector windows,
        clip policy, warm-start vectors, kept probes, random generator. Only tensors and plain values, so
        ``torch.load`` reads it with its safe default ``weights_only=True``."""
        self.wait()  # warm starts and the generator belong to a measurement in flight until it is done
        generator = self._generator
        return {
            "step": self._step,
            "run_id": self.run_id,
            "clip_count": self.clip_count,
            "detector": self.detector.state_dict(),
            "nonfinite": self._nonfinite.state_dict(),
            "clip_policy": self.clip_policy.state_dict() if self.clip_policy is not None else None,
            "warm_starts": {
                "|".join(map(str, key)): warm_start_to_state(warm) for key, warm in self._warm_starts.items()
            },
            "probes": {name: probe_to_state(probe) for name, probe in self._probes.items()},
            "generator": None
            if generator is None
            else {"device": str(generator.device), "state": generator.get_state()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state_dict()`` of an earlier monitor on the same model (the run_id stays new)."""
        if not isinstance(state, Mapping) or not isinstance(state.get("step"), int):
            raise ValueError("a gradwatch state_dict needs an integer 'step' (from Monitor.state_dict())")
        self.wait()
        self._step = int(state["step"])
        self.clip_count = int(state.get("clip_count", 0))
        if "detector" in state:
            self.detector.load_state_dict(state["detector"])
        if "nonfinite" in state:
            self._nonfinite.load_state_dict(state["nonfinite"])
        if self.clip_policy is not None and state.get("clip_policy") is not None:
            self.clip_policy.load_state_dict(state["clip_policy"])
        self._warm_starts = {}
        for key, value in dict(state.get("warm_starts", {})).items():
            name, layer, direction = key.rsplit("|", 2)
            self._warm_starts[(name, int(layer), direction)] = warm_start_from_state(value)
        self._probes = {
            name: probe_from_state(probe)
            for name, probe in dict(state.get("probes", {})).items()
            if name in self._recorders
        }
        self._probe_steps = {name: _probe_length(probe) for name, probe in self._probes.items()}
        generator = state.get("generator")
        self._generator = None
        if generator is not None:
            self._generator = torch.Generator(device=torch.device(generator["device"]))
            self._generator.set_state(generator["state"])
        self._arm(self._is_measured(self._step))

    # --- the step -------------------------------------------------------------------------------------

    def _is_measured(self, step: int) -> bool:
        return step % self.config.every == 0

    def _arm(self, measured: bool) -> None:
        for name, recorder in self._recorders.items():
            need = measured and name not in self.faults.disabled_modules
            if self.config.probe == "fixed" and self._probe_steps.get(name, 0) >= FIXED_PROBE_MIN_STEPS:
                need = False  # a long enough probe is kept; nothing to record on this step
            recorder.armed = need

    def _end_of_step(self, optimizer: torch.optim.Optimizer | None) -> None:
        if self._closed:
            return
        step = self._step
        alerts: list[Alert] = self._collect(wait=False)  # a background measurement that has finished
        try:
            self._out.observe_step(step)
            grad_values: Mapping[str, float] = {}
            grad_nonfinite: Mapping[str, int] = {}
            nonfinite_total = 0
            with self.faults.guard("gradients"):
                grad_values, grad_nonfinite = gradient_norms(self._parameters).to_host_per_parameter()
                nonfinite_total = sum(grad_nonfinite.values())
                if nonfinite_total and self._background is not None and self._background.busy:
                    # Rare path: the non-finite alert quotes the latest Jacobian verdict (an exploding
                    # product names the cause), so the measurement still running must be published first.
                    alerts += self._collect(wait=True)
                alerts += self._observe_gradient_growth(step, grad_values)
                if nonfinite_total or self._nonfinite.active():
                    alerts += self._handle_nonfinite(step, optimizer)
            if self.clip_policy is not None and not nonfinite_total:
                with self.faults.guard("clip"):
                    self._clip(step)
            if self._is_measured(step):
                alerts += self._measure(step, grad_values, grad_nonfinite)
        except (GradWatchFault, NonFiniteGradientError):
            raise
        except Exception as exc:
            self._fault("step", "", exc)
        finally:
            for recorder in self._recorders.values():
                recorder.reset()
            self._step = step + 1
            self._arm(self._is_measured(self._step))
        self._deliver(alerts)

    def _deliver(self, alerts: list[Alert]) -> None:
        """Write alerts to the sinks, then warn/log/call back (which may raise on purpose: not a fault)."""
        for alert in alerts:
            self._emit(alert)
        if alerts:
            self._flush()
        for alert in alerts:
            emit_alert(alert, self._on_alert, stacklevel=5)

    def _observe_gradient_growth(self, step: int, grad_values: Mapping[str, float]) -> list[Alert]:
        """Every step: each module's total gradient norm (host floats, already synced) to the growth test."""
        if not self.config.detection.gradient_growth_test:
            return []
        names = self._module_gradient_names
        if names is None:
            names = {}
            for (module, _, _), parameters in self._layer_parameters.items():
                names.setdefault(module, []).extend(parameters)
            self._module_gradient_names = names
        now = time.time()
        alerts: list[Alert] = []
        for module, module_names in names.items():
            values = [grad_values[n] for n in module_names if n in grad_values]
            total = math.hypot(*values) if values else None  # NaN/Inf: skipped by the growth test
            alerts += self.detector.observe_gradient_norms(
                step, module, total, time=now, rank=self.rank, run_id=self.run_id
            )
        return alerts

    def _handle_nonfinite(self, step: int, optimizer: torch.optim.Optimizer | None) -> list[Alert]:
        """Per module: count NaN/Inf gradient elements, alert once per episode, apply the policy."""
        now = time.time()
        counts = {
            watched.name: {
                name: int((~torch.isfinite(p.grad)).sum())
                for name, p in watched.module.named_parameters()
                if p.grad is not None
            }
            for watched in self._watched
        }
        alerts: list[Alert] = []
        for module, module_counts in counts.items():
            context = explain_nonfinite_context(
                self.detector.latest_jacobian_reading(module),
                self.detector.growth_episode_start(module),
                self.detector.config,
            )
            alerts += self._nonfinite.update(
                step, module, module_counts, time=now, rank=self.rank, run_id=self.run_id, context=context
            )
        for module, module_counts in counts.items():
            if enforce_nonfinite_policy(
                self.config.nonfinite, module=module, counts=module_counts, step=step, optimizer=optimizer
            ):
                break  # every gradient is gone: the optimizer step does nothing
        return alerts

    def _clip(self, step: int) -> None:
        assert self.clip_policy is not None
        if self.config.clip_mode == "exploding" and not self._exploding_now():
            return
        parameters = (
            list(self._parameters.values())
            if self.config.clip_scope == "monitored"
            else list(self.model.parameters())
        )
        event = apply_clip(parameters, self.clip_policy, step)
        if event is not None:
            self.clip_count += 1
            self._emit(replace(event, rank=self.rank, run_id=self.run_id))

    def _exploding_now(self) -> bool:
        return any(
            self.detector.verdict(w.name, layer, direction) is Verdict.EXPLODING  # type: ignore[arg-type]
            for w in self._watched
            for layer in range(w.num_layers)
            for direction in w.directions
        )

    def _measure(
        self, step: int, grad_values: Mapping[str, float], grad_nonfinite: Mapping[str, int] | None = None
    ) -> list[Alert]:
        """Measure, record, and run the detector; returns the alerts to deliver.

        In background mode the replay and snapshots happen now and the estimators run on the worker
        thread, which hands the records to the live sinks (Prometheus) as soon as they are done; the other
        sinks, the detector and the alerts get them at a later step boundary (or by wait()/close()).
        """
        if self._background is None:
            return self._publish(self._estimate(self._prepare(step, grad_values, grad_nonfinite)))
        # One measurement at a time: the previous one's warm starts feed this one.
        alerts = self._collect(wait=True)
        job = self._prepare(step, grad_values, grad_nonfinite)
        if not any(module.layers for module in job.modules):
            return alerts + self._publish(self._estimate(job))
        live_sinks = self._out.live_sinks()  # chosen here, not there
        self._background.submit(partial(self._estimate_and_show_live, job, live_sinks))
        return alerts

    def _estimate_and_show_live(self, job: _MeasurementJob, live_sinks: list[LiveSink]) -> _MeasurementResult:
        """The worker's job: estimate, then give the records at once to the sinks that take them from this
        thread (so an exporter shows them without waiting for another step). A sink that raises gets no
        more of them; its fault is kept in the result and reported on the training thread at publication.
        Touches no monitor state besides what _estimate does."""
        result = self._estimate(job)
        result.live_faults.extend(write_live(live_sinks, result.records))
        return result

    def _collect(self, *, wait: bool) -> list[Alert]:
        """Publish a finished background measurement (waiting for it if ``wait``); its alerts."""
        if self._background is None:
            return []
        try:
            done, result = self._background.take(wait=wait)
        except Exception as exc:
            self._fault("measure", "", exc)
            return []
        if not done or result is None:
            return []
        return self._publish(result)

    def _publish(self, result: _MeasurementResult) -> list[Alert]:
        """Report estimator and live-sink faults, write the records, update the detector; returns the
        alerts. A live sink already showing a record takes it again here without showing it twice."""
        for module, exc in result.faults:
            self._fault("estimator", module, exc, step=result.step)
        self._out.report_live_faults(result.live_faults, result.step)
        alerts: list[Alert] = []
        for record in result.records:
            self._emit(record)
            if record.module in self.faults.disabled_modules:
                continue  # its detector failed on an earlier layer of this measurement
            try:
                alerts += self.detector.update(record)
            except Exception as exc:
                self._fault("detector", record.module, exc, step=record.step)
        if self._global_view is not None:
            try:
                for combined in self._global_view.exchange(result.records):
                    self._emit(combined)  # rank -1: all ranks combined (no detector: the ranks alert)
            except Exception as exc:
                self._global_view = None
                self._fault("global_view", "", exc, step=result.step)
        self._flush()
        return alerts

    def _measure_records(
        self, step: int, grad_values: Mapping[str, float] | None = None
    ) -> list[Measurement]:
        """One Measurement per layer and direction of every module that ran on this step, synchronously
        (no side effects on the user's random stream: the replay runs under a forked RNG)."""
        result = self._estimate(self._prepare(step, grad_values or {}))
        for module, exc in result.faults:
            self._fault("estimator", module, exc, step=step)
        return result.records

    def _prepare(
        self, step: int, grad_values: Mapping[str, float], grad_nonfinite: Mapping[str, int] | None = None
    ) -> _MeasurementJob:
        """The training-thread half of a measurement: replay every module on its probe and freeze what the
        estimators need (weights copied in background mode, as the optimizer is about to change them).
        User cells are estimated here too: their step function calls the live module."""
        job = _MeasurementJob(step=step, time=time.time(), modules=[])
        snapshot = self._background is not None
        with torch.random.fork_rng(devices=self._cuda_devices()), torch.no_grad(), _autocast_off():
            for watched in self._watched:
                if watched.name in self.faults.disabled_modules:
                    continue
                # A user cell runs in eval mode while it is measured: dropout inside it would make every
                # J v of the iteration a different matrix.
                custom = watched.kind == "custom"
                try:
                    with deterministic_mode(watched.module) if custom else nullcontext():
                        layers = self._layer_jobs(
                            watched, grad_values, snapshot=snapshot and not custom, nonfinite=grad_nonfinite
                        )
                        if custom:
                            ready = [self._estimate_layer(step, job.time, layer) for layer in layers]
                            job.modules.append(_ModuleJob(watched.name, [], ready))
                        else:
                            job.modules.append(_ModuleJob(watched.name, layers, []))
                except Exception as exc:
                    self._fault("estimator", watched.name, exc)
        return job

    def _layer_jobs(
        self,
        watched: WatchedModule,
        grads: Mapping[str, float],
        *,
        snapshot: bool,
        nonfinite: Mapping[str, int] | None = None,
    ) -> list[_LayerJob]:
        traces = self._traces(watched)
        if traces is None:
            return []
        jobs = []
        for trace in traces:
            jacobians: StepJacobians
            if trace.weights is not None:
                weights = _copy_weights(trace.weights) if snapshot else trace.weights
                jacobians = builtin_step_jacobians(weights, trace.inputs, trace.previous_states)
            else:
                assert trace.step_function is not None
                jacobians = function_step_jacobians(trace.step_function, trace.inputs, trace.previous_states)
            recurrent = trace.recurrent_weight
            if snapshot and recurrent is not None:
                recurrent = recurrent.detach().clone()
            jobs.append(
                _LayerJob(
                    module=watched.name,
                    layer=trace.layer,
                    direction=trace.direction,
                    jacobians=jacobians,
                    mask=trace.mask,
                    recurrent_weight=recurrent,
                    generator=self._generator_for(trace.states.device),
                    grads={
                        local: grads.get(qualified)
                        for local, qualified in self._grad_names(watched, trace).items()
                    },
                    grad_nonfinite=sum(
                        (nonfinite or {}).get(qualified, 0)
                        for qualified in self._grad_names(watched, trace).values()
                    ),
                )
            )
        return jobs

    def _estimate(self, job: _MeasurementJob) -> _MeasurementResult:
        """The estimator half: pure tensor work on the job's own tensors (safe on the worker thread). A
        module whose estimate fails gives no records and one fault, reported when the result is published."""
        result = _MeasurementResult(step=job.step, records=[], faults=[])
        with torch.no_grad(), _autocast_off():
            for module in job.modules:
                try:
                    records = [self._estimate_layer(job.step, job.time, layer) for layer in module.layers]
                except Exception as exc:
                    result.faults.append((module.name, exc))
                    continue
                result.records.extend(module.ready + records)
        return result

    def _estimate_layer(self, step: int, now: float, layer: _LayerJob) -> Measurement:
        key = (layer.module, layer.layer, layer.direction)
        settings = self.config.estimator
        if self._background is not None and settings.chunk_entries is None:
            settings = replace(settings, chunk_entries=BACKGROUND_CHUNK_ENTRIES)
        estimate = estimate_layer(
            layer.jacobians,
            layer.mask,
            layer.recurrent_weight,
            settings,
            warm_start=self._warm_starts.get(key),
            generator=layer.generator,
        )
        self._warm_starts[key] = estimate.warm_start
        values = layer_metrics(estimate)
        metrics = MeasurementMetrics(**values, grad_norm=layer.grads, grad_nonfinite=layer.grad_nonfinite)  # type: ignore[arg-type]
        return Measurement(
            step=step,
            time=now,
            module=layer.module,
            layer=layer.layer,
            direction=layer.direction,
            metrics=metrics,
            rank=self.rank,
            run_id=self.run_id,
        )

    def _traces(self, watched: WatchedModule) -> list[LayerTrace] | None:
        """Replay the module on its probe (fixed mode) or on this step's recorded call (live mode)."""
        recorder = self._recorders[watched.name]
        recorder.settle()  # calls recorded inside a torch.compile'd forward
        fixed = self.config.probe == "fixed"
        kept = self._probes.get(watched.name) if fixed else None
        kept_steps = self._probe_steps.get(watched.name, 0)
        recorded = recorder.fused_call if watched.kind == "fused" else (list(recorder.cell_calls) or None)
        # A kept probe shorter than FIXED_PROBE_MIN_STEPS gives way to a longer batch (the recorder stays
        # armed on measured steps until then): a first batch of T = 1 must not blind the monitor for good.
        renew = (
            kept is not None
            and recorded is not None
            and kept_steps < FIXED_PROBE_MIN_STEPS
            and _probe_length(recorded) > kept_steps
        )
        fresh = kept is None or renew
        probe = recorded if fresh else kept
        if probe is None:
            return None  # the module did not run with gradients on this step
        if fresh and recorder.recorded_in_eval:
            self._warn_once(
                f"eval-forward:{watched.name}",
                f"gradwatch: {watched.name} ran only in eval mode (module.training is False) with "
                f"gradients on during measured step {self._step}; measuring that call. If this is a "
                "validation pass, run it under torch.no_grad() (it is then ignored); a training-mode "
                "forward on the step is always preferred over eval-mode ones",
            )
        if fresh and fixed:
            self._probes[watched.name] = probe
            self._probe_steps[watched.name] = steps = _probe_length(probe)
            if steps < VERDICT_MIN_STEPS:
                message = (
                    f"gradwatch: the fixed probe of {watched.name} has only {steps} time step(s): no lag "
                    "norm and no Lyapunov exponent, so no vanishing/exploding verdict; it is replaced by "
                    f"the next measured batch that is longer, until one has {FIXED_PROBE_MIN_STEPS} steps"
                )
                try:
                    self._warn_once(f"short-probe:{watched.name}", message)
                except Warning:  # GradWatchWarning turned into an error: a notice, not a reason to fail
                    logger.warning(message)
        module = watched.module
        # A fresh call is measured at the weights its forward used, kept by the hook (the optimizer may have
        # moved them since: LBFGS steps after its last closure); a kept probe is re-run at the current ones.
        recorded = recorder.weights if fresh else None
        if watched.kind == "fused":
            assert isinstance(probe, FusedCall) and watched.cell_kind is not None
            reference = probe if fresh else rerun_fused(module, probe)  # a kept probe: re-run the module
            replay = replay_fused(module, watched.cell_kind, probe, recorded)
            check = check_fused_replay(module, reference, replay)
            traces = replay.traces
        elif watched.kind == "cell":
            assert isinstance(probe, list) and watched.cell_kind is not None
            trace = trace_builtin_cell(
                module, watched.cell_kind, probe, recompute=not fresh, weights=recorded
            )
            check = check_cell_replay(trace) if fresh else check_cell_against_module(module, trace)
            traces = [trace]
        else:
            assert isinstance(probe, list) and watched.custom is not None
            traces = [trace_custom_cell(module, watched.custom, probe, recompute=True, weights=recorded)]
            check = None
        if check is not None and not check.ok:
            self._probes.pop(watched.name, None)
            self._probe_steps.pop(watched.name, None)
            self._warn_once(
                f"replay:{watched.name}",
                f"gradwatch: replaying {watched.name} ({type(module).__name__}) did not reproduce its "
                f"{check.compared} (max abs error {check.max_abs_error:.3g} > {check.tolerance:.3g}); "
                "skipping this module's measurement",
            )
            return None
        return traces

    # --- plumbing -------------------------------------------------------------------------------------

    def _map_layer_parameters(self) -> dict[LayerKey, dict[str, nn.Parameter]]:
        """Which leaf parameters belong to each (module, layer, direction), by qualified name.

        A parametrized or weight-dropped weight is attributed to the leaves it is computed from
        (``WatchedModule.weight_leaves``); ``self._local_names`` keeps each leaf's name in grad_norm."""
        out: dict[LayerKey, dict[str, nn.Parameter]] = {}
        self._local_names: dict[LayerKey, dict[str, str]] = {}
        for watched in self._watched:
            params = dict(watched.module.named_parameters())
            for layer in range(watched.num_layers):
                for direction in watched.directions:
                    key = (watched.name, layer, direction)
                    if watched.kind == "fused":
                        names = fused_parameter_names(watched.module, layer, direction)  # type: ignore[arg-type]
                        leaves = {
                            local: p for n in names for local, p in watched.weight_leaves.get(n, {}).items()
                        }
                    elif watched.kind == "cell":
                        leaves = {local: p for w in watched.weight_leaves.values() for local, p in w.items()}
                    else:
                        leaves = params
                    # a leaf inside the module: "<module>.<local>"; on a parent (fastai's WeightDropout):
                    # already named relative to the model
                    local_to_qualified = {
                        local: f"{watched.name}.{local}" if local in params else local for local in leaves
                    }
                    out[key] = {local_to_qualified[local]: p for local, p in leaves.items()}
                    self._local_names[key] = local_to_qualified
            if watched.unattributed_weights:
                self._warn(
                    f"gradwatch: {watched.name} computes {', '.join(watched.unattributed_weights)} in its "
                    "forward from no parameter gradwatch could find (not a parameter, not parametrized, no "
                    "'<name>_raw' on it or a parent module); its Jacobians are measured, but grad_norm "
                    "leaves those weights out"
                )
        return out

    def _grad_names(self, watched: WatchedModule, trace: LayerTrace) -> dict[str, str]:
        return dict(self._local_names[(watched.name, trace.layer, trace.direction)])

    def _generator_for(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.config.seed)
        return self._generator

    def _cuda_devices(self) -> list[int]:
        if not torch.cuda.is_available():
            return []
        return sorted({p.device.index or 0 for p in self._parameters.values() if p.device.type == "cuda"})

    def _emit(self, record: Record) -> None:
        self._out.emit(record)

    def _flush(self) -> None:
        self._out.flush()

    def _module_disabled(self, module: str) -> None:
        """The fault policy disabled a module: stop recording its calls."""
        self._recorders[module].armed = False
        self._recorders[module].reset()

    def _part_disabled(self, part: str) -> None:
        """The fault policy turned a monitor-wide part off (clipping)."""
        if part == "clip":
            self.clip_policy = None

    def _fault(self, where: str, module: str, exc: Exception, *, step: int | None = None) -> None:
        self.faults.fault(where, module, exc, step=step)

    def _warn(self, message: str) -> None:
        self.faults.warn(message)

    def _warn_once(self, key: str, message: str) -> None:
        self.faults.warn_once(key, message)


# One process-wide optimizer step pre-hook (nothing is registered on the optimizer), dispatching to the
# monitors attached to each optimizer; removed when the last one closes.
_optimizer_monitors: weakref.WeakKeyDictionary[torch.optim.Optimizer, list[Monitor]] = (
    weakref.WeakKeyDictionary()
)
_optimizer_hook_handle: RemovableHandle | None = None


def _attach_optimizer(optimizer: torch.optim.Optimizer, monitor: Monitor) -> None:
    global _optimizer_hook_handle
    _optimizer_monitors.setdefault(optimizer, []).append(monitor)
    if _optimizer_hook_handle is None:
        _optimizer_hook_handle = register_optimizer_step_pre_hook(_optimizer_step_hook)


def _detach_optimizer(optimizer: torch.optim.Optimizer, monitor: Monitor) -> None:
    global _optimizer_hook_handle
    monitors = _optimizer_monitors.get(optimizer, [])
    if monitor in monitors:
        monitors.remove(monitor)
    if not monitors:
        _optimizer_monitors.pop(optimizer, None)
    if not _optimizer_monitors and _optimizer_hook_handle is not None:
        _optimizer_hook_handle.remove()
        _optimizer_hook_handle = None


def _optimizer_step_hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Close the step of every monitor attached to this optimizer (a copy of it has none)."""
    for monitor in list(_optimizer_monitors.get(optimizer, ())):
        monitor._end_of_step(optimizer)


@contextlib.contextmanager
def _autocast_off() -> Iterator[None]:
    """Measure in the module's own precision even if optimizer.step() runs inside a torch.autocast block."""
    with contextlib.ExitStack() as stack:
        for device_type in ("cpu", "cuda"):
            if device_type == "cpu" or torch.cuda.is_available():
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


def _probe_length(probe: FusedCall | list[CellCall]) -> int:
    """Time steps of a probe: its longest kept sequence (fused call) or its number of cell calls."""
    if isinstance(probe, FusedCall):
        return int(probe.lengths.max()) if probe.lengths.numel() else 0
    return len(probe)


def rank_log_path(path: str | os.PathLike[str], rank: int) -> Path:
    """``runs/exp.jsonl`` for rank 0, ``runs/exp.rank1.jsonl`` for rank 1, ..."""
    p = Path(path)
    return p if rank == 0 else p.with_name(f"{p.stem}.rank{rank}{p.suffix or '.jsonl'}")


def new_run_id() -> str:
    """A sortable, unique run id: start time plus random suffix."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"


def watch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    every: int = 50,
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
    estimator: EstimatorSettings | None = None,
    strict: bool = False,
    seed: int = 0,
    fsync: FsyncPolicy = "header",
    history_size: int = 100_000,
    run_id: str | None = None,
    log_ranks: LogRanks = "all",
    global_view: bool = False,
    background: bool | None = None,
) -> Monitor:
    """Attach a monitor to every recurrent module of ``model``: one line, no change to the training loop.

    With an ``optimizer`` each ``optimizer.step()`` closes a training step; without one, call
    ``monitor.step()`` after ``loss.backward()``. Measures on step 0 and every ``every`` steps after it, on at
    most ``max_sequences`` sequences of the batch. ``probe="fixed"`` re-measures the sequences seen at the
    first measurement with the current weights (trends then depend on the weights alone; a probe shorter
    than FIXED_PROBE_MIN_STEPS = 8 steps is replaced by the next longer measured batch);
    ``probe="live"`` measures each measured step's own batch. ``log`` is a JSON-lines run log path.
    ``clip``: None, a max norm (as ``clip_grad_norm_``), ``"auto"`` (ZClip) or a ClipPolicy.
    ``nonfinite``: "warn", "raise" or "skip" (the optimizer step does not happen).
    ``prometheus``: a port (0 = any free one), "host:port" or "push://host:port".
    ``tensorboard``: a directory for TensorBoard event files (rank r > 0 writes ``DIR/rank<r>``; needs
    ``pip install 'gradwatch[tensorboard]'``).
    Under torch.distributed every rank measures its own batch; ``log_ranks="all"`` writes one log per rank
    (``NAME.rank<r>.jsonl`` for r > 0), ``"zero"`` only rank 0's. ``run_id`` defaults to rank 0's new id.
    ``global_view=True`` adds, on rank 0, records of rank -1 that combine every rank's measurement.
    ``background=True`` runs the estimators on a worker thread beside the next training steps: the
    Prometheus exporter (any :class:`~gradwatch.sinks.base.LiveSink`) shows each measurement as soon as
    it is done; the run log, logging, alerts and callbacks get it at the next step boundary, in step order
    (``monitor.wait()`` delivers it at once); ``None`` chooses it when every watched module is a built-in
    RNN on the CPU and ``global_view`` is off.
    Every configuration error is raised here, before training starts.
    """
    config = WatchConfig(
        every=every,
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
        estimator=estimator or EstimatorSettings(),
        detection=detection or DetectionConfig(),
    )
    if not isinstance(config.estimator, EstimatorSettings):
        raise TypeError(
            f"estimator must be a gradwatch.EstimatorSettings, got {type(config.estimator).__name__}"
        )
    if not isinstance(global_view, bool):
        raise TypeError(f"global_view must be True or False, got {global_view!r}")
    if not isinstance(config.detection, DetectionConfig):
        raise TypeError(
            f"detection must be a gradwatch.DetectionConfig, got {type(config.detection).__name__}"
        )
    if config.nonfinite is NonFinitePolicy.SKIP and optimizer is None:
        raise ValueError("nonfinite='skip' needs the optimizer: watch(model, optimizer, nonfinite='skip')")
    _check_watch_options(optimizer, strict=strict, seed=seed, fsync=fsync)
    clip_policy = None if clip is None else make_clip_policy(clip)
    callbacks = _callbacks(on_alert)
    modules = find_rnn_modules(model)
    if not modules:
        raise ValueError(no_rnn_message(model))
    if optimizer is not None:
        _check_optimizer_holds_watched(optimizer, modules)
    config = replace(
        config,
        background=_resolve_background(background, modules, global_view=global_view, clip_mode=clip_mode),
    )
    log_ranks = check_log_ranks(log_ranks)
    if run_id is not None and (not isinstance(run_id, str) or not run_id):
        raise ValueError(f"run_id must be a non-empty string (or None for a new one), got {run_id!r}")
    rank, _ = distributed_rank()
    run_id = run_id or shared_run_id(new_run_id())
    user_sinks = list(sinks)
    for sink in user_sinks:
        if not all(callable(getattr(sink, m, None)) for m in ("write", "flush", "close")):
            raise TypeError(f"sinks must have write(record), flush() and close(); {sink!r} does not")
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


def _resolve_background(
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


def _check_watch_options(optimizer: object, *, strict: object, seed: object, fsync: object) -> None:
    """Options that are checked nowhere else, so that a typo fails at watch() rather than later (or never)."""
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer (or None, then call monitor.step() after "
            f"backward), got {type(optimizer).__name__}"
        )
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be True or False, got {strict!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    if fsync not in FSYNC_POLICIES:
        raise ValueError(
            f"fsync must be one of {', '.join(map(repr, FSYNC_POLICIES))} (when to fsync the run log), "
            f"got {fsync!r}"
        )


def _check_optimizer_holds_watched(
    optimizer: torch.optim.Optimizer, modules: Sequence[WatchedModule]
) -> None:
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


def _callbacks(on_alert: AlertCallback | Sequence[AlertCallback] | None) -> list[AlertCallback]:
    if on_alert is None:
        return []
    callbacks = [on_alert] if callable(on_alert) else list(on_alert)
    for fn in callbacks:
        if not callable(fn):
            raise TypeError(f"on_alert must be a callable fn(alert) or a list of them, got {fn!r}")
    return callbacks

""":class:`Monitor`, the coordinator (``gradwatch.watch()`` in attach.py builds it): it owns the step
counter, the schedule and the order of the work in a step; the work itself is done by parts with one
job each (docs/architecture.md).

A *step* is one optimizer step (or one ``monitor.step()`` call when no optimizer is given). On step 0 and
every ``every`` steps after it the monitor measures: forward hooks record the step's inputs, and just before
the optimizer applies the gradients (a step pre-hook) the measurement pipeline (measure.py) replays each
recurrent layer and estimates its Jacobian norms, and the records go to the detector and, through the sink
fan-out (sinks/fanout.py), to the sinks. On every step the step policies (policy/step.py) check the
gradients for non-finite values and, if asked, clip them. Faults go to the fault policy (faults.py); input
checks live in checks.py.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, Literal

import torch
from torch import nn

from gradwatch._version import __version__
from gradwatch.background import BackgroundWorker, run_and_release
from gradwatch.capture.modules import (
    WatchedModule,
    find_rnn_modules,
    no_rnn_message,
)
from gradwatch.checks import (
    check_config,
    check_optimizer,
)
from gradwatch.distributed import (
    GlobalView,
    distributed_rank,
)
from gradwatch.estimators.gradients import gradient_norms
from gradwatch.estimators.layer import (
    EstimatorSettings,
    WarmStart,
)
from gradwatch.faults import FaultPolicy, GradWatchFault
from gradwatch.lifecycle.monitor_lifecycle import MonitorLifecycle
from gradwatch.measure import (
    LayerKey,
    MeasurementJob,
    MeasurementPipeline,
    MeasurementResult,
    ProbeMode,
    estimate,
)
from gradwatch.policy.alerts import AlertCallback, NonFiniteGradientError, emit_alert
from gradwatch.policy.clipping import ClipPolicy
from gradwatch.policy.config import DetectionConfig
from gradwatch.policy.gradient_growth import ModuleGradientGrowth
from gradwatch.policy.nonfinite import NonFinitePolicy
from gradwatch.policy.schedule import MeasurementSchedule
from gradwatch.policy.step import ClipStepPolicy, GradientStats, NonFiniteStepPolicy, StepPolicy, split_alerts
from gradwatch.policy.trends import TrendDetector
from gradwatch.records import (
    Alert,
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

logger = logging.getLogger("gradwatch")

ClipScope = Literal["monitored", "all"]
ClipMode = Literal["always", "exploding"]


@dataclass(frozen=True)
class WatchConfig:
    """The validated settings of a monitor; its JSON form goes into the run header."""

    every: int = 50
    time_budget: float | None = None  # share of the training time measurements may take; None: no limit
    max_sequences: int = 8
    probe: ProbeMode = "fixed"
    strict: bool = False
    seed: int = 0
    history_size: int = 10_000  # ~2.8 KB per measurement record: ~28 MB (docs/performance.md)
    nonfinite: NonFinitePolicy = NonFinitePolicy.WARN
    clip: str | float | None = None  # the clip option as given (a policy: its repr), for the run header
    clip_scope: ClipScope = "monitored"
    clip_mode: ClipMode = "always"
    global_view: bool = False
    background: bool = False
    horizon: int | None = None  # the dependency range (steps) the task needs; None: the sequence length
    estimator: EstimatorSettings = field(default_factory=EstimatorSettings)
    detection: DetectionConfig = field(default_factory=DetectionConfig)

    def __post_init__(self) -> None:
        check_config(self)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["nonfinite"] = self.nonfinite.value
        for part in ("estimator", "detection"):
            data[part] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in data[part].items()}
        return data


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
        name: str | None = None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.config = config
        self._watched = list(modules) if modules is not None else find_rnn_modules(model)
        if not self._watched:
            raise ValueError(no_rnn_message(model))
        self.rank, self.world_size = distributed_rank()
        self.run_id = run_id or new_run_id()
        self.name = name
        """The run's name from ``watch(..., name=...)`` (in the run header; the report shows it), or None."""
        self.detector = TrendDetector(config.detection)
        self._global_view = (
            GlobalView(self.run_id, self.rank, self.world_size)
            if config.global_view and self.world_size > 1
            else None
        )
        self._on_alert = list(on_alert)
        self._background: BackgroundWorker[MeasurementResult] | None = (
            BackgroundWorker() if config.background else None
        )
        # Ranks must measure the same steps (the global view gathers them): with several, a fixed schedule.
        self._schedule = MeasurementSchedule(
            config.every, config.time_budget if self.world_size <= 1 else None
        )
        self._step = 0
        self._closure_step: int | None = None  # a measured step whose forward runs in optimizer.step(closure)
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
        # The warm starts of the last measurement: kept here, on the training thread; each job gets a copy
        # and its result brings the new ones back (the background worker never touches this dict).
        self._warm_starts: dict[LayerKey, WarmStart] = {}
        self._pipeline = MeasurementPipeline(
            self._watched,
            self.faults,
            probe=config.probe,
            max_sequences=config.max_sequences,
            seed=config.seed,
            estimator=config.estimator,
            background=config.background,
            model_label=f"{type(model).__name__} (run {self.run_id})",
            horizon=config.horizon,
            reach_floor=config.detection.vanishing_lag_norm,
        )
        self._recorders = self._pipeline.recorders
        self._layer_parameters = self._pipeline.layer_parameters
        self._gradient_growth = ModuleGradientGrowth(
            self._layer_parameters, self.detector, rank=self.rank, run_id=self.run_id
        )
        self._parameters = self._pipeline.parameters
        # What is done to every step before the optimizer applies it, in this order.
        self._nonfinite_step = NonFiniteStepPolicy(
            self._watched, self.detector, config.nonfinite, rank=self.rank, run_id=self.run_id
        )
        self._clip_step = (
            None
            if clip is None
            else ClipStepPolicy(
                clip,
                list(self._parameters.values())
                if config.clip_scope == "monitored"
                else list(model.parameters()),
                self.detector,
                self._watched,
                mode=config.clip_mode,
                rank=self.rank,
                run_id=self.run_id,
            )
        )
        self._step_policies: list[StepPolicy] = [self._nonfinite_step]
        if self._clip_step is not None:
            self._step_policies.append(self._clip_step)

        check_optimizer(optimizer)
        self._lifecycle = MonitorLifecycle(
            self,
            pipeline=self._pipeline,
            background=self._background,
            out=self._out,
            publish=self.wait,
            emit=self._emit,
            last_step=lambda: self._step - 1,
            rank=self.rank,
        )
        # All or nothing: a failure up to the run header (strict mode and a full device) leaves nothing.
        self._lifecycle.start(
            f"monitor {self.run_id} (modules {', '.join(self.watched_modules)})", announce=self._announce
        )

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
    def clip_policy(self) -> ClipPolicy | None:
        """The gradient clipping policy, or None (none given, or turned off by a fault)."""
        return self._clip_step.policy if self._clip_step in self._step_policies else None

    @property
    def clip_count(self) -> int:
        """How many steps were clipped."""
        return 0 if self._clip_step is None else self._clip_step.count

    @property
    def warm_starts(self) -> dict[LayerKey, WarmStart]:
        """A copy of the warm starts the next measurement starts from, per (module, layer, direction); waits
        for a measurement still running in the background (its result brings the new ones)."""
        self.wait()
        return dict(self._warm_starts)

    @property
    def current_step(self) -> int:
        """The index of the step in progress (the number of completed steps)."""
        return self._step

    def watched_parameter_ids(self) -> set[int]:
        """Ids of the watched leaf parameters (an optimizer holding them all may replace the one given)."""
        return {id(p) for p in self._parameters.values()}

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

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran (even one that raised): no hook is left, the sinks are closed."""
        return self._lifecycle.closed

    def close(self) -> None:
        """Remove every hook, flush and close the sinks. Idempotent; the model behaves as before. An
        interrupt (Ctrl-C) inside it still removes the hooks and closes the log, then propagates; calling
        ``close()`` again completes whatever it stopped."""
        self._lifecycle.close()

    def _announce(self) -> None:
        """The run starts: arm the first step, write the run header."""
        self._arm(self._is_measured(self._step))
        if self.prometheus_url is not None:
            logger.info("gradwatch: Prometheus metrics at %s", self.prometheus_url)
        self._emit(
            RunHeader(
                run_id=self.run_id,
                started=time.time(),
                gradwatch=__version__,
                torch=torch.__version__,
                config=self.config.to_json(),
                modules=tuple(w.describe() for w in self._watched),
                rank=self.rank,
                world_size=self.world_size,
                name=self.name,
            )
        )
        self._flush()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter exit
        with contextlib.suppress(Exception):
            if not self._lifecycle.closed:
                self._out.flush_quietly()

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue where this one stopped: step counter, detector windows,
        clip policy, warm-start vectors, kept probes, random generator. Only tensors and plain values, so
        ``torch.load`` reads it with its safe default ``weights_only=True``."""
        self.wait()  # warm starts and the generator belong to a measurement in flight until it is done
        generator = self._pipeline.generator
        return {
            "step": self._step,
            "run_id": self.run_id,
            "clip_count": self.clip_count,
            "detector": self.detector.state_dict(),
            "nonfinite": self._nonfinite_step.tracker.state_dict(),
            "clip_policy": self.clip_policy.state_dict() if self.clip_policy is not None else None,
            "warm_starts": {
                "|".join(map(str, key)): warm_start_to_state(warm) for key, warm in self._warm_starts.items()
            },
            "probes": {name: probe_to_state(probe) for name, probe in self._pipeline.probes.items()},
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
        if self._clip_step is not None:
            self._clip_step.count = int(state.get("clip_count", 0))
        if "detector" in state:
            self.detector.load_state_dict(state["detector"])
        if "nonfinite" in state:
            self._nonfinite_step.tracker.load_state_dict(state["nonfinite"])
        clip_policy = self.clip_policy
        if clip_policy is not None and state.get("clip_policy") is not None:
            clip_policy.load_state_dict(state["clip_policy"])
        self._warm_starts = {}
        for key, value in dict(state.get("warm_starts", {})).items():
            name, layer, direction = key.rsplit("|", 2)
            self._warm_starts[(name, int(layer), direction)] = warm_start_from_state(value)
        self._pipeline.load_probes(
            {name: probe_from_state(probe) for name, probe in dict(state.get("probes", {})).items()}
        )
        generator = state.get("generator")
        self._pipeline.generator = None
        if generator is not None:
            self._pipeline.generator = torch.Generator(device=torch.device(generator["device"]))
            self._pipeline.generator.set_state(generator["state"])
        self._arm(self._is_measured(self._step))

    # --- the step -------------------------------------------------------------------------------------

    def _is_measured(self, step: int) -> bool:
        return self._schedule.is_measured(step)

    def _timed_measure(
        self, step: int, grad_values: Mapping[str, float], grad_nonfinite: Mapping[str, int] | None
    ) -> list[Alert]:
        """:meth:`_measure`, its time on the training thread told to the schedule."""
        begin = time.perf_counter()
        try:
            return self._measure(step, grad_values, grad_nonfinite)
        finally:
            self._schedule.measured(step, time.perf_counter() - begin)

    def _arm(self, measured: bool) -> None:
        self._pipeline.arm(measured)

    def _end_of_step(self, optimizer: torch.optim.Optimizer | None, *, closure: bool = False) -> None:
        """Close the step in progress. ``closure``: ``optimizer.step(closure)`` was called, so this step's
        forward passes run inside it, after this pre-hook (LBFGS); a measured step is then measured from the
        step post-hook, on the last closure's forward (:meth:`_end_of_closure_step`)."""
        if self._lifecycle.closed:
            self._lifecycle.stepped_after_close()
            return
        self._closure_step = None  # a closure step whose post-hook never ran (its closure raised)
        self._schedule.step_boundary()
        step = self._step
        alerts: list[Alert] = self._collect(wait=False)  # a background measurement that has finished
        try:
            self._out.observe_step(step)
            gradients = GradientStats({}, {}, complete=False)
            with self.faults.guard("gradients"):
                norms, nonfinite = gradient_norms(self._parameters).to_host_per_parameter()
                gradients = GradientStats(norms, nonfinite)
                if gradients.nonfinite_total and self._background is not None and self._background.busy:
                    # Rare path: the non-finite alert quotes the latest Jacobian verdict (an exploding
                    # product names the cause), so the measurement still running must be published first.
                    alerts += self._collect(wait=True)
                alerts += self._gradient_growth.observe(step, norms)
            for policy in list(self._step_policies):
                with self.faults.guard(policy.fault_name):
                    policy_alerts, records = split_alerts(policy.before_step(step, gradients, optimizer))
                    for record in records:
                        self._emit(record)
                    alerts += policy_alerts
            if self._is_measured(step):
                if closure:
                    self._closure_step = step
                else:
                    alerts += self._timed_measure(step, gradients.norms, gradients.nonfinite)
        except (GradWatchFault, NonFiniteGradientError):
            raise
        except Exception as exc:
            self._fault("step", "", exc)
        finally:
            self._pipeline.reset()  # for a closure step: the previous step's calls, not this one's
            self._step = step + 1
            self._arm(self._closure_step is not None or self._is_measured(self._step))
        self._deliver(alerts)

    def _end_of_closure_step(self) -> None:
        """Measure a closure step after ``optimizer.step(closure)``: its closures ran after the pre-hook, and
        the recorded (last) call is measured at the weights it used, with the gradients it left."""
        step, self._closure_step = self._closure_step, None
        if self._lifecycle.closed or step is None:
            return
        alerts: list[Alert] = []
        try:
            with self.faults.guard("gradients"):
                norms, nonfinite = gradient_norms(self._parameters).to_host_per_parameter()
                alerts += self._timed_measure(step, norms, nonfinite)
        except (GradWatchFault, NonFiniteGradientError):
            raise
        except Exception as exc:
            self._fault("step", "", exc)
        finally:
            self._pipeline.reset()
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

    def _measure(
        self, step: int, grad_values: Mapping[str, float], grad_nonfinite: Mapping[str, int] | None = None
    ) -> list[Alert]:
        """Measure, record, and run the detector; returns the alerts to deliver.

        In background mode the replay and snapshots happen now and the estimators run on the worker
        thread, which hands the records to the live sinks (Prometheus) as soon as they are done; the other
        sinks, the detector and the alerts get them at a later step boundary (or by wait()/close()).
        """
        if self._background is None:
            job = self._prepare(step, grad_values, grad_nonfinite)
            return self._publish(run_and_release(partial(estimate, job)))
        # One measurement at a time: the previous one's warm starts feed this one.
        alerts = self._collect(wait=True)
        job = self._prepare(step, grad_values, grad_nonfinite)
        if not any(module.layers for module in job.modules) or not self._pipeline.fits_in_background(job):
            return alerts + self._publish(run_and_release(partial(estimate, job)))
        live_sinks = self._out.live_sinks()  # chosen here, not there
        self._background.submit(partial(_estimate_and_show_live, job, live_sinks), tag=step)
        return alerts

    def _prepare(
        self, step: int, grad_values: Mapping[str, float], grad_nonfinite: Mapping[str, int] | None
    ) -> MeasurementJob:
        """The training-thread half: the job, with a copy of the warm starts it starts from."""
        return self._pipeline.prepare(
            step,
            grad_values,
            grad_nonfinite,
            warm_starts=self._warm_starts,
            rank=self.rank,
            run_id=self.run_id,
        )

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

    def _publish(self, result: MeasurementResult) -> list[Alert]:
        """Report estimator and live-sink faults, write the records, update the detector; returns the
        alerts. A live sink already showing a record takes it again here without showing it twice. The
        result's warm starts are kept here, on the training thread, for the next measurement."""
        self._warm_starts.update(result.warm_starts)
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

    def _emit(self, record: Record) -> None:
        self._out.emit(record)

    def _flush(self) -> None:
        self._out.flush()

    def _module_disabled(self, module: str) -> None:
        """The fault policy disabled a module: stop recording its calls."""
        self._pipeline.disarm(module)

    def _part_disabled(self, part: str) -> None:
        """The fault policy turned a monitor-wide part off (clipping)."""
        if part == "clip" and self._clip_step in self._step_policies:
            self._step_policies.remove(self._clip_step)

    def _fault(self, where: str, module: str, exc: Exception, *, step: int | None = None) -> None:
        self.faults.fault(where, module, exc, step=step)


def _estimate_and_show_live(job: MeasurementJob, live_sinks: list[LiveSink]) -> MeasurementResult:
    """The worker's job: estimate, then give the records at once to the sinks that take them from this
    thread (so an exporter shows them without waiting for another step). A sink that raises gets no more of
    them; its fault is kept in the result and reported on the training thread at publication. Touches no
    monitor state: the job carries its warm starts in and the result carries the new ones out."""
    result = estimate(job)
    result.live_faults.extend(write_live(live_sinks, result.records))
    return result


def new_run_id() -> str:
    """A sortable, unique run id: start time plus random suffix."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"

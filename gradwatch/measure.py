"""The measurement pipeline: capture -> prepare (replay, traces, probes) -> estimate -> records.

:class:`MeasurementPipeline` owns the hooks that record the measured step's inputs, the kept probes, the
random generator of the estimators and which parameters belong to each layer. It runs in two halves:

- :meth:`MeasurementPipeline.prepare`, on the training thread: replay every watched module on its probe
  and freeze what the estimators need into a :class:`MeasurementJob` (weights copied when the job runs in
  the background, as the optimizer is about to change them). The warm starts of the previous measurement
  go IN with the job.
- :func:`estimate`, pure tensor work on the job's own tensors (safe on the background worker thread): one
  :class:`~gradwatch.records.Measurement` per layer and direction, and the new warm starts, returned WITH
  the result for the training thread to keep.

:meth:`MeasurementPipeline.measure` runs both halves at once (``gradwatch.diagnose`` uses it).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Literal

import torch
from torch import nn

from gradwatch.capture import hooks as _hooks
from gradwatch.capture.hooks import CallRecorder, CellCall, FusedCall
from gradwatch.capture.modules import WatchedModule
from gradwatch.capture.replay import (
    LayerTrace,
    check_cell_against_module,
    check_cell_replay,
    check_fused_replay,
    fused_parameter_names,
    replay_fused,
    rerun_fused,
    trace_builtin_cell,
    trace_custom_cell,
)
from gradwatch.estimators.jacobian import StepJacobians, builtin_step_jacobians, function_step_jacobians
from gradwatch.estimators.layer import (
    BACKGROUND_CHUNK_ENTRIES,
    EstimatorSettings,
    WarmStart,
    estimate_layer,
    layer_metrics,
)
from gradwatch.estimators.reach import DEFAULT_REACH_FLOOR, gradient_reach, judged_horizon
from gradwatch.faults import FaultPolicy
from gradwatch.policy.memory import background_budget, peak_memory_bytes
from gradwatch.records import Direction, Measurement
from gradwatch.sinks.base import Sink

logger = logging.getLogger("gradwatch")

#: probe="fixed" keeps a probe for good only once it has this many time steps (its longest kept sequence):
#: lags 1, 2, 4, 7 then reach back far enough for a verdict (a vanishing one needs a lag norm < 1e-3). A
#: shorter probe is kept for now and replaced by the next measured batch that is longer, until one has it.
FIXED_PROBE_MIN_STEPS = 8
#: A probe shorter than this has no lag norm and no Lyapunov exponent: no verdict at all (one warning).
VERDICT_MIN_STEPS = 2
#: A watched module not recorded on this many measured steps gets one warning and one error record.
NEVER_RECORDED_AFTER = 2

ProbeMode = Literal["fixed", "live"]
LayerKey = tuple[str, int, str]  # (module name, layer, direction)
Probe = FusedCall | list[CellCall]


@dataclass
class LayerJob:
    """One layer and direction, frozen at the measured step, ready for the estimators."""

    module: str
    layer: int
    direction: Direction
    jacobians: StepJacobians
    mask: torch.Tensor
    recurrent_weight: torch.Tensor | None
    generator: torch.Generator
    grads: dict[str, float | None]
    grad_nonfinite: int = 0  # NaN/Inf gradient elements of this layer's parameters

    @property
    def key(self) -> LayerKey:
        return (self.module, self.layer, self.direction)


@dataclass
class ModuleJob:
    name: str
    layers: list[LayerJob]  # still to estimate
    ready: list[Measurement]  # already estimated on the training thread (user cells)
    ready_warm_starts: dict[LayerKey, WarmStart] = field(default_factory=dict)  # theirs, for the result


@dataclass
class MeasurementJob:
    """Everything one measurement needs, owned by the job: it may run on the worker thread."""

    step: int
    time: float
    modules: list[ModuleJob]
    settings: EstimatorSettings
    warm_starts: dict[LayerKey, WarmStart]  # IN: the previous measurement's (a private copy)
    rank: int = 0
    run_id: str = ""
    reach_floor: float = DEFAULT_REACH_FLOOR
    horizon: int | None = None
    """The declared dependency range (``watch(horizon=)``); None: the measured sequence length."""


def job_bytes(job: MeasurementJob) -> tuple[int, torch.device]:
    """Bytes of the tensors the job's layers hold that the model does not (the Jacobians' coefficients,
    weight copies, masks: what a background job keeps alive beside the training steps; the warm starts are
    the monitor's in every mode), and the device they live on."""
    storages: dict[int, int] = {}
    device = torch.device("cpu")
    for module in job.modules:
        for layer in module.layers:
            for tensor in _tensors_of((layer.jacobians, layer.mask, layer.recurrent_weight)):
                if not tensor.is_meta:
                    storage = tensor.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
                    device = tensor.device
    return sum(storages.values()), device


def _tensors_of(value: object, depth: int = 0) -> Iterator[torch.Tensor]:
    """The tensors in ``value``: itself, or inside its tuples, lists, dicts and attributes (a few levels)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif depth < 4 and isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors_of(item, depth + 1)
    elif depth < 4 and isinstance(value, dict):
        for item in value.values():
            yield from _tensors_of(item, depth + 1)
    elif depth < 4 and hasattr(value, "__dict__") and not isinstance(value, (nn.Module, torch.Generator)):
        for item in vars(value).values():
            yield from _tensors_of(item, depth + 1)


@dataclass
class MeasurementResult:
    step: int
    records: list[Measurement]
    faults: list[tuple[str, Exception]]  # (module, what its estimate raised)
    live_faults: list[tuple[Sink, Exception]] = field(default_factory=list)  # (sink, what write_live raised)
    warm_starts: dict[LayerKey, WarmStart] = field(default_factory=dict)  # OUT: for the next measurement


def estimate(job: MeasurementJob) -> MeasurementResult:
    """The estimator half: pure tensor work on the job's own tensors (safe on the worker thread). A module
    whose estimate fails gives no records and one fault, reported when the result is published."""
    result = MeasurementResult(step=job.step, records=[], faults=[])
    with torch.no_grad(), _autocast_off():
        for module in job.modules:
            warm_starts: dict[LayerKey, WarmStart] = {}
            try:
                records = [estimate_layer_job(job, layer, warm_starts) for layer in module.layers]
            except Exception as exc:
                result.faults.append((module.name, exc))
                continue
            result.records.extend(module.ready + records)
            result.warm_starts.update(module.ready_warm_starts)
            result.warm_starts.update(warm_starts)
    return result


def estimate_layer_job(
    job: MeasurementJob, layer: LayerJob, warm_starts_out: dict[LayerKey, WarmStart]
) -> Measurement:
    """One layer's record; its new warm start goes into ``warm_starts_out`` (the job's own are kept)."""
    estimated = estimate_layer(
        layer.jacobians,
        layer.mask,
        layer.recurrent_weight,
        job.settings,
        warm_start=job.warm_starts.get(layer.key),
        generator=layer.generator,
    )
    warm_starts_out[layer.key] = estimated.warm_start
    metrics = layer_metrics(estimated)
    metrics = replace(
        metrics,
        grad_norm=layer.grads,
        grad_nonfinite=layer.grad_nonfinite,
        gradient_reach=gradient_reach(metrics.lag_norm, job.reach_floor),
        horizon=judged_horizon(job.horizon, metrics.lag_norm),
    )
    return Measurement(
        step=job.step,
        time=job.time,
        module=layer.module,
        layer=layer.layer,
        direction=layer.direction,
        metrics=metrics,
        rank=job.rank,
        run_id=job.run_id,
    )


class MeasurementPipeline:
    """Capture, replay and estimate the watched modules of one model (see the module docstring)."""

    def __init__(
        self,
        watched: Sequence[WatchedModule],
        faults: FaultPolicy,
        *,
        probe: ProbeMode,
        max_sequences: int,
        seed: int,
        estimator: EstimatorSettings,
        background: bool = False,
        model_label: str = "",
        horizon: int | None = None,
        reach_floor: float = DEFAULT_REACH_FLOOR,
    ) -> None:
        self.watched = list(watched)
        self.model_label = model_label
        """Names the model in warnings (two monitors' modules may share a name): class and run id."""
        self.horizon = horizon
        """The declared dependency range in steps (None: each measurement's sequence length)."""
        self.reach_floor = reach_floor
        """Lag norms below this share of the last step's gradient count as lost (the reach)."""
        self.faults = faults
        self.probe_mode = probe
        self.max_sequences = max_sequences
        self.seed = seed
        self.background = background
        """Jobs run on the worker thread: weights are snapshotted and estimates are chunked."""
        self.settings = estimator
        if background and estimator.chunk_entries is None:
            self.settings = replace(estimator, chunk_entries=BACKGROUND_CHUNK_ENTRIES)
        self.probes: dict[str, Probe] = {}
        self.probe_steps: dict[str, int] = {}  # time steps of each kept probe (see FIXED_PROBE_MIN_STEPS)
        self.generator: torch.Generator | None = None
        self.recorders: dict[str, CallRecorder] = {}
        self.measured_steps = 0  # measurements prepared so far
        self.recorded_modules: set[str] = set()  # modules recorded on some measured step
        self._attached: list[tuple[nn.Module, CallRecorder]] = []  # routed by gradwatch's global hooks
        self._local_names: dict[LayerKey, dict[str, str]] = {}
        self.layer_parameters = self._map_layer_parameters()
        """Which leaf parameters belong to each (module, layer, direction), by qualified name."""
        self.parameters = {
            name: p for key in self.layer_parameters for name, p in self.layer_parameters[key].items()
        }

    # --- capture ----------------------------------------------------------------------------------------

    def attach(self, owner: str) -> None:
        """Route the watched modules' forward calls to this pipeline's recorders (one owner per module:
        refused before anything is attached when one is watched already)."""
        for watched in self.watched:
            current = _hooks.attached_owner(watched.module)
            if current is not None:
                raise ValueError(_hooks.already_watched_message(watched.module, current))
        recorders = [
            CallRecorder(
                watched, self.max_sequences, on_fault=partial(self.faults.fault, "capture", watched.name)
            )
            for watched in self.watched
        ]
        try:
            for watched, recorder in zip(self.watched, recorders, strict=True):
                self.recorders[watched.name] = recorder
                _hooks.attach(watched.module, recorder, owner)
                self._attached.append((watched.module, recorder))
                if watched.parent is not None:  # a wrapper may call watched.module.forward (no hook fires)
                    _hooks.attach_parent(watched.parent, recorder)
        except Exception:
            self.detach()
            raise

    def detach(self) -> None:
        """Stop recording; nothing stays behind on the modules."""
        for module, recorder in self._attached:
            recorder.armed = False
            recorder.traced_by_compile = False
            _hooks.detach(module, recorder)
        self._attached.clear()

    @contextlib.contextmanager
    def capturing(self, owner: str) -> Iterator[MeasurementPipeline]:
        """Attach, record the next forward calls, detach."""
        self.attach(owner)
        try:
            self.arm(True)
            yield self
        finally:
            self.detach()
            self.reset()

    def arm(self, measured: bool) -> None:
        """Record on a measured step, except for disabled modules and fixed probes long enough to keep."""
        for name, recorder in self.recorders.items():
            need = measured and not self.faults.is_disabled(name)
            if self.probe_mode == "fixed" and self.probe_steps.get(name, 0) >= FIXED_PROBE_MIN_STEPS:
                need = False  # a long enough probe is kept; nothing to record on this step
            recorder.armed = need

    def disarm(self, module: str) -> None:
        """Stop recording one module (disabled after a fault)."""
        self.recorders[module].armed = False
        self.recorders[module].reset()

    def reset(self) -> None:
        """Drop what the recorders hold (at the end of every step)."""
        for recorder in self.recorders.values():
            recorder.reset()

    def load_probes(self, probes: Mapping[str, Probe]) -> None:
        """Kept probes from a checkpoint (modules this pipeline does not watch are ignored)."""
        self.probes = {name: probe for name, probe in probes.items() if name in self.recorders}
        self.probe_steps = {name: probe_length(probe) for name, probe in self.probes.items()}

    # --- prepare and estimate ---------------------------------------------------------------------------

    def measure(
        self,
        step: int,
        grad_values: Mapping[str, float] | None = None,
        grad_nonfinite: Mapping[str, int] | None = None,
        *,
        warm_starts: Mapping[LayerKey, WarmStart] | None = None,
        rank: int = 0,
        run_id: str = "",
    ) -> MeasurementResult:
        """Both halves at once, on this thread: the records of every module that ran on this step (no side
        effects on the user's random stream: the replay runs under a forked RNG)."""
        return estimate(
            self.prepare(
                step, grad_values or {}, grad_nonfinite, warm_starts=warm_starts, rank=rank, run_id=run_id
            )
        )

    def prepare(
        self,
        step: int,
        grad_values: Mapping[str, float],
        grad_nonfinite: Mapping[str, int] | None = None,
        *,
        warm_starts: Mapping[LayerKey, WarmStart] | None = None,
        rank: int = 0,
        run_id: str = "",
    ) -> MeasurementJob:
        """The training-thread half of a measurement: replay every module on its probe and freeze what the
        estimators need (weights copied in background mode, as the optimizer is about to change them).
        User cells are estimated here too: their step function runs a private copy of the module."""
        job = MeasurementJob(
            step=step,
            time=time.time(),
            modules=[],
            settings=self.settings,
            warm_starts=dict(warm_starts or {}),
            rank=rank,
            run_id=run_id,
            reach_floor=self.reach_floor,
            horizon=self.horizon,
        )
        with torch.random.fork_rng(devices=self._cuda_devices()), torch.no_grad(), _autocast_off():
            for watched in self.watched:
                if self.faults.is_disabled(watched.name):
                    continue
                # A user cell is measured on a private copy in eval mode (replay.trace_custom_cell).
                custom = watched.kind == "custom"
                try:
                    layers = self._layer_jobs(
                        watched,
                        step,
                        grad_values,
                        snapshot=self.background and not custom,
                        nonfinite=grad_nonfinite,
                    )
                    if custom:
                        fresh: dict[LayerKey, WarmStart] = {}
                        ready = [estimate_layer_job(job, layer, fresh) for layer in layers]
                        job.modules.append(ModuleJob(watched.name, [], ready, fresh))
                    else:
                        job.modules.append(ModuleJob(watched.name, layers, []))
                except Exception as exc:
                    self.faults.fault("estimator", watched.name, exc)
        self.measured_steps += 1
        self.tell_never_recorded(step)
        return job

    def fits_in_background(self, job: MeasurementJob) -> bool:
        """Within the memory budget of a background job (gradwatch/policy/memory.py); a job over it is to
        run inline, said once (a warning and an error record ``where="memory"`` with the sizes)."""
        size, device = job_bytes(job)
        decision = background_budget(size, peak_memory_bytes(device))
        if not decision.fits:
            self.faults.notice("background-memory", "memory", "", decision.message(job.step), step=job.step)
        return decision.fits

    def tell_never_recorded(self, step: int, *, closing: bool = False) -> None:
        """From the second measured step on (or when the monitor closes after one): one warning and one
        error record for each watched module that was never recorded while training went on (its verdict
        is unknown; the cause is rarely a stop)."""
        if self.measured_steps < (1 if closing else NEVER_RECORDED_AFTER):
            return
        for watched in self.watched:
            if watched.name in self.recorded_modules or self.faults.is_disabled(watched.name):
                continue
            message = (
                f"gradwatch: {watched.name} ({type(watched.module).__name__}) of "
                f"{self.model_label or 'the model'} was not recorded on any of the {self.measured_steps} "
                f"measured steps up to step {step}, while training went on: no call of it fired its "
                "forward hook with gradients on. Likely causes: a wrapper calls its .forward(...) directly "
                "instead of calling the module (gradwatch follows a wrapper only when the wrapper's own "
                "arguments and result are the module's, as in salesforce's WeightDrop), it runs only under "
                "torch.no_grad(), or training does not use it. It has no measurement: its verdict is unknown"
            )
            self.faults.notice(f"never-recorded:{watched.name}", "capture", watched.name, message, step=step)

    def _layer_jobs(
        self,
        watched: WatchedModule,
        step: int,
        grads: Mapping[str, float],
        *,
        snapshot: bool,
        nonfinite: Mapping[str, int] | None = None,
    ) -> list[LayerJob]:
        traces = self._traces(watched, step)
        if traces is None:
            return []
        jobs = []
        for trace in traces:
            jacobians: StepJacobians
            recurrent = trace.recurrent_weight
            if trace.weights is not None:
                analytic = builtin_step_jacobians(trace.weights, trace.inputs, trace.previous_states)
                if snapshot:  # only W_hh (and W_hr) are copied: the coefficients are computed already
                    analytic = analytic.owning_recurrent_weights()
                    if recurrent is trace.weights.weight_hh:
                        recurrent = analytic.weights.weight_hh  # W_hh is copied once, not twice
                jacobians = analytic
            else:
                assert trace.step_function is not None
                jacobians = function_step_jacobians(trace.step_function, trace.inputs, trace.previous_states)
            if snapshot and recurrent is not None and recurrent is trace.recurrent_weight:
                recurrent = recurrent.detach().clone()
            names = self._local_names[(watched.name, trace.layer, trace.direction)]
            jobs.append(
                LayerJob(
                    module=watched.name,
                    layer=trace.layer,
                    direction=trace.direction,
                    jacobians=jacobians,
                    mask=trace.mask,
                    recurrent_weight=recurrent,
                    generator=self._generator_for(trace.states.device),
                    # a leaf without a gradient has no entry: null in grad_norm means NaN/Inf elements
                    grads={local: grads[name] for local, name in names.items() if name in grads},
                    grad_nonfinite=sum((nonfinite or {}).get(qualified, 0) for qualified in names.values()),
                )
            )
        return jobs

    def _traces(self, watched: WatchedModule, step: int) -> list[LayerTrace] | None:
        """Replay the module on its probe (fixed mode) or on this step's recorded call (live mode)."""
        recorder = self.recorders[watched.name]
        recorder.settle()  # calls recorded inside a torch.compile'd forward
        fixed = self.probe_mode == "fixed"
        kept = self.probes.get(watched.name) if fixed else None
        kept_steps = self.probe_steps.get(watched.name, 0)
        recorded = recorder.fused_call if watched.kind == "fused" else (list(recorder.cell_calls) or None)
        if recorded is not None or kept is not None:
            self.recorded_modules.add(watched.name)
        # A kept probe shorter than FIXED_PROBE_MIN_STEPS gives way to a longer batch (the recorder stays
        # armed on measured steps until then): a first batch of T = 1 must not blind the monitor for good.
        renew = (
            kept is not None
            and recorded is not None
            and kept_steps < FIXED_PROBE_MIN_STEPS
            and probe_length(recorded) > kept_steps
        )
        fresh = kept is None or renew
        probe = recorded if fresh else kept
        if probe is None:
            return None  # the module did not run with gradients on this step
        if fresh and recorder.recorded_in_eval:
            self.faults.warn_once(
                f"eval-forward:{watched.name}",
                f"gradwatch: {watched.name} ran only in eval mode (module.training is False) with "
                f"gradients on during measured step {step}; measuring that call. If this is a "
                "validation pass, run it under torch.no_grad() (it is then ignored); a training-mode "
                "forward on the step is always preferred over eval-mode ones",
            )
        if fresh and fixed:
            self.probes[watched.name] = probe
            self.probe_steps[watched.name] = probe_length(probe)
        if fresh and probe_length(probe) < VERDICT_MIN_STEPS:
            self._warn_short_probe(watched, recorder, probe_length(probe), step)
        module = watched.module
        # A fresh call is measured at the weights its forward used, kept by the hook (the optimizer may have
        # moved them since: LBFGS steps after its last closure); a kept probe is re-run at the current ones.
        forward_weights = recorder.weights if fresh else None
        if watched.kind == "fused":
            assert isinstance(probe, FusedCall) and watched.cell_kind is not None
            assert isinstance(module, nn.RNNBase)  # a fused kind is one of torch's nn.RNN/LSTM/GRU
            reference = probe if fresh else rerun_fused(module, probe)  # a kept probe: re-run the module
            replay = replay_fused(module, watched.cell_kind, probe, forward_weights)
            check = check_fused_replay(module, reference, replay)
            traces = replay.traces
        elif watched.kind == "cell":
            assert isinstance(probe, list) and watched.cell_kind is not None
            trace = trace_builtin_cell(
                module, watched.cell_kind, probe, recompute=not fresh, weights=forward_weights
            )
            check = check_cell_replay(trace) if fresh else check_cell_against_module(module, trace)
            traces = [trace]
        else:
            assert isinstance(probe, list) and watched.custom is not None
            custom = trace_custom_cell(module, watched.custom, probe, recompute=True, weights=forward_weights)
            traces = [custom]
            check = None
        if check is not None and not check.ok:
            self.probes.pop(watched.name, None)
            self.probe_steps.pop(watched.name, None)
            self.faults.warn_once(
                f"replay:{watched.name}",
                f"gradwatch: replaying {watched.name} ({type(module).__name__}) did not reproduce its "
                f"{check.compared} (max abs error {check.max_abs_error:.3g} > {check.tolerance:.3g}); "
                "skipping this module's measurement",
            )
            return None
        return traces

    def _warn_short_probe(
        self, watched: WatchedModule, recorder: CallRecorder, steps: int, step: int
    ) -> None:
        """Once per module: a probe of one time step has no lag norm, so its verdict is unknown; say why
        (calls that were not chained) and what replaces it."""
        where = f"{watched.name} ({type(watched.module).__name__}) of {self.model_label or 'the model'}"
        if recorder.calls_seen > 1:
            cause = (
                f"it was called {recorder.calls_seen} times on measured step {step}, but the calls are not "
                "chained (a call's state is not the state the previous call returned, or its weights "
                "changed), so they cannot be measured as one sequence and only the last call is measured"
            )
        else:
            cause = f"its call on measured step {step} has {steps} time step(s)"
        then = (
            "; it is replaced by the next measured batch that is longer, until one has "
            f"{FIXED_PROBE_MIN_STEPS} steps"
            if self.probe_mode == "fixed"
            else ""
        )
        message = (
            f"gradwatch: {where}: {cause}. A product of one step Jacobian has no lag norm (lyapunov_max is "
            f"then only the log of that one step's sigma_max), so its verdict is unknown, not healthy{then}"
        )
        try:
            self.faults.warn_once(f"short-probe:{watched.name}", message)
        except Warning:  # GradWatchWarning turned into an error: a notice, not a reason to fail
            logger.warning(message)

    # --- plumbing -------------------------------------------------------------------------------------

    def _map_layer_parameters(self) -> dict[LayerKey, dict[str, nn.Parameter]]:
        """Which leaf parameters belong to each (module, layer, direction), by qualified name.

        A parametrized or weight-dropped weight is attributed to the leaves it is computed from
        (``WatchedModule.weight_leaves``); ``self._local_names`` keeps each leaf's name in grad_norm."""
        out: dict[LayerKey, dict[str, nn.Parameter]] = {}
        for watched in self.watched:
            params = dict(watched.module.named_parameters())
            for layer in range(watched.num_layers):
                for direction in watched.directions:
                    key = (watched.name, layer, direction)
                    if watched.kind == "fused":
                        names = fused_parameter_names(watched.module, layer, direction)
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
                self.faults.warn(
                    f"gradwatch: {watched.name} computes {', '.join(watched.unattributed_weights)} in its "
                    "forward from no parameter gradwatch could find (not a parameter, not parametrized, no "
                    "'<name>_raw' on it or a parent module); its Jacobians are measured, but grad_norm "
                    "leaves those weights out"
                )
        return out

    def _generator_for(self, device: torch.device) -> torch.Generator:
        if self.generator is None or self.generator.device != device:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(self.seed)
        return self.generator

    def _cuda_devices(self) -> list[int]:
        if not torch.cuda.is_available():
            return []
        return sorted({p.device.index or 0 for p in self.parameters.values() if p.device.type == "cuda"})


@contextlib.contextmanager
def _autocast_off() -> Iterator[None]:
    """Measure in the module's own precision even if optimizer.step() runs inside a torch.autocast block."""
    with contextlib.ExitStack() as stack:
        for device_type in ("cpu", "cuda"):
            if device_type == "cpu" or torch.cuda.is_available():
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


def probe_length(probe: Probe) -> int:
    """Time steps of a probe: its longest kept sequence (fused call) or its number of cell calls."""
    if isinstance(probe, FusedCall):
        return int(probe.lengths.max()) if probe.lengths.numel() else 0
    return len(probe)

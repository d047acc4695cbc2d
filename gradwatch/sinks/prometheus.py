"""Prometheus sink: every run-log record as Prometheus metrics, scraped from an exporter or pushed.

Two ways out, usable together:

- **exporter** (default): an in-process HTTP(S) server on ``127.0.0.1:9400`` serving this sink's own
  ``CollectorRegistry`` (so two monitors, and the user's own metrics, never collide);
- **Pushgateway** (batch jobs): the registry is PUT to ``push_gateway`` under ``job`` and a grouping key
  holding ``run`` and ``rank`` on every ``flush()`` and at ``close()``. Failures never reach training: they
  are counted, warned about once, and retried with exponential back-off.

Counters exist at 0 from the first scrape (each layer the run header lists, or from its first measurement;
the run's clip and push-failure counters from the header), so ``rate()`` and ``increase()`` see the first
alert and the first clip.

Values are the record's values. A ``None`` field ("not measurable") removes that series, so queries see it
absent rather than stale; non-finite floats are exported as ``+Inf``/``-Inf``/``NaN`` (the JSON run log can
only write ``null`` for those). The metric list with meanings is in ``docs/grafana.md``.

The sink is a :class:`~gradwatch.sinks.base.LiveSink`: with background measurement, gradwatch's worker
thread hands it each finished measurement at once (``write_live``), so the per-layer gauges,
``gradwatch_measurements_total`` and ``gradwatch_last_measurement_timestamp_seconds`` change (and, in push
mode, are pushed) without waiting for a training step; alerts, errors, clips and the step gauge follow at
publication on the training thread. A lock serialises the two threads' writes; the publication ``write``
of a record already shown live changes nothing, so no counter counts it twice.

Label values are text from the run (module, run id, parameter names): one that cannot be encoded (a lone
surrogate) is exported with the escape written out (``\\ud800``), as ``gradwatch report`` shows it. A
collector or metric family the exporter cannot serve is left out of the scrape, not the whole scrape: the
failure is a fault of the exporter (one ``GradWatchWarning``, one error record, ``monitor.fault_counts``),
reported on the training thread at the next step (:meth:`PrometheusSink.take_faults`). Pushes send the same
checked families.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.exposition import basic_auth_handler, default_handler, push_to_gateway

from gradwatch.faults import warn_or_log
from gradwatch.metric_table import METRICS_BY_FIELD, jacobian_stats, layer_gauges
from gradwatch.records import (
    Alert,
    AlertKind,
    ClipEvent,
    ErrorRecord,
    Measurement,
    MeasurementMetrics,
    Record,
    RunHeader,
)
from gradwatch.sinks._http_exporter import BasicAuth, FaultTolerantCollection, MetricsServer
from gradwatch.sinks._push_thread import PushThread

logger = logging.getLogger(__name__)

DEFAULT_PORT = 9400
DEFAULT_ADDRESS = "127.0.0.1"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
PREFIX = "gradwatch_"

RUN_LABELS = ("run", "rank")
LAYER_LABELS = (*RUN_LABELS, "module", "layer", "direction")

# Exponential back-off between push attempts after a failure: 1 s, 2 s, 4 s, ... capped at 60 s.
PUSH_BACKOFF_BASE_S = 1.0
PUSH_BACKOFF_MAX_S = 60.0

MAX_PENDING_FAULTS = 100
"""Scrape faults kept for the training thread between two steps (more are dropped: the first tell it)."""

# Alert kinds that open an episode; RECOVERED closes whichever is open.
EPISODE_KINDS = (AlertKind.VANISHING, AlertKind.EXPLODING, AlertKind.NONFINITE)


@dataclass(frozen=True)
class LayerGauge:
    """One per-layer gauge fed by one scalar field of :class:`MeasurementMetrics`."""

    field: str
    name: str
    help: str


# Per-layer scalar gauges, from the metric table. The Jacobian summary statistics share one family with a
# ``stat`` label, the mappings (lag_norm, grad_norm) have their own key label.
LAYER_GAUGES: tuple[LayerGauge, ...] = tuple(
    LayerGauge(metric.field, metric.prometheus, metric.help)
    for metric in layer_gauges()
    if metric.prometheus is not None
)

# stat label value -> MeasurementMetrics field
JACOBIAN_STATS: tuple[tuple[str, str], ...] = jacobian_stats()


class PrometheusSink:
    """Export gradwatch records as Prometheus metrics (see the module docstring for the two modes).

    ``port``: exporter port (``0`` picks a free one; ``None`` serves nothing, e.g. to only push, or to
    serve ``registry`` yourself). ``address``: bind address, loopback unless you ask otherwise.
    ``certfile``/``keyfile``: serve HTTPS. ``basic_auth``: ``(user, password)`` scrapers must present;
    in push mode it is also sent to the gateway. ``timeout``: seconds for each push.
    """

    def __init__(
        self,
        port: int | None = DEFAULT_PORT,
        *,
        address: str = DEFAULT_ADDRESS,
        registry: CollectorRegistry | None = None,
        push_gateway: str | None = None,
        job: str = "gradwatch",
        grouping_key: Mapping[str, str] | None = None,
        run_id: str = "",
        rank: int = 0,
        certfile: str | None = None,
        keyfile: str | None = None,
        basic_auth: tuple[str, str] | None = None,
        timeout: float = 2.0,
    ) -> None:
        if port is not None and (
            isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535
        ):
            raise ValueError(f"port must be an integer in 0..65535 (0 = any free port) or None, got {port!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(f"rank must be a non-negative integer, got {rank!r}")
        if not (isinstance(timeout, (int, float)) and 0 < timeout <= 60):
            raise ValueError(f"timeout must be a number of seconds in (0, 60], got {timeout!r}")
        if push_gateway is not None and not push_gateway.strip():
            raise ValueError(
                "push_gateway must be a URL such as 'http://localhost:9091', got an empty string"
            )
        if not job:
            raise ValueError("job must be a non-empty string (the Pushgateway 'job' label)")
        if port is None and push_gateway is None and registry is None:
            raise ValueError(
                "PrometheusSink with port=None and no push_gateway would export nothing; give a port, a "
                "push_gateway, or a registry that you serve yourself"
            )
        if port is None and (certfile is not None or keyfile is not None):
            raise ValueError("certfile/keyfile secure the exporter; they need a port (not port=None)")
        credentials = BasicAuth(*basic_auth) if basic_auth is not None else None
        if (
            credentials is not None
            and port is not None
            and certfile is None
            and address not in LOOPBACK_NAMES
        ):
            logger.warning(
                "gradwatch exporter on %s:%s uses basic auth without TLS: the password crosses the network "
                "in clear text; give certfile/keyfile too",
                address,
                port,
            )

        self.registry = registry if registry is not None else CollectorRegistry()
        self.run_id = run_id
        self.rank = rank
        self.push_gateway = push_gateway
        self.job = job
        self.timeout = float(timeout)
        self._grouping_key_extra = dict(grouping_key or {})
        for reserved in ("job", *RUN_LABELS):
            if reserved in self._grouping_key_extra:
                raise ValueError(
                    f"grouping_key must not set {reserved!r}: the sink sets it from job/run_id/rank"
                )
        self._push_handler: Callable[..., Any] = (
            partial(basic_auth_handler, username=credentials.username, password=credentials.password)
            if credentials is not None
            else default_handler
        )
        self._metrics = _MetricFamilies(self.registry)
        # _lock guards what write() and write_live() share across the training and worker threads: the
        # mapping keys, the closed flag and the records shown live (by identity, so a record given to
        # write() later is recognised; each entry is dropped at that write()).
        self._lock = threading.RLock()
        self._mapping_keys: dict[tuple[str, tuple[str, ...]], set[str]] = {}
        self._counted_layers: set[tuple[str, ...]] = set()  # layer label sets whose counters exist
        self._shown_live: dict[int, Measurement] = {}
        self._closed = False
        self._last_step = -1
        self._pending_faults: list[tuple[str, Exception]] = []  # from scrape threads, under _lock
        self._step_gauge = self._metrics.training_step.labels(*self._run_labels())

        # Push bookkeeping (all monotonic seconds).
        self._clock: Callable[[], float] = time.monotonic
        self.push_attempts = 0
        self.push_failures = 0
        self._consecutive_failures = 0
        self._next_push_at = 0.0
        self._warned = False
        self._unshown_warning: str | None = None  # a failed push's warning, shown on the training thread
        self._push_lock = threading.Lock()  # one push at a time; guards the push bookkeeping above
        self._warning_lock = threading.Lock()
        self._pusher = PushThread(self._push_if_due, self._final_push) if push_gateway is not None else None

        # What a scrape or a push sends: each collector and family checked on its own (see _export_failed).
        self._exposed = FaultTolerantCollection(self.registry, self._export_failed)
        self._server: MetricsServer | None = None
        if port is not None:
            try:
                self._server = MetricsServer(
                    self.registry,
                    address=address,
                    port=port,
                    certfile=certfile,
                    keyfile=keyfile,
                    basic_auth=credentials,
                    on_fault=self._export_failed,
                )
            except ValueError:
                self._metrics.unregister()  # leave a caller's registry as it was, so a retry can succeed
                raise

    # --- construction from the watch() argument ------------------------------------------------------

    @classmethod
    def from_spec(
        cls, spec: int | str | bool, *, run_id: str = "", rank: int = 0, **options: Any
    ) -> PrometheusSink:
        """Build a sink from ``watch(prometheus=...)``.

        Accepted: ``True`` (port 9400), an int port (``0`` = any free port), ``"host:port"`` or
        ``"[v6addr]:port"`` (exporter bound to that address), ``"push://host:port"`` or
        ``"push+https://host:port"`` (Pushgateway mode, no exporter).
        """
        if spec is True:
            return cls(DEFAULT_PORT, run_id=run_id, rank=rank, **options)
        if isinstance(spec, int) and not isinstance(spec, bool):
            return cls(spec, run_id=run_id, rank=rank, **options)
        if isinstance(spec, str):
            text = spec.strip()
            for scheme, http_scheme in (("push://", "http://"), ("push+https://", "https://")):
                if text.startswith(scheme) and len(text) > len(scheme):
                    gateway = http_scheme + text[len(scheme) :]
                    return cls(None, push_gateway=gateway, run_id=run_id, rank=rank, **options)
            match = re.fullmatch(
                r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:\[\]/\s]+)):(?P<port>\d{1,5})", text
            )
            if match is not None:
                address = match.group("v6") or match.group("host")
                return cls(int(match.group("port")), address=address, run_id=run_id, rank=rank, **options)
            if text.isdigit():
                return cls(int(text), run_id=run_id, rank=rank, **options)
        raise ValueError(
            f"prometheus={spec!r} is not understood; use a port (9400, or 0 for any free port), "
            "'host:port' for the exporter's bind address, or 'push://host:port' for a Pushgateway"
        )

    # --- where it serves ------------------------------------------------------------------------------

    @property
    def port(self) -> int | None:
        """The exporter's port (the real one when constructed with port 0), or None without exporter."""
        return self._server.port if self._server is not None else None

    @property
    def address(self) -> str | None:
        """The address the exporter's socket is bound to, or None without exporter."""
        return self._server.bound_address if self._server is not None else None

    @property
    def url(self) -> str | None:
        """The exporter's scrape URL, e.g. ``http://127.0.0.1:9400/metrics``, or None without exporter."""
        return self._server.url if self._server is not None else None

    # --- Sink protocol --------------------------------------------------------------------------------

    def observe_step(self, step: int) -> None:
        """Record the current training step (called every step, so it only sets one gauge)."""
        self._last_step = step
        self._step_gauge.set(step)

    def write(self, record: Record) -> None:
        """Update the metrics from one record (a measurement already shown by ``write_live``: nothing)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("PrometheusSink is closed; records written after close() are not exported")
            if isinstance(record, Measurement):
                if self._shown_live.pop(id(record), None) is not record:
                    self._write_measurement(record)
            elif isinstance(record, Alert):
                self._write_alert(record)
            elif isinstance(record, ClipEvent):
                self._write_clip(record)
            elif isinstance(record, ErrorRecord):
                where = label_value(record.where)
                self._metrics.errors.labels(*self._record_run_labels(record), where).inc()
            elif isinstance(record, RunHeader):
                self._write_header(record)
            else:
                raise TypeError(
                    f"PrometheusSink.write expects a gradwatch record, got {type(record).__name__}"
                )
        step = getattr(record, "step", None)
        if isinstance(step, int) and step > self._last_step:
            self.observe_step(step)

    def write_live(self, record: Measurement) -> None:
        """Export a finished background measurement now, from the worker thread (push mode: push it,
        unless a failed push's back-off has not yet passed). Leaves the step gauge to the training thread;
        ignored once the sink is closed. See :class:`~gradwatch.sinks.base.LiveSink`."""
        if not isinstance(record, Measurement):
            raise TypeError(f"PrometheusSink.write_live expects a Measurement, got {type(record).__name__}")
        with self._lock:
            if self._closed:
                return
            self._write_measurement(record)
            self._shown_live[id(record)] = record
        if self._pusher is not None:
            self._pusher.request()

    def flush(self) -> None:
        """In push mode, have the pusher thread push unless a failed push's back-off has not yet passed
        (returns at once: an unanswering gateway never blocks the training step)."""
        if self._pusher is not None:
            self._pusher.request()
            self._show_push_warning()

    def close(self) -> None:
        """Final push (push mode, ignoring back-off; waited for at most ``timeout`` + 1 s), then stop the
        exporter; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._shown_live.clear()
        try:
            if self._pusher is not None:  # the final push, waited for at most the push timeout (+1 s)
                self._pusher.finish(self.timeout + 1.0)
                self._show_push_warning()
        finally:
            if self._server is not None:
                self._server.close()

    def take_faults(self) -> list[tuple[str, Exception]]:
        """The exporter's faults since the last call, as ``(where, exception)``: for the training thread,
        which reports them through the fault policy (see :class:`~gradwatch.sinks.base.FaultSource`)."""
        with self._lock:
            faults, self._pending_faults = self._pending_faults, []
        return faults

    def _export_failed(self, what: str, exc: Exception) -> None:
        """On a scrape thread: ``what`` was left out of the scrape; keep the fault for the training thread."""
        logger.debug("gradwatch exporter left %s out of a scrape: %r", what, exc)
        fault = ExportFault(
            f"the exporter cannot serve {what} ({type(exc).__name__}: {exc}); it is left out of each "
            "scrape while it fails and the other metrics are served"
        )
        fault.__cause__ = exc
        with self._lock:
            if len(self._pending_faults) < MAX_PENDING_FAULTS:
                self._pending_faults.append(("exporter", fault))

    def release_after_fork(self) -> None:
        """In a forked child: off without taking a lock (a parent thread may have held one at the fork) and
        without the parent's threads; the inherited listening socket is closed."""
        self._closed = True
        self._pusher = None  # its thread does not exist here
        if self._server is not None:
            self._server.release_after_fork()

    def __repr__(self) -> str:
        where = self.url or f"push {self.push_gateway}"
        return f"PrometheusSink({where}, run={self.run_id!r}, rank={self.rank})"

    # --- records -> metrics ---------------------------------------------------------------------------

    def _run_labels(self) -> tuple[str, str]:
        return (label_value(self.run_id), str(self.rank))

    def _record_run_labels(self, record: Measurement | Alert | ClipEvent | ErrorRecord) -> tuple[str, str]:
        return (label_value(record.run_id or self.run_id), str(record.rank))

    def _write_header(self, header: RunHeader) -> None:
        if not self.run_id:
            # The sink adopts the run's identity so that observe_step() lands on the run's series.
            self._metrics.training_step.remove(*self._run_labels())
            self.run_id = header.run_id
            self.rank = header.rank
            self._step_gauge = self._metrics.training_step.labels(*self._run_labels())
        run = (label_value(header.run_id), str(header.rank))
        versions = (label_value(header.gradwatch), label_value(header.torch), str(header.world_size))
        self._metrics.run_info.labels(*run, *versions).set(1)
        self._metrics.run_start.labels(*run).set(header.started)
        self._last_step = -1
        # counters at 0 from the first scrape: rate() and increase() then see their first increment
        self._metrics.clips.labels(*run)
        self._metrics.push_failures.labels(*run)
        for module, _kind, layer, direction in header.watched_layers():
            self._count_layer((*run, label_value(module), str(layer), direction))

    def _count_layer(self, labels: tuple[str, ...]) -> None:
        """Create a layer's counters at 0 (and its alert_active gauges at 0), once."""
        if labels in self._counted_layers:
            return
        self._counted_layers.add(labels)
        families = self._metrics
        families.measurements.labels(*labels)
        for kind in AlertKind:
            families.alerts.labels(*labels, kind.value)
        for episode in EPISODE_KINDS:
            families.alert_active.labels(*labels, episode.value).set(0)

    def _write_measurement(self, record: Measurement) -> None:
        labels = (
            *self._record_run_labels(record),
            label_value(record.module),
            str(record.layer),
            record.direction,
        )
        metrics: MeasurementMetrics = record.metrics
        families = self._metrics
        self._count_layer(labels)
        for stat, field in JACOBIAN_STATS:
            _set_or_remove(families.jacobian_sigma_max, (*labels, stat), getattr(metrics, field))
        for spec in LAYER_GAUGES:
            _set_or_remove(families.layer[spec.field], labels, getattr(metrics, spec.field))
        self._write_mapping("lag_norm", families.lag_norm, labels, metrics.lag_norm)
        self._write_mapping("grad_norm", families.grad_norm, labels, metrics.grad_norm)
        self._write_mapping(
            "lyapunov_spectrum", families.lyapunov_spectrum, labels, metrics.lyapunov_spectrum
        )
        families.measurements.labels(*labels).inc()
        families.last_measurement.labels(*labels[: len(RUN_LABELS)]).set(record.time)

    def _write_mapping(
        self, family: str, gauge: Gauge, labels: tuple[str, ...], values: Mapping[str, float | None]
    ) -> None:
        """Set one series per key; keys the previous measurement had and this one lacks are removed."""
        key = (family, labels)
        previous = self._mapping_keys.get(key, set())
        current = {label_value(str(k)) for k in values}
        for gone in previous - current:
            gauge.remove(*labels, gone)
        for name, value in values.items():
            _set_or_remove(gauge, (*labels, label_value(str(name))), value)
        self._mapping_keys[key] = current

    def _write_alert(self, record: Alert) -> None:
        labels = (
            *self._record_run_labels(record),
            label_value(record.module),
            str(record.layer),
            record.direction,
        )
        kind = AlertKind(record.alert)
        self._count_layer(labels)
        self._metrics.alerts.labels(*labels, kind.value).inc()
        # A layer has one verdict at a time: the new alert's kind is active, every other kind is not.
        for episode in EPISODE_KINDS:
            self._metrics.alert_active.labels(*labels, episode.value).set(1 if episode is kind else 0)

    def _write_clip(self, record: ClipEvent) -> None:
        run = self._record_run_labels(record)
        self._metrics.clips.labels(*run).inc()
        self._metrics.clip_scale.labels(*run).set(record.scale)
        self._metrics.clip_max_norm.labels(*run).set(record.max_norm)
        _set_or_remove(self._metrics.clip_norm_before, run, record.norm_before)

    # --- Pushgateway ----------------------------------------------------------------------------------

    def _grouping_key(self) -> dict[str, str]:
        return {**self._grouping_key_extra, "run": label_value(self.run_id), "rank": str(self.rank)}

    def _push_if_due(self) -> None:
        """Push unless closed or inside a failed push's back-off (from either thread)."""
        with self._push_lock:
            if not self._closed and self._clock() >= self._next_push_at:
                self._push()

    def _final_push(self) -> None:
        with self._push_lock:
            self._push()

    def _show_push_warning(self) -> None:
        """Show the one push-failure warning on the calling (training) thread, not on the worker's."""
        with self._warning_lock:  # not _push_lock: a push in progress must not block the training thread
            message, self._unshown_warning = self._unshown_warning, None
        if message is not None:
            warn_or_log(message, RuntimeWarning, stacklevel=3)  # never raised into the training step

    def _push(self) -> None:
        """One bounded push (the caller holds ``_push_lock``); a failure is counted, its warning kept for
        the training thread (once), and it schedules the next try."""
        assert self.push_gateway is not None
        self.push_attempts += 1
        try:
            push_to_gateway(
                self.push_gateway,
                job=self.job,
                registry=self._exposed,
                grouping_key=self._grouping_key(),
                timeout=self.timeout,
                handler=self._push_handler,
            )
        except Exception as exc:  # any failure of the network or the gateway: never into training
            self.push_failures += 1
            self._consecutive_failures += 1
            self._metrics.push_failures.labels(*self._run_labels()).inc()
            delay = min(PUSH_BACKOFF_MAX_S, PUSH_BACKOFF_BASE_S * 2 ** (self._consecutive_failures - 1))
            self._next_push_at = self._clock() + delay
            message = (
                f"gradwatch could not push metrics to the Pushgateway at {self.push_gateway}: "
                f"{type(exc).__name__}: {exc}. Training goes on; gradwatch retries with back-off and counts "
                "failures in gradwatch_push_failures_total (this warning is shown once)."
            )
            if not self._warned:
                self._warned = True
                with self._warning_lock:
                    self._unshown_warning = message
            logger.debug("%s (next try in %.1f s)", message, delay)
            return
        if self._consecutive_failures:
            logger.info("gradwatch pushes to %s work again", self.push_gateway)
        self._consecutive_failures = 0
        self._next_push_at = 0.0


class ExportFault(RuntimeError):
    """A metric family or collector the exporter could not serve (left out of the scrape)."""


def label_value(text: str) -> str:
    """``text`` as a label value that can always be encoded: a lone surrogate (from a module or parameter
    name of broken text) is written out as its escape, ``\\ud800``; anything else is kept as it is."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _set_or_remove(gauge: Gauge, labels: tuple[str, ...], value: float | None) -> None:
    """Set the series to ``value``, or remove it when the value is ``None`` (not measurable)."""
    if value is None:
        gauge.remove(*labels)
    else:
        gauge.labels(*labels).set(float(value))


class _MetricFamilies:
    """Every metric family of one sink, registered in that sink's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def gauge(name: str, help_text: str, labels: tuple[str, ...]) -> Gauge:
            metric = Gauge(PREFIX + name, help_text, labels, registry=registry)
            self._registered.append(metric)
            return metric

        def counter(name: str, help_text: str, labels: tuple[str, ...]) -> Counter:
            # prometheus_client appends _total to the exposed name.
            metric = Counter(PREFIX + name, help_text, labels, registry=registry)
            self._registered.append(metric)
            return metric

        self._registry = registry
        self._registered: list[Gauge | Counter] = []
        try:
            sigma = METRICS_BY_FIELD["jacobian_sigma_max_mean"]
            self.jacobian_sigma_max = gauge(str(sigma.prometheus), sigma.help, (*LAYER_LABELS, "stat"))
            self.layer = {spec.field: gauge(spec.name, spec.help, LAYER_LABELS) for spec in LAYER_GAUGES}
            lag, grad = METRICS_BY_FIELD["lag_norm"], METRICS_BY_FIELD["grad_norm"]
            self.lag_norm = gauge(str(lag.prometheus), lag.help, (*LAYER_LABELS, str(lag.key_label)))
            self.grad_norm = gauge(str(grad.prometheus), grad.help, (*LAYER_LABELS, str(grad.key_label)))
            spectrum = METRICS_BY_FIELD["lyapunov_spectrum"]
            self.lyapunov_spectrum = gauge(
                str(spectrum.prometheus), spectrum.help, (*LAYER_LABELS, str(spectrum.key_label))
            )
            self.measurements = counter("measurements", "Measurements exported per layer.", LAYER_LABELS)
            self.last_measurement = gauge(
                "last_measurement_timestamp_seconds", "Unix time of the latest measurement.", RUN_LABELS
            )
            self.alerts = counter(
                "alerts",
                "Alerts raised, by alert kind (an episode starting, or 'recovered').",
                (*LAYER_LABELS, "alert"),
            )
            self.alert_active = gauge(
                "alert_active",
                "1 while the layer's latest verdict is this alert kind, 0 otherwise (recovered).",
                (*LAYER_LABELS, "alert"),
            )
            self.clips = counter("clips", "Optimizer steps whose gradients gradwatch clipped.", RUN_LABELS)
            self.clip_scale = gauge(
                "clip_scale", "Scale factor max_norm / norm_before of the latest clip.", RUN_LABELS
            )
            self.clip_norm_before = gauge(
                "clip_norm_before", "Total gradient norm before the latest clip.", RUN_LABELS
            )
            self.clip_max_norm = gauge("clip_max_norm", "Clipping threshold of the latest clip.", RUN_LABELS)
            self.training_step = gauge(
                "training_step", "Current training step of the watched run.", RUN_LABELS
            )
            self.errors = counter(
                "errors",
                "Faults inside gradwatch that disabled a module or sink (training went on).",
                (*RUN_LABELS, "where"),
            )
            self.push_failures = counter(
                "push_failures",
                "Failed pushes to the Pushgateway (a later push carries this count).",
                RUN_LABELS,
            )
            self.run_info = gauge(
                "run_info",
                "Constant 1, labelled with the gradwatch and torch versions and world size of the run.",
                (*RUN_LABELS, "gradwatch_version", "torch_version", "world_size"),
            )
            self.run_start = gauge("run_start_time_seconds", "Unix time the run started.", RUN_LABELS)
        except ValueError as exc:
            self.unregister()
            raise ValueError(
                f"{exc}. The registry already holds gradwatch metrics (another PrometheusSink?); give each "
                "sink its own registry (the default) instead of sharing one."
            ) from exc

    def unregister(self) -> None:
        """Take every family registered so far out of the registry."""
        while self._registered:
            self._registry.unregister(self._registered.pop())

"""TensorBoard sink: the run log's records as TensorBoard scalars, histograms and text.

The tag layout (shared by this sink, the Lightning callback's ``log_to_trainer`` and
``gradwatch report --format tensorboard``, all through :func:`measurement_scalars`):

- ``gradwatch/<module>/L<layer>/<direction>/<group>/<metric>``: every scalar metric of a measurement
  record, in numbered groups so that TensorBoard's name order puts what decides the verdict first:
  ``1_verdict`` (``lyapunov_max``, ``lag_norm_longest_log10``, ``grad_norm_total``), ``2_lag_norm_log10``
  (``lag001``, ``lag002`` ... zero-padded), ``3_factors``, ``4_step_jacobian``, ``5_gradients``
  (``grad_norm/<parameter>``, ``grad_nonfinite``), ``6_estimator``, ``7_other`` (the Lyapunov
  spectrum when measured: ``lyapunov_spectrum/<index>``, ``lyapunov_log10_condition``);
- ``.../jacobian_sigma_max``: histogram of the per-step sigma_max(J_t) values (records that carry one);
- ``.../lag_norm_curve`` (image, ``lag_images=True``): the decay curve ||ds_T/ds_(T-tau)|| over tau at
  that step, log-log;
- ``.../alert`` (text): alerts of that layer; ``gradwatch/clip`` (text) and ``gradwatch/clip/<field>``
  (scalars): clipping; ``gradwatch/errors`` and ``gradwatch/run`` (text): faults and run headers.

Records that combine all ranks (``rank`` -1, ``watch(..., global_view=True)``) use the root
``gradwatch_all_ranks`` instead of ``gradwatch``. Values are those of the run log's JSON form: a value the
log writes as null (not measurable, or non-finite) is not written. Steps are gradwatch's step numbers and
wall times the records' own ``time``. Needs ``pip install 'gradwatch[tensorboard]'`` for the sink only;
the tag functions import nothing beyond gradwatch.
"""

from __future__ import annotations

import itertools
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

from gradwatch.policy.config import DetectionConfig
from gradwatch.policy.judge import total_gradient_norm
from gradwatch.records import Alert, ClipEvent, ErrorRecord, Measurement, Record, RunHeader, SigmaHistogram

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

TAG_ROOT = "gradwatch"
ALL_RANKS_TAG_ROOT = "gradwatch_all_ranks"
HISTOGRAM_METRIC = "jacobian_sigma_max_histogram"
HISTOGRAM_TAG = "jacobian_sigma_max"
LAG_LAYOUT_CATEGORY = "gradwatch lag norms"
INSTALL_HINT = "the TensorBoard sink needs tensorboard: pip install 'gradwatch[tensorboard]'"


def layer_tag_prefix(module: str, layer: int, direction: str, rank: int = 0) -> str:
    """``gradwatch/<module>/L<layer>/<direction>`` (root ``gradwatch_all_ranks`` for rank -1)."""
    root = ALL_RANKS_TAG_ROOT if rank < 0 else TAG_ROOT
    return f"{root}/{module}/L{layer}/{direction}"


VERDICT_GROUP = "1_verdict"
LAG_GROUP = "2_lag_norm_log10"
TAG_GROUPS: dict[str, str] = {
    # what decides the verdict first, then what explains it, then how the estimate went
    "lyapunov_max": VERDICT_GROUP,
    "gradient_reach": VERDICT_GROUP,
    "horizon": VERDICT_GROUP,
    "weight_hh_sigma_max": "3_factors",
    "activation_derivative_mean": "3_factors",
    "activation_saturation_ratio": "3_factors",
    "gate_mean": "3_factors",
    "jacobian_sigma_max_mean": "4_step_jacobian",
    "jacobian_sigma_max_p95": "4_step_jacobian",
    "jacobian_sigma_max_min": "4_step_jacobian",
    "jacobian_sigma_max_max": "4_step_jacobian",
    "jacobian_frac_above_one": "4_step_jacobian",
    "grad_norm": "5_gradients",
    "grad_nonfinite": "5_gradients",
    "jacobian_converged_ratio": "6_estimator",
    "jacobian_iterations": "6_estimator",
    "sequences": "6_estimator",
    "time_steps": "6_estimator",
}
"""Metric -> the numbered group its tag goes under: TensorBoard sorts tags by name, so the verdict's
metrics (lambda, the longest lag norm, the total gradient norm) come first and the estimator's last."""
OTHER_GROUP = "7_other"


def lag_tag(tau: str) -> str:
    """``lag001``, ``lag016``, ``lag512``: zero-padded so TensorBoard's name order is the lag order."""
    return f"lag{int(tau):03d}" if tau.isdigit() else f"lag_{tau}"


def measurement_scalars(record: Measurement | Mapping[str, Any]) -> list[tuple[str, float]]:
    """Every scalar of one measurement as ``(tag, value)``, from the record or its run-log JSON dict.

    Tags are ``<prefix>/<group>/<metric>`` with numbered groups (:data:`TAG_GROUPS`): the verdict first
    (``1_verdict/lyapunov_max``, ``1_verdict/lag_norm_longest_log10``, ``1_verdict/grad_norm_total``),
    then log10 of every lag norm (``2_lag_norm_log10/lag001`` ..., zero-padded), the factors, the per-step
    Jacobian norms, the gradients and the estimator. Values are the run log's (nulls skipped); lag norms
    are written as log10 (a norm of 0 has none and is skipped), because they span tens of decades.
    """
    data = record.to_json() if isinstance(record, Measurement) else record
    prefix = layer_tag_prefix(
        str(data["module"]), int(data["layer"]), str(data["direction"]), int(data.get("rank", 0))
    )
    scalars: list[tuple[str, float]] = []
    metrics = dict(data.get("metrics") or {})
    lag_norm = metrics.get("lag_norm")
    if isinstance(lag_norm, Mapping):
        lags = sorted((int(k), v) for k, v in lag_norm.items() if str(k).isdigit())
        logs = [(tau, math.log10(v)) for tau, v in lags if _is_number(v) and v > 0 and math.isfinite(v)]
        if lags and logs and logs[-1][0] == lags[-1][0]:
            scalars.append((f"{prefix}/{VERDICT_GROUP}/lag_norm_longest_log10", logs[-1][1]))
        scalars += [(f"{prefix}/{LAG_GROUP}/{lag_tag(str(tau))}", value) for tau, value in logs]
    grad_norm = metrics.get("grad_norm")
    if isinstance(grad_norm, Mapping) and all(_is_number(v) for v in grad_norm.values()):
        total = total_gradient_norm(grad_norm)  # as the report and clip_grad_norm_ compute it
        if total is not None:
            scalars.append((f"{prefix}/{VERDICT_GROUP}/grad_norm_total", total))
    for name, value in metrics.items():
        if name in (HISTOGRAM_METRIC, "lag_norm"):
            continue
        group = TAG_GROUPS.get(name, OTHER_GROUP)
        if isinstance(value, Mapping):
            scalars += [
                (f"{prefix}/{group}/{name}/{key}", float(v)) for key, v in value.items() if _is_number(v)
            ]
        elif _is_number(value):
            scalars.append((f"{prefix}/{group}/{name}", float(value)))
    return sorted(scalars)


def clip_scalars(record: ClipEvent | Mapping[str, Any]) -> list[tuple[str, float]]:
    """``gradwatch/clip/<field>`` for a clip event's norm_before, max_norm and scale (nulls skipped)."""
    data = record.to_json() if isinstance(record, ClipEvent) else record
    return [
        (f"{TAG_ROOT}/clip/{name}", float(data[name]))
        for name in ("norm_before", "max_norm", "scale")
        if _is_number(data.get(name))
    ]


def lag_norm_layout(modules: Iterable[Mapping[str, Any]], rank: int = 0) -> dict[str, Any]:
    """A custom-scalars layout with one multi-line chart per module, layer and direction: log10 of the lag
    norm of every tau over the steps (the decay with tau is the spread between the lines; log10 so that
    1e-34 and 1e4 both stay readable)."""
    charts: dict[str, list[Any]] = {}
    for module in modules:
        name = str(module.get("name", ""))
        for layer in range(int(module.get("layers", 1) or 1)):
            for direction in module.get("directions") or ["forward"]:
                prefix = layer_tag_prefix(name, layer, str(direction), rank)
                charts[f"{name} L{layer} {direction}: log10 lag norm"] = [
                    "Multiline",
                    [f"^{re.escape(prefix)}/{LAG_GROUP}/"],
                ]
    return {LAG_LAYOUT_CATEGORY: charts}


def alert_text(alert: Alert) -> str:
    value = "null" if alert.value is None else f"{alert.value:.6g}"
    threshold = "null" if alert.threshold is None else f"{alert.threshold:.6g}"
    return f"**{alert.alert.value}** ({alert.metric} = {value}, threshold {threshold}): {alert.message}"


def clip_text(clip: ClipEvent) -> str:
    before = "null" if clip.norm_before is None else f"{clip.norm_before:.6g}"
    return f"clipped: norm {before} -> max_norm {clip.max_norm:.6g} (scale {clip.scale:.6g})"


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class TensorBoardSink:
    """Write records to TensorBoard event files under ``log_dir`` (``tensorboard --logdir`` that folder).

    ``write`` builds the events and queues them: ``SummaryWriter`` serialises and writes them from its own
    thread (``benchmarks/tensorboard_sink.py`` measures the cost per record). ``flush``, which the monitor
    calls after every measurement, does not wait for that thread (waiting cost 3-7 ms per measurement on
    a 2-core machine): the writer puts events on disk every ``flush_secs`` seconds by itself;
    ``flush(wait=True)`` and ``close`` wait until everything queued is in the file. ``close`` is idempotent.
    ``lag_images=True`` also draws each measurement's lag-norm decay curve as an image (6-20 ms per layer
    record measured on a busy 2-core machine, so off in a live run by default; ``gradwatch report --format
    tensorboard`` draws them).
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str],
        *,
        flush_secs: int = 5,
        max_queue: int = 1000,
        lag_images: bool = False,
    ) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError(INSTALL_HINT) from exc
        self.log_dir = Path(log_dir)
        if self.log_dir.exists() and not self.log_dir.is_dir():
            raise ValueError(
                f"tensorboard log directory {str(self.log_dir)!r} is a file; give a directory such as runs/tb"
            )
        self._writer: SummaryWriter | None = SummaryWriter(
            str(self.log_dir), flush_secs=flush_secs, max_queue=max_queue
        )
        self._layout_written = False
        self.lag_images = lag_images
        self.records_written = 0

    @property
    def writer(self) -> SummaryWriter:
        if self._writer is None:
            raise RuntimeError(f"{self!r} is closed")
        return self._writer

    def write(self, record: Record) -> None:
        writer = self.writer
        if isinstance(record, Measurement):
            for tag, value in measurement_scalars(record):
                writer.add_scalar(tag, value, record.step, walltime=record.time)
            histogram = record.metrics.jacobian_sigma_max_histogram
            if histogram is not None:
                prefix = layer_tag_prefix(record.module, record.layer, record.direction, record.rank)
                write_histogram(writer, f"{prefix}/{HISTOGRAM_TAG}", histogram, record.step, record.time)
            if self.lag_images:
                curve = lag_curve_image(record.to_json()["metrics"]["lag_norm"])
                if curve is not None:
                    prefix = layer_tag_prefix(record.module, record.layer, record.direction, record.rank)
                    writer.add_image(
                        f"{prefix}/lag_norm_curve",
                        curve,
                        record.step,
                        walltime=record.time,
                        dataformats="HWC",
                    )
        elif isinstance(record, Alert):
            prefix = layer_tag_prefix(record.module, record.layer, record.direction, record.rank)
            writer.add_text(f"{prefix}/alert", alert_text(record), record.step, walltime=record.time)
        elif isinstance(record, ClipEvent):
            for tag, value in clip_scalars(record):
                writer.add_scalar(tag, value, record.step, walltime=record.time)
            writer.add_text(f"{TAG_ROOT}/clip", clip_text(record), record.step, walltime=record.time)
        elif isinstance(record, ErrorRecord):
            text = f"{record.where} {record.module}: {record.message}".replace("  ", " ")
            writer.add_text(f"{TAG_ROOT}/errors", text, record.step, walltime=record.time)
        elif isinstance(record, RunHeader):
            if not self._layout_written:  # TensorBoard shows the first layout of a run's event files
                writer.add_custom_scalars(lag_norm_layout(record.modules, record.rank))
                self._layout_written = True
            modules = ", ".join(f"{m.get('name')} ({m.get('type')})" for m in record.modules)
            versions = f"gradwatch {record.gradwatch}, torch {record.torch}"
            named = f"run {record.name!r} ({record.run_id})" if record.name else f"run {record.run_id}"
            text = f"{named}: {versions}; modules {modules}"
            writer.add_text(f"{TAG_ROOT}/run", text, 0, walltime=record.started)
        self.records_written += 1

    def flush(self, wait: bool = False) -> None:
        """The monitor calls this after every measurement; the writer thread flushes on its own within
        ``flush_secs``, so only ``wait=True`` blocks until the queued events are in the file."""
        if self._writer is not None and wait:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            try:
                self._writer.flush()
            finally:
                self._writer.close()
                self._writer = None

    def __repr__(self) -> str:
        return f"TensorBoardSink({str(self.log_dir)!r})"


def write_histogram(
    writer: SummaryWriter, tag: str, histogram: SigmaHistogram, step: int, walltime: float | None = None
) -> None:
    """One TensorBoard histogram from the run log's fixed-bin histogram: bucket i spans edges[i]..edges[i+1]
    (TensorBoard takes the right edges as ``bucket_limits`` and the first left edge as ``min``)."""
    writer.add_histogram_raw(
        tag,
        min=histogram.edges[0],
        max=histogram.edges[-1],
        num=sum(histogram.counts),
        sum=histogram.total,
        sum_squares=histogram.sum_squares,
        bucket_limits=list(histogram.edges[1:]),
        bucket_counts=list(histogram.counts),
        global_step=step,
        walltime=walltime,
    )


def lag_curve_image(lag_norm: Mapping[str, float | None], size: tuple[int, int] = (360, 240)) -> Any:
    """The decay curve log10 ||ds_T/ds_(T-tau)|| over log2 tau as an RGB array (H, W, 3), drawn with
    Pillow (a dependency of tensorboard); ``None`` with fewer than two finite points. The grey dashed line is
    norm 1: above it gradients over that lag grow, below it they shrink; the detector's default lag-norm
    thresholds (amber: vanishing, red: exploding) are dashed where they fall in the drawn range, and the
    green vertical line is the reach, where the curve falls below the vanishing threshold."""
    import math

    import numpy as np
    from PIL import Image, ImageDraw

    points = sorted(
        (int(tau), math.log10(value))
        for tau, value in lag_norm.items()
        if tau.isdigit() and int(tau) > 0 and _is_number(value) and value > 0 and math.isfinite(value)
    )
    if len(points) < 2:
        return None
    width, height = size
    left, right, top, bottom = 56, 12, 12, 34
    xs = [math.log2(tau) for tau, _ in points]
    ys = [y for _, y in points]
    y_low, y_high = min([*ys, 0.0]), max([*ys, 0.0])  # always show norm 1 (log10 = 0)
    if y_high - y_low < 1e-9:
        y_low, y_high = y_low - 1, y_high + 1
    x_low, x_high = xs[0], xs[-1]

    def pixel(x: float, y: float) -> tuple[float, float]:
        px = left + (x - x_low) / (x_high - x_low) * (width - left - right)
        py = top + (y_high - y) / (y_high - y_low) * (height - top - bottom)
        return px, py

    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([left, top, width - right, height - bottom], outline=(120, 120, 120))
    _, one_y = pixel(x_low, 0.0)
    for dash in range(left, width - right, 8):
        draw.line([(dash, one_y), (dash + 4, one_y)], fill=(160, 160, 160))
    defaults = DetectionConfig()
    for level, color in (
        (defaults.vanishing_lag_norm, (201, 138, 0)),
        (defaults.exploding_lag_norm, (198, 40, 40)),
    ):
        y_level = math.log10(level)
        if y_low <= y_level <= y_high:  # the detector's thresholds, where they fall inside the drawn range
            _, py_level = pixel(x_low, y_level)
            for dash in range(left, width - right, 8):
                draw.line([(dash, py_level), (dash + 4, py_level)], fill=color)
    reach = _falls_below(list(zip(xs, ys, strict=True)), math.log10(defaults.vanishing_lag_norm))
    if reach is not None:  # how far back a gradient still arrives: where the curve crosses the threshold
        reach_x, _ = pixel(reach, y_low)
        draw.line([(reach_x, top), (reach_x, height - bottom)], fill=(27, 94, 32), width=1)
        draw.text((reach_x + 3, top + 2), f"reach ~{2**reach:.3g}", fill=(27, 94, 32))
    draw.line([pixel(x, y) for x, y in zip(xs, ys, strict=True)], fill=(230, 85, 13), width=2)
    for x, y in zip(xs, ys, strict=True):
        px, py = pixel(x, y)
        draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=(230, 85, 13))
    for tau, _ in points:
        px, _py = pixel(math.log2(tau), y_low)
        draw.text((px - 6, height - bottom + 4), str(tau), fill=(60, 60, 60))
    draw.text((4, top), f"{10**y_high:.3g}", fill=(60, 60, 60))
    draw.text((4, height - bottom - 10), f"{10**y_low:.3g}", fill=(60, 60, 60))
    if 0.0 not in (y_low, y_high):
        draw.text((4, one_y - 5), "1", fill=(60, 60, 60))
    draw.text(
        (left + 4, height - 14), "tau (log scale); norm of ds_T/ds_(T-tau), log scale", fill=(60, 60, 60)
    )
    return np.asarray(image)


def _falls_below(curve: list[tuple[float, float]], level: float) -> float | None:
    """The x where the (x, y) polyline first goes below ``level`` (linear between points); None if never,
    or if it starts below."""
    for (x0, y0), (x1, y1) in itertools.pairwise(curve):
        if y0 >= level > y1:
            return x0 + (level - y0) / (y1 - y0) * (x1 - x0)
    return None

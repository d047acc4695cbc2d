"""torch.distributed helpers: one run id shared by every rank, and which ranks write a run log.

Nothing here runs a collective on the training's process group: the run id travels through the process
group's key-value store (rank 0 writes, the others wait with a bound), so a rank that never calls
``gradwatch.watch`` cannot make the others hang for longer than that bound.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Literal

import torch

from gradwatch.metric_table import METRIC_TABLE
from gradwatch.records import GLOBAL_RANK, Measurement, MeasurementMetrics, record_from_json

logger = logging.getLogger(__name__)

LogRanks = Literal["all", "zero"]
LOG_RANKS: tuple[LogRanks, ...] = ("all", "zero")
RUN_ID_TIMEOUT_S = 120.0  # how long ranks > 0 wait for rank 0's run id before using their own

_watch_calls = itertools.count()  # the n-th watch() of every rank shares the n-th run id


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside torch.distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def check_log_ranks(log_ranks: str) -> LogRanks:
    """Validate the ``log_ranks`` option of ``watch()``."""
    if log_ranks not in LOG_RANKS:
        raise ValueError(
            f"log_ranks must be 'all' (every rank writes its own log, NAME.rank<r>.jsonl for r > 0) or "
            f"'zero' (only rank 0 writes a log), got {log_ranks!r}"
        )
    return log_ranks


def writes_log(log_ranks: LogRanks, rank: int) -> bool:
    """Does this rank write a JSONL run log?"""
    return log_ranks == "all" or rank == 0


def shared_run_id(own_run_id: str, timeout_s: float = RUN_ID_TIMEOUT_S) -> str:
    """Rank 0's run id on every rank (so ``gradwatch report --merge-ranks`` joins the ranks' logs).

    Outside torch.distributed, or with one rank, returns ``own_run_id``. If rank 0 does not publish its id
    within ``timeout_s`` (it never called watch()), or the store is not reachable, a rank keeps its own id
    and logs a warning: the logs then stay apart, training goes on.
    """
    rank, world_size = distributed_rank()
    if world_size == 1:
        return own_run_id
    key = f"gradwatch/run_id/{next(_watch_calls)}"
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        store = _get_default_store()
        if rank == 0:
            store.set(key, own_run_id)
            return own_run_id
        store.wait([key], timedelta(seconds=timeout_s))
        return bytes(store.get(key)).decode("utf-8")
    except Exception as exc:  # a missing store must not stop training
        logger.warning(
            "gradwatch: rank %d could not get rank 0's run id (%r); using its own id %s, so its log will not "
            "merge with the other ranks' (pass watch(..., run_id=...) to set one explicitly)",
            rank,
            exc,
            own_run_id,
        )
        return own_run_id


# --- global view: every rank's measurement combined, through the store ----------------------------------

GLOBAL_VIEW_TIMEOUT_S = 2.0


def combine_metrics(per_rank: Sequence[MeasurementMetrics]) -> MeasurementMetrics:
    """One rank-independent summary: min of minima, max of maxima, sums of counts, means of the rest.

    Means are over the ranks that reported a value (None is "not measurable" on that rank). Gradient norms
    are the same on every rank after DDP's all-reduce, so their mean is that value.
    """
    combined: dict[str, object] = {}
    for metric in METRIC_TABLE:  # each row says how its field combines
        name = metric.field
        values = [getattr(m, name) for m in per_rank]
        if metric.combine == "drop":
            combined[name] = None
        elif metric.kind == "mapping":
            keys = sorted({k for v in values for k in v}, key=lambda k: (len(k), k))
            combined[name] = {k: _reduce([v.get(k) for v in values], metric.combine) for k in keys}
        elif metric.combine == "sum":
            combined[name] = int(sum(v or 0 for v in values))
        elif metric.combine == "largest":
            present = [v for v in values if v is not None]
            combined[name] = max(present) if present else None
        else:
            combined[name] = _reduce(values, metric.combine)
    # the values are typed per field by METRIC_TABLE's kind; mypy cannot follow a table
    return MeasurementMetrics(**combined)  # type: ignore[arg-type]


def _reduce(values: Sequence[float | None], how: str) -> float | None:
    present = [float(v) for v in values if v is not None]
    if not present:
        return None
    if how == "min":
        return min(present)
    if how == "max":
        return max(present)
    return sum(present) / len(present)


class GlobalView:
    """Share each rank's measurements through the process group's key-value store; rank 0 combines them.

    No collective runs: ranks > 0 only write their records (a few hundred bytes per layer and measurement),
    rank 0 waits at most ``timeout_s`` for the others and combines what arrived, so a rank that measures
    on another schedule or skipped the RNN delays rank 0 by at most the timeout and never hangs anyone.
    """

    def __init__(
        self, run_id: str, rank: int, world_size: int, timeout_s: float = GLOBAL_VIEW_TIMEOUT_S
    ) -> None:
        from torch.distributed.distributed_c10d import _get_default_store

        self.store = _get_default_store()
        self.run_id, self.rank, self.world_size, self.timeout_s = run_id, rank, world_size, timeout_s

    def _key(self, record: Measurement, rank: int) -> str:
        return (
            f"gradwatch/{self.run_id}/{record.step}/{record.module}/{record.layer}/{record.direction}/{rank}"
        )

    def exchange(self, records: Sequence[Measurement]) -> list[Measurement]:
        """Publish this rank's records; on rank 0, return the combined (rank -1) records."""
        if self.rank != 0:
            for record in records:
                self.store.set(self._key(record, self.rank), json.dumps(record.to_json()))
            return []
        combined = []
        deadline = time.monotonic() + self.timeout_s
        for record in records:
            keys = [self._key(record, r) for r in range(1, self.world_size)]
            # A rank that did not measure this layer in time makes wait() raise: combine what arrived.
            with contextlib.suppress(Exception):
                self.store.wait(keys, timedelta(seconds=max(0.0, deadline - time.monotonic())))
            others = []
            for key in keys:
                if self.store.check([key]):
                    parsed = record_from_json(json.loads(bytes(self.store.get(key)).decode("utf-8")))
                    self.store.delete_key(key)
                    if isinstance(parsed, Measurement):
                        others.append(parsed.metrics)
            combined.append(
                dataclasses.replace(
                    record, rank=GLOBAL_RANK, metrics=combine_metrics([record.metrics, *others])
                )
            )
        return combined

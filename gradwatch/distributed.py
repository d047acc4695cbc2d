"""torch.distributed helpers: one run id shared by every rank, and which ranks write a run log.

Nothing here runs a collective on the training's process group: the run id travels through the process
group's key-value store (rank 0 writes, the others wait with a bound), so a rank that never calls
``gradwatch.watch`` cannot make the others hang for longer than that bound.
"""

from __future__ import annotations

import itertools
import logging
from datetime import timedelta
from typing import Literal

import torch

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
    return log_ranks  # type: ignore[return-value]


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

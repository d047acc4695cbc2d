"""Fold again, in step order and in bounded memory, the runs a streaming pass could not fold exactly.

The streaming summary folds each run in the order its records arrive. A run whose measurements or alerts
came out of step order (a hand-edited or concatenated log), or that had more records after it was finished
(a run resumed after others in the same file), is listed by
:meth:`~gradwatch.report.streaming.StreamingSummary.inexact_runs`. :func:`refold` reads the files again,
keeps only those runs' records and sorts them with an external merge sort: sorted batches of
:data:`SORT_BATCH` records are spilled to temporary files and merged lazily, so memory stays bounded
however large the runs are. The sorted records are what the whole-file summary sees after its own
(stable) sorts, so the refolded runs get the whole-file figures.
"""

from __future__ import annotations

import heapq
import pickle
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from operator import itemgetter
from pathlib import Path
from typing import IO, Any

from gradwatch.records import GLOBAL_RANK, Alert, Measurement
from gradwatch.report.reader import LINE_TYPE, LogContents, LogItem, LogTail, record_of
from gradwatch.report.streaming import LIVE_RUNS, StreamingSummary
from gradwatch.report.summary import ReportOptions, RunKey, RunSummary, summarize

SORT_BATCH = 16_384
"""Records sorted in memory at a time; more are spilled to temporary files in sorted batches."""
_BLOCK = 256
"""Records per pickled block of a spilled batch (what the merge holds of each batch at a time)."""
_FIRST = -(1 << 62)
"""The sort step of records folded in file order (headers, clips, errors): before every measurement."""

SortKey = tuple[tuple[str, int], int, int, str, int, int, int]
_KEY = itemgetter(0)


def run_key(item: LogItem, options: ReportOptions) -> RunKey | None:
    """The run an item belongs to in a report with ``options`` (``None``: left out, as the summary does)."""
    rank = item.rank
    if options.merge_ranks and rank == GLOBAL_RANK:
        return None
    return (item.run_id, None if options.merge_ranks else rank)


def sort_key(item: LogItem, key: RunKey, file_index: int, line: int) -> SortKey:
    """Measurements by step, then file and line (the whole-file summary's stable sort); alerts by step,
    rank, module and layer (its alert order); other records in file order, first."""
    run_order = (key[0], -1 if key[1] is None else key[1])
    if (LINE_TYPE is not None and type(item) is LINE_TYPE) or isinstance(item, Measurement):
        return (run_order, item.step, 0, "", 0, file_index, line)  # type: ignore[union-attr]
    if isinstance(item, Alert):
        return (run_order, item.step, item.rank, item.module, item.layer, file_index, line)
    return (run_order, _FIRST, 0, "", 0, file_index, line)


class ExternalSort:
    """Sort (key, item) pairs of unique keys in bounded memory: sorted batches spilled to temporary files."""

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self._pairs: list[tuple[Any, Any]] = []
        self._spilled: list[IO[bytes]] = []

    @property
    def spilled_batches(self) -> int:
        return len(self._spilled)

    def add(self, key: Any, item: Any) -> None:
        self._pairs.append((key, item))
        if len(self._pairs) >= self.batch:
            self._spill()

    def _spill(self) -> None:
        self._pairs.sort(key=_KEY)
        handle = tempfile.TemporaryFile(prefix="gradwatch-report-")  # noqa: SIM115  # read back, closed by sorted_items
        for start in range(0, len(self._pairs), _BLOCK):
            pickle.dump(self._pairs[start : start + _BLOCK], handle, protocol=pickle.HIGHEST_PROTOCOL)
        handle.seek(0)
        self._spilled.append(handle)
        self._pairs = []

    def sorted_items(self) -> Iterator[Any]:
        """Every item added, by key (the spilled batches are read back lazily and closed after)."""
        self._pairs.sort(key=_KEY)
        streams: list[Iterable[tuple[Any, Any]]] = [_read_back(handle) for handle in self._spilled]
        streams.append(self._pairs)
        try:
            for _key, item in heapq.merge(*streams, key=_KEY):
                yield item
        finally:
            for handle in self._spilled:
                handle.close()
            self._spilled, self._pairs = [], []


def _read_back(handle: IO[bytes]) -> Iterator[tuple[Any, Any]]:
    """The pairs of one spilled batch, a block at a time (our own pickles, written above)."""
    while True:
        try:
            block = pickle.load(handle)
        except EOFError:
            return
        yield from block


def _items_of(
    files: Sequence[Path], keys: set[RunKey], options: ReportOptions
) -> Iterator[tuple[int, int, LogItem, RunKey]]:
    """(file index, line, item, run) of every item of the runs ``keys`` (problems were noted before)."""
    for file_index, path in enumerate(files):
        out = LogContents()
        for line, item in enumerate(LogTail(path, rows=True).stream(out, final=True)):
            key = run_key(item, options)
            if key is not None and key in keys:
                yield file_index, line, item, key


def refold(
    files: Sequence[Path], keys: set[RunKey], options: ReportOptions, *, batch: int | None = None
) -> StreamingSummary:
    """A summary of the runs ``keys`` of ``files``, their records folded sorted (see the module doc)."""
    sorter = ExternalSort(batch or SORT_BATCH)
    for file_index, line, item, key in _items_of(files, keys, options):
        sorter.add(sort_key(item, key, file_index, line), item)
    summary = StreamingSummary(options, live_runs=LIVE_RUNS)
    summary.add_all(sorter.sorted_items())
    return summary


def whole_runs(files: Sequence[Path], keys: set[RunKey], options: ReportOptions) -> list[RunSummary]:
    """The whole-file summaries of the runs ``keys`` (their records held in memory: the last resort)."""
    records = [record_of(item) for _file, _line, item, _key in _items_of(files, keys, options)]
    return list(summarize(records, options).runs)

"""Fold again, in step order and in bounded memory, the runs a streaming pass could not fold exactly.

The streaming summary folds each run in the order its records arrive. A run whose measurements or alerts
came out of step order (a hand-edited or concatenated log), or that had more records after it was finished
(a run resumed after others in the same file), is listed by
:meth:`~gradwatch.report.streaming.StreamingSummary.inexact_runs`. :func:`refold` reads the files again,
keeps only those runs' records and sorts them with an external merge sort: sorted batches of
:data:`SORT_BATCH` records (any kind, with the fast decoders or without) are spilled to temporary files and
merged lazily, so memory stays bounded however large the runs are. The sorted records are what the
whole-file summary sees after its own (stable) sorts, so the refolded runs get the whole-file figures.
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from enum import Enum
from operator import itemgetter
from pathlib import Path
from typing import IO, Any

from gradwatch.records import (
    GLOBAL_RANK,
    Alert,
    AlertKind,
    ClipEvent,
    ErrorRecord,
    Measurement,
    MeasurementMetrics,
    RunHeader,
    SigmaHistogram,
)
from gradwatch.report.reader import LINE_DECODER, LINE_TYPE, LogContents, LogItem, LogTail, record_of
from gradwatch.report.streaming import LIVE_RUNS, StreamingSummary
from gradwatch.report.summary import ReportOptions, RunKey, RunSummary, summarize

SORT_BATCH = 16_384
"""Records sorted in memory at a time; more are spilled to temporary files in sorted batches."""
_FIRST = -(1 << 62)
"""The sort step of records folded in file order (headers, clips, errors): before every measurement."""

_encode: Callable[[Any], bytes] | None
_decode: Callable[[bytes], Any] | None
if LINE_TYPE is not None:
    import msgspec

    _encode, _decode = msgspec.json.Encoder().encode, LINE_DECODER
else:  # no msgspec: no measurement lines either (every item is a record, spilled as its JSON)
    _encode = _decode = None

SortKey = tuple[tuple[str, int], int, int, str, int, int, int]
_KEY = itemgetter(0)
_LINE_TAG, _RECORD_TAG = b"L", b"R"


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
    """Sort (key, item) pairs of unique keys in bounded memory: sorted batches spilled to temporary files.

    Keys are tuples of strings and ints; items are what a reader yields. At most ``batch`` items are held
    in memory, whatever they are: measurement lines (the bulk of a log read with msgspec) are spilled as
    the JSON msgspec writes and reads back exactly (their numbers are finite: the decoder refuses any other
    line); records (every item without msgspec; headers, alerts, clips, errors and odd measurements with
    it) field by field through :mod:`json` (:func:`_plain`), which reads every float back to the bit
    (``Infinity`` and ``NaN`` too). Nothing is unpickled or evaluated.
    """

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self._items: list[tuple[Any, Any]] = []
        self._spilled: list[IO[bytes]] = []

    @property
    def spilled_batches(self) -> int:
        return len(self._spilled)

    @property
    def held(self) -> int:
        """Items held in memory now (at most ``batch``)."""
        return len(self._items)

    def add(self, key: Any, item: Any) -> None:
        self._items.append((key, item))
        if len(self._items) >= self.batch:
            self._spill()

    def _spill(self) -> None:
        self._items.sort(key=_KEY)
        handle = tempfile.TemporaryFile(prefix="gradwatch-report-")  # noqa: SIM115  # closed by sorted_items
        handle.writelines(
            json.dumps(key).encode() + b"\t" + _payload(item) + b"\n" for key, item in self._items
        )
        handle.seek(0)
        self._spilled.append(handle)
        self._items = []

    def sorted_items(self) -> Iterator[Any]:
        """Every item added, by key (the spilled batches are read back lazily and closed after)."""
        self._items.sort(key=_KEY)
        streams: list[Iterable[tuple[Any, Any]]] = [map(_decoded, handle) for handle in self._spilled]
        streams.append(self._items)
        try:
            for _key, item in heapq.merge(*streams, key=_KEY):
                yield item
        finally:
            for handle in self._spilled:
                handle.close()
            self._spilled, self._items = [], []


def _payload(item: LogItem) -> bytes:
    """An item as one line of a spilled batch: a tag, then its JSON."""
    if _encode is not None and type(item) is LINE_TYPE:
        return _LINE_TAG + _encode(item)
    return _RECORD_TAG + json.dumps(_plain(item)).encode()


_RECORD_TYPES: dict[str, Any] = {
    cls.__name__: cls
    for cls in (RunHeader, Measurement, MeasurementMetrics, SigmaHistogram, Alert, ClipEvent, ErrorRecord)
}
_ENUM_TYPES: dict[str, Any] = {AlertKind.__name__: AlertKind}


def _plain(value: Any) -> Any:
    """A record as JSON data that :func:`_restored` turns back into an equal record, every field as it was
    (``to_json`` writes non-finite floats as null; here :mod:`json` writes ``NaN``/``Infinity`` and reads
    them back). Dataclasses, enums, dicts and tuples are tagged; nothing is evaluated when read."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            "t": type(value).__name__,
            "f": [_plain(getattr(value, f.name)) for f in dataclasses.fields(value)],
        }
    if isinstance(value, Enum):
        return {"e": type(value).__name__, "v": value.value}
    if isinstance(value, dict):
        return {"d": [[_plain(key), _plain(item)] for key, item in value.items()]}
    if isinstance(value, tuple):
        return {"u": [_plain(item) for item in value]}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value  # str, int, float, bool, None


def _restored(value: Any) -> Any:
    """The value :func:`_plain` made ``value`` from."""
    if isinstance(value, list):
        return [_restored(item) for item in value]
    if isinstance(value, dict):
        if "t" in value:
            return _RECORD_TYPES[value["t"]](*(_restored(item) for item in value["f"]))
        if "e" in value:
            return _ENUM_TYPES[value["e"]](value["v"])
        if "d" in value:
            return {_restored(key): _restored(item) for key, item in value["d"]}
        return tuple(_restored(item) for item in value["u"])
    return value


def _decoded(line: bytes) -> tuple[Any, Any]:
    """The (key, item) of a spilled line."""
    key_text, payload = line.rstrip(b"\n").split(b"\t", 1)
    run_order, *rest = json.loads(key_text)
    tag, body = payload[:1], payload[1:]
    if tag == _LINE_TAG:
        assert _decode is not None  # only written with msgspec
        item = _decode(body)
    else:
        item = _restored(json.loads(body))
    return (tuple(run_order), *rest), item


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

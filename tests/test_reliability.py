"""Configuration errors at watch() time, a run log that loses nothing, resuming, and the security promises."""

from __future__ import annotations

import ast
import errno
import io
import socket
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import gradwatch
import gradwatch.measure as measure_module
from gradwatch.records import Alert, ClipEvent, ErrorRecord, Measurement, Record, RunHeader
from gradwatch.report.command import make_report, render
from gradwatch.report.reader import read_logs
from gradwatch.report.summary import ReportOptions
from gradwatch.sinks.jsonl import JsonlSink

REPO = Path(__file__).resolve().parents[1]


class SeqModel(nn.Module):
    def __init__(self, rnn: nn.Module | None = None) -> None:
        super().__init__()
        self.rnn = rnn if rnn is not None else nn.GRU(3, 5)
        self.head = nn.Linear(self.rnn.hidden_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0]).squeeze(-1)


def _train(
    model: nn.Module, optimizer: torch.optim.Optimizer, steps: range, seed: int = 5, spike_step: int = -1
) -> list[torch.Tensor]:
    """Train on batches that depend only on the step index (so a resumed run sees the same data); the
    targets of ``spike_step`` are 100 times larger (a gradient spike)."""
    losses = []
    for step in steps:
        generator = torch.Generator().manual_seed(seed * 1000 + step)
        x = torch.randn(8, 4, 3, generator=generator)
        y = torch.randn(8, 4, generator=generator) * (100.0 if step == spike_step else 1.0)
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return losses


# --- configuration errors at watch() time ---------------------------------------------------------------


def _taken_port() -> tuple[socket.socket, int]:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    return holder, holder.getsockname()[1]


def _not_callable(alert: Alert) -> None:  # pragma: no cover - never called
    pass


BAD_OPTIONS: list[tuple[str, dict[str, Any], type[Exception], str]] = [
    ("every-zero", {"every": 0}, ValueError, "every must be a positive integer"),
    ("every-float", {"every": 2.5}, ValueError, "every must be a positive integer"),
    ("max-sequences", {"max_sequences": 0}, ValueError, "max_sequences must be a positive integer"),
    ("probe", {"probe": "sometimes"}, ValueError, "probe must be 'fixed'"),
    (
        "nonfinite",
        {"nonfinite": "ignore"},
        ValueError,
        "nonfinite policy must be one of 'warn', 'raise', 'skip'",
    ),
    ("clip-string", {"clip": "zclip"}, ValueError, "clip must be 'auto', a positive number or a ClipPolicy"),
    ("clip-negative", {"clip": -1.0}, ValueError, "max_norm must be a finite number > 0"),
    ("clip-scope", {"clip": 1.0, "clip_scope": "some"}, ValueError, "clip_scope must be 'monitored'"),
    (
        "clip-mode",
        {"clip": 1.0, "clip_mode": "never"},
        ValueError,
        "clip_mode must be 'always' or 'exploding'",
    ),
    ("fsync", {"fsync": "sometimes"}, ValueError, "fsync must be one of 'never', 'header', 'always'"),
    ("strict", {"strict": "yes"}, TypeError, "strict must be True or False"),
    ("seed", {"seed": "0"}, TypeError, "seed must be an integer"),
    ("history-size", {"history_size": -1}, ValueError, "history_size must be a non-negative integer"),
    (
        "prometheus-spec",
        {"prometheus": "everywhere"},
        ValueError,
        "prometheus='everywhere' is not understood",
    ),
    (
        "estimator",
        {"estimator": {"max_iter": 3}},
        TypeError,
        "estimator must be a gradwatch.EstimatorSettings",
    ),
    ("detection", {"detection": {"patience": 3}}, TypeError, "detection must be a gradwatch.DetectionConfig"),
    ("sinks", {"sinks": [object()]}, TypeError, r"sinks must have write\(record\), flush\(\) and close\(\)"),
    ("on-alert", {"on_alert": [_not_callable, "print"]}, TypeError, "on_alert must be a callable"),
    ("optimizer", {"optimizer": "adam"}, TypeError, "optimizer must be a torch.optim.Optimizer"),
    ("skip-needs-optimizer", {"nonfinite": "skip"}, ValueError, "nonfinite='skip' needs the optimizer"),
]


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [case[1:] for case in BAD_OPTIONS],
    ids=[case[0] for case in BAD_OPTIONS],
)
def test_an_unknown_option_value_is_a_clear_error_at_watch_time(
    options: dict[str, Any], error: type[Exception], message: str, tmp_path: Path
) -> None:
    options = dict(options)
    optimizer = options.pop("optimizer", None)
    log = tmp_path / "run.jsonl"
    with pytest.raises(error, match=message):
        gradwatch.watch(SeqModel(), optimizer, log=log, **options)  # type: ignore[arg-type]
    assert not log.exists() or log.stat().st_size == 0  # nothing was written for a run that never started


def test_a_model_without_recurrent_modules_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="register_cell"):
        gradwatch.watch(nn.Sequential(nn.Linear(3, 3), nn.Tanh()))


@pytest.mark.parametrize("kind", ["file-in-the-way", "directory"], ids=["parent-is-a-file", "path-is-a-dir"])
def test_an_unwritable_log_path_names_the_fix(kind: str, tmp_path: Path) -> None:
    if kind == "file-in-the-way":
        (tmp_path / "blocker").write_text("x")
        log, message = tmp_path / "blocker" / "run.jsonl", "cannot open log file .* Choose a writable path"
    else:
        log, message = tmp_path, "is a directory; give a file path such as runs/exp.jsonl"
    with pytest.raises(ValueError, match=message):
        gradwatch.watch(SeqModel(), log=log)


def test_a_port_in_use_names_the_fix() -> None:
    holder, port = _taken_port()
    with holder, pytest.raises(ValueError, match=f"port {port} on 127.0.0.1 is already in use.*port 0"):
        gradwatch.watch(SeqModel(), prometheus=port)


def test_a_failing_watch_releases_the_log_file_and_the_port(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    closed: list[object] = []
    original_close = JsonlSink.close

    def tracking_close(self: JsonlSink) -> None:
        closed.append(self)
        original_close(self)

    def broken_recorder(*args: object, **kwargs: object) -> None:
        raise RuntimeError("cannot build the hook")

    monkeypatch.setattr(JsonlSink, "close", tracking_close)
    monkeypatch.setattr(measure_module, "CallRecorder", broken_recorder)
    with pytest.raises(RuntimeError, match="cannot build the hook"):
        gradwatch.watch(SeqModel(), log=tmp_path / "run.jsonl", prometheus="127.0.0.1:0")
    assert len(closed) == 1
    # The exporter's port was released too: the monitor that failed holds no server.
    assert not [t for t in __import__("threading").enumerate() if t.name == "gradwatch-exporter"]


# --- the run log loses nothing ----------------------------------------------------------------------------


class DiskFullFile:
    """Wraps the log's raw file: while ``full``, a write stores only half its bytes, the next one raises
    ENOSPC (what a filling disk does); afterwards writes go through again."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.full = False
        self._half_written = False

    def write(self, data: bytes) -> int:
        if self.full:
            if self._half_written:
                raise OSError(errno.ENOSPC, "No space left on device")
            self._half_written = True
            return self.raw.write(data[: len(data) // 2])
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()

    def fileno(self) -> int:
        return self.raw.fileno()

    def close(self) -> None:
        self.raw.close()


def test_a_full_disk_degrades_to_one_warning_and_the_log_stays_readable(tmp_path: Path) -> None:
    log = tmp_path / "run.jsonl"
    model = SeqModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    # background=False: the disk fills at exact steps, so each measurement must be written at its own step.
    monitor = gradwatch.watch(model, optimizer, every=1, log=log, fsync="never", background=False)
    jsonl = next(s for s in monitor.sinks if isinstance(s, JsonlSink))
    disk = DiskFullFile(jsonl._file)
    jsonl._file = disk  # type: ignore[assignment]
    _train(model, optimizer, range(0, 2))
    disk.full = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(model, optimizer, range(2, 5))
    disk.full = False
    _train(model, optimizer, range(5, 8))
    monitor.close()

    ours = [w for w in caught if issubclass(w.category, gradwatch.GradWatchWarning)]
    assert len(ours) == 1 and "No space left on device" in str(ours[0].message)
    assert monitor.fault_counts[f"sink:{jsonl!r}"] == 3  # steps 2, 3, 4: a half line, then two refusals
    contents = read_logs([str(log)])
    assert len(contents.problems) == 1 and "not valid JSON" in contents.problems[0].message  # the half line
    steps = [r.step for r in contents.records if isinstance(r, Measurement)]
    assert steps == [0, 1, 5, 6, 7]  # every record written while the disk had room is whole and readable


def test_a_short_write_is_completed_so_the_line_stays_whole(tmp_path: Path) -> None:
    class ShortWrites(DiskFullFile):
        def write(self, data: bytes) -> int:
            return self.raw.write(data[:7])  # the OS may take fewer bytes than offered

    sink = JsonlSink(tmp_path / "run.jsonl")
    sink._file = ShortWrites(sink._file)  # type: ignore[assignment]
    record = ErrorRecord(3, 1.0, "capture", "RuntimeError('x')", module="rnn", run_id="r")
    sink.write(record)
    sink.write(record)
    sink.close()
    assert read_logs([str(tmp_path / "run.jsonl")]).records == [record, record]


def test_appending_after_a_cut_last_line_keeps_the_new_run_readable(tmp_path: Path) -> None:
    log = tmp_path / "run.jsonl"
    model = SeqModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradwatch.watch(model, optimizer, every=1, log=log):
        _train(model, optimizer, range(2))
    with log.open("ab") as raw:
        raw.write(b'{"kind":"measurement","run_id":"x","st')  # a crash in the middle of a line
    with gradwatch.watch(model, optimizer, every=1, log=log) as second:
        _train(model, optimizer, range(2))
    contents = read_logs([str(log)])
    assert len(contents.problems) == 1 and contents.problems[0].line == 4
    headers = [r for r in contents.records if isinstance(r, RunHeader)]
    assert [h.run_id for h in headers][1] == second.run_id
    assert sum(isinstance(r, Measurement) for r in contents.records) == 4


def test_fsync_is_exposed_and_each_line_is_fsynced_when_asked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    synced: list[int] = []
    monkeypatch.setattr("gradwatch.sinks.jsonl.os.fsync", lambda fd: synced.append(fd))
    model = SeqModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = gradwatch.watch(
        model, optimizer, every=1, log=tmp_path / "run.jsonl", fsync="always", background=False
    )
    _train(model, optimizer, range(3))
    lines = (tmp_path / "run.jsonl").read_text().count("\n")
    assert len(synced) == lines == 4  # header + 3 measurements, each fsynced
    monitor.close()


# --- resuming ---------------------------------------------------------------------------------------------


def _exploding_model() -> SeqModel:
    """A relu RNN whose recurrent weight has spectral norm 2.5: products of Jacobians grow every step."""
    torch.manual_seed(4)
    rnn = nn.RNN(3, 6, nonlinearity="relu")
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(2.5 * torch.linalg.qr(torch.randn(6, 6))[0])
        rnn.bias_hh_l0.fill_(0.5)
    return SeqModel(rnn)


def _resume_options() -> dict[str, Any]:
    return {
        "every": 1,
        "clip": gradwatch.ZClip(warmup_steps=3),
        "detection": gradwatch.DetectionConfig(patience=4, exploding_lag_norm=20.0),
    }


def _comparable(records: list[Record]) -> list[dict[str, Any]]:
    """Records without what must differ between two processes: run id and wall-clock time."""
    return [
        {k: v for k, v in r.to_json().items() if k not in ("run_id", "time")}
        for r in records
        if not isinstance(r, RunHeader)
    ]


@pytest.mark.filterwarnings("ignore::gradwatch.ExplodingGradientWarning")  # the alert is asserted below
def test_a_resumed_run_continues_alerts_clipping_and_measurements_exactly(tmp_path: Path) -> None:
    total, split = 7, 2
    reference = _exploding_model()
    optimizer = torch.optim.SGD(reference.parameters(), lr=1e-4)
    with gradwatch.watch(reference, optimizer, **_resume_options()) as uninterrupted:
        _train(reference, optimizer, range(total), spike_step=5)

    log = tmp_path / "run.jsonl"
    first_model = _exploding_model()
    first_optimizer = torch.optim.SGD(first_model.parameters(), lr=1e-4)
    first = gradwatch.watch(first_model, first_optimizer, log=log, **_resume_options())
    _train(first_model, first_optimizer, range(split), spike_step=5)
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save(
        {
            "model": first_model.state_dict(),
            "optimizer": first_optimizer.state_dict(),
            "gradwatch": first.state_dict(),
        },
        checkpoint,
    )
    first.close()

    state = torch.load(
        checkpoint
    )  # weights_only=True, the safe default: the state is tensors and plain values
    model = _exploding_model()
    model.load_state_dict(state["model"])
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    optimizer.load_state_dict(state["optimizer"])
    resumed = gradwatch.watch(model, optimizer, log=log, **_resume_options())
    resumed.load_state_dict(state["gradwatch"])
    _train(model, optimizer, range(split, total), spike_step=5)
    resumed.close()

    expected = list(uninterrupted.history)
    alerts = [r for r in expected if isinstance(r, Alert)]
    assert alerts and alerts[0].step > split  # the alert needs detector windows from before the split
    assert [r for r in expected if isinstance(r, ClipEvent) and r.step >= split]  # ZClip state is needed too
    assert _comparable(list(first.history) + list(resumed.history)) == _comparable(expected)
    assert resumed.detector.state_dict() == uninterrupted.detector.state_dict()
    assert resumed.clip_policy.state_dict() == uninterrupted.clip_policy.state_dict()  # type: ignore[union-attr]

    report = make_report([str(log)], ReportOptions())
    assert {run.header.run_id for run in report.runs} == {first.run_id, resumed.run_id}  # type: ignore[union-attr]
    contents = read_logs([str(log)])
    assert not contents.problems
    assert {r.run_id for r in contents.records} == {first.run_id, resumed.run_id}
    assert all(r.step >= split for r in contents.records if r.run_id == resumed.run_id and hasattr(r, "step"))


def test_state_dict_holds_only_tensors_and_plain_values() -> None:
    model = SeqModel(nn.LSTM(3, 4))
    optimizer = torch.optim.Adam(model.parameters())
    with gradwatch.watch(model, optimizer, every=1, clip="auto") as monitor:
        _train(model, optimizer, range(2))
        state = monitor.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert loaded["step"] == 2 and set(loaded["probes"]) == {"rnn"}
    assert loaded["warm_starts"]["rnn|0|forward"]["step_vectors"].shape[:2] == (8, 4)


def test_every_warm_start_survives_torch_save_and_a_weights_only_load() -> None:
    """Step, weight and lag vectors of every layer come back equal, with lags that still match the
    measurement's (a tuple), so the resumed monitor starts warm exactly where the first one stopped."""
    model = SeqModel(nn.LSTM(3, 4, num_layers=2))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    with gradwatch.watch(model, optimizer, every=1) as monitor:
        _train(model, optimizer, range(2))
        state = monitor.state_dict()
        saved = monitor.warm_starts
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    with gradwatch.watch(model, optimizer, every=1) as resumed:
        resumed.load_state_dict(torch.load(buffer, weights_only=True))
        loaded = resumed.warm_starts
    assert set(loaded) == set(saved) and len(saved) == 2  # one per layer
    for key, warm in saved.items():
        assert loaded[key].lags == warm.lags == (1, 2, 4, 8)
        for name in ("step_vectors", "weight_vector", "lag_vectors"):
            assert torch.equal(getattr(loaded[key], name), getattr(warm, name)), (key, name)


@pytest.mark.parametrize(
    "state",
    [{}, {"step": "3"}, {"step": 3, "warm_starts": {"rnn|0|forward": {"lags": [1]}}}],
    ids=["empty", "step-not-int", "warm-start-without-vectors"],
)
def test_a_bad_state_dict_is_a_clear_error(state: dict[str, Any]) -> None:
    with gradwatch.watch(SeqModel()) as monitor, pytest.raises(ValueError, match=r"Monitor\.state_dict\(\)"):
        monitor.load_state_dict(state)


# --- security ---------------------------------------------------------------------------------------------


def test_the_exporter_binds_loopback_unless_told_otherwise() -> None:
    from gradwatch.sinks.prometheus import PrometheusSink

    with gradwatch.watch(SeqModel(), prometheus=0) as monitor:
        exporter = next(s for s in monitor.sinks if isinstance(s, PrometheusSink))
        assert exporter._server is not None and exporter._server.bound_address == "127.0.0.1"


def test_a_hostile_module_name_from_a_real_run_renders_as_text_in_html(tmp_path: Path) -> None:
    hostile = "<script>alert('x')</script>"
    model = nn.Module()
    model.add_module(hostile, nn.GRU(3, 4))
    log = tmp_path / "run.jsonl"
    with gradwatch.watch(model, every=1, log=log) as monitor:
        out, _ = getattr(model, hostile)(torch.randn(5, 2, 3))
        out.sum().backward()
        monitor.step()
    page = render(make_report([str(log)], ReportOptions()), "html")
    assert hostile not in page and "<script" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page


FORBIDDEN_MODULES = {"pickle", "marshal", "shelve", "dill", "yaml", "importlib", "subprocess", "torch"}
FORBIDDEN_BUILTINS = {"eval", "exec", "compile", "__import__"}
FORBIDDEN_METHODS = {"load", "write_text", "write_bytes"}  # torch.load / pickle.load, Path writers


def _unsafe_uses(source: str) -> list[str]:
    """Lines of ``source`` that import a deserialiser, evaluate code, load, or open a file for writing."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules = {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            modules = {(node.module or "").split(".")[0]}
        else:
            modules = set()
        if modules & FORBIDDEN_MODULES:
            found.append(f"line {node.lineno}: imports {sorted(modules & FORBIDDEN_MODULES)}")
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        forbidden = FORBIDDEN_BUILTINS if isinstance(func, ast.Name) else FORBIDDEN_METHODS
        if name in forbidden:
            found.append(f"line {node.lineno}: calls {name}")
        if name == "open":
            mode = (
                node.args[1]
                if len(node.args) > 1
                else next((k.value for k in node.keywords if k.arg == "mode"), None)
            )
            if not (isinstance(mode, ast.Constant) and set(str(mode.value)) <= {"r", "b", "t"}):
                found.append(f"line {node.lineno}: open() without a read-only mode")
    return found


@pytest.mark.parametrize("path", sorted((REPO / "gradwatch" / "report").glob("*.py")), ids=lambda p: p.name)
def test_the_report_reads_logs_as_json_only(path: Path) -> None:
    """Nothing in gradwatch/report unpickles, evaluates, loads with torch, or opens a file for writing."""
    assert _unsafe_uses(path.read_text()) == []


def test_the_static_check_catches_unsafe_code() -> None:
    unsafe = (
        "import pickle\nfrom torch import load\nx = eval(s)\nopen(p, 'w')\nopen(p)\n"
        "Path(p).write_text(s)\nopen(p, mode='rb')\nre.compile(s)\n"
    )
    assert _unsafe_uses(unsafe) == [
        "line 1: imports ['pickle']",
        "line 2: imports ['torch']",
        "line 3: calls eval",
        "line 4: open() without a read-only mode",
        "line 5: open() without a read-only mode",
        "line 6: calls write_text",
    ]

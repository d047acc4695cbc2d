"""GradWatchCallback: Lightning training writes the expected records, once per optimizer step."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradwatch
from gradwatch.records import Alert, AlertKind, ErrorRecord, Measurement, RunHeader, record_from_json
from gradwatch.sinks.jsonl import JsonlSink

pl = pytest.importorskip("lightning.pytorch", reason="needs Lightning: pip install 'gradwatch[lightning]'")
from gradwatch.lightning import GradWatchCallback  # noqa: E402


class SequenceRegressor(pl.LightningModule):
    """An RNN -> linear model predicting a value per time step; counts its training_step calls."""

    def __init__(self, rnn: nn.Module, hidden: int, lr: float = 1e-2) -> None:
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(hidden, 1)
        self.lr = lr
        self.batches_seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out).squeeze(-1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.batches_seen += 1
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _loader(batches: int, batch_size: int = 4, steps: int = 8, features: int = 3) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batches * batch_size, steps, features, generator=generator)
    y = torch.randn(batches * batch_size, steps, generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def _trainer(callback: GradWatchCallback, max_steps: int, **kwargs: object) -> pl.Trainer:
    return pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        **kwargs,  # type: ignore[arg-type]
    )


def _read(path: Path) -> list:
    return [record_from_json(json.loads(line)) for line in path.read_text().splitlines()]


def _exploding_rnn() -> nn.RNN:
    """A ReLU RNN with W_hh = 1.5 I and positive inputs: every J_t = 1.5 I, so ||J^15|| = 1.5^15 > 100."""
    rnn = nn.RNN(3, 4, nonlinearity="relu", batch_first=True)
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(1.5 * torch.eye(4))
        rnn.weight_ih_l0.abs_()
        rnn.bias_ih_l0.fill_(0.1)
        rnn.bias_hh_l0.zero_()
    return rnn


def test_lstm_training_writes_a_header_and_one_measurement_per_step(tmp_path: Path) -> None:
    log = tmp_path / "exp.jsonl"
    model = SequenceRegressor(nn.LSTM(3, 6, num_layers=2, batch_first=True), 6)
    callback = GradWatchCallback(log=log, every=1)
    _trainer(callback, max_steps=4).fit(model, _loader(batches=4))

    records = _read(log)
    assert isinstance(records[0], RunHeader)
    assert [m["name"] for m in records[0].modules] == ["rnn"]
    measurements = [r for r in records if isinstance(r, Measurement)]
    expected = [(step, layer) for step in range(4) for layer in (0, 1)]
    assert sorted({(m.step, m.layer) for m in measurements}) == expected
    assert all(m.metrics.jacobian_sigma_max_mean is not None for m in measurements)
    assert all(m.run_id == records[0].run_id for m in measurements)
    assert callback.monitor is None  # teardown closed the monitor


@pytest.mark.parametrize("accumulate", [1, 2, 3], ids=["accumulate-1", "accumulate-2", "accumulate-3"])
def test_gradient_accumulation_measures_once_per_optimizer_step(tmp_path: Path, accumulate: int) -> None:
    log = tmp_path / "exp.jsonl"
    model = SequenceRegressor(nn.GRU(3, 5, batch_first=True), 5)
    callback = GradWatchCallback(log=log, every=1)
    trainer = _trainer(callback, max_steps=3, accumulate_grad_batches=accumulate)
    trainer.fit(model, _loader(batches=3 * accumulate))

    assert model.batches_seen == 3 * accumulate
    steps = [r.step for r in _read(log) if isinstance(r, Measurement)]
    assert steps == [0, 1, 2]
    assert trainer.global_step == 3


def test_exploding_init_raises_an_exploding_alert(tmp_path: Path) -> None:
    log = tmp_path / "exp.jsonl"
    model = SequenceRegressor(_exploding_rnn(), 4, lr=0.0)  # lr 0: the weights stay exploding
    callback = GradWatchCallback(log=log, every=1)
    loader = DataLoader(TensorDataset(torch.rand(16, 16, 3), torch.zeros(16, 16)), batch_size=4)
    with pytest.warns(gradwatch.ExplodingGradientWarning):
        _trainer(callback, max_steps=4).fit(model, loader)

    records = _read(log)
    lyapunov = [r.metrics.lyapunov_max for r in records if isinstance(r, Measurement)]
    assert lyapunov == pytest.approx([torch.log(torch.tensor(1.5)).item()] * 4, rel=1e-3)
    alerts = [r for r in records if isinstance(r, Alert)]
    assert [a.alert for a in alerts] == [AlertKind.EXPLODING]
    assert alerts[0].module == "rnn"


def test_skipped_amp_steps_are_not_steps_nor_nonfinite_alerts(tmp_path: Path) -> None:
    """A GradScaler that finds inf skips optimizer.step(): the callback must not count or flag that step."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    class InfOnSecondBatch(SequenceRegressor):
        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            return loss * float("inf") if batch_idx == 1 else loss

    log = tmp_path / "exp.jsonl"
    model = InfOnSecondBatch(nn.RNN(3, 4, batch_first=True), 4)  # CPU float16 autocast runs nn.RNN in fp16
    callback = GradWatchCallback(log=log, every=1)
    precision = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", gradwatch.NonFiniteGradientWarning)
        trainer = _trainer(callback, max_steps=4, plugins=[precision])
        trainer.fit(model, _loader(batches=5))

    records = _read(log)
    assert not [r for r in records if isinstance(r, Alert)]
    # Lightning counts the skipped step in global_step; gradwatch counts optimizer steps taken (3 of 4).
    assert model.batches_seen == trainer.global_step == 4
    assert [r.step for r in records if isinstance(r, Measurement)] == [0, 1, 2]


def test_checkpoint_carries_the_step_counter(tmp_path: Path) -> None:
    log = tmp_path / "exp.jsonl"
    model = SequenceRegressor(nn.GRU(3, 5, batch_first=True), 5)
    trainer = _trainer(GradWatchCallback(log=log, every=1), max_steps=2)
    trainer.fit(model, _loader(batches=4))
    checkpoint = tmp_path / "two.ckpt"
    trainer.save_checkpoint(checkpoint)

    resumed = _trainer(GradWatchCallback(log=log, every=1), max_steps=4)
    fresh_model = SequenceRegressor(nn.GRU(3, 5, batch_first=True), 5)
    resumed.fit(fresh_model, _loader(batches=4), ckpt_path=checkpoint)
    records = _read(log)
    headers = [r for r in records if isinstance(r, RunHeader)]
    assert len(headers) == 2
    second_run = [r.step for r in records if isinstance(r, Measurement) and r.run_id == headers[1].run_id]
    assert second_run == [2, 3]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"optimizer": None}, "does not take 'optimizer'"),
        ({"nonfinite": "skip"}, "nonfinite='skip' is not available"),
    ],
    ids=["optimizer", "nonfinite-skip"],
)
def test_options_lightning_owns_are_rejected(options: dict, message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        GradWatchCallback(**options)


def test_gradwatch_imports_without_lightning_and_the_callback_names_the_extra() -> None:
    script = (
        "import sys\n"
        "for name in ('lightning', 'lightning.pytorch', 'pytorch_lightning'):\n"
        "    sys.modules[name] = None\n"
        "import gradwatch\n"
        "assert 'gradwatch.lightning' not in sys.modules\n"
        "try:\n"
        "    import gradwatch.lightning\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=60, check=True
    )
    assert "pip install 'gradwatch[lightning]'" in result.stdout


def _measurements(path: Path) -> list[dict]:
    """Measurement records as JSON without what differs between two runs (run id, wall-clock time)."""
    return [
        {k: v for k, v in r.to_json().items() if k not in ("run_id", "time")}
        for r in _read(path)
        if isinstance(r, Measurement)
    ]


def test_a_resumed_fit_measures_exactly_like_an_uninterrupted_one(tmp_path: Path) -> None:
    """Lag warm starts survive a Lightning checkpoint: every record of the resumed fit, lag norms included,
    equals the uninterrupted fit's bit for bit (cold lag starts move the last bits of the lag norms)."""

    def model() -> SequenceRegressor:
        torch.manual_seed(3)
        return SequenceRegressor(nn.GRU(3, 5, batch_first=True), 5)

    # Every batch is the same, so the resumed epoch's batch order cannot matter.
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 9, 3, generator=generator), torch.randn(4, 9, generator=generator)
    loader = DataLoader(TensorDataset(x.repeat(4, 1, 1), y.repeat(4, 1)), batch_size=4, shuffle=False)
    options = {"every": 1, "background": False}

    whole = tmp_path / "whole.jsonl"
    _trainer(GradWatchCallback(log=whole, **options), max_steps=4).fit(model(), loader)

    split = tmp_path / "split.jsonl"
    first = _trainer(GradWatchCallback(log=split, **options), max_steps=2)
    first.fit(model(), loader)
    checkpoint = tmp_path / "two.ckpt"
    first.save_checkpoint(checkpoint)
    resumed_callback = GradWatchCallback(log=split, **options)
    _trainer(resumed_callback, max_steps=4).fit(model(), loader, ckpt_path=checkpoint)

    expected, got = _measurements(whole), _measurements(split)
    assert [m["step"] for m in got] == [0, 1, 2, 3]
    assert all(len(m["metrics"]["lag_norm"]) == 5 for m in got)  # lags 1, 2, 4, 8, 9
    assert got == expected
    state = resumed_callback.state_dict()
    assert all(isinstance(w["lags"], list) for w in state["warm_starts"].values())  # plain, weights_only


def _csv_rows(path: Path) -> list[dict[str, str]]:
    import csv

    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("background", [False, True], ids=["inline", "background"])
def test_log_to_trainer_sends_every_scalar_to_the_csv_logger(tmp_path: Path, background: bool) -> None:
    """Every scalar of every measurement (the TensorBoard tags) is a CSVLogger column, at the global step
    of the measured optimizer step, with the run log's value; a background measurement too."""
    from lightning.pytorch.loggers import CSVLogger

    from gradwatch.sinks.tensorboard import measurement_scalars

    log = tmp_path / "exp.jsonl"
    model = SequenceRegressor(nn.LSTM(3, 6, num_layers=2, batch_first=True), 6)
    callback = GradWatchCallback(log=log, every=2, log_to_trainer=True, background=background)
    csv_logger = CSVLogger(tmp_path / "csv", name="", version="")
    trainer = pl.Trainer(
        max_steps=5,
        accelerator="cpu",
        devices=1,
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=csv_logger,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )
    trainer.fit(model, _loader(batches=5))

    lines = [json.loads(line) for line in log.read_text().splitlines()]
    expected: dict[tuple[int, str], float] = {}
    for line in lines:
        if line["kind"] == "measurement":
            expected.update({(line["step"], tag): value for tag, value in measurement_scalars(line)})
    assert sorted({step for step, _ in expected}) == [0, 2, 4]
    rows = _csv_rows(Path(csv_logger.log_dir) / "metrics.csv")
    logged = {
        (int(row["step"]), tag): float(value)
        for row in rows
        for tag, value in row.items()
        if value and tag.startswith("gradwatch/")
    }
    assert logged == expected  # the optimizer step s has trainer.global_step s (no accumulation)
    assert "gradwatch/rnn/L1/forward/1_verdict/lyapunov_max" in rows[0]
    assert "gradwatch/rnn/L0/forward/2_lag_norm_log10/lag001" in rows[0]


def test_log_to_trainer_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="log_to_trainer must be True or False"):
        GradWatchCallback(log_to_trainer="yes")  # type: ignore[arg-type]


def test_a_failing_trainer_logger_degrades_to_a_warning(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import Logger

    class BrokenLogger(Logger):
        name = "broken"
        version = "0"

        def log_hyperparams(self, params: object, *args: object, **kwargs: object) -> None:
            pass

        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            if any(key.startswith("gradwatch/") for key in metrics):
                raise RuntimeError("logger down")

    model = SequenceRegressor(nn.GRU(3, 5, batch_first=True), 5)
    callback = GradWatchCallback(every=1, log_to_trainer=True)
    trainer = pl.Trainer(
        max_steps=2,
        accelerator="cpu",
        devices=1,
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=BrokenLogger(),
        enable_checkpointing=False,
    )
    with pytest.warns(gradwatch.GradWatchWarning, match="logging to BrokenLogger failed"):
        trainer.fit(model, _loader(batches=2))
    assert trainer.global_step == 2


class _KeepsMonitor(GradWatchCallback):
    """The callback, keeping its monitor after teardown (which closes it) for the test to read."""

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.closed_monitor = self.monitor
        super().teardown(trainer, pl_module, stage)


class _LogAtSizeLimit(_KeepsMonitor):
    """The callback with a run log whose file system refuses every write after the header (EFBIG)."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        from tests.test_warnings_as_errors import FileTooLarge

        assert self.monitor is not None
        log = next(s for s in self.monitor.sinks if isinstance(s, JsonlSink))
        log._file = FileTooLarge(log._file)  # type: ignore[assignment]
        self.log_sink = log


class EvalModeRegressor(SequenceRegressor):
    """Trains with its RNN deliberately in eval mode: gradwatch notices it (a GradWatchWarning)."""

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.rnn.eval()
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("background", [False, True], ids=["inline", "background"])
def test_warnings_as_errors_never_stop_a_fit_and_are_recorded(tmp_path: Path, background: bool) -> None:
    """``-W error``: gradwatch's warnings (a log at its size limit, an eval-mode-only step) raise nothing
    out of Lightning's training step; each is an error record in the monitor's history."""
    size_limited = _LogAtSizeLimit(log=tmp_path / "full.jsonl", every=1, background=background)
    eval_only = _KeepsMonitor(every=1, background=background)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("error")
        # Lightning's own advice (dataloader workers, log interval) stays a warning; gradwatch's are errors.
        warnings.filterwarnings("always", module=r"lightning\..*")
        warnings.filterwarnings("always", category=pl.utilities.warnings.PossibleUserWarning)
        size_model = SequenceRegressor(nn.GRU(3, 5, batch_first=True), 5)
        _trainer(size_limited, max_steps=3).fit(size_model, _loader(batches=3))
        eval_model = EvalModeRegressor(nn.LSTM(3, 5, batch_first=True), 5)
        _trainer(eval_only, max_steps=2).fit(eval_model, _loader(batches=2))
    assert size_model.batches_seen == 3 and eval_model.batches_seen == 2  # both fits ran to the end
    assert not [w for w in caught if issubclass(w.category, gradwatch.GradWatchWarning)]  # none escaped
    size_errors = [r for r in size_limited.closed_monitor._history if isinstance(r, ErrorRecord)]
    assert [e.where for e in size_errors] == [f"sink:{size_limited.log_sink!r}"]
    assert "File too large" in size_errors[0].message
    history = eval_only.closed_monitor._history
    notices = [r for r in history if isinstance(r, ErrorRecord) and r.where == "warning"]
    assert len(notices) == 1 and "ran only in eval mode" in notices[0].message

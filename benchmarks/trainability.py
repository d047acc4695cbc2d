"""Calibrate the verdicts on trainability: does the model learn the adding problem, and what did gradwatch say?

Two phases, so that iterating on a rule needs no retraining:

* ``record``: train each configuration on the adding problem (gradwatch/demo/task.py: values U(0, 1), two
  marked steps, target their sum; predicting 1 gives MSE 1/6 ~ 0.167) with the monitor on, writing its run
  log (JSONL) and an outcome file (held-out MSE every ``--eval-every`` steps) into ``--out``.
* ``evaluate``: re-run the detector of this checkout (``DetectionConfig()`` defaults) over the recorded
  measurements and print one row per run: config, T, learned? (held-out MSE vs the 0.167 baseline), the
  final verdict, the alert history, and whether the verdict is right by the issue's criteria (#28):
  vanishing open and staying open for a configuration that never learns; no vanishing or exploding open
  once it has learned; exploding never "recovered" while the run is diverged.

Setting (Le, Jaitly & Hinton 2015): H = 64, batch 64, Adam 1e-3, gradients clipped at 1 (clip_grad_norm_),
``every=10``, 2000 steps at T = 50 and 5000 at T = 150.

Run from the repository root (logs stay out of git: runs/ is ignored):
  nice -n 5 python3 -m benchmarks.trainability record --out runs/trainability --only T50
  python3 -m benchmarks.trainability evaluate --out runs/trainability
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import torch
from torch import nn

from gradwatch.attach import watch
from gradwatch.demo.task import BASELINE_MSE, INPUT_SIZE, adding_problem_batch
from gradwatch.policy.config import DetectionConfig
from gradwatch.policy.trends import TrendDetector
from gradwatch.records import Alert, AlertKind, Measurement, record_from_json

HIDDEN = 64
BATCH = 64
LEARNING_RATE = 1e-3
CLIP = 1.0
EVERY = 10
HELD_OUT = 1000
LEARNED_MSE = 0.5 * BASELINE_MSE
"""A run has learned when its held-out MSE is below half the baseline (the issue's learners end at <= 0.043)."""


class AddingModel(nn.Module):
    """A recurrent layer and a linear read-out of its last hidden state."""

    def __init__(self, rnn: nn.RNN | nn.LSTM | nn.GRU) -> None:
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(rnn.hidden_size, 1)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        output, _ = self.rnn(inputs)
        return self.head(output[-1])


def orthogonal_rnn(nonlinearity: str, gain: float) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        rnn = nn.RNN(INPUT_SIZE, HIDDEN, nonlinearity=nonlinearity)
        with torch.no_grad():
            nn.init.orthogonal_(rnn.weight_hh_l0)
            rnn.weight_hh_l0.mul_(gain)
        return rnn

    return build


def irnn() -> nn.Module:
    """Le et al. 2015: ReLU, W_hh = identity, zero recurrent biases."""
    rnn = nn.RNN(INPUT_SIZE, HIDDEN, nonlinearity="relu")
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(torch.eye(HIDDEN))
        rnn.bias_hh_l0.zero_()
        rnn.bias_ih_l0.zero_()
    return rnn


def lstm_forget_bias_one() -> nn.Module:
    rnn = nn.LSTM(INPUT_SIZE, HIDDEN)
    with torch.no_grad():
        for bias in (rnn.bias_ih_l0, rnn.bias_hh_l0):
            bias[HIDDEN : 2 * HIDDEN].fill_(0.5)  # forget-gate bias 1 in total
    return rnn


CONFIGS: dict[str, Callable[[], nn.Module]] = {
    "tanh default": lambda: nn.RNN(INPUT_SIZE, HIDDEN),
    "tanh orth 1.0": orthogonal_rnn("tanh", 1.0),
    "tanh orth 0.5": orthogonal_rnn("tanh", 0.5),
    "tanh orth 0.2": orthogonal_rnn("tanh", 0.2),
    "relu orth 2.0": orthogonal_rnn("relu", 2.0),
    "relu default": lambda: nn.RNN(INPUT_SIZE, HIDDEN, nonlinearity="relu"),
    "gru default": lambda: nn.GRU(INPUT_SIZE, HIDDEN),
    "lstm forget 1": lstm_forget_bias_one,
    "irnn": irnn,
}


@dataclass(frozen=True)
class RunSpec:
    config: str
    seq_len: int
    steps: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.config.replace(' ', '_')}-T{self.seq_len}-s{self.seed}"


def default_runs() -> list[RunSpec]:
    """The issue's table: T = 50 runs first (they are cheaper), then T = 150."""
    t50 = [("tanh default", 0), ("tanh default", 1), ("tanh orth 1.0", 0), ("tanh orth 0.5", 0),
           ("tanh orth 0.5", 1), ("tanh orth 0.2", 0), ("relu default", 0), ("relu default", 1),
           ("gru default", 0), ("lstm forget 1", 0), ("irnn", 0)]  # fmt: skip
    t150 = ["tanh default", "tanh orth 1.0", "tanh orth 0.2", "relu orth 2.0", "relu default", "gru default",
            "lstm forget 1", "irnn"]  # fmt: skip
    return [RunSpec(c, 50, 2000, s) for c, s in t50] + [RunSpec(c, 150, 5000, 0) for c in t150]


def held_out_mse(model: nn.Module, batch_inputs: torch.Tensor, targets: torch.Tensor) -> float:
    with torch.no_grad():
        return float(nn.functional.mse_loss(model(batch_inputs), targets))


def input_gradient_ratio(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """The lecture's quantity measured independently of gradwatch, in float64 on a copy of the model:
    ||dL/dx_0|| / ||dL/dx_(T-1)||, how much of the loss gradient reaches the first input compared with the
    last (x_k enters through s_k, so this is ||dL/ds_0|| / ||dL/ds_T|| seen through W_ih)."""
    replica = copy.deepcopy(model).double()
    probe = inputs.double().clone().requires_grad_(True)
    loss = nn.functional.mse_loss(replica(probe), targets.double())
    (gradient,) = torch.autograd.grad(loss, probe)
    last = float(gradient[-1].norm())
    return float(gradient[0].norm()) / last if last > 0 else math.nan


def record_run(
    spec: RunSpec, out: Path, steps: int | None, eval_every: int, estimator: str = "economy"
) -> Path:
    """Train one configuration with the monitor on; write NAME.jsonl (run log) and NAME.outcome.json."""
    torch.manual_seed(spec.seed)
    model = AddingModel(CONFIGS[spec.config]())  # type: ignore[arg-type]
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    data = torch.Generator().manual_seed(1000 + spec.seed)
    held = adding_problem_batch(torch.Generator().manual_seed(99), spec.seq_len, HELD_OUT)
    total = steps if steps is not None else spec.steps
    log = out / f"{spec.name}.jsonl"
    curve: list[tuple[int, float]] = []
    reaches: list[tuple[int, float]] = []
    started = time.perf_counter()
    monitor = watch(model, optimizer, every=EVERY, log=log, run_id=spec.name, estimator=estimator)
    try:
        for step in range(total):
            batch = adding_problem_batch(data, spec.seq_len, BATCH)
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(batch.inputs), batch.targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            optimizer.step()
            if (step + 1) % eval_every == 0 or step + 1 == total:
                curve.append((step + 1, held_out_mse(model, held.inputs, held.targets)))
                reaches.append(
                    (step + 1, input_gradient_ratio(model, held.inputs[:, :64], held.targets[:64]))
                )
    finally:
        monitor.close()
    outcome = {
        "spec": asdict(spec),
        "steps": total,
        "seconds": time.perf_counter() - started,
        "held_out_mse": curve,
        "input_gradient_ratio": reaches,
    }
    (out / f"{spec.name}.outcome.json").write_text(json.dumps(outcome))
    torch.save(model.state_dict(), out / f"{spec.name}.final.pt")  # for checking the measurements afterwards
    return log


@click.group()
def main() -> None:
    """Trainability benchmark of the vanishing/exploding verdicts (adding problem)."""


@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/trainability"), show_default=True)
@click.option("--only", default="", help="comma-separated substrings of run names (e.g. T50,lstm)")
@click.option("--steps", type=int, default=None, help="override the steps of every run (shortened table)")
@click.option("--eval-every", type=int, default=100, show_default=True)
@click.option("--skip-existing/--no-skip-existing", default=True, show_default=True)
@click.option(
    "--estimator",
    type=click.Choice(["economy", "full"]),
    default="economy",
    show_default=True,
    help="the monitor's estimator (record both into two --out folders, then run `compare`)",
)
def record(
    out: Path, only: str, steps: int | None, eval_every: int, skip_existing: bool, estimator: str
) -> None:
    """Train the configurations and record their run logs and outcomes."""
    out.mkdir(parents=True, exist_ok=True)
    wanted = [s for s in only.split(",") if s]
    for spec in default_runs():
        if wanted and not any(w in spec.name for w in wanted):
            continue
        if skip_existing and (out / f"{spec.name}.outcome.json").exists():
            continue
        (out / f"{spec.name}.jsonl").unlink(missing_ok=True)
        started = time.perf_counter()
        record_run(spec, out, steps, eval_every, estimator)
        outcome = json.loads((out / f"{spec.name}.outcome.json").read_text())
        final = outcome["held_out_mse"][-1][1]
        print(f"{spec.name}: held-out MSE {final:.4g} ({time.perf_counter() - started:.0f} s)", flush=True)


class WordLanguageModel(nn.Module):
    """pytorch/examples' word_language_model in small: embedding, LSTM, tied-size decoder."""

    def __init__(self, vocabulary: int, size: int = 128) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, size)
        self.rnn = nn.LSTM(size, size)
        self.decoder = nn.Linear(size, vocabulary)

    def forward(
        self, tokens: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        output, state = self.rnn(self.embedding(tokens), state)
        return self.decoder(output), state


def python_source_words(limit: int = 200_000) -> list[str]:
    """A word-level corpus that ships with Python (no download): the stdlib's ``json``, ``email`` and
    ``logging`` package sources, split on whitespace."""
    import email
    import json as json_package
    import logging

    words: list[str] = []
    for package in (json_package, email, logging):
        for path in sorted(Path(next(iter(package.__path__))).glob("*.py")):
            words += path.read_text(encoding="utf-8").split()
    return words[:limit]


@main.command("record-lm")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/trainability"), show_default=True)
@click.option("--steps", type=int, default=1500, show_default=True)
def record_lm(out: Path, steps: int) -> None:
    """A word-level LSTM language model, truncated BPTT 35 with the hidden state carried between batches
    (the pytorch/examples setting, small): does it learn (held-out perplexity), and what is its verdict?"""
    out.mkdir(parents=True, exist_ok=True)
    words = python_source_words()
    vocabulary = {w: i for i, w in enumerate(sorted(set(words)))}
    ids = torch.tensor([vocabulary[w] for w in words])
    split = int(0.9 * len(ids))
    batch, bptt = 20, 35
    train = ids[:split][: (split // batch) * batch].view(batch, -1).t().contiguous()  # (time, batch)
    held = ids[split:][: ((len(ids) - split) // batch) * batch].view(batch, -1).t().contiguous()
    torch.manual_seed(0)
    model = WordLanguageModel(len(vocabulary))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    log = out / "word_lm-T35-s0.jsonl"
    log.unlink(missing_ok=True)
    curve: list[tuple[int, float]] = []
    started = time.perf_counter()

    def perplexity() -> float:
        with torch.no_grad():
            logits, _ = model(held[:-1], None)
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), held[1:].reshape(-1))
        return math.exp(float(loss))

    state = None
    position = 0
    with watch(model, optimizer, every=EVERY, log=log, run_id="word_lm-T35-s0"):
        for step in range(steps):
            if position + bptt + 1 > train.shape[0]:
                position, state = 0, None
            tokens, targets = train[position : position + bptt], train[position + 1 : position + bptt + 1]
            position += bptt
            state = None if state is None else (state[0].detach(), state[1].detach())
            logits, state = model(tokens, state)
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
            optimizer.step()
            if (step + 1) % 100 == 0 or step == 0:
                curve.append((step + 1, perplexity()))
    outcome = {"vocabulary": len(vocabulary), "words": len(words), "unigram_perplexity": None,
               "held_out_perplexity": curve, "seconds": time.perf_counter() - started}  # fmt: skip
    counts = torch.bincount(ids[:split], minlength=len(vocabulary)).double() + 1
    probabilities = counts / counts.sum()
    outcome["unigram_perplexity"] = math.exp(float(-probabilities[held].log().mean()))
    (out / "word_lm-T35-s0.lm.json").write_text(json.dumps(outcome))
    print(f"word LM: vocabulary {len(vocabulary)}, held-out perplexity {curve[0][1]:.0f} -> {curve[-1][1]:.0f} "
          f"(unigram {outcome['unigram_perplexity']:.0f})")  # fmt: skip


@main.command("evaluate-lm")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/trainability"), show_default=True)
def evaluate_lm(out: Path) -> None:
    """The word LM's verdict under this checkout's rules, its alerts and its reach."""
    outcome = json.loads((out / "word_lm-T35-s0.lm.json").read_text())
    detector = TrendDetector(DetectionConfig())
    alerts: list[Alert] = []
    reaches: list[tuple[int, float | None, int | None]] = []
    with (out / "word_lm-T35-s0.jsonl").open() as lines:
        for line in lines:
            record = record_from_json(json.loads(line))
            if isinstance(record, Measurement):
                alerts += detector.update(record)
                reaches.append((record.step, record.metrics.gradient_reach, record.metrics.horizon))
    history = alert_history(alerts)
    curve = outcome["held_out_perplexity"]
    print(f"word LM (LSTM, BPTT 35, vocabulary {outcome['vocabulary']}): held-out perplexity "
          f"{curve[0][1]:.0f} -> {curve[-1][1]:.0f} (unigram {outcome['unigram_perplexity']:.0f}); "
          f"final verdict {detector.verdict('rnn').value}; alerts {history}")  # fmt: skip
    for step, reach, horizon in reaches[:: max(1, len(reaches) // 8)]:
        print(f"  step {step}: reach {reach} of {horizon} steps")


@dataclass(frozen=True)
class Row:
    """One recorded run judged again by this checkout's detector."""

    spec: RunSpec
    steps: int
    final_mse: float
    learned_step: int | None
    diverged_step: int | None
    final_verdict: str
    history: str
    right: bool
    why: str
    input_ratio: float | None = None  # the lecture's quantity at the end, measured independently
    agreement: float | None = (
        None  # share of evaluations where "vanishing open" == (independent ratio < floor)
    )


INDEPENDENT_TAIL = 5
"""The independent ||dL/dx_0|| / ||dL/dx_(T-1)|| at the end of a run: the median of its last 5 evaluations
(it moves by decades from one evaluation to the next)."""


def final_input_ratio(outcome: dict[str, object]) -> float | None:
    """The median of the last INDEPENDENT_TAIL evaluations of the independent ratio, or None (older logs)."""
    ratios = [float(r) for _, r in outcome.get("input_gradient_ratio", [])][-INDEPENDENT_TAIL:]  # type: ignore[attr-defined]
    finite = sorted(r for r in ratios if math.isfinite(r))
    return finite[(len(finite) - 1) // 2] if finite else None


def learned_at(curve: list[tuple[int, float]]) -> int | None:
    """The first evaluated step from which the held-out MSE stays below LEARNED_MSE, or None."""
    first: int | None = None
    for step, mse in curve:
        below = math.isfinite(mse) and mse < LEARNED_MSE
        first = (step if first is None else first) if below else None
    return first


def diverged_at(curve: list[tuple[int, float]]) -> int | None:
    """The first evaluated step whose held-out MSE is non-finite or beyond 1e3 x the baseline."""
    return next((step for step, mse in curve if not math.isfinite(mse) or mse > 1e3 * BASELINE_MSE), None)


def judge_run(log: Path, outcome: dict[str, object], config: DetectionConfig) -> Row:
    """Replay the run log through a fresh detector and check the verdicts against the outcome (#28)."""
    spec = RunSpec(**outcome["spec"])  # type: ignore[arg-type]
    curve = [(int(s), float(m)) for s, m in outcome["held_out_mse"]]  # type: ignore[attr-defined]
    alerts, final = replay_run(log, config)
    learned, diverged = learned_at(curve), diverged_at(curve)
    ratio = final_input_ratio(outcome)
    final_mse = curve[-1][1]
    history = alert_history(alerts)
    why = ""
    if diverged is not None:
        after = [a for a in alerts if a.step >= diverged and a.alert is AlertKind.RECOVERED]
        right = final == "exploding" and not after
        why = "" if right else "diverged: exploding must stay open"
    elif learned is not None:
        episode: str | None = None  # the episode open at each alert
        late = []
        for alert in alerts:
            episode = None if alert.alert is AlertKind.RECOVERED else alert.alert.value
            if alert.step >= learned and episode is not None:
                late.append(alert)
        open_at_learned = _open_episode(alerts, learned)
        right = open_at_learned is None and not late and final == "healthy"
        why = "" if right else f"learned at {learned}: {open_at_learned or 'alert'} still open"
    else:
        right, why = _judge_never_learned(alerts, final, outcome, config)
    agreement = agreement_with_independent_ratio(alerts, outcome, config)
    return Row(
        spec,
        int(outcome["steps"]),
        final_mse,
        learned,
        diverged,
        final,
        history,
        right,
        why,
        ratio,
        agreement,
    )  # type: ignore[call-overload]


def agreement_with_independent_ratio(
    alerts: list[Alert], outcome: dict[str, object], config: DetectionConfig
) -> float | None:
    """The share of evaluations after the warm-up (and the patience it takes to open) at which the
    detector's state (a vanishing episode open or not) agrees with the independent ratio (below the floor or
    not); None without recorded ratios."""
    settled = config.vanishing_warmup_steps + config.vanishing_patience * EVERY
    pairs = [(int(s), float(r)) for s, r in outcome.get("input_gradient_ratio", []) if int(s) >= settled]  # type: ignore[attr-defined]
    pairs = [(s, r) for s, r in pairs if math.isfinite(r)]
    if not pairs:
        return None
    agree = sum(
        (_open_episode(alerts, s) == "vanishing") == (r < config.vanishing_lag_norm) for s, r in pairs
    )
    return agree / len(pairs)


def _judge_never_learned(
    alerts: list[Alert], final: str, outcome: dict[str, object], config: DetectionConfig
) -> tuple[bool, str]:
    """A run that never learned. Vanishing must open. Where the independent ratio was recorded, the verdict
    must follow it: vanishing at the end iff the ratio at the end is below the floor, and every recovery
    backed by an evaluation, between the episode's opening and 100 steps after the recovery, whose ratio
    reached the floor (the gradient did reach back then). Without it (older logs), the issue's literal
    rule: vanishing opens and stays open."""
    opened = [a for a in alerts if a.alert is AlertKind.VANISHING]
    if not opened:
        return False, "never learned: vanishing must open"
    recoveries = [a for a in alerts if a.alert is AlertKind.RECOVERED and a.step > opened[0].step]
    ratio = final_input_ratio(outcome)
    if ratio is None:
        right = final == "vanishing" and not recoveries
        return right, "" if right else "never learned: vanishing must open and stay open"
    floor = config.vanishing_lag_norm
    reached = [int(s) for s, r in outcome["input_gradient_ratio"] if math.isfinite(r) and r >= floor]  # type: ignore[attr-defined]
    for recovery in recoveries:
        since = max((a.step for a in opened if a.step < recovery.step), default=opened[0].step)
        if not any(since <= step <= recovery.step + 100 for step in reached):
            return False, f"recovered at {recovery.step} while the independent ratio stayed below {floor:g}"
    expected = "vanishing" if ratio < floor else "not vanishing"
    right = (final == "vanishing") == (ratio < floor)
    return right, "" if right else f"never learned; the independent ratio at the end says {expected}"


def _open_episode(alerts: list[Alert], step: int) -> str | None:
    """The vanishing/exploding episode open at ``step`` (after the alerts up to it), or None."""
    episode: str | None = None
    for alert in alerts:
        if alert.step > step:
            break
        episode = None if alert.alert is AlertKind.RECOVERED else alert.alert.value
    return episode


def outcome_text(row: Row) -> str:
    if row.diverged_step is not None:
        return f"diverged at {row.diverged_step} (MSE {row.final_mse:.3g})"
    if row.learned_step is not None:
        return f"yes, at {row.learned_step} ({row.final_mse:.3f})"
    return f"no ({row.final_mse:.3f})"


def changed_config(overrides: tuple[str, ...]) -> DetectionConfig:
    """DetectionConfig() with FIELD=VALUE overrides, each value parsed as the field's default type."""
    config = DetectionConfig()
    for item in overrides:
        name, _, text = item.partition("=")
        if not hasattr(config, name) or not text:
            raise click.BadParameter(
                f"{item!r}: expected FIELD=VALUE with a DetectionConfig field", param_hint="--set"
            )
        kind = type(getattr(config, name))
        value = text.lower() in ("1", "true", "yes") if kind is bool else kind(text)
        config = dataclasses.replace(config, **{name: value})
    return config


def replay_run(log: Path, config: DetectionConfig) -> tuple[list[Alert], str]:
    """The alerts and the final verdict of a recorded run replayed through a fresh detector."""
    detector = TrendDetector(config)
    alerts: list[Alert] = []
    layer: tuple[str, int, str] | None = None
    with log.open() as lines:
        for line in lines:
            record = record_from_json(json.loads(line))
            if isinstance(record, Measurement):
                layer = (record.module, record.layer, record.direction)
                alerts += detector.update(record)
    return alerts, detector.verdict(*layer).value if layer is not None else "unknown"  # type: ignore[arg-type]


def alert_history(alerts: list[Alert]) -> str:
    """ "V@140 R@1520": the alerts' kinds (initials) and steps."""
    return " ".join(f"{a.alert.value[0].upper()}@{a.step}" for a in alerts) or "-"


def replay_alerts(log: Path, config: DetectionConfig) -> tuple[str, str]:
    """The final verdict and the alert history of a recorded run under ``config``."""
    alerts, final = replay_run(log, config)
    return final, alert_history(alerts)


@main.command()
@click.argument("economy", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.argument("full", type=click.Path(path_type=Path, exists=True, file_okay=False))
def compare(economy: Path, full: str) -> None:
    """Verdicts and alert steps of the same runs recorded with the economy and the full estimator (#32):
    training is identical (the monitor changes nothing), so any difference is the estimator's."""
    config = DetectionConfig()
    same = total = 0
    missing: list[str] = []
    print("| run | economy: verdict, alerts | full: verdict, alerts | same? |\n|---|---|---|---|")
    for spec in default_runs():
        logs = [Path(folder) / f"{spec.name}.jsonl" for folder in (economy, full)]
        present = [(Path(folder) / f"{spec.name}.outcome.json").exists() for folder in (economy, full)]
        if not all(present):
            if any(present):
                missing.append(spec.name)
            continue
        (verdict_e, history_e), (verdict_f, history_f) = (replay_alerts(log, config) for log in logs)
        equal = (verdict_e, history_e) == (verdict_f, history_f)
        same, total = same + equal, total + 1
        print(
            f"| {spec.name} | {verdict_e}, {history_e} | {verdict_f}, {history_f} | {'yes' if equal else '**no**'} |"
        )
    print(f"\n{same} of {total} runs: the same final verdict and the same alert steps")
    if missing:
        print(f"not compared, recorded in one folder only: {', '.join(missing)}")


@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/trainability"), show_default=True)
@click.option("--markdown/--text", default=True, show_default=True)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="FIELD=VALUE",
    help="judge with a changed DetectionConfig field, e.g. --set vanishing_lag_norm=1e-3 (repeatable)",
)
def evaluate(out: Path, markdown: bool, overrides: tuple[str, ...]) -> None:
    """Judge the recorded runs with this checkout's DetectionConfig() (or a changed one) and print the table."""
    config = changed_config(overrides)
    rows = []
    for spec in default_runs():
        outcome_path = out / f"{spec.name}.outcome.json"
        if not outcome_path.exists():
            continue
        rows.append(judge_run(out / f"{spec.name}.jsonl", json.loads(outcome_path.read_text()), config))
    header = ["config", "T", "seed", "steps", "learned? (held-out MSE)", "||dL/dx_0||/||dL/dx_T|| at the end",
              "agrees with it",
              "final verdict", "alerts", "right?"]  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        ratio = "-" if row.input_ratio is None else f"{row.input_ratio:.1e}"
        agreement = "-" if row.agreement is None else f"{100 * row.agreement:.0f}%"
        cells = [row.spec.config, str(row.spec.seq_len), str(row.spec.seed), str(row.steps), outcome_text(row), ratio, agreement,
                 row.final_verdict, row.history, "yes" if row.right else f"**no**: {row.why}"]  # fmt: skip
        print("| " + " | ".join(cells) + " |")
    print(f"\n{sum(r.right for r in rows)} of {len(rows)} rows right "
          "(alerts: V vanishing, E exploding, R recovered, N non-finite, @ step)")  # fmt: skip


if __name__ == "__main__":
    main()

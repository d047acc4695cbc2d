"""Clipping policies: bit-equality with clip_grad_norm_, ZClip's rule, and a real stabilising effect."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from torch import nn

from gradwatch.policy.clipping import ClipPolicy, FixedNorm, ZClip, apply_clip, make_clip_policy
from tests.oracles.reference_cases import RecurrentRegressor, adding_problem_batch

pytestmark = pytest.mark.usefixtures("one_thread")


def model_with_grads(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.LSTM(3, 6, num_layers=2)
    output, _ = model(torch.randn(5, 2, 3) * 3)
    output.square().sum().backward()
    return model


@pytest.mark.parametrize("max_norm", [1e-3, 0.5, 1e6], ids=["tiny", "medium", "above-norm"])
def test_fixed_norm_matches_clip_grad_norm_bit_for_bit(max_norm: float) -> None:
    ours, theirs = model_with_grads(0), model_with_grads(0)
    event = apply_clip(ours.parameters(), FixedNorm(max_norm), step=3, time=1.0)
    total = torch.nn.utils.clip_grad_norm_(theirs.parameters(), max_norm)
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)
    if max_norm < float(total):
        assert event is not None and event.step == 3 and event.max_norm == max_norm
        assert event.norm_before == pytest.approx(float(total), rel=1e-6)
        assert event.scale == pytest.approx(max_norm / float(total), rel=1e-5)
    else:
        assert event is None


def test_zclip_follows_the_published_rule() -> None:
    """Warm-up statistics, the adaptive threshold mu + z_t * s / (z / z_t) and the EMA update, by hand."""
    policy = ZClip(alpha=0.9, z_threshold=2.0, warmup_steps=4)
    warmup = [1.0, 2.0, 1.0, 2.0]
    assert [policy.max_norm(g, step) for step, g in enumerate(warmup)] == [None] * 4
    mean, variance = statistics.fmean(warmup), statistics.pvariance(warmup)
    assert (policy.mean, policy.variance) == pytest.approx((mean, variance))
    assert policy.max_norm(2.0, 4) is None  # z = 1 <= 2: no clip, EMA update with the norm itself
    mean = 0.9 * mean + 0.1 * 2.0
    variance = 0.9 * variance + 0.1 * (2.0 - mean) ** 2
    assert (policy.mean, policy.variance) == pytest.approx((mean, variance))
    spike = 50.0
    std = math.sqrt(variance)
    z = (spike - mean) / (std + 1e-6)
    expected = mean + 2.0 * std / (z / 2.0)
    assert policy.max_norm(spike, 5) == pytest.approx(expected)
    assert policy.mean == pytest.approx(0.9 * mean + 0.1 * expected)  # updated with the clipped value


def test_zclip_ceiling_applies_during_warmup_and_after() -> None:
    policy = ZClip(warmup_steps=2, ceiling=0.5)
    assert policy.max_norm(3.0, 0) == 0.5
    policy.max_norm(3.0, 1)
    assert policy.max_norm(3.0, 2) == 0.5


def test_zclip_state_round_trip_continues_identically() -> None:
    generator = torch.Generator().manual_seed(0)
    norms = [*(1 + 0.2 * torch.rand(60, generator=generator)).tolist(), 40.0, 1.0]
    original = ZClip()
    for step, g in enumerate(norms[:30]):
        original.max_norm(g, step)
    restored = ZClip()
    restored.load_state_dict(original.state_dict())
    assert [original.max_norm(g, s) for s, g in enumerate(norms[30:])] == [
        restored.max_norm(g, s) for s, g in enumerate(norms[30:])
    ]


def test_apply_clip_skips_non_finite_norms_without_touching_policy_state() -> None:
    model = model_with_grads(1)
    next(model.parameters()).grad[0, 0] = float("inf")
    policy = ZClip(warmup_steps=2)
    assert apply_clip(model.parameters(), policy, step=0) is None
    assert policy.state_dict() == ZClip(warmup_steps=2).state_dict()
    assert apply_clip([nn.Parameter(torch.ones(2))], policy, step=0) is None  # no gradients at all


def model_with_overflowing_grads(seed: int) -> nn.Module:
    """Finite float32 gradients whose total 2-norm overflows to inf (squares beyond 3.4e38)."""
    model = model_with_grads(seed)
    for parameter in model.parameters():
        assert parameter.grad is not None
        parameter.grad.mul_(1e19)
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
    return model


@pytest.mark.parametrize("max_norm", [1e-3, 1.0, 1e30], ids=["tiny", "one", "huge"])
def test_an_overflowed_total_norm_is_clipped_as_clip_grad_norm_does_bit_for_bit(max_norm: float) -> None:
    """Issue #28: clip_grad_norm_ scales by max_norm / (inf + 1e-6) = 0 when the total norm overflows; the
    clip was skipped before. Same gradients bit for bit, and the clip is recorded."""
    ours, theirs = model_with_overflowing_grads(0), model_with_overflowing_grads(0)
    event = apply_clip(ours.parameters(), FixedNorm(max_norm), step=7, time=1.0)
    total = torch.nn.utils.clip_grad_norm_(theirs.parameters(), max_norm)
    assert math.isinf(float(total))
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)
    assert event is not None and event.step == 7 and event.max_norm == max_norm
    assert event.norm_before == math.inf and event.scale == 0.0
    assert event.to_json()["norm_before"] is None  # the run log writes inf as null


def test_zclip_clips_an_overflowed_norm_to_its_mean_without_updating_its_statistics() -> None:
    policy = ZClip(warmup_steps=2)
    assert policy.max_norm(math.inf, 0) is None  # warm-up, no ceiling: nothing to clip to yet
    policy.max_norm(1.0, 1)
    policy.max_norm(3.0, 2)
    state = policy.state_dict()
    assert policy.max_norm(math.inf, 3) == pytest.approx(2.0)
    assert policy.state_dict() == state
    assert ZClip(warmup_steps=2, ceiling=0.5).max_norm(math.inf, 0) == 0.5
    with pytest.raises(ValueError, match="NaN"):
        policy.max_norm(math.nan, 4)


def test_watch_clip_records_the_overflowed_clip_and_matches_clip_grad_norm_() -> None:
    """watch(clip=1.0) on gradients whose total norm overflows: the optimizer gets clip_grad_norm_'s."""
    import gradwatch

    def run(with_monitor: bool) -> tuple[list[torch.Tensor], list]:
        torch.manual_seed(0)
        model = nn.RNN(3, 6)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        output, _ = model(torch.randn(5, 2, 3))
        output.square().sum().backward()
        for parameter in model.parameters():
            parameter.grad.mul_(1e19)  # finite, but the float32 total norm overflows
        records: list = []
        if with_monitor:
            monitor = gradwatch.watch(model, optimizer, every=1000, clip=1.0, sinks=[_Collect(records)])
            optimizer.step()
            monitor.close()
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        return [p.detach().clone() for p in model.parameters()], records

    ours, records = run(True)
    theirs, _ = run(False)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    clips = [r for r in records if isinstance(r, gradwatch.ClipEvent)]
    assert [(c.step, c.scale, c.norm_before) for c in clips] == [(0, 0.0, math.inf)]


class _Collect:
    """A sink that keeps every record."""

    def __init__(self, records: list) -> None:
        self.records = records

    def write(self, record: object) -> None:
        self.records.append(record)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("auto", ZClip), (2.0, FixedNorm), (FixedNorm(1.0), FixedNorm)],
    ids=["auto", "number", "policy"],
)
def test_make_clip_policy(spec: object, expected: type) -> None:
    policy = make_clip_policy(spec)  # type: ignore[arg-type]
    assert isinstance(policy, expected) and isinstance(policy, ClipPolicy)


@pytest.mark.parametrize(
    "spec", ["zclip", -1.0, float("nan"), None], ids=["unknown-name", "negative", "nan", "none"]
)
def test_make_clip_policy_rejects_bad_specs(spec: object) -> None:
    with pytest.raises((ValueError, TypeError), match=r"clip|max_norm"):
        make_clip_policy(spec)  # type: ignore[arg-type]


def train_adding_problem(policy: ClipPolicy | None, seed: int, steps: int = 200) -> tuple[int | None, int]:
    """Relu RNN on the adding problem with SGD lr 1.5; returns (first non-finite step or None, clip count)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = RecurrentRegressor(nn.RNN(2, 8, nonlinearity="relu"))
    optimizer = torch.optim.SGD(model.parameters(), lr=1.5)
    clips = 0
    for step in range(steps):
        x, y = adding_problem_batch(generator, 30, 16)
        loss = torch.nn.functional.mse_loss(model(x), y)
        if not torch.isfinite(loss):
            return step, clips
        optimizer.zero_grad()
        loss.backward()
        if policy is not None:
            clips += apply_clip(model.parameters(), policy, step) is not None
        optimizer.step()
    return None, clips


@pytest.mark.parametrize("seed", [1, 5], ids=["seed-1", "seed-5"])
def test_auto_clipping_keeps_an_exploding_relu_rnn_finite(seed: int) -> None:
    diverged_at, _ = train_adding_problem(None, seed)
    assert diverged_at is not None and diverged_at > 25  # explodes mid-training, after ZClip's warm-up
    still_finite, clips = train_adding_problem(make_clip_policy("auto"), seed)
    assert still_finite is None and clips > 0

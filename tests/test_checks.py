"""Input checks live in gradwatch/checks.py: watch(), WatchConfig, Monitor and diagnose() share them."""

from __future__ import annotations

import pytest
from torch import nn

import gradwatch
from gradwatch.monitor import Monitor, WatchConfig
from tests.test_monitor import SeqModel


def test_monitor_and_watch_refuse_a_non_optimizer_with_the_same_message() -> None:
    model = SeqModel(nn.GRU(3, 4), 4)
    with pytest.raises(TypeError, match=r"optimizer must be a torch\.optim\.Optimizer") as from_watch:
        gradwatch.watch(model, object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"optimizer must be a torch\.optim\.Optimizer") as from_monitor:
        Monitor(model, object(), config=WatchConfig())  # type: ignore[arg-type]
    assert str(from_watch.value) == str(from_monitor.value)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("estimator", 3, "estimator must be a gradwatch.EstimatorSettings"),
        ("detection", "strict", "detection must be a gradwatch.DetectionConfig"),
        ("global_view", 1, "global_view must be True or False"),
    ],
)
def test_watch_config_checks_every_field_itself(field: str, value: object, message: str) -> None:
    """A WatchConfig built without watch() (diagnose() builds one) is checked as strictly."""
    with pytest.raises(TypeError, match=message):
        WatchConfig(**{field: value})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=message):
        gradwatch.watch(SeqModel(nn.GRU(3, 4), 4), **{field: value})

"""emit_alert: warning categories (filterable), logging levels, user callbacks; the non-finite error."""

from __future__ import annotations

import logging
import warnings

import pytest

from gradwatch.policy.alerts import (
    ExplodingGradientWarning,
    GradWatchWarning,
    NonFiniteGradientError,
    NonFiniteGradientWarning,
    VanishingGradientWarning,
    emit_alert,
)
from gradwatch.records import Alert, AlertKind


def make_alert(kind: AlertKind) -> Alert:
    return Alert(
        step=7, time=1.0, module="rnn", layer=0, direction="forward", alert=kind, metric="lyapunov_max",
        value=0.4, threshold=0.02, message=f"{kind.value} message",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "category"),
    [
        (AlertKind.VANISHING, VanishingGradientWarning),
        (AlertKind.EXPLODING, ExplodingGradientWarning),
        (AlertKind.NONFINITE, NonFiniteGradientWarning),
    ],
    ids=["vanishing", "exploding", "nonfinite"],
)
def test_each_kind_warns_with_its_category_logs_and_calls_back(kind, category, caplog) -> None:
    received: list[Alert] = []
    alert = make_alert(kind)
    with (
        caplog.at_level(logging.INFO, logger="gradwatch"),
        pytest.warns(category, match=f"{kind.value} message"),
    ):
        emit_alert(alert, [received.append])
    assert received == [alert]
    assert [(r.name, r.levelno) for r in caplog.records] == [("gradwatch", logging.WARNING)]
    assert issubclass(category, GradWatchWarning) and issubclass(category, UserWarning)


def test_recovered_logs_at_info_and_does_not_warn(caplog) -> None:
    received: list[Alert] = []
    with caplog.at_level(logging.INFO, logger="gradwatch"), warnings.catch_warnings():
        warnings.simplefilter("error")
        emit_alert(make_alert(AlertKind.RECOVERED), [received.append])
    assert [r.levelno for r in caplog.records] == [logging.INFO] and len(received) == 1


def test_error_filter_turns_the_warning_into_an_exception_after_log_and_callbacks(caplog) -> None:
    received: list[Alert] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExplodingGradientWarning)
        with pytest.raises(ExplodingGradientWarning):
            emit_alert(make_alert(AlertKind.EXPLODING), [received.append])
        emit_alert(make_alert(AlertKind.RECOVERED))  # other kinds are unaffected
    assert len(received) == 1 and len(caplog.records) >= 1


def test_nonfinite_error_names_module_and_parameter() -> None:
    error = NonFiniteGradientError("encoder.lstm", "weight_hh_l1", 3, 40)
    assert isinstance(error, RuntimeError)
    assert "'weight_hh_l1'" in str(error) and "'encoder.lstm'" in str(error) and "step 40" in str(error)

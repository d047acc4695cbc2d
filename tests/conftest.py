"""Shared fixtures: seeded tiny models and a fresh RNG per test."""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import torch

# CI has 2 cores: one intra-op thread per test process is faster than oversubscription for these small models.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _close_leftover_monitors(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Close every monitor a test left open: an open monitor stays attached to its modules (and keeps the
    global forward hook installed on measured steps) for the rest of the session otherwise."""
    import gradwatch.monitor as monitor_module

    # Weak references: a test may check that a closed monitor is garbage (test_hooks' deep-copy test).
    opened: list[weakref.ref[monitor_module.Monitor]] = []
    original_init = monitor_module.Monitor.__init__

    def tracking_init(self: monitor_module.Monitor, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        opened.append(weakref.ref(self))

    monkeypatch.setattr(monitor_module.Monitor, "__init__", tracking_init)
    yield
    for monitor_ref in opened:
        monitor = monitor_ref()
        if monitor is None:
            continue
        with warnings.catch_warnings(), contextlib.suppress(Exception):
            warnings.simplefilter("ignore")
            monitor.close()

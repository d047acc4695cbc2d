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

    opened: list[weakref.ref[monitor_module.Monitor]] = []  # weak: a test may check the monitor is freed
    original_init = monitor_module.Monitor.__init__

    def tracking_init(self: monitor_module.Monitor, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        opened.append(weakref.ref(self))

    monkeypatch.setattr(monitor_module.Monitor, "__init__", tracking_init)
    yield
    for ref in opened:
        monitor = ref()
        if monitor is None:
            continue
        with warnings.catch_warnings(), contextlib.suppress(Exception):
            warnings.simplefilter("ignore")
            monitor.close()


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Small dense ops on a shared 2-core machine: extra threads only oversubscribe (opt in per module)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

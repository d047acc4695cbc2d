"""Shared fixtures: seeded tiny models and a fresh RNG per test."""

from __future__ import annotations

import pytest
import torch

# CI has 2 cores: one intra-op thread per test process is faster than oversubscription for these small models.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)

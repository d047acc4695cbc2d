"""Shared fixtures: seeded tiny models and a fresh RNG per test."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)

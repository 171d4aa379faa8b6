"""Fixtures for the data tests."""

from __future__ import annotations

import pytest
import torch
from data_helpers import ArrayDataModule


@pytest.fixture
def indexed_dm():
    """Factory: a data module of ``n`` records whose single feature is the record's index / n."""

    def make(n: int = 200, **kw) -> ArrayDataModule:
        x = (torch.arange(n, dtype=torch.float32) / n).unsqueeze(1)
        y = torch.arange(n) % 10
        return ArrayDataModule(x, y, **kw)

    return make


@pytest.fixture
def array_dm():
    return ArrayDataModule

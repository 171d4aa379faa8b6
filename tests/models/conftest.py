"""Shared data for the model tests: sklearn digits as [n, 1, 8, 8] in [0, 1], a 2-D pinwheel."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.datasets import load_digits
from torch import Tensor

import lit_dpvae.models as models

PAIRINGS = [name for name in models.__all__ if name != "BaseVAE"]


def model_class(name: str) -> type[models.BaseVAE]:
    return getattr(models, name)


@pytest.fixture(scope="session")
def digits() -> tuple[Tensor, Tensor]:
    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32)[:, None]
    return x, torch.tensor(d.target, dtype=torch.int64)


def pinwheel(
    arms: int = 5,
    per_arm: int = 200,
    radial_std: float = 0.3,
    tangential_std: float = 0.08,
    rate: float = 0.5,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Pinwheel toy (Johnson et al., arXiv 1603.06277): arm k is a stretched Gaussian rotated by
    2πk/arms plus a twist that grows with the radius. Returns x [n, 2], arm labels [n]."""
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(arms * per_arm, 2, generator=g) * torch.tensor([radial_std, tangential_std])
    f[:, 0] += 1.0
    labels = torch.arange(arms).repeat_interleave(per_arm)
    angle = labels * (2 * math.pi / arms) + rate * f[:, 0].exp()
    c, s = angle.cos(), angle.sin()
    x = torch.stack([f[:, 0] * c - f[:, 1] * s, f[:, 0] * s + f[:, 1] * c], dim=1)
    return x, labels


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is faster than two fighting over a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

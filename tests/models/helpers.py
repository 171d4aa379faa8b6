"""Helpers shared by the model tests."""

from __future__ import annotations

import torch


def record_noise(mu: torch.Tensor, k: int) -> torch.Tensor:
    """Noise that depends only on the record's own (detached) posterior mean."""
    steps = torch.arange(k, dtype=mu.dtype)[None, :, None]
    return torch.sin(37.0 * mu.detach()[:, None, :] + 1.3 * steps + 0.5)


def make_batch(n, shape, seed=0):
    """n random records of ``shape`` in [0, 1) and labels in {0, 1, 2}."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *shape, generator=g), torch.randint(0, 3, (n,), generator=g)

"""The pinwheel toy (Johnson et al. 2016): shapes, labels, arm geometry, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lit_dpvae.data import PinwheelDataModule, make_pinwheel


def test_make_pinwheel_shapes_labels_and_scale():
    x, y = make_pinwheel(4, 50, seed=3)
    assert x.shape == (200, 2) and y.shape == (200,) and y.dtype == np.int64
    assert np.bincount(y).tolist() == [50] * 4
    x10, y10 = make_pinwheel(4, 50, seed=3, scale=10.0)
    np.testing.assert_allclose(x10, 10 * x)
    np.testing.assert_array_equal(y10, y)
    other, _ = make_pinwheel(4, 50, seed=4)
    assert not np.allclose(other, x)


def test_arms_are_rotated_copies():
    """With no spread across the arm, a point of arm k with radial coordinate r is
    r·(cos a, −sin a), a = 2πk/K + rate·exp(r) (the reference rotates row vectors)."""
    num_arms, rate = 5, 0.25
    x, y = make_pinwheel(num_arms, 200, tangential_std=0.0, rate=rate, seed=0)
    radius = np.linalg.norm(x, axis=1)
    errors = []
    for r in (radius, -radius):  # |r| is known, its sign is not
        a = 2 * np.pi * y / num_arms + rate * np.exp(r)
        errors.append(np.linalg.norm(x - r[:, None] * np.stack([np.cos(a), -np.sin(a)], 1), axis=1))
    assert np.minimum(*errors).max() < 1e-9
    assert np.mean(radius) == pytest.approx(1.0, abs=0.05)  # arms centred at radius 1


def test_datamodule_shapes_labels_and_real_values():
    dm = PinwheelDataModule(num_arms=3, num_per_arm=500, batch_size=50)
    dm.setup("fit")
    assert dm.data_shape == (2,) and dm.num_classes == 3
    sizes = {name: len(y) for name, (_, y) in dm.splits.items()}
    assert sizes == {"train": 1080, "val": 120, "test": 300}
    all_y = torch.cat([y for _, y in dm.splits.values()])
    assert torch.bincount(all_y).tolist() == [500] * 3
    x = dm.splits["train"][0]
    assert x.dtype == torch.float32 and x.shape == (1080, 2)
    assert float(x.min()) < 0.0 and float(x.abs().max()) < 4.0  # real-valued, not in [0, 1]
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape[1:] == (2,) and yb.dtype == torch.int64


def test_datamodule_is_determined_by_data_seed():
    a, b = PinwheelDataModule(num_per_arm=200), PinwheelDataModule(num_per_arm=200, seed=9)
    c = PinwheelDataModule(num_per_arm=200, data_seed=1)
    assert torch.equal(a.splits["train"][0], b.splits["train"][0])
    assert not torch.equal(a.splits["train"][0], c.splits["train"][0])

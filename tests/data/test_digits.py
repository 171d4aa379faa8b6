"""The embedded 8×8 digits: shapes, ranges, sizes, labels, determinism."""

from __future__ import annotations

import pytest
import torch

from lit_dpvae.data import DigitsDataModule


@pytest.fixture(scope="module")
def digits():
    dm = DigitsDataModule()
    dm.setup("fit")
    return dm


def test_shapes_sizes_and_ranges(digits):
    assert digits.data_shape == (1, 8, 8) and digits.num_classes == 10
    sizes = {name: len(y) for name, (_, y) in digits.splits.items()}
    assert sizes == {"train": 1294, "val": 144, "test": 359}
    assert sum(sizes.values()) == 1797
    assert digits.num_train == 1294
    assert digits.sample_rate == pytest.approx(64 / 1294)
    for x, y in digits.splits.values():
        assert x.shape[1:] == (1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert float(x.min()) == 0.0 and float(x.max()) == 1.0  # 0..16 scaled by 1/16
        assert torch.equal(x * 16, (x * 16).round())
        assert set(y.tolist()) == set(range(10))
    counts = torch.bincount(digits.splits["train"][1], minlength=10)
    assert int(counts.min()) > 100


def test_batches_are_x_y_pairs(digits):
    x, y = next(iter(digits.train_dataloader()))
    assert x.shape[1:] == (1, 8, 8) and x.shape[0] == y.shape[0]
    x, y = next(iter(digits.val_dataloader()))
    assert x.shape == (64, 1, 8, 8) and y.shape == (64,)


def test_split_is_determined_by_data_seed(digits):
    again = DigitsDataModule(seed=5)
    other = DigitsDataModule(data_seed=1)
    for name in ("train", "val", "test"):
        assert torch.equal(again.splits[name][0], digits.splits[name][0])
    assert not torch.equal(other.splits["test"][0], digits.splits["test"][0])


def test_test_size_as_count():
    dm = DigitsDataModule(test_size=97, val_size=100)
    assert len(dm.splits["test"][1]) == 97 and len(dm.splits["val"][1]) == 100
    assert dm.num_train == 1797 - 197

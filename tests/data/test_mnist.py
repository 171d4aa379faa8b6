"""MNIST / Fashion-MNIST data modules over IDX folders: synthetic folders in tmp_path, missing
folder and file messages, bad files failing in setup, and the real Fashion-MNIST when installed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import write_idx, write_idx_folder

from lit_dpvae.data import (
    FASHION_MNIST_DIR,
    DataError,
    FashionMNISTDataModule,
    IDXFormatError,
    MNISTDataModule,
)
from lit_dpvae.privacy import is_poisson_loader


@pytest.mark.parametrize("cls", [MNISTDataModule, FashionMNISTDataModule])
@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
def test_reads_a_synthetic_folder_exactly(tmp_path, cls, gz):
    arrays = write_idx_folder(tmp_path, n_train=250, n_test=50, gz=gz)
    dm = cls(data_dir=tmp_path, batch_size=25, val_size=60)
    dm.setup("fit")
    assert dm.data_shape == (1, 28, 28) and dm.num_classes == 10 and dm.num_train == 190
    x_test, y_test = dm.splits["test"]
    expected = torch.from_numpy(arrays["t10k_images"]).float().unsqueeze(1) / 255
    assert torch.equal(x_test, expected)
    assert torch.equal(y_test, torch.from_numpy(arrays["t10k_labels"]).long())
    # train + val is the training file, each record once, in file order within each split
    ids = {s: (dm.splits[s][0][:, 0, 0, 0] * 255).round().long().tolist() for s in ("train", "val")}
    assert sorted(ids["train"] + ids["val"]) == list(range(250))
    assert ids["val"] == sorted(ids["val"]) and len(ids["val"]) == 60
    for i, rec in zip(ids["val"][:5], dm.splits["val"][0][:5], strict=True):
        assert torch.equal(rec[0] * 255, torch.from_numpy(arrays["train_images"][i]).float())
    assert is_poisson_loader(dm.train_dataloader())
    assert next(iter(dm.test_dataloader()))[0].shape == (25, 1, 28, 28)  # eval_batch_size


def test_limit_train(tmp_path):
    write_idx_folder(tmp_path, n_train=300, n_test=10)
    dm = MNISTDataModule(tmp_path, batch_size=10, val_size=50, limit_train=40)
    assert dm.num_train == 40 and dm.sample_rate == pytest.approx(0.25)
    assert len(dm.splits["val"][1]) == 50


def test_default_folder_is_debians():
    assert FashionMNISTDataModule().data_dir == Path("/usr/share/datasets/fashion-mnist")
    assert FASHION_MNIST_DIR == "/usr/share/datasets/fashion-mnist"


def test_missing_folder_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist") as err:
        FashionMNISTDataModule(data_dir=tmp_path / "absent").setup()
    assert "apt-get install dataset-fashion-mnist" in str(err.value)
    assert "data_dir" in str(err.value)
    with pytest.raises(FileNotFoundError, match="not downloaded automatically.*data_dir"):
        MNISTDataModule(tmp_path / "absent").setup()


def test_missing_file_names_it_and_says_how_to_install(tmp_path):
    write_idx_folder(tmp_path, n_train=20, n_test=5)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.*dataset-fashion-mnist"):
        FashionMNISTDataModule(data_dir=tmp_path, val_size=5).setup()


def test_mnist_needs_a_folder():
    with pytest.raises(TypeError, match="data_dir"):
        MNISTDataModule()


def test_corrupt_file_fails_in_setup(tmp_path):
    write_idx_folder(tmp_path, n_train=20, n_test=5)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-20])
    dm = MNISTDataModule(tmp_path, batch_size=2, val_size=5)  # construction reads nothing
    with pytest.raises(IDXFormatError, match="train-images-idx3-ubyte.gz: truncated or corrupt"):
        dm.setup("fit")


def test_count_mismatch_and_bad_labels_fail_in_setup(tmp_path):
    write_idx_folder(tmp_path, n_train=20, n_test=5, gz=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(6, dtype=np.uint8))
    with pytest.raises(IDXFormatError, match="count mismatch.*'t10k'.*5 images.*6 labels"):
        MNISTDataModule(tmp_path, batch_size=2, val_size=5).setup()
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([0, 1, 2, 10, 3], dtype=np.uint8))
    with pytest.raises(DataError, match=r"test split: 1 labels out of range \[0, 10\)"):
        MNISTDataModule(tmp_path, batch_size=2, val_size=5).setup()


def test_wrong_image_size_fails_in_setup(tmp_path):
    write_idx_folder(tmp_path, n_train=20, n_test=5, gz=False)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((5, 32, 32), dtype=np.uint8))
    with pytest.raises(DataError, match=r"test split: record shape \(1, 32, 32\)"):
        MNISTDataModule(tmp_path, batch_size=2, val_size=5).setup()


@pytest.mark.skipif(
    not Path(FASHION_MNIST_DIR).is_dir(),
    reason=f"{FASHION_MNIST_DIR} absent (apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist():
    dm = FashionMNISTDataModule()
    dm.setup("fit")
    sizes = {name: tuple(x.shape) for name, (x, _) in dm.splits.items()}
    assert sizes == {
        "train": (55000, 1, 28, 28),
        "val": (5000, 1, 28, 28),
        "test": (10000, 1, 28, 28),
    }
    assert dm.num_train + len(dm.splits["val"][1]) == 60000
    for _, y in dm.splits.values():
        assert set(y.tolist()) == set(range(10))
    assert torch.bincount(dm.splits["test"][1]).tolist() == [1000] * 10  # the balanced t10k set
    assert float(dm.splits["test"][0].max()) == 1.0
    assert dm.sample_rate == pytest.approx(256 / 55000)

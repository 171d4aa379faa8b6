"""Helpers for the data tests: an IDX writer and a data module over given tensors.

(A uniquely named module, not ``conftest``, so importing it never picks up another folder's
conftest.)
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from lit_dpvae.data import VAEDataModule

_CODES = {
    "uint8": 0x08,
    "int8": 0x09,
    "int16": 0x0B,
    "int32": 0x0C,
    "float32": 0x0D,
    "float64": 0x0E,
}


def write_idx(path: Path, array: np.ndarray, *, gz: bool = False) -> Path:
    """Write ``array`` as an IDX file (big-endian payload), gzip-compressed if ``gz``."""
    array = np.asarray(array)
    header = bytes([0, 0, _CODES[array.dtype.name], array.ndim])
    header += np.asarray(array.shape, dtype=">u4").tobytes()
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path = Path(path)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_idx_folder(
    folder: Path, *, n_train: int = 300, n_test: int = 50, gz: bool = True, seed: int = 0
) -> dict[str, np.ndarray]:
    """A synthetic MNIST-style folder; pixel [0, 0] of record i of train is i % 256 so records
    can be told apart. Returns the arrays written."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[:, 0, 0] = np.arange(n) % 256
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        suffix = ".gz" if gz else ""
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images, gz=gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels, gz=gz)
        arrays[f"{prefix}_images"], arrays[f"{prefix}_labels"] = images, labels
    return arrays


class ArrayDataModule(VAEDataModule):
    """A data module over given tensors; record i of the pool is ``x[i]``."""

    def __init__(self, x, y, x_test=None, y_test=None, *, num_classes=10, unit_interval=True, **kw):
        super().__init__(**kw)
        self._arrays = (x, y, x if x_test is None else x_test, y if y_test is None else y_test)
        self._num_classes = num_classes
        self.unit_interval = unit_interval

    @property
    def data_shape(self):
        return tuple(self._arrays[0].shape[1:])

    @property
    def num_classes(self):
        return self._num_classes

    def _load(self):
        x, y, x_test, y_test = self._arrays
        return {"train": (x, y), "test": (x_test, y_test)}

"""Your own arrays as a private data module: numpy/torch arrays, or an ``.npy``/``.npz`` file.

What must be public (it is not protected by the guarantee, and the library never measures it
from the records): the record shape, the number of classes, and the value range the records lie
in (``value_range``, e.g. ``(0, 255)`` for 8-bit images, a column's documented bounds). Records
outside the declared range are refused, not clipped: a range measured from the data would leak
its extremes. Held-out validation and test splits are carved from your records; they are not
protected (only the training records are, docs/privacy.md §1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lit_dpvae.data.base import Split, VAEDataModule, carve
from lit_dpvae.data.checks import DataError


def _as_tensor(value: Any, what: str) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach().cpu()
    try:
        return torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError) as error:
        raise DataError(f"{what} must be an array or tensor of numbers: {error}") from None


def load_arrays(path: str | Path) -> tuple[Tensor, Tensor | None]:
    """``(x, y or None)`` from an ``.npy`` file (records only) or an ``.npz`` file with the keys
    ``x`` and, optionally, ``y`` (what ``python -m lit_dpvae sample`` writes)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist: pass arrays, or the path of a .npy/.npz file")
    if path.suffix == ".npy":
        return torch.from_numpy(np.load(path, allow_pickle=False)), None
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            if "x" not in data:
                raise DataError(f"{path} has no array 'x' (keys: {sorted(data.files)}): save "
                                "the records as x (and labels as y) with numpy.savez")
            y = torch.from_numpy(data["y"]) if "y" in data else None
            return torch.from_numpy(data["x"]), y
    raise DataError(f"{path}: expected a .npy or .npz file, got {path.suffix!r}")


class ArrayDataModule(VAEDataModule):
    """Records from arrays (or a ``.npy``/``.npz`` path), Poisson-sampled for training.

    Args:
        x: records ``[N, *shape]`` (array, tensor, or a path to ``.npy``/``.npz``).
        y: integer labels ``[N]`` in ``[0, num_classes)``; None (default): every label 0.
        value_range: the public ``(low, high)`` bounds of every value. Records are mapped to
            [0, 1] by ``(x − low)/(high − low)`` when ``rescale`` (what Bernoulli-type
            likelihoods need); values outside the bounds are an error.
        num_classes: the public number of classes (required with labels; 1 without).
        rescale: map the declared range to [0, 1] (default); False keeps the values as they are
            (for Gaussian/Laplace likelihoods), still refusing values outside the range.
        test_size: test records carved from the records (count or fraction, default 0.2).
        batch_size: expected batch size B of the Poisson sampling (sample rate q = B/N).
        **kwargs: :class:`VAEDataModule` arguments (``val_size``, ``seed``, ...).

    The arrays are not hyper-parameters (they are left out of the logger config and
    checkpoints, :mod:`lit_dpvae.hparams`); a path is.
    """

    data_arguments = ("x", "y")
    hparams_ignore = ("num_classes",)  # the model's num_classes means something else

    def __init__(self, x: Any, y: Any = None, *, value_range: tuple[float, float],
                 num_classes: int | None = None, rescale: bool = True,
                 test_size: int | float = 0.2, batch_size: int = 64, **kwargs: Any) -> None:
        declared, num_classes = num_classes, 1 if num_classes is None else num_classes
        super().__init__(batch_size, **kwargs)
        if isinstance(x, (str, Path)):
            x, stored_y = load_arrays(x)
            y = stored_y if y is None else y
        self._x = _as_tensor(x, "x")
        if self._x.dim() < 2 or self._x.shape[0] < 3:
            raise DataError(f"x must be [N, *shape] with N >= 3 records, got shape "
                            f"{tuple(self._x.shape)}")
        if y is None:
            if declared not in (None, 1):
                raise DataError("num_classes without labels: pass y, or leave num_classes unset")
            self._y = torch.zeros(self._x.shape[0], dtype=torch.int64)
            self._num_classes = 1
        else:
            if declared is None:
                raise DataError(
                    "labels need a declared num_classes (public; counting the classes in the "
                    "private labels would leak them): pass num_classes=K")
            self._y = _as_tensor(y, "y")
            self._num_classes = int(num_classes)
        low, high = (float(v) for v in value_range)
        if not low < high:
            raise DataError(f"value_range must be (low, high) with low < high, got {value_range}")
        self.value_range, self.rescale, self.test_size = (low, high), bool(rescale), test_size
        self.unit_interval = self.rescale

    @property
    def data_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self._x.shape[1:])

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def _load(self) -> dict[str, Split]:
        x = self._x.to(torch.float32)
        low, high = self.value_range
        outside = ~((x >= low) & (x <= high))  # NaN counts as outside
        if bool(outside.any()):
            records = int(outside.reshape(len(x), -1).any(1).sum())
            raise DataError(
                f"{records} records have values outside the declared value_range "
                f"{self.value_range} (or NaN): declare the public bounds the data really has, "
                "or clip/remove those records before training")
        if self.rescale:
            x = (x - low) / (high - low)
        gen = torch.Generator().manual_seed(self.data_seed + 1)
        train, test = carve((x, self._y), self.test_size, gen, what="test_size")
        return {"train": train, "test": test}

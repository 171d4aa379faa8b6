"""MNIST and Fashion-MNIST from IDX files on disk (nothing is downloaded).

Both have 60000 training and 10000 test records of ``[1, 28, 28]`` uint8 pixels, scaled by 1/255
into [0, 1], and 10 classes. Validation records (default 5000) are carved from the training file
with ``data_seed``; the test split is the ``t10k`` files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lit_dpvae.data.base import Split, VAEDataModule
from lit_dpvae.data.idx import read_idx_split

#: where Debian's ``dataset-fashion-mnist`` package installs the Fashion-MNIST IDX files.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


class IDXDataModule(VAEDataModule):
    """28×28 grey-scale images with 10 classes read from an IDX folder (``train-*`` and ``t10k-*``
    image/label files, raw or ``.gz``).

    Args:
        data_dir: folder with the four IDX files.
        batch_size: expected global batch size (default 256).
        val_size: validation records carved from the training file (default 5000).
        **kwargs: the remaining :class:`VAEDataModule` arguments (unknown keys are errors), e.g.
            ``limit_train`` for quick runs.
    """

    #: how to get the files; appended to the error for a missing folder or file.
    missing_hint: str = "point data_dir at a folder with the IDX files"

    def __init__(
        self,
        data_dir: str | Path,
        batch_size: int = 256,
        *,
        val_size: int | float = 5000,
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size, val_size=val_size, **kwargs)
        self.data_dir = Path(data_dir)

    @property
    def data_shape(self) -> tuple[int, ...]:
        return (1, 28, 28)

    @property
    def num_classes(self) -> int:
        return 10

    def _load(self) -> dict[str, Split]:
        if not self.data_dir.is_dir():
            raise FileNotFoundError(
                f"{type(self).__name__}: data folder {self.data_dir} does not exist; "
                f"{self.missing_hint}"
            )
        splits = {}
        for name, prefix in (("train", "train"), ("test", "t10k")):
            try:
                images, labels = read_idx_split(self.data_dir, prefix)
            except FileNotFoundError as err:
                raise FileNotFoundError(
                    f"{type(self).__name__}: {err}; {self.missing_hint}"
                ) from err
            x = torch.from_numpy(images).unsqueeze(1).to(torch.float32).div_(255.0)
            splits[name] = (x, torch.from_numpy(labels).to(torch.int64))
        return splits


class MNISTDataModule(IDXDataModule):
    """MNIST (LeCun et al. 1998) from a user-supplied IDX folder (no default, no download).

    Args:
        data_dir: folder with ``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
            ``t10k-images-idx3-ubyte[.gz]``, ``t10k-labels-idx1-ubyte[.gz]``.
        **kwargs: the remaining :class:`IDXDataModule` arguments.
    """

    missing_hint = (
        "MNIST is not downloaded automatically: set data_dir to a folder holding "
        "train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz] "
        "and t10k-labels-idx1-ubyte[.gz]"
    )


class FashionMNISTDataModule(IDXDataModule):
    """Fashion-MNIST (Xiao et al. 2017, arXiv 1708.07747), by default from Debian's
    ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``).

    Args:
        data_dir: folder with the four IDX files (default :data:`FASHION_MNIST_DIR`).
        **kwargs: the remaining :class:`IDXDataModule` arguments.
    """

    missing_hint = (
        "install the files with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu, puts them "
        f"in {FASHION_MNIST_DIR}) or set data_dir to a folder holding the IDX files "
        "(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
        "t10k-labels-idx1-ubyte.gz)"
    )

    def __init__(self, data_dir: str | Path = FASHION_MNIST_DIR, **kwargs: Any) -> None:
        super().__init__(data_dir, **kwargs)

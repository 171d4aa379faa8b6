"""scikit-learn's bundled 8×8 handwritten digits (1797 records, 10 classes): the embedded default
dataset, needs no download. Values 0..16 are scaled by 1/16 into [0, 1]."""

from __future__ import annotations

from typing import Any

import torch

from lit_dpvae.data.base import Split, VAEDataModule, carve


class DigitsDataModule(VAEDataModule):
    """8×8 digits (UCI optdigits test set as bundled by ``sklearn.datasets.load_digits``).

    Records ``[1, 8, 8]`` in [0, 1], labels 0..9. There is no official test split: ``test_size``
    records (count or fraction) are carved from all 1797 with ``data_seed``, then ``val_size`` from
    the rest.

    Args:
        batch_size: expected global batch size (default 64).
        test_size: test records, an int (count) or a float in (0, 1) (fraction, default 0.2).
        **kwargs: the remaining :class:`VAEDataModule` arguments (unknown keys are errors).
    """

    def __init__(
        self, batch_size: int = 64, *, test_size: int | float = 0.2, **kwargs: Any
    ) -> None:
        super().__init__(batch_size, **kwargs)
        self.test_size = test_size

    @property
    def data_shape(self) -> tuple[int, ...]:
        return (1, 8, 8)

    @property
    def num_classes(self) -> int:
        return 10

    def _load(self) -> dict[str, Split]:
        from sklearn.datasets import load_digits

        images, labels = load_digits(return_X_y=True)
        x = torch.from_numpy(images).to(torch.float32).reshape(-1, *self.data_shape) / 16.0
        y = torch.from_numpy(labels).to(torch.int64)
        gen = torch.Generator().manual_seed(self.data_seed + 1)
        train, test = carve((x, y), self.test_size, gen, what="test_size")
        return {"train": train, "test": test}

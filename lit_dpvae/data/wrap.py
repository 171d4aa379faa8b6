"""Any map-style ``torch.utils.data.Dataset`` as a private data module (the role of Opacus'
``DPLightningDataModule``): its training loader is Poisson-sampled and rank-synchronised, so the
accountant's ``q = batch_size / N`` holds; validation and test sets, if given, are served as they
are (they are not protected, docs/privacy.md §1)."""

from __future__ import annotations

from collections.abc import Sized
from typing import Any

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from lit_dpvae.hparams import ScrubbedHyperparametersMixin
from lit_dpvae.privacy.sampling import poisson_dataloader


class PrivateDataModule(ScrubbedHyperparametersMixin, LightningDataModule):
    """Poisson-sampled training batches from your own map-style datasets.

    Args:
        train: the training records (``__len__`` and ``__getitem__``); each item is what your
            model's ``loss_terms`` reads from one record (a batch is their default collation).
        val: optional held-out datasets (ordinary sequential loaders; without one,
            validation or testing has no batches and is skipped).
        test: see ``val``.
        batch_size: the *expected* global batch size B (q = B / len(train)).
        seed: the Poisson sampler's seed; None (default) draws a secret one. Keep it secret.
        eval_batch_size: batch size of the val/test loaders (default ``batch_size``).
        num_workers: as in ``DataLoader`` (empty batches are collated to
            zero-length tensors).
        collate_fn: see ``num_workers``.
    """

    def __init__(self, train: Dataset, val: Dataset | None = None, test: Dataset | None = None,
                 *, batch_size: int = 64, seed: int | None = None,
                 eval_batch_size: int | None = None, num_workers: int = 0,
                 collate_fn: Any = None) -> None:
        super().__init__()
        if not isinstance(train, Sized) or not hasattr(train, "__getitem__"):
            raise TypeError("train must be a map-style Dataset (with __len__ and __getitem__): "
                            "Poisson sampling draws records by index")
        if not 1 <= batch_size <= len(train):
            raise ValueError(f"batch_size must be in [1, len(train)={len(train)}], "
                             f"got {batch_size}")
        self.save_hyperparameters(ignore=["train", "val", "test", "collate_fn"])
        self.train_set, self.val_set, self.test_set = train, val, test
        self.batch_size, self.seed = int(batch_size), seed
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers, self.collate_fn = num_workers, collate_fn

    @property
    def num_train(self) -> int:
        return len(self.train_set)  # type: ignore[arg-type]

    @property
    def sample_rate(self) -> float:
        return self.batch_size / self.num_train

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        kwargs = {} if self.collate_fn is None else {"collate_fn": self.collate_fn}
        return poisson_dataloader(
            self.train_set, self.sample_rate, seed=self.seed,
            num_replicas=int(trainer.world_size) if trainer else 1,
            rank=int(trainer.global_rank) if trainer else 0,
            num_workers=self.num_workers, **kwargs)

    def _eval(self, dataset: Dataset | None, name: str) -> DataLoader | list:
        if dataset is None:  # no batches: Lightning skips the loop (and the sanity check)
            return []
        kwargs = {} if self.collate_fn is None else {"collate_fn": self.collate_fn}
        return DataLoader(dataset, batch_size=self.eval_batch_size, shuffle=False,
                          num_workers=self.num_workers, **kwargs)

    def val_dataloader(self) -> DataLoader | list:
        return self._eval(self.val_set, "val")

    def test_dataloader(self) -> DataLoader | list:
        return self._eval(self.test_set, "test")

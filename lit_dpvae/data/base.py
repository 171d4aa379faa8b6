"""The shared base of every data module: splits, load-time checks, Poisson train loader.

Train batches come from :func:`lit_dpvae.privacy.poisson_dataloader`: each record enters each
step's global batch independently with probability ``sample_rate = batch_size / num_train`` (the
``q`` of the accountant), every rank draws the same global batch from the shared ``seed`` and keeps
its share, and empty batches are yielded, not skipped. Validation and test loaders are ordinary
sequential loaders (deterministic, not private: they never touch the gradient).

The record split (which records are train/val/test) uses ``data_seed``, not ``seed``, so runs that
differ only in their training seed are evaluated on the same records.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lit_dpvae.data.checks import DataError, check_split
from lit_dpvae.hparams import ScrubbedHyperparametersMixin
from lit_dpvae.privacy.sampling import PoissonBatchSampler, poisson_dataloader

Split = tuple[Tensor, Tensor]


class VAEDataModule(ScrubbedHyperparametersMixin, LightningDataModule):
    """Base class: a subclass implements :meth:`_load` and the ``data_shape``/``num_classes``
    properties; this class checks, splits, subsamples and serves the data.

    Batches are ``(x, y)`` with ``x`` float32 ``[n, *data_shape]`` and ``y`` int64 ``[n]``; ``n``
    varies from step to step in training (Poisson) and may be 0.

    Args:
        batch_size: *expected* global batch size ``B`` of a training step (over all ranks).
        seed: seed of the Poisson sampler. Keep it secret: amplification by subsampling assumes
            nobody knows which records each step used. ``None`` (default) draws a secret seed;
            ``TermwiseDPStrategy`` makes it the same on every rank and keeps it in checkpoints.
        data_seed: seed of the train/val(/test) split and of ``limit_train`` subsampling.
        val_size: validation records carved from the training pool: an int (count) or a float in
            (0, 1) (fraction of the pool).
        limit_train: if set, keep only this many training records (a random subset) for quick runs.
        eval_batch_size: batch size of the val/test loaders (default ``batch_size``).
        num_workers: DataLoader workers.

    ``save_hyperparameters`` captures a subclass's ``__init__`` arguments too; tensors, arrays,
    data sets and data-like lists among them are left out of ``hparams`` (so of the logger config
    and checkpoints) with a warning: :mod:`lit_dpvae.hparams`.
    """

    #: whether records must lie in [0, 1] (images for Bernoulli-type likelihoods).
    unit_interval: bool = True
    #: ``__init__`` arguments kept out of ``hparams``: Lightning refuses a fit whose logger gets
    #: a key that the model's hparams hold with another value (ArrayDataModule's
    #: ``num_classes``: the model's 0 means "unconditional", the data's 1 "no labels").
    hparams_ignore: tuple[str, ...] = ()

    def __init__(
        self,
        batch_size: int = 256,
        *,
        seed: int | None = None,
        data_seed: int = 0,
        val_size: int | float = 0.1,
        limit_train: int | None = None,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(val_size, float) and not 0.0 < val_size < 1.0:
            raise ValueError(f"a fractional val_size must be in (0, 1), got {val_size}")
        if val_size <= 0:
            raise ValueError(f"val_size must be positive, got {val_size}")
        if limit_train is not None and limit_train < 1:
            raise ValueError(f"limit_train must be >= 1 or None, got {limit_train}")
        self.save_hyperparameters(ignore=list(self.hparams_ignore))
        self.batch_size = int(batch_size)
        self.seed = None if seed is None else int(seed)
        self.data_seed = int(data_seed)
        self.val_size = val_size
        self.limit_train = limit_train
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self._splits: dict[str, Split] | None = None

    # --- what a subclass provides -------------------------------------------------------------

    @property
    def data_shape(self) -> tuple[int, ...]:
        """Shape of one record, e.g. ``(1, 28, 28)``."""
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        """Labels lie in ``[0, num_classes)``."""
        raise NotImplementedError

    @property
    def schema(self) -> Any:
        """The public schema of a table's records (:class:`lit_dpvae.data.Schema`), or None for
        arrays and images; the CLI passes it to the model (``BaseVAE(schema=...)``)."""
        return None

    def _load(self) -> dict[str, Split]:
        """Return ``{"train": (x, y), "test": (x, y)}``, the training pool and the test set, with
        ``x`` already scaled. ``"val"`` may be returned too; otherwise it is carved from
        ``"train"`` by ``val_size``. Raise :class:`DataError` (or ``FileNotFoundError`` with an
        install hint) on problems."""
        raise NotImplementedError

    # --- public sizes (for the accountant and LightningCLI ``link_arguments``) --------------------

    @property
    def num_train(self) -> int:
        """Number of training records ``N`` (loads the data on first use)."""
        return int(self.splits["train"][0].shape[0])

    @property
    def sample_rate(self) -> float:
        """Poisson inclusion probability ``q = batch_size / num_train``."""
        if self.batch_size > self.num_train:
            raise ValueError(
                f"batch_size {self.batch_size} exceeds the {self.num_train} training records; "
                "the expected batch size must be at most num_train"
            )
        return self.batch_size / self.num_train

    # --- loading ------------------------------------------------------------------------------

    @property
    def splits(self) -> dict[str, Split]:
        """The checked ``train``/``val``/``test`` tensors, loaded once and cached."""
        if self._splits is None:
            self._splits = self._build()
        return self._splits

    def _build(self) -> dict[str, Split]:
        raw = self._load()
        gen = torch.Generator().manual_seed(self.data_seed)
        train = raw["train"]
        if "val" in raw:
            val = raw["val"]
        else:
            train, val = carve(train, self.val_size, gen, what="val_size")
        if self.limit_train is not None and self.limit_train < train[0].shape[0]:
            keep = torch.randperm(train[0].shape[0], generator=gen)[: self.limit_train]
            keep = keep.sort().values
            train = (train[0][keep], train[1][keep])
        splits = {"train": train, "val": val, "test": raw["test"]}
        return {
            name: check_split(
                name,
                x,
                y,
                data_shape=self.data_shape,
                num_classes=self.num_classes,
                unit_interval=self.unit_interval,
            )
            for name, (x, y) in splits.items()
        }

    def setup(self, stage: str | None = None) -> None:
        """Load and check every split (all stages, so sizes are the same whatever the stage)."""
        self.splits  # noqa: B018 (loads and checks)

    def dataset(self, split: str) -> TensorDataset:
        """The ``TensorDataset`` of ``split`` (``"train"``, ``"val"`` or ``"test"``)."""
        x, y = self.splits[split]
        return TensorDataset(x, y)

    # --- loaders ------------------------------------------------------------------------------

    def _process_group(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        return int(trainer.world_size), int(trainer.global_rank)

    def train_dataloader(self) -> DataLoader:
        """Rank-synchronised Poisson batches (empty batches included), ``round(1/q)`` steps per
        epoch. With a trainer attached, the sampler starts at ``trainer.current_epoch`` so a
        resumed run draws fresh batches instead of replaying epoch 0. The trainer must run with
        ``use_distributed_sampler=False``: Lightning's distributed sampler would re-shard the
        batches, and the accounting needs every rank to keep its share of the one global Poisson
        sample (docs/privacy.md §1, *Sampling*, and §4, *Distributed training*)."""
        num_replicas, rank = self._process_group()
        loader = poisson_dataloader(
            self.dataset("train"),
            self.sample_rate,
            seed=self.seed,
            num_replicas=num_replicas,
            rank=rank,
            num_workers=self.num_workers,
        )
        sampler = loader.batch_sampler
        assert isinstance(sampler, PoissonBatchSampler)
        if self.trainer is not None:
            sampler.set_epoch(int(self.trainer.current_epoch))
        return loader

    def _eval_loader(self, split: str) -> DataLoader:
        return DataLoader(
            self.dataset(split),
            batch_size=self.eval_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")


def carve(
    split: Split, size: int | float, gen: torch.Generator, *, what: str = "size"
) -> tuple[Split, Split]:
    """Split ``(x, y)`` into ``(rest, carved)`` with ``size`` records (int) or a fraction (float)
    in ``carved``, chosen by a random permutation from ``gen``; both parts keep the original
    order."""
    x, y = split
    n = int(x.shape[0])
    k = round(size * n) if isinstance(size, float) else int(size)
    if not 0 < k < n:
        raise DataError(f"{what}={size} must leave at least one record on each side of {n}")
    perm = torch.randperm(n, generator=gen)
    carved, rest = perm[:k].sort().values, perm[k:].sort().values
    return (x[rest], y[rest]), (x[carved], y[carved])

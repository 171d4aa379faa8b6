"""Rank-synchronised Poisson sampling.

Privacy amplification by subsampling (the accountant's ``sample_rate``) assumes each record enters
each step's batch independently with probability ``q``. Opacus' distributed Poisson sampler draws
per rank and skips empty local batches, so ranks take different numbers of steps and the job hangs
(docs/privacy.md §7). Here every rank draws the *same global* Poisson batch from a shared seed,
keeps its share ``global_batch[rank::world_size]``, and yields it even when it is empty. Every
rank therefore takes exactly ``steps_per_epoch`` steps, and the union of the local batches is one
Poisson sample.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data._utils.collate import default_collate


class PoissonBatchSampler(Sampler[list[int]]):
    """Poisson batches of a dataset of ``num_samples`` records, identical across ranks.

    Each call to ``__iter__`` is one epoch of ``steps_per_epoch`` steps (default ``round(1/q)``);
    step ``t`` of epoch ``e`` includes record ``j`` iff ``u_j < q`` for ``u`` drawn from a generator
    seeded by ``(seed, e, t)`` (NumPy ``SeedSequence``). The epoch counter advances by itself at
    the end of each epoch (Lightning never calls ``set_epoch`` on a batch sampler) and is part of
    ``state_dict()``.

    Args:
        num_samples: dataset size ``N``.
        sample_rate: inclusion probability ``q`` in (0, 1].
        seed: shared seed; must be the same on every rank. It must stay *secret*: amplification
            by subsampling assumes nobody knows which records each step used. ``None`` (the
            default) draws a fresh secret seed from the OS; a fixed seed is for tests and exact
            reproduction, and a multi-process strategy broadcasts rank 0's seed.
        num_replicas, rank: the process group's size and this process's rank.
        steps_per_epoch: steps per epoch (default ``max(1, round(1 / q))``).
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        *,
        seed: int | None = None,
        num_replicas: int = 1,
        rank: int = 0,
        steps_per_epoch: int | None = None,
    ) -> None:
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(
                f"sample_rate must be in (0, 1], got {sample_rate} (expected batch size / N)"
            )
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, num_replicas={num_replicas})")
        self.num_samples = int(num_samples)
        self.sample_rate = float(sample_rate)
        self.seed = secrets.randbits(62) if seed is None else int(seed)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.steps_per_epoch = (
            int(steps_per_epoch) if steps_per_epoch else max(1, round(1.0 / self.sample_rate))
        )
        self.epoch = 0
        #: First step of the next epoch only (a run resumed mid-epoch continues where it was).
        self.start_step = 0

    @property
    def expected_batch_size(self) -> float:
        """``B = q N``, the public normaliser of the update (global, over all ranks)."""
        return self.sample_rate * self.num_samples

    def global_batch(self, epoch: int, step: int) -> torch.Tensor:
        """Indices of the global Poisson batch of ``(epoch, step)`` (same on every rank)."""
        rng = np.random.default_rng([self.seed, epoch, step])
        mask = rng.random(self.num_samples) < self.sample_rate
        return torch.from_numpy(np.flatnonzero(mask))

    def __iter__(self) -> Iterator[list[int]]:
        # Advance the epoch when iteration starts: loops that stop after len(self) batches never
        # exhaust the generator, so an increment after the loop would never run.
        epoch, self.epoch = self.epoch, self.epoch + 1
        start, self.start_step = self.start_step, 0
        for step in range(start, self.steps_per_epoch):
            batch = self.global_batch(epoch, step)
            yield batch[self.rank :: self.num_replicas].tolist()

    def __len__(self) -> int:
        return self.steps_per_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def resume_at(self, epoch: int, batches_done: int, epochs_done: int,
                  in_progress: bool = True) -> None:
        """Continue where a run stopped: ``batches_done`` of the current ``epoch`` were taken
        (Lightning's ``batch_progress.current.ready``), ``epochs_done`` epochs finished, and
        ``in_progress``: that epoch was started but not completed (``epoch_progress``'s
        ``started > completed``). A run that stopped mid-epoch continues with the step after the
        last completed one. One that took every batch of its epoch continues with the next
        epoch, never with a replay of this one's Poisson draws: after a step checkpoint on an
        epoch's last batch Lightning still calls that epoch current (in progress), after an
        end-of-fit checkpoint it already counts the next one (and the batch counter is stale).
        The default ``in_progress=True`` errs towards skipping an epoch's draws, never towards
        replaying them."""
        if batches_done >= len(self):
            epoch = max(epoch + 1 if in_progress else epoch, epochs_done)
        self.set_epoch(epoch)
        self.start_step = batches_done if 0 < batches_done < len(self) else 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "seed": self.seed, "sample_rate": self.sample_rate}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.seed = int(state["seed"])
        self.sample_rate = float(state["sample_rate"])


class EmptySafeCollate:
    """``default_collate`` that turns an empty list of records into a zero-length batch.

    The structure of an empty batch is taken from ``dataset[0]`` (collated, then sliced to zero
    rows), so every empty batch has the right trailing shapes and dtypes. No record content leaks:
    the empty batch has no rows.
    """

    def __init__(self, dataset: Dataset, collate_fn: Any = default_collate) -> None:
        self.collate_fn = collate_fn
        self._empty = _slice_empty(collate_fn([dataset[0]]))

    def __call__(self, records: list[Any]) -> Any:
        if len(records) == 0:
            return self._empty
        return self.collate_fn(records)


def _slice_empty(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[:0].clone()
    if isinstance(batch, dict):
        return {k: _slice_empty(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_slice_empty(v) for v in batch)
    raise TypeError(
        f"cannot build an empty batch from a {type(batch).__name__}; Poisson sampling needs "
        "batches made of tensors (or lists/tuples/dicts of tensors)"
    )


def poisson_dataloader(
    dataset: Dataset,
    sample_rate: float,
    *,
    seed: int | None = None,
    num_replicas: int = 1,
    rank: int = 0,
    steps_per_epoch: int | None = None,
    num_workers: int = 0,
    collate_fn: Any = default_collate,
) -> DataLoader:
    """A DataLoader over rank-synchronised Poisson batches (empty batches included)."""
    if not isinstance(dataset, Sized):
        raise TypeError("Poisson sampling needs a map-style dataset with __len__")
    sampler = PoissonBatchSampler(
        len(dataset),
        sample_rate,
        seed=seed,
        num_replicas=num_replicas,
        rank=rank,
        steps_per_epoch=steps_per_epoch,
    )
    # Its own generator: creating the loader's iterator (every epoch) then draws its worker base
    # seed from it, not from the global torch RNG that the model's reparameterisation noise
    # uses, so an exact resume at an epoch boundary continues that stream where it stopped.
    generator = torch.Generator().manual_seed(sampler.seed ^ 0x5EED)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=EmptySafeCollate(dataset, collate_fn),
        num_workers=num_workers,
        generator=generator,
    )


def is_poisson_loader(loader: Any) -> bool:
    """True if ``loader`` draws its batches with :class:`PoissonBatchSampler`."""
    return isinstance(getattr(loader, "batch_sampler", None), PoissonBatchSampler)


def from_opacus_loader(loader: Any, *, num_replicas: int = 1, rank: int = 0) -> DataLoader | None:
    """The rank-synchronised Poisson loader equivalent to an Opacus ``DPDataLoader`` (same
    dataset, sample rate q, steps per epoch and collate function), or None when ``loader`` is
    not one. Opacus' samplers draw Poisson batches with the same q, but per rank and from a
    generator the strategy cannot checkpoint or keep secret across ranks; the replacement draws
    one global Poisson batch per step from a fresh secret seed (kept in checkpoints) and gives
    each rank its share, so the accountant's q and an exact resume hold (docs/privacy.md §1)."""
    from opacus.utils.uniform_sampler import (
        DistributedUniformWithReplacementSampler,
        UniformWithReplacementSampler,
    )

    sampler = getattr(loader, "batch_sampler", None)
    if isinstance(sampler, UniformWithReplacementSampler):
        num_samples, steps = int(sampler.num_samples), int(sampler.steps)
    elif isinstance(sampler, DistributedUniformWithReplacementSampler):
        num_samples, steps = int(sampler.total_size), int(sampler.num_batches)
    else:
        return None
    dataset = loader.dataset
    if not isinstance(dataset, Sized) or len(dataset) != num_samples:
        raise ValueError("the Opacus DPDataLoader's sampler does not cover its dataset: build it "
                         "with DPDataLoader.from_data_loader(loader) over the training set")
    # Empty batches as zero-length tensors of the records' shapes (not Opacus' optional random
    # stand-in record, nor an IndexError from a plain collate): the user's own collate inside.
    collate = getattr(loader.collate_fn, "wrapped_collator_fn", loader.collate_fn)
    return poisson_dataloader(dataset, float(sampler.sample_rate), seed=None,
                              num_replicas=num_replicas, rank=rank, steps_per_epoch=steps,
                              num_workers=loader.num_workers,
                              collate_fn=collate or default_collate)

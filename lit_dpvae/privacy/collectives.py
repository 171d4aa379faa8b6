"""Collectives: how a mechanism talks to the other processes of a run.

A mechanism's ``aggregate(module, batch, comm)`` only ever calls the methods below, so one code
path serves one process (:data:`LOCAL`, where every call is the identity) and many
(:class:`TorchDistributed`, over an initialised ``torch.distributed`` process group). The
records of a global Poisson batch are dealt to ranks round-robin (record ``j·W + r`` of the
global batch is local record ``j`` of rank ``r``; ``privacy.sampling``).

While a mechanism forms its statistics the collectives are *active*: a model's batch-wise terms
read the global batch with :func:`gather_for_batch_terms` (other ranks' rows without gradient,
the local rows with theirs), so the per-rank divergence gradients sum to the global one. Outside
``aggregate`` (validation, test, a plain forward) it is the identity. docs/privacy.md §7.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


class Collectives:
    """One process: every collective is the identity (the base class, and :data:`LOCAL`)."""

    world_size = 1
    rank = 0

    @property
    def distributed(self) -> bool:
        """More than one process: every rank must take part in every collective, so a
        mechanism runs its forward pass even on an empty local batch."""
        return self.world_size > 1

    def all_reduce(self, stats: dict[str, Tensor]) -> dict[str, Tensor]:
        """The sum over ranks of each raw statistic (before a part is clipped as a whole)."""
        return stats

    def gather(self, t: Tensor) -> tuple[Tensor, int]:
        """All ranks' rows of ``t`` without gradient (rank order), and the offset of this
        rank's rows in them."""
        return t.detach(), 0

    def gather_with_local_grad(self, t: Tensor) -> Tensor:
        """All ranks' rows of ``t`` (rank order); only this rank's rows carry gradient."""
        return t

    def broadcast(self, t: Tensor) -> Tensor:
        """Rank 0's ``t`` on every rank."""
        return t

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's picklable ``obj`` on every rank."""
        return obj

    def local_prefix(self, n_global: int) -> int:
        """How many of this rank's records are among the first ``n_global`` of the global
        batch (round-robin dealing: local record ``j`` is global record ``j·W + r``)."""
        return max(0, math.ceil((n_global - self.rank) / self.world_size))


#: The collectives of a single process.
LOCAL = Collectives()


class TorchDistributed(Collectives):
    """The collectives of an initialised ``torch.distributed`` process group."""

    def __init__(self, world_size: int, rank: int) -> None:
        self.world_size, self.rank = int(world_size), int(rank)

    def all_reduce(self, stats: dict[str, Tensor]) -> dict[str, Tensor]:
        if not dist.is_initialized():
            return stats
        names = list(stats)
        flat = torch.cat([stats[n].reshape(-1) for n in names])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        out, offset = {}, 0
        for n in names:
            size = stats[n].numel()
            out[n] = flat[offset : offset + size].view_as(stats[n])
            offset += size
        return out

    def _sizes(self, t: Tensor) -> list[int]:
        size = torch.tensor([t.shape[0]], device=t.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size)
        return [int(s) for s in sizes]

    def _rows(self, t: Tensor, sizes: list[int]) -> list[Tensor]:
        padded = torch.zeros(max(sizes), *t.shape[1:], dtype=t.dtype, device=t.device)
        padded[: t.shape[0]] = t
        chunks = [torch.zeros_like(padded) for _ in range(self.world_size)]
        dist.all_gather(chunks, padded)
        return [c[:s] for c, s in zip(chunks, sizes)]

    def gather(self, t: Tensor) -> tuple[Tensor, int]:
        sizes = self._sizes(t)
        return torch.cat(self._rows(t.detach(), sizes)), sum(sizes[: self.rank])

    def gather_with_local_grad(self, t: Tensor) -> Tensor:
        if not dist.is_initialized():
            return t
        parts = self._rows(t.detach(), self._sizes(t))
        parts[self.rank] = t
        return torch.cat(parts)

    def broadcast(self, t: Tensor) -> Tensor:
        t = t.contiguous().clone()
        dist.broadcast(t, src=0)
        return t

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


_ACTIVE: contextvars.ContextVar[Collectives] = contextvars.ContextVar(
    "lit_dpvae_collectives", default=LOCAL)


def current() -> Collectives:
    """The collectives active now (:data:`LOCAL` outside ``Mechanism.aggregate``)."""
    return _ACTIVE.get()


@contextlib.contextmanager
def active(comm: Collectives) -> Iterator[Collectives]:
    """Make ``comm`` the collectives :func:`gather_for_batch_terms` uses (inside
    ``Mechanism.aggregate``)."""
    token = _ACTIVE.set(comm)
    try:
        yield comm
    finally:
        _ACTIVE.reset(token)


def gather_for_batch_terms(t: Tensor) -> Tensor:
    """The global batch's rows of ``t`` for a batch-wise term: in a private multi-process step,
    other ranks' rows (no gradient) around this rank's (with gradient), in rank order; the
    identity otherwise. Call it on the codes a divergence reads (``BaseVAE`` does)."""
    return _ACTIVE.get().gather_with_local_grad(t)

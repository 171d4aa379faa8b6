"""Naive DP-SGD: the whole loss attributed per record, honestly accounted (sensitivity
2·n_max·C)."""

from __future__ import annotations

import math
from typing import Any, cast

from torch import Tensor, nn

from lit_dpvae.privacy.collectives import LOCAL, Collectives
from lit_dpvae.privacy.mechanisms.base import (
    Mechanism,
    Stats,
    check_positive,
    truncate_batch,
)
from lit_dpvae.privacy.mechanisms.registry import register_mechanism
from lit_dpvae.privacy.terms import LossTerms


@register_mechanism("naive")
class NaiveDPSGD(Mechanism):
    """DP-SGD with the whole loss attributed per record by layer hooks (docs/privacy.md §3.2).

    What Opacus does when a batch-wise divergence is simply added to the loss, made honest:

    1. truncate the batch to its first ``n_max`` records (``max_batch_size``);
    2. attribute ``Σ_i ℓ_i + B·Σ_k λ_k D_k`` to records through each layer's rows
       (``B`` = ``expected_batch_size`` when set, else the batch size), clip each to ``C``, sum;
    3. one record moves every attributed gradient of a batch it joins, so the add/remove
       sensitivity of the clipped sum is ``2·n_max·C`` (proof in docs/privacy.md), not ``C``.

    Noise std ``σ·2·n_max·C``; update ``(sum + noise)/B``. This baseline shows the O(B) blow-up.
    """

    parts = ("total",)
    summed_over_records = {"total": True}

    def __init__(
        self,
        *,
        max_grad_norm: float = 1.0,
        max_batch_size: int | None = None,
        noise_multiplier: float = 0.0,
        expected_batch_size: float | None = None,
        backend: str = "ghost",
    ) -> None:
        self.max_grad_norm = check_positive("max_grad_norm (C)", max_grad_norm)
        #: n_max chosen by the user; None: twice the expected batch size (``set_sampling``)
        self.requested_max_batch_size = max_batch_size
        if max_batch_size is not None and (int(max_batch_size) != max_batch_size
                                           or max_batch_size < 1):
            raise ValueError(
                f"max_batch_size (n_max) must be a positive integer, got {max_batch_size}"
            )
        self.max_batch_size = 1 if max_batch_size is None else int(max_batch_size)
        self.expected_batch_size = expected_batch_size
        if max_batch_size is None and expected_batch_size is not None:
            self.set_sampling(expected_batch_size)
        super().__init__(noise_multiplier=noise_multiplier, backend=backend)

    @property
    def sensitivity(self) -> dict[str, float]:
        return {"total": 2.0 * self.max_batch_size * self.max_grad_norm}

    def set_sampling(self, expected_batch_size: float) -> None:
        """B scales the batch-wise terms; n_max defaults to ``⌈2B⌉`` (public)."""
        super().set_sampling(expected_batch_size)
        self.expected_batch_size = expected_batch_size
        if self.requested_max_batch_size is None:
            self.max_batch_size = max(1, math.ceil(2 * expected_batch_size))

    def aggregate(self, module: nn.Module, batch: Any, comm: Collectives = LOCAL) -> Stats:
        """The batch is truncated to the first ``n_max`` records of the *global* batch (on
        each rank, the local records among them: ``comm.local_prefix``)."""
        batch = truncate_batch(batch, comm.local_prefix(self.max_batch_size))
        n = self.start(module, batch, comm)
        if self.skip(n, comm):
            return {"total": comm.all_reduce(self.zeros(module)["total"])}
        scale = float(self.expected_batch_size) if self.expected_batch_size else float(n)

        def run() -> tuple[Tensor, LossTerms]:
            terms = self.forward_terms(module, batch, n)
            per_record = terms.per_record()
            batch_loss = terms.batch_total()
            loss = per_record.sum() if per_record is not None else 0.0
            if batch_loss is not None:
                loss = loss + scale * batch_loss
            return cast(Tensor, loss), terms  # terms carry a per-record or a batch-wise part

        total, _, _ = self.clipper.clipped_sum(module, run, self.max_grad_norm, n)
        return {"total": comm.all_reduce(total)}

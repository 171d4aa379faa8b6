"""The non-private reference: the plain gradient, split like term-wise (no clipping, no noise)."""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from lit_dpvae.privacy.capture import named_trainable
from lit_dpvae.privacy.collectives import LOCAL, Collectives
from lit_dpvae.privacy.mechanisms.base import (
    Mechanism,
    Stats,
    grads_of,
)
from lit_dpvae.privacy.mechanisms.registry import register_mechanism


@register_mechanism("nonprivate")
class NonPrivate(Mechanism):
    """Plain gradient (docs/privacy.md §3.1). No clipping, no noise.

    One part, ``update`` = ``∇(Σ_i ℓ_i / B + Σ_k λ_k D_k)`` with B the expected batch size
    (``set_sampling``, as for the private mechanisms): the update term-wise DP-SGD would give
    without clipping and noise, from *one* backward pass — the fastest honest non-private step
    (issue 18), where a sample part and a batch part would cost two.
    Runs at the user's float32 precision (TF32 allowed): there is no bound to protect.
    """

    private = False
    parts = ("update",)
    ieee_statistics = False
    summed_over_records = {"update": False}

    def __init__(self, *, backend: str = "ghost") -> None:
        super().__init__(noise_multiplier=0.0, backend=backend)

    @Mechanism.noise_multiplier.setter  # type: ignore[attr-defined]
    def noise_multiplier(self, value: float) -> None:
        if float(value) != 0.0:
            raise ValueError("NonPrivate adds no noise; use TermwiseDPSGD for a private run")
        self._noise_multiplier = 0.0

    @property
    def sensitivity(self) -> dict[str, float]:
        return {"update": math.inf}

    def aggregate(self, module: nn.Module, batch: Any, comm: Collectives = LOCAL) -> Stats:
        n = self.start(module, batch, comm)
        if self.skip(n, comm):
            return {part: comm.all_reduce(v) for part, v in self.zeros(module).items()}
        if self._expected_batch_size is None:
            raise RuntimeError("NonPrivate divides the record-wise terms by the expected batch "
                               "size B: call set_sampling(B) first (DPStrategy does, before the "
                               "first step)")
        params = named_trainable(module)
        terms = self.forward_terms(module, batch, n)
        per_record, batch_total = terms.per_record(), terms.batch_total()
        loss = None if per_record is None else per_record.sum() / self._expected_batch_size
        if batch_total is not None:
            loss = batch_total if loss is None else loss + batch_total
        return {"update": comm.all_reduce(grads_of(loss, params, retain=False))}

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
    """Plain gradient, split the same way as term-wise (docs/privacy.md §3.1). No clipping, no
    noise.

    Parts: ``sample`` = ``Σ_i ∇ℓ_i`` and ``batch`` = ``∇ Σ_k λ_k D_k``; update ``sample/B + batch``.
    Runs at the user's float32 precision (TF32 allowed): there is no bound to protect.
    """

    private = False
    parts = ("sample", "batch")
    ieee_statistics = False
    summed_over_records = {"sample": True, "batch": False}

    def __init__(self, *, backend: str = "ghost") -> None:
        super().__init__(noise_multiplier=0.0, backend=backend)

    @Mechanism.noise_multiplier.setter  # type: ignore[attr-defined]
    def noise_multiplier(self, value: float) -> None:
        if float(value) != 0.0:
            raise ValueError("NonPrivate adds no noise; use TermwiseDPSGD for a private run")
        self._noise_multiplier = 0.0

    @property
    def sensitivity(self) -> dict[str, float]:
        return {"sample": math.inf, "batch": math.inf}

    def aggregate(self, module: nn.Module, batch: Any, comm: Collectives = LOCAL) -> Stats:
        n = self.start(module, batch, comm)
        if self.skip(n, comm):
            return {part: comm.all_reduce(v) for part, v in self.zeros(module).items()}
        params = named_trainable(module)
        terms = self.forward_terms(module, batch, n)
        per_record = terms.per_record()
        sample_loss = per_record.sum() if per_record is not None else None
        return {
            "sample": comm.all_reduce(grads_of(sample_loss, params, retain=True)),
            "batch": comm.all_reduce(grads_of(terms.batch_total(), params, retain=False)),
        }

"""Term-wise DP-SGD (Takahashi et al., arXiv 2006.11204): sample and batch parts, each with its own
mechanism (docs/privacy.md §2)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from torch import nn

from lit_dpvae.privacy.accounting import split_noise_multiplier
from lit_dpvae.privacy.capture import named_trainable
from lit_dpvae.privacy.collectives import LOCAL, Collectives
from lit_dpvae.privacy.mechanisms.base import (
    Mechanism,
    Stats,
    check_positive,
    clip_vector,
    grads_of,
    parameter_prefixes,
)
from lit_dpvae.privacy.mechanisms.registry import register_mechanism
from lit_dpvae.privacy.terms import LossTerms


@register_mechanism("termwise")
class TermwiseDPSGD(Mechanism):
    """Term-wise DP-SGD (Takahashi et al., arXiv 2006.11204; docs/privacy.md §3.3).

    Two randomised gradients on the same Poisson batch:

    1. sample part ``G_s = Σ_i clip_C(∇ℓ_i) + N(0, σ_s² C² I)``; sensitivity ``C``;
    2. batch part ``h = ∇ Σ_k λ_k D_k(S)`` as one ordinary gradient (no per-record attribution),
       ``G_b = clip_{C_b}(h) + N(0, σ_b² (2C_b)² I)``; both clipped vectors lie in the
       ``C_b``-ball, so the sensitivity is ``2C_b`` whatever the batch size;
    3. update ``G_s / B + G_b``.

    The pair is one Gaussian mechanism with ``σ_eff = (σ_s⁻² + σ_b⁻²)^(-1/2)``; the share ``γ``
    (``sample_share``) of the budget spent on the sample part sets ``σ_s = σ_eff/√γ`` and
    ``σ_b = σ_eff/√(1−γ)``. With ``γ = 1`` there is no batch part and this is exactly DP-SGD.

    Defaults (data-independent, docs/privacy.md §3.3 *Defaults*): ``batch_max_grad_norm=None``
    is ``C_b = C/(2B)`` with B the public expected batch size (``set_sampling``), so the batch
    part's noise equals the sample part's in the update; ``sample_share=None`` is γ = 1/2.
    ``batch_params`` (name prefixes, e.g. ``["encoder.head."]``) confines the batch part —
    gradient, clipping and noise — to those parameters (*Parameter subset*).

    Args:
        max_grad_norm: C, the per-record clipping norm of the sample-wise gradient (sensitivity C).
        batch_max_grad_norm: C_b, the clipping norm of the batch part (None: C/(2B)).
        noise_multiplier: σ_eff; 0 until the strategy's budget calibrates it (leave it unset).
        sample_share: γ, the budget share of the sample part (None: 1/2; 1: DP-SGD, no batch part).
        batch_params: name prefixes of the parameters the batch part is computed and noised on
            (None: all), e.g. ``["encoder.head."]``.
        backend: per-record clipping backend: ``"ghost"`` (norms without per-record gradients
            where possible), ``"hooks"`` or ``"functorch"``.
    """

    summed_over_records = {"sample": True, "batch": False}

    def __init__(
        self,
        *,
        max_grad_norm: float = 1.0,
        batch_max_grad_norm: float | None = None,
        noise_multiplier: float = 0.0,
        sample_share: float | None = None,
        batch_params: Sequence[str] | None = None,
        backend: str = "ghost",
    ) -> None:
        self.max_grad_norm = check_positive("max_grad_norm (C)", max_grad_norm)
        #: C_b as given (None: C/(2B), set from the public expected batch size B).
        self.batch_clip_setting = (None if batch_max_grad_norm is None else
                                   check_positive("batch_max_grad_norm (C_b)",
                                                  batch_max_grad_norm))
        share = 0.5 if sample_share is None else float(sample_share)
        if not 0.0 < share <= 1.0:
            raise ValueError(
                f"sample_share γ must be in (0, 1], got {sample_share}: it is the share of the "
                "privacy budget spent on the sample-wise part (1 = no batch-wise terms)"
            )
        #: γ (default 1/2: with the default C_b = C/(2B) both parts' released sensitivities are
        #: equal, C/B and 2C_b, and 1/2 is the least noisy split).
        self.sample_share = share
        self.parts = ("sample",) if share == 1.0 else ("sample", "batch")
        #: The batch part is computed, clipped and noised on these parameters only (name
        #: prefixes; None: every trainable parameter). Fixed before training: data-independent.
        self.batch_params = parameter_prefixes(batch_params, "batch_params")
        super().__init__(noise_multiplier=noise_multiplier, backend=backend)

    @property
    def batch_max_grad_norm(self) -> float:
        """C_b: as set, or by default ``C/(2B)`` (B the public expected batch size), so the
        batch part's sensitivity 2C_b equals the sample part's C/B at the scale of the update."""
        if self.batch_clip_setting is not None:
            return self.batch_clip_setting
        if self._expected_batch_size is None:
            raise RuntimeError(
                "batch_max_grad_norm=None means C/(2B) with B the expected batch size, which is "
                "known once the sampling is set (set_sampling, done by DPStrategy before the "
                "first step): call set_sampling(B) or pass batch_max_grad_norm")
        return self.max_grad_norm / (2.0 * self._expected_batch_size)

    def part_parameters(self, part: str) -> tuple[str, ...] | None:
        return self.batch_params if part == "batch" else None

    def settings(self) -> dict[str, Any]:
        """As ``Mechanism.settings``; without a batch part (γ = 1: DP-SGD) the batch part's
        C_b and parameter subset are left out (they play no role in the release)."""
        out = super().settings()
        if "batch" not in self.parts:
            out.pop("batch_max_grad_norm", None)
            out.pop("batch_params", None)
        return out

    @property
    def sensitivity(self) -> dict[str, float]:
        sens = {"sample": self.max_grad_norm}
        if "batch" in self.parts:
            sens["batch"] = 2.0 * self.batch_max_grad_norm
        return sens

    @property
    def noise_multipliers(self) -> dict[str, float]:
        sigma_s, sigma_b = split_noise_multiplier(self.noise_multiplier, self.sample_share)
        sigmas = {"sample": sigma_s, "batch": sigma_b}
        return {part: sigmas[part] for part in self.parts}

    def balance_warning(self, expected_batch_size: float) -> str | None:
        """The batch part's noise swamps the update when ``σ_b·2C_b ≫ σ_s·C/B``."""
        if "batch" not in self.parts:
            return None
        std = self.noise_std()
        sample_std = std["sample"] / expected_batch_size
        if not std["batch"] > 10 * sample_std:
            return None
        return (
            f"the batch-wise part's noise (std {std['batch']:.3g} per coordinate) is "
            f"{std['batch'] / sample_std:.0f}x the sample-wise part's ({sample_std:.3g}): the "
            "divergence gradient is released at the scale of one clipped vector, not divided "
            "by B. Lower batch_max_grad_norm (C_b) or raise sample_share (γ) unless the "
            "divergence needs that weight.")

    def aggregate(self, module: nn.Module, batch: Any, comm: Collectives = LOCAL) -> Stats:
        n = self.start(module, batch, comm)
        if self.skip(n, comm):
            return {part: comm.all_reduce(v) for part, v in self.zeros(module).items()}
        params = named_trainable(module)
        batch_params = self.select(params, "batch")

        def check(terms: LossTerms) -> None:
            if terms.batch and "batch" not in self.parts:
                raise ValueError(
                    f"the model has batch-wise terms {sorted(terms.batch)} but sample_share=1 "
                    "leaves no budget for them: set sample_share < 1 (e.g. 0.5)"
                )
            if not terms.batch and "batch" in self.parts:
                raise ValueError(
                    "the model has no batch-wise terms, so the batch part would only burn budget: "
                    "set sample_share=1 (term-wise DP-SGD is then exactly DP-SGD)"
                )

        # The batch part from one forward of the whole batch (first: its reparameterisation
        # draws are the step's first; the model's batch_terms where it has one, so no decoder);
        # the sample part in fixed-size blocks of records (each record computed the same way
        # whatever else is in the batch).
        h, batch_terms = None, {}
        if "batch" in self.parts:
            terms = self.batch_forward(module, batch, n)
            check(terms)
            batch_terms = {k: v.detach() for k, v in terms.batch.items()}
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                h = grads_of(terms.batch_total(), batch_params, retain=False)
            del terms
        sample, logged = self.blocked_sample_sum(module, batch, n, check, comm)
        stats: Stats = {"sample": comm.all_reduce(sample)}
        if h is not None:
            stats["batch"] = clip_vector(comm.all_reduce(h), self.batch_max_grad_norm)
        self.last_terms = LossTerms(sample=logged, batch=batch_terms)
        return stats

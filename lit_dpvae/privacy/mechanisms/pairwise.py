"""Term-wise DP-SGD with kernel divergences privatised pair by pair (docs/privacy.md §8)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lit_dpvae.privacy.capture import capture_layers, named_trainable
from lit_dpvae.privacy.clipping import check_finite
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
from lit_dpvae.privacy.pairwise import clipped_owner_sum, latent_jacobian, owner_vectors
from lit_dpvae.privacy.terms import LossTerms


@register_mechanism("pairwise")
class PairwiseDPSGD(Mechanism):
    """Term-wise DP-SGD with kernel divergences privatised pair by pair (docs/privacy.md §8).

    Parts, on the same Poisson batch S (n = |S|):

    1. ``sample``: ``Σ_i clip_C(∇ℓ_i)``, sensitivity ``C`` (as term-wise);
    2. ``pairwise``: for each divergence declared in ``LossTerms.pairwise`` (weight λ, kernel k,
       codes z_i, prior samples w_m), ``Σ_i J_iᵀ ū_i`` with
       ``ū_i = (2/(n−1)) Σ_{j≠i} clip(λ∇₁k(z_i,z_j)) − 2·clip(λ (1/M) Σ_m ∇₁k(z_i,w_m))``,
       each clip of the *parameter* vector ``J_iᵀu`` to ``C_p`` (``pair_max_grad_norm``); 0 for
       n < 2. Unclipped it is ``n·∇(λ MMD²)``. Sensitivity ``8·C_p`` per pairwise divergence,
       whatever n (docs/privacy.md §8); divided by ``B`` in the update like the sample part;
    3. ``batch``: the remaining (opaque) batch-wise terms, ``clip_{C_b}(∇ Σ D_k)``,
       sensitivity ``2C_b`` — only when ``sample_share + pairwise_share < 1``.

    ``σ_eff = (σ_s⁻² + σ_p⁻² + σ_b⁻²)^(-1/2)`` with ``σ_k = σ_eff/√γ_k``. Defaults
    (docs/privacy.md §8.5): ``C_p = C/16`` and, with neither share set, shares proportional to
    the sensitivities, ``γ_s = C/(C + 8·C_p·T)`` (T = ``num_pairwise_terms``), the least noisy
    split; ``pairwise_share`` alone gives ``γ_s = 1 − pairwise_share``, ``sample_share`` alone
    ``γ_p = 1 − sample_share`` (no opaque batch part). Multi-process: ``aggregate``
    gathers the global partners without gradient and takes rank 0's prior samples (``comm``), so the
    all-reduced statistic equals the single-process one of the global batch.

    Args:
        max_grad_norm: C, the per-record clipping norm of the sample-wise gradient (sensitivity C).
        pair_max_grad_norm: C_p, the clipping norm of each pair's parameter vector (None: C/16).
        batch_max_grad_norm: C_b of the opaque batch part (only with a budget share left).
        noise_multiplier: σ_eff; 0 until the strategy's budget calibrates it (leave it unset).
        sample_share: γ_s (None with ``pairwise_share`` None: proportional to sensitivity).
        pairwise_share: γ_p (None: 1 − γ_s).
        num_pairwise_terms: T, the pairwise divergences the model declares (``auto`` sets it).
        batch_params: name prefixes of the parameters the pairwise (and opaque batch) part is
            computed, clipped and noised on (None: all), e.g. ``["encoder."]``: a divergence
            reads the codes, so its gradient is structurally zero on the decoder, and noise
            there only hurts (``auto`` takes the model's ``batch_term_parameters()``).
        backend: per-record clipping backend: ``"ghost"`` (norms without per-record gradients
            where possible), ``"hooks"`` or ``"functorch"``.
    """

    summed_over_records = {"sample": True, "pairwise": True, "batch": False}
    extra_settings = ("shares",)  # the resolved budget shares (public: from the settings)

    def __init__(
        self,
        *,
        max_grad_norm: float = 1.0,
        pair_max_grad_norm: float | None = None,
        batch_max_grad_norm: float = 1.0,
        noise_multiplier: float = 0.0,
        sample_share: float | None = None,
        pairwise_share: float | None = None,
        num_pairwise_terms: int = 1,
        batch_params: Sequence[str] | None = None,
        backend: str = "ghost",
    ) -> None:
        self.max_grad_norm = check_positive("max_grad_norm (C)", max_grad_norm)
        #: C_p; default C/16: one pairwise divergence's sensitivity 8·C_p is C/2, so at the
        #: default shares the update's noise is 1.5× DP-SGD's, not 2× (docs/privacy.md §8.5).
        self.pair_max_grad_norm = check_positive(
            "pair_max_grad_norm (C_p)",
            self.max_grad_norm / 16.0 if pair_max_grad_norm is None else pair_max_grad_norm)
        self.batch_max_grad_norm = check_positive("batch_max_grad_norm (C_b)", batch_max_grad_norm)
        if int(num_pairwise_terms) < 1:
            raise ValueError(f"num_pairwise_terms must be >= 1, got {num_pairwise_terms}")
        #: How many pairwise divergences the model declares (each adds 8·C_p); a model that
        #: declares another number is refused.
        self.num_pairwise_terms = int(num_pairwise_terms)
        if sample_share is None and pairwise_share is None:
            # Both parts are sums over records divided by B: shares proportional to their
            # sensitivities minimise the update's noise, std σ_eff·(C + 8·C_p·T)/B.
            sens_p = 8.0 * self.pair_max_grad_norm * self.num_pairwise_terms
            gs = self.max_grad_norm / (self.max_grad_norm + sens_p)
        elif sample_share is None:
            gs = 1.0 - float(pairwise_share)  # type: ignore[arg-type]
        else:
            gs = float(sample_share)
        gp = 1.0 - gs if pairwise_share is None else float(pairwise_share)
        if not (0.0 < gs < 1.0 and 0.0 < gp < 1.0 and gs + gp <= 1.0 + 1e-12):
            raise ValueError(
                f"sample_share={sample_share} and pairwise_share={pairwise_share} must be in "
                "(0, 1) with sum <= 1 (the rest, if any, is the opaque batch-wise part's share)"
            )
        gb = max(0.0, 1.0 - gs - gp)
        if gb < 1e-9:
            gb = 0.0
        self.sample_share, self.pairwise_share = gs, pairwise_share
        self.shares = {"sample": gs, "pairwise": gp, "batch": gb}
        self.parts = ("sample", "pairwise") + (("batch",) if gb > 0 else ())
        #: The pairwise and batch parts are computed, clipped and noised on these parameters
        #: only (name prefixes; None: every trainable parameter). Fixed before training.
        self.batch_params = parameter_prefixes(batch_params, "batch_params")
        #: Scratch memory the latent-Gram pass reuses from step to step (no state).
        self._workspace: dict = {}
        super().__init__(noise_multiplier=noise_multiplier, backend=backend)

    @property
    def sensitivity(self) -> dict[str, float]:
        sens = {
            "sample": self.max_grad_norm,
            "pairwise": 8.0 * self.pair_max_grad_norm * self.num_pairwise_terms,
            "batch": 2.0 * self.batch_max_grad_norm,
        }
        return {part: sens[part] for part in self.parts}

    @property
    def noise_multipliers(self) -> dict[str, float]:
        return {p: self.noise_multiplier / math.sqrt(self.shares[p]) for p in self.parts}

    def part_parameters(self, part: str) -> tuple[str, ...] | None:
        return None if part == "sample" else self.batch_params

    def settings(self) -> dict[str, Any]:
        """As ``Mechanism.settings``; without an opaque batch part (no budget share left) its
        C_b is left out (it plays no role in the release)."""
        out = super().settings()
        if "batch" not in self.parts:
            out.pop("batch_max_grad_norm", None)
        return out

    def aggregate(
        self,
        module: nn.Module,
        batch: Any,
        comm: Collectives = LOCAL,
    ) -> Stats:
        """Multi-process: ``comm.gather(codes)`` gives the global codes of all ranks (no
        gradient) and the offset of this rank's rows in them, ``comm.broadcast`` rank 0's
        prior samples. Every rank calls both for every pairwise term, whatever its local batch
        size, so the collectives line up."""
        n = self.start(module, batch, comm)
        if self.skip(n, comm):
            return {part: comm.all_reduce(v) for part, v in self.zeros(module).items()}
        params = named_trainable(module)

        def check_batch(terms: LossTerms) -> None:  # the batch-wise and pairwise terms
            if not terms.pairwise:
                raise ValueError(
                    "the model declares no pairwise-decomposable divergence "
                    "(LossTerms.pairwise is empty): use TermwiseDPSGD"
                )
            opaque = sorted(set(terms.batch) - set(terms.pairwise))
            if opaque and "batch" not in self.parts:
                raise ValueError(
                    f"the model has opaque batch-wise terms {opaque} but sample_share + "
                    "pairwise_share = 1 leaves no budget for them: lower pairwise_share"
                )
            if not opaque and "batch" in self.parts:
                raise ValueError(
                    "all batch-wise terms are pairwise, so the batch part would only burn "
                    "budget: set pairwise_share = 1 - sample_share (the default)"
                )
            if len(terms.pairwise) != self.num_pairwise_terms:
                raise ValueError(
                    f"the model declares {len(terms.pairwise)} pairwise divergences; this "
                    f"mechanism is calibrated for {self.num_pairwise_terms} (pass "
                    "num_pairwise_terms=... to the mechanism: each adds 8·C_p to the "
                    "sensitivity)"
                )

        def check(terms: LossTerms) -> None:  # a record block's full terms
            check_batch(terms)
            if terms.per_record() is None:
                raise ValueError("PairwiseDPSGD needs at least one sample-wise term")

        # The pairwise and batch parts from one forward of the whole batch (first: its
        # reparameterisation draws are the step's first; the model's batch_terms where it has
        # one, so no decoder), whose layer calls the latent Gram reads; the sample part in
        # fixed-size blocks of records (each record computed the same way whatever else is
        # in the batch).
        with capture_layers(module) as cap:
            terms = self.batch_forward(module, batch, n)
        check_batch(terms)
        sample, logged = self.blocked_sample_sum(module, batch, n, check, comm)
        self.last_terms = LossTerms(sample=logged,
                                    batch={k: v.detach() for k, v in terms.batch.items()})
        stats: Stats = {"sample": comm.all_reduce(sample)}
        pair_params = self.select(params, "pairwise")
        pairwise = {name: torch.zeros_like(p) for name, p in pair_params.items()}
        for term in terms.pairwise.values():
            partners, offset, prior = None, 0, term.prior_samples
            if comm.distributed:
                partners, offset = comm.gather(term.codes.detach())
                if partners.shape[0] >= 2:
                    prior = comm.broadcast(prior.detach())
            total = n if partners is None else partners.shape[0]
            if total < 2 or n == 0:
                continue  # the U-statistic is 0 (and so is its gradient) below two records
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                jac = latent_jacobian(cap.calls, term.codes, n, self._workspace,
                                      set(pair_params.values()))
            owner, _, _ = owner_vectors(term.codes, prior, term.kernel, float(term.weight),
                                        jac.gram, self.pair_max_grad_norm, partners, offset,
                                        jac.terms)
            for name, g in clipped_owner_sum(jac, owner, pair_params, n).items():
                pairwise[name] += g
        check_finite(pairwise)
        stats["pairwise"] = comm.all_reduce(pairwise)
        if "batch" in self.parts:
            opaque = [v for k, v in terms.batch.items() if k not in terms.pairwise]
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                h = grads_of(torch.stack(opaque).sum(), self.select(params, "batch"),
                             retain=False)
            stats["batch"] = clip_vector(comm.all_reduce(h), self.batch_max_grad_norm)
        return stats

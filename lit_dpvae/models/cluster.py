"""ClusterVAE: mixture-of-Gaussians prior, Monte Carlo per-record KL plus λ·D(q_agg, p)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from lit_dpvae.divergences import MMD, MMD_BANDWIDTHS, AggregateKL
from lit_dpvae.metrics.latent import assign_clusters, cluster_purity, nmi
from lit_dpvae.models.base import BaseVAE
from lit_dpvae.priors import MixtureOfGaussians
from lit_dpvae.privacy.terms import register_batch_terms

#: The divergences ClusterVAE offers, and the default λ of each.
CLUSTER_DIVERGENCES = {"mmd": 10.0, "aggregate_kl": 1.0}


@register_batch_terms
class ClusterVAE(BaseVAE):
    """ℓ_i = recon_i + β·(1/K) Σ_k [log q(z_ik|x_i) − log p(z_ik)], p = Σ_c π_c N(μ_c, s² I),
    plus λ·D between the batch's aggregate posterior and the mixture, which pulls the batch's
    codes onto every component. Cluster of a record: ``prior.assign(mu)``.

    ``divergence="mmd"`` (default): MMD² between one code per record and M samples of the
    mixture (``lit_dpvae.divergences.MMD``): pairwise-decomposable, so ``mechanism="auto"``
    privatises it pair by pair (docs/privacy.md §8); under the aggregate KL the NMI on pinwheel
    at ε = 10 fell below λ = 0's. Under DP each pair term is clipped to C_p, so the divergence
    acts with a fixed weight (≤ 4·C_p per record against C; λ matters only below the clip) and
    it needs large batches: on pinwheel it un-merges classes at B = 1,000, not at B = 100
    (experiments/results/divergence_effect.md). ``"aggregate_kl"``: the
    inclusive KL(p ‖ q_agg) (``AggregateKL``, log-sum-exp over the batch), batch-wise:
    privatised as one clipped vector by term-wise DP-SGD (docs/privacy.md §3.3).

    Validation logs ``val/nmi`` and ``val/purity`` against the labels when the data have them.
    Shapes: ``x [n, *data_shape] -> recon, kl [n]; kl_agg []``.
    DP: recon, kl sample-wise; ``kl_agg`` (the divergence's term, either kind) batch-wise.
    Reference: Dilokthanakul et al., arXiv 1611.02648; Hoffman & Johnson, ELBO surgery (2016);
    Tolstikhin et al., WAE, arXiv 1711.01558 (MMD to a non-Gaussian prior).

    Args:
        lam: λ, weight of the divergence (default: 10 for "mmd", 1 for "aggregate_kl").
        divergence: ``"mmd"`` (default) or ``"aggregate_kl"``.
        n_components: see ``lit_dpvae.priors.MixtureOfGaussians``.
        radius: see ``lit_dpvae.priors.MixtureOfGaussians``.
        scale: see ``lit_dpvae.priors.MixtureOfGaussians``.
        layout: see ``lit_dpvae.priors.MixtureOfGaussians``; None (default): ``"axes"`` (one
            component per signed coordinate axis) when ``n_components <= 2·latent_dim``, else
            ``"circle"``. On a circle, 10 components share 2 of 16 dimensions and the MMD did
            not make them follow Fashion-MNIST's classes even without privacy (issue 15).
        seed: see ``lit_dpvae.priors.MixtureOfGaussians``.
        n_prior_samples: M prior samples of the divergence.
        kernel: of the MMD (``lit_dpvae.divergences.MMD``).
        bandwidths: of the MMD (``lit_dpvae.divergences.MMD``).
        beta: β, weight of the per-record KL (default 0.5: with β = 1 the per-record KL to
            the mixture already does much of the divergence's work, so λ had less to add).
        optimizer: as for ``BaseVAE`` (default ``"auto"``: ``DPAdamBC`` under a DPStrategy,
            Adam otherwise; under DP the pairwise part doubles the encoder's noise, and with
            Adam the λ-on models reconstructed far worse than λ = 0's).
        **kwargs: ``BaseVAE`` arguments.
    """

    divergence_key = "kl_agg"

    def __init__(
        self,
        lam: float | None = None,
        n_components: int = 10,
        radius: float = 3.0,
        scale: float = 0.5,
        layout: str | None = None,
        seed: int = 0,
        n_prior_samples: int = 256,
        divergence: str = "mmd",
        kernel: str = "imq",
        bandwidths: Sequence[float] = MMD_BANDWIDTHS,
        beta: float = 0.5,
        optimizer: str = "auto",
        **kwargs: Any,
    ) -> None:
        if divergence not in CLUSTER_DIVERGENCES:
            raise ValueError(f"divergence must be one of {sorted(CLUSTER_DIVERGENCES)}, got "
                             f"{divergence!r}")
        lam = CLUSTER_DIVERGENCES[divergence] if lam is None else lam
        super().__init__(lam=lam, beta=beta, optimizer=optimizer, **kwargs)
        if layout is None:  # one component per signed axis where the latent space has room
            layout = "axes" if n_components <= 2 * self.latent_dim else "circle"
        self.prior = MixtureOfGaussians(self.latent_dim, n_components, radius, scale, layout, seed)
        if divergence == "mmd":
            self.divergence = MMD(kernel, bandwidths, n_prior_samples)
        else:  # reads [mu, log_var]: one collective
            self.divergence = AggregateKL(n_prior_samples)

    def latent_metrics(self, mu: Tensor, y: Tensor | None,
                       z: Tensor | None = None) -> dict[str, float]:
        if y is None:
            return {}
        clusters = assign_clusters(mu.to(self.device), self.prior)
        return {"nmi": nmi(y, clusters), "purity": cluster_purity(y, clusters)}

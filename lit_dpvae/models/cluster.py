"""ClusterVAE: mixture-of-Gaussians prior, Monte Carlo per-record KL plus λ·KL(p ‖ q_agg)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lit_dpvae.divergences import AggregateKL
from lit_dpvae.metrics.latent import assign_clusters, cluster_purity, nmi
from lit_dpvae.models.base import BaseVAE
from lit_dpvae.priors import MixtureOfGaussians


class ClusterVAE(BaseVAE):
    """ℓ_i = recon_i + β·(1/K) Σ_k [log q(z_ik|x_i) − log p(z_ik)], p = Σ_c π_c N(μ_c, s² I),
    plus λ·KL(p ‖ q_agg) (``AggregateKL``) on the batch's (μ_i, log σ_i²), which pulls the batch's
    posteriors onto every component. Cluster of a record: ``prior.assign(mu)``.

    Validation logs ``val/nmi`` and ``val/purity`` against the labels when the data have them.
    Shapes: ``x [n, *data_shape] -> recon, kl [n]; kl_agg []``.
    DP: recon, kl sample-wise; ``kl_agg`` batch-wise (log-sum-exp over the batch; privatised as
    one clipped vector, docs/privacy.md §3.3).
    Reference: Dilokthanakul et al., arXiv 1611.02648; Hoffman & Johnson, ELBO surgery (2016).

    Args:
        lam: λ, weight of the aggregate KL (default 1).
        n_components, radius, scale, layout, seed: see ``lit_dpvae.priors.MixtureOfGaussians``.
        n_prior_samples: M prior samples of ``AggregateKL``.
        **kwargs: ``BaseVAE`` arguments.
    """

    divergence_key = "kl_agg"

    def __init__(
        self,
        lam: float = 1.0,
        n_components: int = 10,
        radius: float = 3.0,
        scale: float = 0.5,
        layout: str = "circle",
        seed: int = 0,
        n_prior_samples: int = 256,
        **kwargs: Any,
    ) -> None:
        super().__init__(lam=lam, **kwargs)
        self.prior = MixtureOfGaussians(self.latent_dim, n_components, radius, scale, layout, seed)
        self.divergence = AggregateKL(n_prior_samples)  # reads [mu, log_var]: one collective

    def latent_metrics(self, mu: Tensor, y: Tensor | None) -> dict[str, float]:
        if y is None:
            return {}
        clusters = assign_clusters(mu.to(self.device), self.prior)
        return {"nmi": nmi(y, clusters), "purity": cluster_purity(y, clusters)}

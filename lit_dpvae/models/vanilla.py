"""VanillaVAE: N(0, I) prior, closed-form per-record KL, no divergence."""

from __future__ import annotations

from typing import Any

from lit_dpvae.models.base import BaseVAE
from lit_dpvae.privacy.terms import register_batch_terms


@register_batch_terms
class VanillaVAE(BaseVAE):
    """ELBO VAE: ℓ_i = −E_q log p(x_i|z) + β·KL(N(μ_i, σ_i²) ‖ N(0, I)) (closed form).

    Shapes: ``x [n, *data_shape] -> recon, kl [n]``; no batch-wise term.
    DP: sample-wise only: term i reads x_i only, so plain DP-SGD applies (γ = 1).
    Reference: Kingma & Welling, arXiv 1312.6114.

    Args: see ``BaseVAE`` (``lam`` is unused: there is no divergence).
    """

    analytic_kl = True

    def __init__(self, **kwargs: Any) -> None:
        if kwargs.get("lam", 0.0) != 0.0:
            raise ValueError("VanillaVAE has no divergence term: lam must be 0")
        super().__init__(**kwargs)

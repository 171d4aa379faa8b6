"""InfoVAE: N(0, I) prior, closed-form per-record KL plus λ·MMD(q_agg, p)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lit_dpvae.divergences import MMD, MMD_BANDWIDTHS
from lit_dpvae.models.base import BaseVAE


class InfoVAE(BaseVAE):
    """MMD-VAE: ℓ_i = recon_i + β·KL(q(z|x_i) ‖ N(0, I)), plus λ·MMD²({z_i}, {w_m ~ N(0, I)}).

    The MMD reads one code per record, ``z[:, 0]`` (the first of the K samples), so codes of a
    batch are i.i.d. draws of the aggregate posterior and the U-statistic is unbiased.
    Shapes: ``x [n, *data_shape] -> recon, kl [n]; mmd []``.
    DP: recon, kl sample-wise; ``mmd`` pairwise-decomposable (docs/privacy.md §8).
    Reference: Zhao, Song, Ermon, InfoVAE, arXiv 1706.02262.

    Args:
        lam: λ, weight of the MMD (default 10).
        kernel, bandwidths, n_prior_samples: see ``lit_dpvae.divergences.MMD``.
        **kwargs: ``BaseVAE`` arguments.
    """

    analytic_kl = True
    divergence_key = "mmd"

    def __init__(
        self,
        lam: float = 10.0,
        kernel: str = "imq",
        bandwidths: Sequence[float] = MMD_BANDWIDTHS,
        n_prior_samples: int = 256,
        **kwargs: Any,
    ) -> None:
        super().__init__(lam=lam, **kwargs)
        self.divergence = MMD(kernel, bandwidths, n_prior_samples)

"""SparseVAE: spike-and-slab prior, Monte Carlo per-record KL plus a per-record Hoyer sparsity
term (default) or λ·dimension-wise MMD."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from lit_dpvae.divergences import SPIKE_BANDWIDTHS, DimensionWiseMMD
from lit_dpvae.metrics.latent import hoyer_sparsity
from lit_dpvae.models.base import BaseVAE
from lit_dpvae.priors import SpikeAndSlab
from lit_dpvae.privacy.terms import register_batch_terms

#: λ of the per-record Hoyer penalty (``divergence="hoyer"``) by likelihood, chosen on
#: validation splits (experiments/results/divergence_effect.md): the Gaussian reconstruction's
#: gradient (scale 0.1) is far larger than a Bernoulli pixel's, so its records need a larger
#: weight for the same balance. Other likelihoods (Laplace, a table's mixed one, a user's) get
#: the Bernoulli value: not validated.
HOYER_LAM_BY_LIKELIHOOD = {"bernoulli": 3.0, "gaussian": 10.0}
#: codes with ‖μ_i‖₂ below this get no Hoyer term (its gradient grows like 1/‖μ_i‖₂)
HOYER_FLOOR = 1e-6


def _default_lam(divergence: str, likelihood: Any, schema: Any) -> float:
    """λ when none is given: the MMD's 10, or the Hoyer term's for the likelihood (``"auto"``
    without a schema is Bernoulli; any other, a table's mixed one included, gets Bernoulli's)."""
    if divergence != "hoyer":
        return 10.0
    name = "bernoulli" if likelihood == "auto" and schema is None else likelihood
    default = HOYER_LAM_BY_LIKELIHOOD["bernoulli"]
    return HOYER_LAM_BY_LIKELIHOOD.get(name, default) if isinstance(name, str) else default


@register_batch_terms
class SparseVAE(BaseVAE):
    """ℓ_i = recon_i + β·(1/K) Σ_k [log q(z_ik|x_i) − log p(z_ik)] + hoyer_i, p = spike-and-slab,
    with the sparsity term (``divergence="hoyer"``, the default)
    ``hoyer_i = λ·(‖μ_i‖₁/‖μ_i‖₂ − 1)/(√d − 1)`` ∈ [0, λ] on record i's posterior mean μ_i: one
    minus its Hoyer sparsity, scale-invariant. It reads record i only, so it is sample-wise:
    per-record clipping covers it, there is no batch-wise term, and ``mechanism="auto"`` runs
    DP-SGD (term-wise with the sample part only). Per-record clipping keeps it in proportion to
    the record's reconstruction, so it survives DP; on digits it raises the standardised Hoyer
    sparsity by ≈ 0.25 without privacy and ≈ 0.3 at ε ∈ {1, 10}
    (experiments/results/divergence_effect.md).

    ``divergence="dim_mmd"`` instead adds the batch-wise λ·Σ_j MMD²(μ[:, j], p(z_j)) on the
    posterior means (``reads="mean"``), Mathieu et al.'s divergence: pairwise-decomposable
    (docs/privacy.md §8), but its effect does not survive the pair clipping (the results page,
    *Why SparseVAE's divergence does not survive DP*). Its default bandwidths are small
    (``SPIKE_BANDWIDTHS``: length scales ≈ 0.045 … 1.4 for d = 1) so the 1-D kernels can tell the
    spike (scale 0.05) from a merely narrow marginal; the InfoVAE defaults cannot.
    Validation logs ``val/hoyer``: Hoyer sparsity of the posterior means with each dimension
    standardised over the epoch (Mathieu et al.: collapsed dimensions are not sparsity), and
    ``val/hoyer_raw`` without standardisation.
    Shapes: ``x [n, *data_shape] -> recon, kl, hoyer [n]`` (``dim_mmd []``).
    DP: recon, kl, hoyer sample-wise; ``dim_mmd`` pairwise-decomposable (docs/privacy.md §8).
    References: Hoyer, JMLR 2004; Mathieu, Rainforth, Siddharth, Teh, arXiv 1812.02833.

    Args:
        lam: λ, weight of the sparsity term. Default for ``"hoyer"``: 3 with the Bernoulli
            likelihood (the default), 10 with ``likelihood="gaussian"`` (its reconstruction's
            gradient is far larger), 3 otherwise (``HOYER_LAM_BY_LIKELIHOOD``, chosen on
            validation splits); 10 for ``"dim_mmd"``.
        gamma: see ``lit_dpvae.priors.SpikeAndSlab``.
        spike_scale: see ``lit_dpvae.priors.SpikeAndSlab``.
        slab_scale: see ``lit_dpvae.priors.SpikeAndSlab``.
        kernel: ``"dim_mmd"`` only; see ``lit_dpvae.divergences.DimensionWiseMMD``.
        bandwidths: ``"dim_mmd"`` only; see ``lit_dpvae.divergences.DimensionWiseMMD``.
        n_prior_samples: ``"dim_mmd"`` only; see ``lit_dpvae.divergences.DimensionWiseMMD``.
        reads: ``"dim_mmd"`` only: what the MMD compares with the prior marginals, the
            posterior means ``"mean"`` (default) or one sample per record ``"sample"`` (the
            posterior noise fills the slab, so the MMD is met by shrinking every dimension).
        divergence: ``"hoyer"`` (default: the sample-wise term above) or ``"dim_mmd"`` (the
            batch-wise dimension-wise MMD; the default before the Hoyer term).
        **kwargs: ``BaseVAE`` arguments.
    """

    divergence_key = "dim_mmd"

    def __init__(
        self,
        lam: float | None = None,
        gamma: float = 0.8,
        spike_scale: float = 0.05,
        slab_scale: float = 1.0,
        kernel: str = "imq",
        bandwidths: Sequence[float] = SPIKE_BANDWIDTHS,
        n_prior_samples: int = 256,
        reads: str = "mean",
        divergence: str = "hoyer",
        **kwargs: Any,
    ) -> None:
        if divergence not in ("dim_mmd", "hoyer"):
            raise ValueError(
                f"SparseVAE: divergence={divergence!r} is not known; use 'dim_mmd' (batch-wise "
                "dimension-wise MMD) or 'hoyer' (sample-wise per-record Hoyer penalty)"
            )
        if divergence == "hoyer":  # the MMD's settings would be silently ignored
            mmd_only = {"kernel": (kernel, "imq"), "bandwidths": (tuple(bandwidths),
                                                                  tuple(SPIKE_BANDWIDTHS)),
                        "n_prior_samples": (n_prior_samples, 256), "reads": (reads, "mean")}
            given = [name for name, (value, default) in mmd_only.items() if value != default]
            if given:
                raise ValueError(
                    f"SparseVAE: {', '.join(given)} only apply to divergence='dim_mmd' (the "
                    "default 'hoyer' term has no kernel): pass divergence='dim_mmd' or drop them"
                )
        if lam is None:
            lam = _default_lam(divergence, kwargs.get("likelihood", "auto"),
                               kwargs.get("schema"))
        if divergence == "hoyer":
            # no batch-wise term (set before BaseVAE's checks read it: label_prior is allowed)
            self.divergence_key = None
        super().__init__(lam=lam, **kwargs)
        self.sparsity_term = divergence
        if divergence == "hoyer" and self.latent_dim < 2:
            raise ValueError("SparseVAE: divergence='hoyer' needs latent_dim >= 2")
        self.prior = SpikeAndSlab(self.latent_dim, gamma, spike_scale, slab_scale)
        self.divergence = None if divergence == "hoyer" else \
            DimensionWiseMMD(kernel, bandwidths, n_prior_samples, reads)

    def extra_sample_terms(self, mu: Tensor, log_var: Tensor, z: Tensor) -> dict[str, Tensor]:
        if self.sparsity_term != "hoyer" or self.lam == 0.0:
            return {}
        # float64: a float32 code of 1e20 would overflow ‖μ_i‖₂² and give l1/l2 = 0. The ratio
        # lies in [1, √d] (clamped against rounding). Its gradient grows like 1/‖μ_i‖₂, so codes
        # with ‖μ_i‖₂ < HOYER_FLOOR get ratio l1/HOYER_FLOOR, clamped to 1: term 0 and gradient
        # 0 (a code of zeros included), never a float32 overflow that would drop the record.
        m = mu.double()
        sqrt_d = math.sqrt(self.latent_dim)
        l1, l2 = m.abs().sum(1), m.norm(dim=1)
        ratio = l1 / l2.clamp_min(HOYER_FLOOR)
        term = (ratio.clamp(1.0, sqrt_d) - 1.0) / (sqrt_d - 1.0)
        return {"hoyer": (self.lam * term).to(mu.dtype)}

    @classmethod
    def legacy_hparams(cls, hparams: dict[str, Any]) -> dict[str, Any]:
        """Hyper-parameters saved before the Hoyer term have no ``divergence``: they were
        trained with the dimension-wise MMD (``BaseVAE.on_load_checkpoint`` refuses them as
        the default Hoyer model)."""
        return {"divergence": "dim_mmd", **hparams}

    def latent_metrics(self, mu: Tensor, y: Tensor | None,
                       z: Tensor | None = None) -> dict[str, float]:
        if self.latent_dim < 2:
            return {}
        return {
            "hoyer": hoyer_sparsity(mu, standardise=True),
            "hoyer_raw": hoyer_sparsity(mu),
        }

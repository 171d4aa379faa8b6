"""Batch-level divergences between the aggregate posterior of a batch and the prior.

Each class declares ``composition`` ∈ {"sample-wise", "pairwise", "batch-wise"}; the DP strategy
dispatches on it (DESIGN §2.3–2.4) and raises on anything else. Inputs are the batch's codes
*after* ``model.gather_for_batch_terms`` (identity on one process, an all-gather across ranks).
All prior samples come from the global torch RNG.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from lit_dpvae.priors import Prior, normal_log_density

COMPOSITIONS = ("sample-wise", "pairwise", "batch-wise")


class MMDPieces(NamedTuple):
    """The three U-statistic means of MMD²: ``MMD² = zz + ww − 2·zw``.

    zz = (1/(n(n−1))) Σ_{i≠j} k(z_i, z_j);  ww = (1/(M(M−1))) Σ_{m≠m'} k(w_m, w_m');
    zw = (1/(nM)) Σ_{i,m} k(z_i, w_m). With a leading batch of dimensions (dimension-wise MMD)
    each piece has that leading shape.
    """

    zz: Tensor
    ww: Tensor
    zw: Tensor


class Divergence(nn.Module):
    """Base class. Subclasses set ``composition`` and document a ``DP:`` line."""

    composition: str = "batch-wise"


class MMD(Divergence):
    """Squared maximum mean discrepancy between the batch codes and M prior samples, unbiased
    U-statistic: MMD² = zz + ww − 2·zw (see ``MMDPieces``). Shapes: ``z [n, d] -> []``.

    Kernel (``c = 2·d``, summed over the bandwidths ``s``):
    inverse multiquadric ``k(a, b) = Σ_s c·s / (c·s + ‖a − b‖²)`` (default, heavy tails, as in
    WAE) or RBF ``k(a, b) = Σ_s exp(−‖a − b‖² / (c·s))``.
    Needs n ≥ 2 for the zz term: for n < 2 the divergence is 0 (connected to the graph).

    DP: pairwise-decomposable: couples all z of the batch, but only through pairs k(z_i, z_j)
    and k(z_i, w_m) with data-independent w (DESIGN §2.4).
    Reference: Gretton et al., JMLR 2012; Zhao, Song, Ermon, InfoVAE, arXiv 1706.02262;
    Tolstikhin et al., WAE, arXiv 1711.01558.
    """

    composition = "pairwise"

    def __init__(
        self,
        kernel: str = "imq",
        bandwidths: Sequence[float] = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0),
        n_prior_samples: int = 256,
    ) -> None:
        super().__init__()
        if kernel not in ("imq", "rbf"):
            raise ValueError(f"unknown kernel {kernel!r}: use 'imq' or 'rbf'")
        if n_prior_samples < 2:
            raise ValueError("n_prior_samples must be >= 2 (the ww U-statistic needs pairs)")
        if not bandwidths or min(bandwidths) <= 0:
            raise ValueError("bandwidths must be a non-empty list of positive numbers")
        self.kernel_name = kernel
        self.bandwidths = tuple(float(b) for b in bandwidths)
        self.n_prior_samples = int(n_prior_samples)

    def kernel(self, a: Tensor, b: Tensor) -> Tensor:
        """k(a, b) element-wise over broadcastable ``[..., d]`` inputs -> ``[...]``."""
        r2 = ((a - b) ** 2).sum(-1)
        c = 2.0 * a.shape[-1]
        if self.kernel_name == "imq":
            return sum(c * s / (c * s + r2) for s in self.bandwidths)  # type: ignore[return-value]
        return sum(torch.exp(-r2 / (c * s)) for s in self.bandwidths)  # type: ignore[return-value]

    def gram(self, a: Tensor, b: Tensor) -> Tensor:
        """Kernel matrix: ``a [..., n, d], b [..., m, d] -> [..., n, m]``."""
        return self.kernel(a[..., :, None, :], b[..., None, :, :])

    def pieces(self, z: Tensor, w: Tensor) -> MMDPieces:
        """The U-statistic pieces for codes ``z [..., n, d]`` (n ≥ 2) and prior samples
        ``w [..., M, d]``."""
        n, m = z.shape[-2], w.shape[-2]
        k_zz, k_ww = self.gram(z, z), self.gram(w, w)
        off_z = k_zz.sum((-2, -1)) - k_zz.diagonal(dim1=-2, dim2=-1).sum(-1)
        off_w = k_ww.sum((-2, -1)) - k_ww.diagonal(dim1=-2, dim2=-1).sum(-1)
        zz = off_z / (n * (n - 1))
        ww = off_w / (m * (m - 1))
        zw = self.gram(z, w).mean((-2, -1))
        return MMDPieces(zz, ww, zw)

    def forward(self, z: Tensor, prior: Prior) -> Tensor:
        if z.shape[0] < 2:
            return z.sum() * 0.0
        return self.value(z, self.draw(prior).to(z))

    # ---- pair decomposition (DESIGN §2.4, docs/privacy.md §8) --------------------------------
    def draw(self, prior: Prior) -> Tensor:
        """The M prior samples ``w [M, d]`` that ``forward`` uses (same RNG consumption)."""
        return prior.sample(self.n_prior_samples)

    def value(self, z: Tensor, w: Tensor) -> Tensor:
        """MMD² for codes ``z [n, d]`` (n ≥ 2) and given prior samples ``w [M, d]``."""
        p = self.pieces(z, w)
        return p.zz + p.ww - 2 * p.zw

    def _dk_dr2(self, r2: Tensor, c: float) -> Tensor:
        """dk/d(r²) of the radial kernel at squared distance ``r2``."""
        if self.kernel_name == "imq":
            return sum(-c * s / (c * s + r2) ** 2 for s in self.bandwidths)  # type: ignore
        return sum(-torch.exp(-r2 / (c * s)) / (c * s) for s in self.bandwidths)  # type: ignore

    #: ∇₁k(a, b) = pair_scale(‖a − b‖², d)·(a − b): lets the pairwise mechanism skip [n, n, d].
    radial = True

    def pair_scale(self, r2: Tensor, d: int) -> Tensor:
        """φ with ∇₁k(a, b) = φ(‖a − b‖²)·(a − b) for d-dimensional inputs: ``2·k'(r²)``."""
        return 2.0 * self._dk_dr2(r2, 2.0 * d)

    def pair_grad(self, a: Tensor, b: Tensor) -> Tensor:
        """∇₁k(a, b) = 2 (a − b) k'(‖a − b‖²), broadcast ``[..., d] -> [..., d]``.

        With it ``n·∇_z MMD²`` at row i is ``(2/(n−1)) Σ_{j≠i} ∇₁k(z_i, z_j) − (2/M) Σ_m
        ∇₁k(z_i, w_m)`` (the pair decomposition the pairwise mechanism clips)."""
        diff = a - b
        r2 = (diff**2).sum(-1, keepdim=True)
        return 2.0 * diff * self._dk_dr2(r2, 2.0 * a.shape[-1])


class DimensionWiseMMD(MMD):
    """Σ_j MMD²(z[:, j], w[:, j]): one 1-D MMD per latent dimension against samples of the prior
    marginal p(z_j) (``prior.sample_dims``), same kernel and U-statistic as ``MMD`` with d = 1.
    Matching marginals, not the joint, is what drives per-dimension sparsity.
    Shapes: ``z [n, d] -> []``; 0 for n < 2.

    DP: pairwise-decomposable: couples all z of the batch through pairs only (DESIGN §2.4).
    Reference: Mathieu, Rainforth, Siddharth, Teh, "Disentangling disentanglement in VAEs",
    arXiv 1812.02833.
    """

    composition = "pairwise"

    radial = False  # the additive kernel Σ_j k₁(a_j, b_j) is not radial in R^d

    def draw(self, prior: Prior) -> Tensor:
        return prior.sample_dims(self.n_prior_samples)

    def value(self, z: Tensor, w: Tensor) -> Tensor:
        p = self.pieces(z.T[..., None], w.T[..., None])  # [d, n, 1], [d, M, 1] -> [d]
        return (p.zz + p.ww - 2 * p.zw).sum()

    def pair_grad(self, a: Tensor, b: Tensor) -> Tensor:
        """∇₁ of the additive kernel ``Σ_j k₁(a_j, b_j)`` (1-D kernels, c = 2): the same
        U-statistic as the sum of per-dimension MMD², so the same pair decomposition holds."""
        diff = a - b
        return 2.0 * diff * self._dk_dr2(diff**2, 2.0)


class AggregateKL(Divergence):
    """Mini-batch estimate of the inclusive KL(p(z) ‖ q_agg(z)), q_agg = (1/n) Σ_i q(z | x_i):

        D = mean_m [ log p(w_m) − logsumexp_i log N(w_m; μ_i, diag σ_i²) + log n ],  w_m ~ p.

    It penalises prior mass (e.g. a mixture component) that no posterior in the batch covers.
    Shapes: ``mu, log_var [n, d] -> []``; 0 for n = 0.

    DP: batch-wise: couples all (μ_i, σ_i) of the batch through the log-sum-exp (not a sum of
    pairs), so it is privatised as one clipped vector (DESIGN §2.3).
    Reference: Makhzani et al., adversarial autoencoders, arXiv 1511.05644 (aggregate-posterior
    matching); Hoffman & Johnson, "ELBO surgery" (2016).
    """

    composition = "batch-wise"

    def __init__(self, n_prior_samples: int = 256) -> None:
        super().__init__()
        if n_prior_samples < 1:
            raise ValueError("n_prior_samples must be >= 1")
        self.n_prior_samples = int(n_prior_samples)

    def forward(self, mu: Tensor, log_var: Tensor, prior: Prior) -> Tensor:
        n = mu.shape[0]
        if n == 0:
            return (mu.sum() + log_var.sum()) * 0.0
        w = prior.sample(self.n_prior_samples).to(mu)  # [M, d]
        log_q = normal_log_density(w[:, None, :], mu, log_var).sum(-1)  # [M, n]
        return (prior.log_prob(w) - torch.logsumexp(log_q, dim=1) + math.log(n)).mean()

"""Batch-level divergences between the aggregate posterior of a batch and the prior.

The interface, one for every divergence (``Divergence``):

* ``codes(z, mu, log_var) -> [n, c]``: what the divergence reads of each record, from the
  reparameterised samples ``z [n, K, d]`` and the posterior ``mu, log_var [n, d]``. Row i must
  depend on record i only (the record-wise model contract, docs/privacy.md §1).
* ``forward(codes, prior) -> []``: the divergence of the batch's codes ``[N, c]`` *after*
  ``model.gather_for_batch_terms`` (identity on one process, an all-gather across ranks). All
  prior samples come from the global torch RNG.

Each class declares ``composition`` ∈ ``COMPOSITIONS``; the DP mechanisms dispatch on it:
"batch-wise" divergences are privatised as one clipped vector (term-wise DP-SGD's batch part,
docs/privacy.md §3.3); "pairwise" ones (``PairwiseDivergence``: kernel U-statistics) also give
their pair decomposition, which ``PairwiseDPSGD`` clips pair by pair (docs/privacy.md §8).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from lit_dpvae.priors import Prior, normal_log_density

COMPOSITIONS = ("sample-wise", "pairwise", "batch-wise")

#: Default bandwidths of ``MMD`` (InfoVAE): kernel scales for codes of unit scale in R^d.
MMD_BANDWIDTHS: tuple[float, ...] = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
#: Default bandwidths of SparseVAE's ``DimensionWiseMMD`` (length scales ≈ 0.045 … 1.4 for
#: d = 1): small enough for the 1-D kernels to tell a spike of scale 0.05 from a merely narrow
#: marginal, which ``MMD_BANDWIDTHS`` cannot.
SPIKE_BANDWIDTHS: tuple[float, ...] = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0)

#: What an ``MMD`` compares with the prior samples: one z ~ q(z|x) per record or its mean μ.
READS: tuple[str, ...] = ("sample", "mean")

#: What ``PairwiseDPSGD`` calls on a ``PairwiseDivergence`` (``pair_scale`` only when radial).
PAIRWISE_INTERFACE = ("draw", "value", "pair_grad")


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
    """Base class of batch-wise divergences D(codes; prior) (see the module docstring).

    Subclasses implement ``forward(codes, prior) -> []`` and, when they read something else
    than one reparameterised sample per record (``z[:, 0]``), ``codes``; they set
    ``composition`` and document a ``DP:`` line. A divergence that is a kernel U-statistic
    subclasses ``PairwiseDivergence`` instead: a ``Divergence`` that declares
    ``composition = "pairwise"`` without it is refused when the class is defined.
    """

    composition: ClassVar[str] = "batch-wise"

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if cls.composition not in COMPOSITIONS:
            raise TypeError(
                f"{cls.__name__}.composition is {cls.composition!r}; it must be one of "
                f"{COMPOSITIONS}"
            )
        pairwise_base = globals().get("PairwiseDivergence")  # None while it is being defined
        if (cls.composition == "pairwise" and pairwise_base is not None
                and not issubclass(cls, pairwise_base)):
            raise TypeError(
                f"{cls.__name__} declares composition 'pairwise' but is not a "
                "lit_dpvae.divergences.PairwiseDivergence: the pairwise mechanism needs its pair "
                f"decomposition ({', '.join(PAIRWISE_INTERFACE)}, and pair_scale when radial). "
                "Subclass PairwiseDivergence, or declare composition 'batch-wise'."
            )

    def codes(self, z: Tensor, mu: Tensor, log_var: Tensor) -> Tensor:
        """The per-record codes ``[n, c]`` that ``forward`` reads, from ``z [n, K, d]`` and
        ``mu, log_var [n, d]``. Default: one reparameterised sample per record, ``z[:, 0]``
        (the first of the K), so a batch's codes are i.i.d. draws of the aggregate
        posterior."""
        return z[:, 0]

    def forward(self, codes: Tensor, prior: Prior) -> Tensor:
        """D (a scalar) of the batch's gathered codes ``[N, c]`` against ``prior``."""
        raise NotImplementedError  # pragma: no cover - abstract: every subclass defines it


class PairwiseDivergence(Divergence):
    """A kernel U-statistic ``D = zz + ww − 2·zw`` (``MMDPieces``) of the codes against
    data-independent prior samples: what ``PairwiseDPSGD`` privatises pair by pair
    (docs/privacy.md §8). It declares, explicitly, what that mechanism needs:

    * ``draw(prior) -> w [M, c]``: the prior samples (global torch RNG; M fixed, data-independent);
    * ``value(codes [N, c], w [M, c]) -> []``: D for given samples, N ≥ 2;
    * ``pair_grad(a, b) -> [..., c]``: ``∇₁k(a, b)`` of the (symmetric) kernel behind ``value``,
      broadcast over ``[..., c]`` inputs;
    * ``radial``: True when ``∇₁k(a, b) = pair_scale(‖a − b‖², c)·(a − b)``; then
      ``pair_scale(r2, c) -> r2.shape`` too (lets the mechanism skip ``[n, N, c]`` pair tensors).

    ``forward`` is then fixed: 0 (connected to the graph) for N < 2, else
    ``value(codes, draw(prior))``, and ``estimate`` returns the samples along with D. A subclass
    missing one of these methods is refused when it is instantiated.
    """

    composition: ClassVar[str] = "pairwise"
    #: ∇₁k(a, b) = pair_scale(‖a − b‖², c)·(a − b) (see the class docstring).
    radial: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        needed = PAIRWISE_INTERFACE + (("pair_scale",) if type(self).radial else ())
        missing = [m for m in needed
                   if getattr(type(self), m) is getattr(PairwiseDivergence, m)]
        if missing:
            raise TypeError(
                f"{type(self).__name__} is a PairwiseDivergence but does not implement "
                f"{', '.join(missing)}: the pairwise mechanism (PairwiseDPSGD) needs "
                f"{', '.join(needed)}"
                + (" (pair_scale because radial = True)" if type(self).radial else "")
            )

    def draw(self, prior: Prior) -> Tensor:
        """The M prior samples ``w [M, c]`` that ``forward`` uses."""
        raise NotImplementedError  # pragma: no cover - abstract (checked at instantiation)

    def value(self, codes: Tensor, w: Tensor) -> Tensor:
        """D for codes ``[N, c]`` (N ≥ 2) and given prior samples ``w [M, c]``."""
        raise NotImplementedError  # pragma: no cover - abstract (checked at instantiation)

    def pair_grad(self, a: Tensor, b: Tensor) -> Tensor:
        """∇₁k(a, b), broadcast ``[..., c] -> [..., c]``."""
        raise NotImplementedError  # pragma: no cover - abstract (checked at instantiation)

    def pair_scale(self, r2: Tensor, d: int) -> Tensor:
        """φ with ∇₁k(a, b) = φ(‖a − b‖²)·(a − b) for d-dimensional inputs (radial kernels)."""
        raise NotImplementedError  # pragma: no cover - abstract (checked at instantiation)

    def estimate(self, codes: Tensor, prior: Prior) -> tuple[Tensor, Tensor]:
        """``(D, w)``: the divergence of the gathered codes ``[N, c]`` and the prior samples it
        used (``[0, c]`` and D = 0, connected to the graph, for N < 2: nothing is drawn)."""
        if codes.shape[0] < 2:
            return codes.sum() * 0.0, codes.new_zeros(0, codes.shape[1])
        w = self.draw(prior).to(codes)
        return self.value(codes, w), w

    def forward(self, codes: Tensor, prior: Prior) -> Tensor:
        return self.estimate(codes, prior)[0]


class _KernelSum(torch.autograd.Function):
    """``k(r²) = Σ_s ψ(r², c·s)`` with ψ = ``cs/(cs + r²)`` (IMQ) or ``exp(−r²/cs)`` (RBF), and
    its derivative ``dk/dr² = Σ_s −cs/(cs + r²)²`` or ``Σ_s −exp(−r²/cs)/cs``, both accumulated
    in place: only ``r²`` is saved for the backward pass (autograd through the plain sum would
    keep one tensor per bandwidth and op). Same values as the plain sum up to rounding."""

    @staticmethod
    def forward(ctx, r2: Tensor, css: tuple[float, ...], imq: bool) -> Tensor:  # type: ignore
        ctx.save_for_backward(r2)
        ctx.css, ctx.imq = css, imq
        out, buf = torch.zeros_like(r2), torch.empty_like(r2)
        for cs in css:
            if imq:
                torch.add(r2, cs, out=buf).reciprocal_()
                out.add_(buf, alpha=cs)
            else:
                torch.mul(r2, -1.0 / cs, out=buf).exp_()
                out.add_(buf)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (r2,) = ctx.saved_tensors
        dk, buf = torch.zeros_like(r2), torch.empty_like(r2)
        for cs in ctx.css:
            if ctx.imq:
                torch.add(r2, cs, out=buf).reciprocal_().square_()
                dk.add_(buf, alpha=-cs)
            else:
                torch.mul(r2, -1.0 / cs, out=buf).exp_()
                dk.add_(buf, alpha=-1.0 / cs)
        return dk.mul_(grad), None, None


class MMD(PairwiseDivergence):
    """Squared maximum mean discrepancy between the batch codes and M prior samples, unbiased
    U-statistic: MMD² = zz + ww − 2·zw (see ``MMDPieces``). Shapes: ``z [n, d] -> []``.

    Kernel (``c = 2·d``, summed over the bandwidths ``s``):
    inverse multiquadric ``k(a, b) = Σ_s c·s / (c·s + ‖a − b‖²)`` (default, heavy tails, as in
    WAE) or RBF ``k(a, b) = Σ_s exp(−‖a − b‖² / (c·s))``.
    Needs n ≥ 2 for the zz term: for n < 2 the divergence is 0 (connected to the graph).
    ``reads`` (``READS``): the codes are one sample ``z ~ q(z|x_i)`` per record (default) or the
    posterior means ``μ_i`` (``"mean"``; see ``codes``).

    DP: pairwise-decomposable: couples all z of the batch, but only through pairs k(z_i, z_j)
    and k(z_i, w_m) with data-independent w (docs/privacy.md §8).
    Reference: Gretton et al., JMLR 2012; Zhao, Song, Ermon, InfoVAE, arXiv 1706.02262;
    Tolstikhin et al., WAE, arXiv 1711.01558.
    """

    #: ∇₁k(a, b) = pair_scale(‖a − b‖², d)·(a − b): lets the pairwise mechanism skip [n, n, d].
    radial = True

    def __init__(
        self,
        kernel: str = "imq",
        bandwidths: Sequence[float] = MMD_BANDWIDTHS,
        n_prior_samples: int = 256,
        reads: str = "sample",
    ) -> None:
        super().__init__()
        if reads not in READS:
            raise ValueError(f"unknown reads {reads!r}: use one of {READS}")
        if kernel not in ("imq", "rbf"):
            raise ValueError(f"unknown kernel {kernel!r}: use 'imq' or 'rbf'")
        if n_prior_samples < 2:
            raise ValueError("n_prior_samples must be >= 2 (the ww U-statistic needs pairs)")
        if not bandwidths or min(bandwidths) <= 0:
            raise ValueError("bandwidths must be a non-empty list of positive numbers")
        self.kernel_name = kernel
        self.bandwidths = tuple(float(b) for b in bandwidths)
        self.n_prior_samples = int(n_prior_samples)
        self.reads = reads

    def codes(self, z: Tensor, mu: Tensor, log_var: Tensor) -> Tensor:
        """``reads="sample"``: one reparameterised sample per record, ``z[:, 0]`` (the aggregate
        posterior); ``reads="mean"``: the posterior means ``mu`` (the distribution of the
        codes' centres, without the posterior noise). Row i depends on record i only either
        way, so the U-statistic stays pairwise-decomposable."""
        return mu if self.reads == "mean" else z[:, 0]

    def kernel(self, a: Tensor, b: Tensor) -> Tensor:
        """k(a, b) element-wise over broadcastable ``[..., d]`` inputs -> ``[...]``."""
        return self.kernel_of_r2(((a - b) ** 2).sum(-1), 2.0 * a.shape[-1])

    def kernel_of_r2(self, r2: Tensor, c: float) -> Tensor:
        """The radial kernel summed over the bandwidths at squared distances ``r2`` (any
        shape), with ``c = 2·d`` (``_KernelSum``: one fused pass forward and backward)."""
        return _KernelSum.apply(r2, tuple(c * s for s in self.bandwidths),
                                self.kernel_name == "imq")

    def gram(self, a: Tensor, b: Tensor) -> Tensor:
        """Kernel matrix: ``a [..., n, d], b [..., m, d] -> [..., n, m]``.

        Squared distances without ``[..., n, m, d]`` temporaries: ``(a_i − b_j)²`` directly for
        d = 1, else ``‖a_i‖² + ‖b_j‖² − 2·a_i·b_j`` (one matmul) clamped at 0 against rounding;
        the diagonal of ``gram(z, z)``, where that rounding sits, is subtracted by ``pieces``
        from the same matrix, so it cancels."""
        d = a.shape[-1]
        if d == 1:
            r2 = (a - b.transpose(-2, -1)).square()
        else:
            r2 = (a.square().sum(-1)[..., :, None] + b.square().sum(-1)[..., None, :]
                  - 2.0 * (a @ b.transpose(-2, -1)))
            r2 = r2.clamp_min(0.0)
        return self.kernel_of_r2(r2, 2.0 * d)

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

    # ---- pair decomposition (PairwiseDivergence; docs/privacy.md §8) --------------------------
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
    Shapes: ``z [n, d] -> []``; 0 for n < 2. SparseVAE uses ``SPIKE_BANDWIDTHS``; the class
    default is ``MMD``'s.

    DP: pairwise-decomposable: couples all z of the batch through pairs only (docs/privacy.md
    §8: its additive kernel Σ_j k₁(a_j, b_j) has exactly this U-statistic).
    Reference: Mathieu, Rainforth, Siddharth, Teh, "Disentangling disentanglement in VAEs",
    arXiv 1812.02833.
    """

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
    Reads the posterior: ``codes(z, mu, log_var) = [mu, log_var]`` (concatenated, ``[n, 2d]``:
    one collective gathers both). Shapes: ``codes [n, 2d] -> []``; 0 for n = 0.

    DP: batch-wise: couples all (μ_i, σ_i) of the batch through the log-sum-exp (not a sum of
    pairs), so it is privatised as one clipped vector (term-wise DP-SGD's batch part,
    docs/privacy.md §3.3).
    Reference: Makhzani et al., adversarial autoencoders, arXiv 1511.05644 (aggregate-posterior
    matching); Hoffman & Johnson, "ELBO surgery" (2016).
    """

    composition = "batch-wise"

    def __init__(self, n_prior_samples: int = 256) -> None:
        super().__init__()
        if n_prior_samples < 1:
            raise ValueError("n_prior_samples must be >= 1")
        self.n_prior_samples = int(n_prior_samples)

    def codes(self, z: Tensor, mu: Tensor, log_var: Tensor) -> Tensor:
        return torch.cat([mu, log_var], dim=-1)

    def forward(self, codes: Tensor, prior: Prior) -> Tensor:
        mu, log_var = codes.chunk(2, dim=-1)
        n = mu.shape[0]
        if n == 0:
            return (mu.sum() + log_var.sum()) * 0.0
        w = prior.sample(self.n_prior_samples).to(mu)  # [M, d]
        log_q = normal_log_density(w[:, None, :], mu, log_var).sum(-1)  # [M, n]
        return (prior.log_prob(w) - torch.logsumexp(log_q, dim=1) + math.log(n)).mean()

"""Priors p(z) over the latent space. Their parameters are buffers, never trainable: the privacy
engine only accounts for parameters inside standard layers, and a prior is data-independent.

Every prior offers ``sample(m) -> [m, d]`` (global torch RNG), ``log_prob(z) -> [...]`` (summed
over the last dimension, so ``[n, d] -> [n]`` and ``[n, K, d] -> [n, K]``) and
``sample_dims(m) -> [m, d]`` whose column ``j`` is distributed as the marginal ``p(z_j)`` (used
by the dimension-wise MMD; columns need not be independent).

``LabelShiftPrior`` is the exception: a class-conditional prior p(z | y) that shifts (and
scales) N(0, I) by label-dependent amounts, learned by trainable layers on the one-hot label
(privatised like every other layer; its KL stays sample-wise).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

_LOG_2PI = math.log(2 * math.pi)


def normal_log_density(z: Tensor, mean: Tensor | float, log_var: Tensor | float) -> Tensor:
    """Element-wise log N(z; mean, exp(log_var)) (no reduction)."""
    log_var_t = torch.as_tensor(log_var, dtype=z.dtype, device=z.device)
    return -0.5 * (_LOG_2PI + log_var_t + (z - mean) ** 2 * torch.exp(-log_var_t))


class Prior(nn.Module):
    """Base class of latent priors (see the module docstring for the interface)."""

    _anchor: Tensor

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {latent_dim}")
        self.latent_dim = int(latent_dim)
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)  # device/dtype

    def sample(self, m: int) -> Tensor:
        raise NotImplementedError

    def log_prob(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def sample_dims(self, m: int) -> Tensor:
        return self.sample(m)

    def _randn(self, *shape: int) -> Tensor:
        return torch.randn(*shape, device=self._anchor.device, dtype=self._anchor.dtype)


class StandardNormal(Prior):
    """p(z) = N(0, I). ``log_prob: [..., d] -> [...]``; ``kl(mu, log_var) -> [n]`` in closed form
    KL(N(μ, diag σ²) ‖ N(0, I)) = ½ Σ_d (μ_d² + σ_d² − log σ_d² − 1).

    DP: sample-wise: the closed-form KL of record i reads (μ_i, log σ²_i) only.
    Reference: Kingma & Welling, arXiv 1312.6114.
    """

    def sample(self, m: int) -> Tensor:
        return self._randn(m, self.latent_dim)

    def log_prob(self, z: Tensor) -> Tensor:
        return normal_log_density(z, 0.0, 0.0).sum(-1)

    @staticmethod
    def kl(mu: Tensor, log_var: Tensor) -> Tensor:
        return 0.5 * (mu**2 + log_var.exp() - log_var - 1.0).sum(-1)


class SpikeAndSlab(Prior):
    """Factorised spike-and-slab: p(z) = Π_d [γ N(z_d; 0, s_spike²) + (1 − γ) N(z_d; 0, s_slab²)].

    A narrow spike (weight γ, default 0.8) makes most coordinates of a code near zero: a sparse
    prior. ``log_prob: [..., d] -> [...]``; ``sample(m) -> [m, d]``.

    DP: data-independent (buffers only); the per-record Monte Carlo KL built on it is sample-wise.
    Reference: Mathieu, Rainforth, Siddharth, Teh, "Disentangling disentanglement",
    arXiv 1812.02833.
    """

    log_weights: Tensor
    scales: Tensor

    def __init__(
        self,
        latent_dim: int,
        gamma: float = 0.8,
        spike_scale: float = 0.05,
        slab_scale: float = 1.0,
    ) -> None:
        super().__init__(latent_dim)
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        if spike_scale <= 0 or slab_scale <= 0:
            raise ValueError("spike_scale and slab_scale must be positive")
        self.gamma = float(gamma)
        self.register_buffer("log_weights", torch.tensor([gamma, 1.0 - gamma]).log())
        self.register_buffer("scales", torch.tensor([spike_scale, slab_scale]))

    def sample(self, m: int) -> Tensor:
        spike = torch.rand(m, self.latent_dim, device=self.scales.device) < self.gamma
        scale = torch.where(spike, self.scales[0], self.scales[1])
        return self._randn(m, self.latent_dim) * scale

    def log_prob(self, z: Tensor) -> Tensor:
        log_var = 2 * self.scales.log()
        comp = normal_log_density(z[..., None], 0.0, log_var) + self.log_weights
        return torch.logsumexp(comp, dim=-1).sum(-1)


class MixtureOfGaussians(Prior):
    """p(z) = Σ_k π_k N(z; μ_k, s² I) with fixed means, scale and weights (uniform by default).

    ``layout="circle"``: means at radius ``radius`` on a circle in dims (0, 1), zero elsewhere;
    ``layout="axes"``: component k at ``±radius·e_j`` (j = k mod d, + for k < d, − after), so
    the components are mutually far apart (distance ``radius·√2``) in a space of ``d`` dims
    instead of crowding a circle; needs ``n_components <= 2·latent_dim``;
    ``layout="random"``: means ``radius · N(0, I)`` drawn from a generator seeded by ``seed``.
    ``log_prob: [..., d] -> [...]``; ``responsibilities(z): [n, d] -> [n, k]``;
    ``assign(z) -> [n]`` the component of highest responsibility.

    DP: data-independent (buffers only); the per-record Monte Carlo KL built on it is sample-wise.
    Reference: Dilokthanakul et al., "Deep unsupervised clustering with Gaussian mixture VAEs",
    arXiv 1611.02648.
    """

    means: Tensor
    log_weights: Tensor
    log_var: Tensor

    def __init__(
        self,
        latent_dim: int,
        n_components: int = 10,
        radius: float = 3.0,
        scale: float = 0.5,
        layout: str = "circle",
        seed: int = 0,
    ) -> None:
        super().__init__(latent_dim)
        if n_components < 1 or scale <= 0:
            raise ValueError("n_components must be >= 1 and scale > 0")
        if layout == "circle":
            if latent_dim < 2:
                raise ValueError("layout='circle' needs latent_dim >= 2; use layout='random'")
            angle = torch.arange(n_components) * (2 * math.pi / n_components)
            means = torch.zeros(n_components, latent_dim)
            means[:, 0], means[:, 1] = radius * angle.cos(), radius * angle.sin()
        elif layout == "axes":
            if n_components > 2 * latent_dim:
                raise ValueError(
                    f"layout='axes' places at most 2·latent_dim = {2 * latent_dim} components "
                    f"(±radius on each axis), got n_components={n_components}: raise latent_dim "
                    "or use layout='circle'")
            k = torch.arange(n_components)
            means = torch.zeros(n_components, latent_dim)
            means[k, k % latent_dim] = radius * (1.0 - 2.0 * (k >= latent_dim).float())
        elif layout == "random":
            gen = torch.Generator().manual_seed(seed)
            means = radius * torch.randn(n_components, latent_dim, generator=gen)
        else:
            raise ValueError(f"unknown layout {layout!r}: use 'circle', 'axes' or 'random'")
        self.n_components = int(n_components)
        self.register_buffer("means", means)
        self.register_buffer("log_weights", torch.full((n_components,), -math.log(n_components)))
        self.register_buffer("log_var", torch.tensor(2 * math.log(scale)))

    def sample(self, m: int) -> Tensor:
        k = torch.multinomial(self.log_weights.exp(), m, replacement=True)
        return self.means[k] + self._randn(m, self.latent_dim) * (0.5 * self.log_var).exp()

    def component_log_prob(self, z: Tensor) -> Tensor:
        """log π_k + log N(z; μ_k, s² I): ``[..., d] -> [..., k]``."""
        lp = normal_log_density(z[..., None, :], self.means, self.log_var).sum(-1)
        return lp + self.log_weights

    def log_prob(self, z: Tensor) -> Tensor:
        return torch.logsumexp(self.component_log_prob(z), dim=-1)

    def responsibilities(self, z: Tensor) -> Tensor:
        return torch.softmax(self.component_log_prob(z), dim=-1)

    def assign(self, z: Tensor) -> Tensor:
        return self.component_log_prob(z).argmax(-1)


class LabelShiftPrior(nn.Module):
    """Class-conditional prior ``p(z | y) = N(μ_y, diag(s_y²))`` as a shift (and optionally a
    scale) of a base prior ``p(ε) = N(0, I)``: ``z = μ_y + s_y ⊙ ε``.

    ``μ_y = means(onehot(y))`` and ``log s_y = log_scales(onehot(y))`` are bias-free Linear
    layers on the one-hot label: trainable layers like any other, privatised with the rest of
    the model. ``means`` starts at N(0, 1) weights (distinct class means from the start),
    ``log_scales`` (only with ``learn_scale``) at 0, i.e. s_y = 1; without it s_y = 1 always.

    * ``to_base(onehot, mu, log_var, z)`` maps a posterior N(μ, σ²) and its samples by
      ``(· − μ_y)/s_y`` into the base prior's frame, where the KL is the base prior's:
      KL(N(μ, σ²) ‖ N(m, s²)) = KL(N((μ − m)/s, σ²/s²) ‖ N(0, I));
    * ``from_base(eps, onehot)`` maps base-prior draws to ``μ_y + s_y ⊙ ε`` (for sampling).
    Shapes: ``onehot [n, num_classes]``, ``mu, log_var [n, d]``, ``z [n, K, d]``, ``eps [n, d]``.

    DP: sample-wise: the KL of record i reads (x_i, y_i) only.
    """

    def __init__(self, num_classes: int, latent_dim: int, learn_scale: bool = False) -> None:
        super().__init__()
        if num_classes < 1 or latent_dim < 1:
            raise ValueError("LabelShiftPrior needs num_classes >= 1 and latent_dim >= 1")
        self.means = nn.Linear(num_classes, latent_dim, bias=False)
        nn.init.normal_(self.means.weight)  # distinct class means from the start
        self.log_scales: nn.Linear | None = None
        if learn_scale:
            self.log_scales = nn.Linear(num_classes, latent_dim, bias=False)
            nn.init.zeros_(self.log_scales.weight)  # s_y = 1: starts as N(μ_y, I)

    def to_base(
        self, onehot: Tensor, mu: Tensor, log_var: Tensor, z: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(mu, log_var, z)`` mapped by ``(· − μ_y)/s_y`` (see the class docstring)."""
        shift = self.means(onehot)
        if self.log_scales is None:
            return mu - shift, log_var, z - shift[:, None]
        log_s = self.log_scales(onehot)
        inv = (-log_s).exp()
        return (mu - shift) * inv, log_var - 2 * log_s, (z - shift[:, None]) * inv[:, None]

    def from_base(self, eps: Tensor, onehot: Tensor) -> Tensor:
        """Base-prior draws ``eps [n, d]`` mapped to ``μ_y + s_y ⊙ ε``."""
        if self.log_scales is not None:
            eps = eps * self.log_scales(onehot).exp()
        return eps + self.means(onehot)

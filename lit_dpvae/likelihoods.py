"""Observation models p(x | z): the decoder outputs their parameters, one tensor ``[m, *shape]``.

Each likelihood returns ``log p(x_i | params_i)`` summed over the data dimensions, shape ``[m]``,
and refuses data outside its support with an explicit error (a Bernoulli log-likelihood of a
pixel value 255 is meaningless, and the DP step would happily train on it).

DP: sample-wise: ``log_prob`` row ``i`` reads only ``x_i`` and ``params_i``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Likelihood(nn.Module):
    """Base class: ``log_prob(x, params) -> [m]`` and ``mean(params) -> [m, *shape]``."""

    def check_support(self, x: Tensor) -> None:
        x = x.detach()
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{type(self).__name__} likelihood: data contain NaN or Inf")

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        raise NotImplementedError

    def mean(self, params: Tensor) -> Tensor:
        raise NotImplementedError


class Bernoulli(Likelihood):
    """log p(x|l) = Σ_d [x_d log σ(l_d) + (1 − x_d) log σ(−l_d)]; params are logits.

    DP: sample-wise: row i reads x_i and its logits only.
    Continuous x in [0, 1] is allowed (the "continuous Bernoulli without normaliser" used by most
    VAE code). Shapes: ``x, logits [m, *shape] -> [m]``.
    Reference: Kingma & Welling, arXiv 1312.6114.
    """

    def check_support(self, x: Tensor) -> None:
        super().check_support(x)
        x = x.detach()
        if x.numel() and (float(x.min()) < 0.0 or float(x.max()) > 1.0):
            raise ValueError(
                f"Bernoulli likelihood needs data in [0, 1], got range [{float(x.min()):.3g}, "
                f"{float(x.max()):.3g}]; scale the data (e.g. pixels / 255) or use Gaussian"
            )

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        self.check_support(x)
        bce = F.binary_cross_entropy_with_logits(params, x, reduction="none")
        return -bce.flatten(1).sum(1)

    def mean(self, params: Tensor) -> Tensor:
        return torch.sigmoid(params)


class Gaussian(Likelihood):
    """log p(x|μ) = Σ_d log N(x_d; μ_d, s²) with a fixed scale ``s``; params are the means.

    Shapes: ``x, mu [m, *shape] -> [m]``. DP: sample-wise: row i reads x_i and μ_i only.
    Reference: Kingma & Welling, arXiv 1312.6114.
    """

    def __init__(self, scale: float = 0.1) -> None:
        super().__init__()
        if scale <= 0:
            raise ValueError(f"Gaussian likelihood scale must be positive, got {scale}")
        self.scale = float(scale)

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        self.check_support(x)
        s = self.scale
        lp = -0.5 * ((x - params) / s) ** 2 - math.log(s) - 0.5 * math.log(2 * math.pi)
        return lp.flatten(1).sum(1)

    def mean(self, params: Tensor) -> Tensor:
        return params

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


class Laplace(Likelihood):
    """log p(x|μ) = Σ_d [−|x_d − μ_d| / b − log 2b] with a fixed scale ``b``; params are the
    locations. Shapes: ``x, mu [m, *shape] -> [m]``. DP: sample-wise: row i reads x_i, μ_i only."""

    def __init__(self, scale: float = 0.1) -> None:
        super().__init__()
        if scale <= 0:
            raise ValueError(f"Laplace likelihood scale must be positive, got {scale}")
        self.scale = float(scale)

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        self.check_support(x)
        b = self.scale
        return (-(x - params).abs() / b - math.log(2 * b)).flatten(1).sum(1)

    def mean(self, params: Tensor) -> Tensor:
        return params

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


def make_likelihood(spec: str | Likelihood, scale: float = 0.1) -> Likelihood:
    """A likelihood from a name (``bernoulli``, ``gaussian``, ``laplace``) or the object itself."""
    if isinstance(spec, Likelihood):
        return spec
    if spec == "bernoulli":
        return Bernoulli()
    if spec == "gaussian":
        return Gaussian(scale)
    if spec == "laplace":
        return Laplace(scale)
    raise ValueError(f"unknown likelihood {spec!r}: use 'bernoulli', 'gaussian' or 'laplace'")

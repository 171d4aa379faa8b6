"""Observation models p(x | z): the decoder outputs their parameters, one tensor ``[m, *shape]``.

Each likelihood returns ``log p(x_i | params_i)`` summed over the data dimensions, shape ``[m]``,
and refuses data outside its support with an explicit error (a Bernoulli log-likelihood of a
pixel value 255 is meaningless, and the DP step would happily train on it).

DP: sample-wise: ``log_prob`` row ``i`` reads only ``x_i`` and ``params_i``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Likelihood(nn.Module):
    """Base class: ``log_prob(x, params) -> [m]``, ``mean(params) -> [m, *shape]`` and
    ``sample(params) -> [m, *shape]`` (one draw of x ~ p(x | params), from the global torch RNG
    or ``generator``)."""

    def check_support(self, x: Tensor) -> None:
        x = x.detach()
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{type(self).__name__} likelihood: data contain NaN or Inf")

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        raise NotImplementedError

    def mean(self, params: Tensor) -> Tensor:
        raise NotImplementedError

    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
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
        outside = (x < 0.0) | (x > 1.0)
        if bool(outside.any()):  # a count, never a value: the records are private
            records = int(outside.reshape(len(x), -1).any(1).sum()) if x.dim() else 1
            raise ValueError(
                f"Bernoulli likelihood needs data in [0, 1], but {records} records have values "
                "outside it; scale the data (e.g. pixels / 255, ArrayDataModule's rescale=True) "
                "or use likelihood='gaussian'"
            )

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        self.check_support(x)
        bce = F.binary_cross_entropy_with_logits(params, x, reduction="none")
        return -bce.flatten(1).sum(1)

    def mean(self, params: Tensor) -> Tensor:
        return torch.sigmoid(params)

    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return torch.bernoulli(torch.sigmoid(params), generator=generator)


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

    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(params.shape, generator=generator, device=params.device,
                            dtype=params.dtype)
        return params + self.scale * noise

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

    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return params + self.scale * laplace_noise(params, generator)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


def laplace_noise(like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Standard Laplace noise shaped like ``like`` (inverse CDF of a uniform in (−1/2, 1/2))."""
    u = torch.rand(like.shape, generator=generator, device=like.device, dtype=like.dtype) - 0.5
    floor = math.log(torch.finfo(like.dtype).tiny)  # u = −1/2 would give −inf
    return -u.sign() * torch.log1p(-2 * u.abs()).clamp_min(floor)


class Tabular(Likelihood):
    """Mixed-type likelihood of an encoded table row, built from its public schema
    (:class:`lit_dpvae.data.schema.Schema`): params have the record's width, and each column
    block contributes its own log-likelihood:

    - numeric (values mapped to [0, 1] by the public bounds): Gaussian or Laplace with the fixed
      scale ``scale`` (on the [0, 1] scale), params are the locations;
    - categorical (one-hot block of k entries): log softmax of the block's k logits at the
      record's category;
    - binary (one entry, 0/1): Bernoulli with the entry's logit.

    ``log_prob(x, params) -> [m]`` sums the columns. DP: sample-wise: row i reads x_i and
    params_i only (every operation is row-wise), so it is one more sample-wise term under every
    mechanism (docs/privacy.md §1). ``sample`` draws a valid encoded record (numeric values
    clamped to [0, 1], exactly one 1 per categorical block); ``mean`` gives the expected
    encoding (the locations clamped to [0, 1], the category probabilities, the Bernoulli
    means); :meth:`Schema.decode` turns either into a table.
    """

    def __init__(self, schema: Any, numeric: str = "gaussian", scale: float = 0.1) -> None:
        super().__init__()
        from lit_dpvae.data.schema import Schema

        if not isinstance(schema, Schema):
            schema = Schema.coerce(schema)
        if numeric not in ("gaussian", "laplace"):
            raise ValueError(f"numeric columns of a tabular likelihood use 'gaussian' or "
                             f"'laplace', got {numeric!r}")
        if scale <= 0:
            raise ValueError(f"tabular likelihood scale must be positive, got {scale}")
        self.schema, self.numeric, self.scale = schema, numeric, float(scale)
        self.blocks = schema.blocks()
        self.width = schema.width

    def _check_shape(self, t: Tensor, what: str) -> None:
        if t.dim() != 2 or t.shape[1] != self.width:
            raise ValueError(f"tabular likelihood: {what} must be [m, {self.width}] (the "
                             f"schema's encoded width), got {tuple(t.shape)}")

    def check_support(self, x: Tensor) -> None:
        super().check_support(x)
        self._check_shape(x, "records")
        x = x.detach()
        for kind, start, stop in self.blocks:
            block = x[:, start:stop]
            if kind == "numeric":
                bad = (block < 0) | (block > 1)
            elif kind == "binary":
                bad = (block != 0) & (block != 1)
            else:
                bad = ((block != 0) & (block != 1)).any(1, keepdim=True) \
                    | (block.sum(1, keepdim=True) != 1)
            if bool(bad.any()):
                raise ValueError(
                    f"tabular likelihood: {int(bad.any(1).sum())} records are not valid "
                    f"encodings in their {kind} column at [{start}:{stop}] (encode tables "
                    "with the schema, e.g. TabularDataModule)")

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        self.check_support(x)
        self._check_shape(params, "params")
        total = torch.zeros(x.shape[0], device=x.device, dtype=params.dtype)
        s = self.scale
        for kind, start, stop in self.blocks:
            xb, pb = x[:, start:stop], params[:, start:stop]
            if kind == "numeric":
                if self.numeric == "gaussian":
                    lp = -0.5 * ((xb - pb) / s) ** 2 - math.log(s) - 0.5 * math.log(2 * math.pi)
                else:
                    lp = -(xb - pb).abs() / s - math.log(2 * s)
            elif kind == "binary":
                lp = -F.binary_cross_entropy_with_logits(pb, xb, reduction="none")
            else:
                lp = xb * F.log_softmax(pb, dim=1)
            total = total + lp.sum(1)
        return total

    def mean(self, params: Tensor) -> Tensor:
        self._check_shape(params, "params")
        parts = []
        for kind, start, stop in self.blocks:
            pb = params[:, start:stop]
            if kind == "numeric":
                parts.append(pb.clamp(0.0, 1.0))
            elif kind == "binary":
                parts.append(torch.sigmoid(pb))
            else:
                parts.append(torch.softmax(pb, dim=1))
        return torch.cat(parts, dim=1)

    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        self._check_shape(params, "params")
        parts = []
        for kind, start, stop in self.blocks:
            pb = params[:, start:stop]
            if kind == "numeric":
                noise = (torch.randn(pb.shape, generator=generator, device=pb.device,
                                     dtype=pb.dtype) if self.numeric == "gaussian"
                         else laplace_noise(pb, generator))
                parts.append((pb + self.scale * noise).clamp(0.0, 1.0))
            elif kind == "binary":
                parts.append(torch.bernoulli(torch.sigmoid(pb), generator=generator))
            else:
                codes = torch.multinomial(torch.softmax(pb, dim=1), 1, generator=generator)
                parts.append(F.one_hot(codes[:, 0], stop - start).to(pb.dtype))
        return torch.cat(parts, dim=1)

    def extra_repr(self) -> str:
        return f"{self.schema!r}, numeric={self.numeric}, scale={self.scale}"


def make_likelihood(spec: str | Likelihood, scale: float = 0.1, schema: Any = None) -> Likelihood:
    """A likelihood from a name (``auto``, ``bernoulli``, ``gaussian``, ``laplace``) or the
    object itself. With a table's ``schema``: :class:`Tabular` (``auto``: Gaussian numeric
    columns; ``gaussian``/``laplace``: that family); ``auto`` without one is Bernoulli."""
    if isinstance(spec, Likelihood):
        if schema is not None and not isinstance(spec, Tabular):
            raise ValueError("a schema needs the tabular likelihood: leave likelihood='auto'")
        return spec
    if schema is not None:
        if spec not in ("auto", "gaussian", "laplace"):
            raise ValueError(
                f"likelihood={spec!r} with a schema: a table's likelihood is built from its "
                "schema; use 'auto' (Gaussian numeric columns) or 'gaussian'/'laplace'")
        return Tabular(schema, "gaussian" if spec == "auto" else spec, scale)
    if spec in ("auto", "bernoulli"):
        return Bernoulli()
    if spec == "gaussian":
        return Gaussian(scale)
    if spec == "laplace":
        return Laplace(scale)
    raise ValueError(
        f"unknown likelihood {spec!r}: use 'auto', 'bernoulli', 'gaussian' or 'laplace'")

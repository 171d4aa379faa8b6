"""Tiny deterministic models for mechanism tests.

Deterministic on purpose: the privacy proofs hold for every fixed realisation of a model's internal
randomness (coupled across neighbouring batches), so the tests fix it to one realisation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lit_dpvae.divergences import MMD, DimensionWiseMMD
from lit_dpvae.privacy import LossTerms, PairwiseDPSGD, PairwiseTerm, global_norm


def coupling_divergence(z: Tensor) -> Tensor:
    """A batch-wise term that couples every record: moments of the batch plus an RBF kernel mean."""
    if z.shape[0] == 0:
        return z.sum()
    mean = z.mean(0)
    var = (z - mean).pow(2).mean(0)
    kernel = torch.exp(-torch.cdist(z, z).pow(2)).mean()
    return mean.pow(2).sum() + (var - 1).pow(2).sum() + kernel


class ToyVAE(nn.Module):
    """MLP encoder/decoder; ``samples`` fixed latent offsets per record (record-major rows)."""

    def __init__(self, d_in: int = 6, hidden: int = 8, d_z: int = 2, samples: int = 1,
                 batch_term: bool = True, lam: float = 1.0) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, 2 * d_z))
        self.dec = nn.Sequential(nn.Linear(d_z, hidden), nn.Tanh(), nn.Linear(hidden, d_in))
        self.d_z, self.samples, self.batch_term, self.lam = d_z, samples, batch_term, lam
        self.register_buffer("offsets", torch.linspace(-0.5, 0.5, samples * d_z).view(samples, d_z))

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, log_var = self.enc(x.flatten(1)).chunk(2, dim=-1)
        return mu, log_var

    def loss_terms(self, batch) -> LossTerms:
        x = batch[0]
        n = x.shape[0]
        mu, log_var = self.encode(x)
        z = mu[:, None, :] + torch.exp(0.5 * log_var)[:, None, :] * self.offsets  # [n, K, d]
        x_hat = self.dec(z.reshape(n * self.samples, self.d_z)).view(n, self.samples, -1)
        recon = (x_hat - x.flatten(1)[:, None, :]).pow(2).sum(-1).mean(1)
        kl = 0.5 * (mu.pow(2) + log_var.exp() - 1 - log_var).sum(-1)
        batch_terms = {"div": self.lam * coupling_divergence(mu)} if self.batch_term else {}
        return LossTerms(sample={"recon": recon, "kl": kl}, batch=batch_terms)


class ConvToy(nn.Module):
    """Conv2d + GroupNorm encoder on 1×4×4 images, Linear decoder."""

    def __init__(self, batch_term: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.norm = nn.GroupNorm(1, 3)
        self.head = nn.Linear(3 * 16, 4)
        self.dec = nn.Linear(2, 16)
        self.batch_term = batch_term

    def loss_terms(self, batch) -> LossTerms:
        x = batch[0]
        h = torch.relu(self.norm(self.conv(x))).flatten(1)
        mu, log_var = self.head(h).chunk(2, dim=-1)
        recon = (self.dec(mu) - x.flatten(1)).pow(2).sum(-1)
        kl = 0.5 * (mu.pow(2) + log_var.exp() - 1 - log_var).sum(-1)
        batch_terms = {"div": coupling_divergence(mu)} if self.batch_term else {}
        return LossTerms(sample={"recon": recon, "kl": kl}, batch=batch_terms)


def make_toy(kind: str, batch_term: bool = True) -> tuple[nn.Module, tuple[int, ...]]:
    """(model, record shape) for ``kind`` in ``mlp``, ``mlp-k3`` (3 samples/record), ``conv``."""
    torch.manual_seed(0)
    if kind == "mlp":
        return ToyVAE(batch_term=batch_term), (6,)
    if kind == "mlp-k3":
        return ToyVAE(samples=3, batch_term=batch_term), (6,)
    if kind == "conv":
        return ConvToy(batch_term=batch_term), (1, 4, 4)
    raise ValueError(kind)


def per_record_oracle(model: nn.Module, x: Tensor, max_norm: float) -> dict[str, Tensor]:
    """Σ_i clip_C(∇ℓ_i), one record at a time (the slow, obviously-correct reference)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(x.shape[0]):
        terms = model.loss_terms((x[i : i + 1],))
        grads = torch.autograd.grad(terms.per_record().sum(), list(params.values()),
                                    allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params.values(), grads)]
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        factor = min(1.0, max_norm / (float(norm) + 1e-6))
        for name, g in zip(params, grads):
            total[name] += factor * g
    return total


class MeanCoupled(nn.Module):
    """Linear VAE-like model whose divergence ``λ⟨mean_i μ_i, 1⟩²`` lets one record flip the sign
    of every other record's attributed gradient: the worst case for naive DP-SGD."""

    def __init__(self, lam: float = 100.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.Linear(6, 2)
        self.dec = nn.Linear(2, 6)
        self.lam = lam

    def loss_terms(self, batch) -> LossTerms:
        x = batch[0]
        mu = self.enc(x)
        recon = (self.dec(mu) - x).pow(2).sum(-1)
        div = self.lam * mu.mean(0).sum().pow(2) if len(x) else mu.sum()
        return LossTerms(sample={"recon": recon}, batch={"div": div})


def diff_norms(mech, model, batch_a, batch_b) -> dict[str, float]:
    """Per-part L2 distance between the statistics of two batches."""
    a, b = mech.aggregate(model, (batch_a,)), mech.aggregate(model, (batch_b,))
    return {
        part: float(global_norm({k: a[part][k] - b[part][k] for k in a[part]}))
        for part in mech.parts
    }


def neighbours(shape, rng: torch.Generator, n_max_records: int = 9):
    """Random and adversarial neighbouring pairs (S, S ∪ {x}), x inserted at a random position."""
    cases = []
    for trial in range(14):
        n = int(torch.randint(0, n_max_records, (1,), generator=rng))
        s = torch.randn(n, *shape, generator=rng)
        kind = trial % 7
        if kind == 0 or n == 0:
            x = torch.randn(1, *shape, generator=rng)  # random record (alone when n = 0)
        elif kind == 1:
            x = 1e6 * torch.randn(1, *shape, generator=rng)  # huge values
        elif kind == 2:
            x = s[:1].clone()  # duplicate of a record already in S
        elif kind == 3:
            x = -1e3 * torch.ones(1, *shape)  # constant extreme record
        elif kind == 4:
            x = torch.full((1, *shape), 1e15)  # gradients near float32 overflow
        else:
            x = 10 * torch.randn(1, *shape, generator=rng)
        pos = int(torch.randint(0, n + 1, (1,), generator=rng))
        cases.append((s, torch.cat([s[:pos], x, s[pos:]])))
    return cases


DIVS = {
    "mmd": lambda: MMD("imq", bandwidths=(0.5, 1.0, 2.0), n_prior_samples=16),
    "dim_mmd": lambda: DimensionWiseMMD("imq", bandwidths=(0.05, 0.5), n_prior_samples=16),
    "mmd_rbf": lambda: MMD("rbf", bandwidths=(0.5, 2.0), n_prior_samples=16),
}


class PairToy(nn.Module):
    """Tiny VAE with a pairwise MMD on one code per record (and optionally an opaque term).

    The prior samples are a fixed buffer (one realisation ω, coupled across neighbours)."""

    def __init__(self, kind: str = "mlp", div: str = "mmd", lam: float = 3.0,
                 opaque: bool = False, d_z: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.kind, self.lam, self.opaque, self.d_z = kind, lam, opaque, d_z
        self.samples = 3 if kind == "mlp-k3" else 1
        if kind == "conv":
            self.shape: tuple[int, ...] = (1, 4, 4)
            self.enc = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.GroupNorm(1, 3), nn.ReLU(),
                                     nn.Flatten(), nn.Linear(48, 2 * d_z))
        else:
            self.shape = (6,)
            self.enc = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2 * d_z))
        d_in = math.prod(self.shape)
        self.dec = nn.Sequential(nn.Linear(d_z, 8), nn.Tanh(), nn.Linear(8, d_in))
        self.div = DIVS[div]()
        self.register_buffer("offsets",
                             torch.linspace(-0.5, 0.5, self.samples * d_z).view(self.samples, d_z))
        self.register_buffer("w", torch.randn(16, d_z, generator=torch.Generator().manual_seed(1)))

    def codes(self, x):
        mu, log_var = self.enc(x).chunk(2, dim=-1)
        z = mu[:, None, :] + torch.exp(0.5 * log_var)[:, None, :] * self.offsets
        return mu, log_var, z

    def loss_terms(self, batch) -> LossTerms:
        x = batch[0]
        n = x.shape[0]
        mu, log_var, z = self.codes(x)
        x_hat = self.dec(z.reshape(n * self.samples, self.d_z)).view(n, self.samples, -1)
        recon = (x_hat - x.flatten(1)[:, None, :]).pow(2).sum(-1).mean(1)
        kl = 0.5 * (mu.pow(2) + log_var.exp() - 1 - log_var).sum(-1)
        codes = z[:, 0]
        value = self.div.value(codes, self.w) if n >= 2 else codes.sum() * 0.0
        batch_terms = {"mmd": self.lam * value}
        if self.opaque:
            batch_terms["div"] = coupling_divergence(mu)
        pair = {"mmd": PairwiseTerm(codes, self.w, self.div, self.lam)}
        return LossTerms(sample={"recon": recon, "kl": kl}, batch=batch_terms, pairwise=pair)


def pairwise_mechanism(c_p: float, opaque: bool = False, backend: str = "ghost",
                       **kw) -> PairwiseDPSGD:
    """A PairwiseDPSGD with the pairwise tests' settings (C = 0.7, C_b = 0.3, σ = 1)."""
    shares = {"sample_share": 0.5, "pairwise_share": 0.3 if opaque else None}
    return PairwiseDPSGD(max_grad_norm=0.7, pair_max_grad_norm=c_p, batch_max_grad_norm=0.3,
                         noise_multiplier=1.0, backend=backend, **shares, **kw)

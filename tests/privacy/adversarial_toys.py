"""Models that probe the engine's failure classes (issue 13): layers on odd input shapes, Linear
subclasses, parent layers with trainable children, shared data-independent rows, coupled codes.

Each is deterministic (fixed realisation of any internal randomness, as in ``toys.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lit_dpvae.divergences import MMD
from lit_dpvae.privacy import LossTerms, PairwiseTerm


class GridLinear(nn.Module):
    """A Linear layer applied to ``[n, H, W, C]`` (channels-last images): Opacus' ghost norm
    sampler returns no norm for 4-D inputs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 4)
        self.head = nn.Linear(4 * 2 * 2, 2)

    def loss_terms(self, batch) -> LossTerms:
        x = batch[0].view(-1, 2, 2, 3)
        h = torch.tanh(self.lin(x))  # [n, 2, 2, 4]
        out = self.head(h.flatten(1))
        return LossTerms(sample={"recon": out.pow(2).sum(-1) + h.pow(2).sum((1, 2, 3))})


class SeqLinear(nn.Module):
    """A Linear layer applied to ``[n, T, d]`` whose rows nearly cancel: the ghost identity
    ``Σ_tt' (b_t·b_t')(a_t·a_t')`` loses the per-record norm to float32 cancellation."""

    def __init__(self, scale: float = 100.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 1, bias=False)
        self.scale = scale

    def loss_terms(self, batch) -> LossTerms:
        x = batch[0].view(-1, 2, 3)
        return LossTerms(sample={"recon": self.scale * self.lin(x).sum((1, 2))})


def cancelling_records(n: int, big: float = 1e4) -> Tensor:
    """Records ``[M u + v, −M u]`` (flattened): per-record gradient ``∝ v``, ghost terms
    ``∝ M²``."""
    u = torch.tensor([1.0, -1.0, 0.5])
    v = torch.tensor([0.0, 0.01, 0.02])
    rec = torch.stack([big * u + v, -big * u]).flatten()
    return rec.repeat(n, 1) + 1e-3 * torch.arange(n, dtype=torch.float32)[:, None]


class LoRALinear(nn.Linear):
    """A Linear subclass with its own forward: frozen weight, trainable low-rank factors."""

    def __init__(self, d_in: int, d_out: int, rank: int = 2) -> None:
        super().__init__(d_in, d_out)
        self.weight.requires_grad_(False)
        self.bias.requires_grad_(False)
        self.lora_a = nn.Parameter(0.5 * torch.randn(rank, d_in))
        self.lora_b = nn.Parameter(0.5 * torch.randn(d_out, rank))

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) + x @ self.lora_a.T @ self.lora_b.T


class LoRAEncoderVAE(nn.Module):
    """An MLP VAE whose encoder head is a ``LoRALinear``; optional MMD as a ``PairwiseTerm``."""

    def __init__(self, lam: float = 50.0, pairwise: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(6, 8)
        self.head = LoRALinear(8, 4)
        self.dec = nn.Linear(2, 6)
        self.lam, self.pairwise = lam, pairwise
        self.kernel = MMD(kernel="rbf", bandwidths=(1.0,))
        self.register_buffer("prior", torch.randn(8, 2))

    def loss_terms(self, batch) -> LossTerms:
        x = batch[0]
        mu, log_var = self.head(torch.tanh(self.body(x))).chunk(2, dim=-1)
        recon = (self.dec(mu) - x).pow(2).sum(-1)
        kl = 0.5 * (mu.pow(2) + log_var.exp() - 1 - log_var).sum(-1)
        if not self.pairwise:
            return LossTerms(sample={"recon": recon, "kl": kl})
        value = self.lam * (self.kernel.value(mu, self.prior) if len(x) >= 2 else mu.sum() * 0)
        term = PairwiseTerm(codes=mu, prior_samples=self.prior, kernel=self.kernel,
                            weight=self.lam)
        return LossTerms(sample={"recon": recon, "kl": kl}, batch={"mmd": value},
                         pairwise={"mmd": term})


class Parent(nn.Module):
    """A layer with its own trainable parameter *and* a trainable child layer."""

    def __init__(self) -> None:
        super().__init__()
        self.child = nn.Linear(6, 4)
        self.gain = nn.Parameter(torch.ones(4))

    def forward(self, x: Tensor) -> Tensor:
        return self.child(x) * self.gain


class ParentVAE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc = Parent()
        self.dec = nn.Linear(4, 6)

    def loss_terms(self, batch) -> LossTerms:
        x = batch[0]
        h = self.enc(x)
        return LossTerms(sample={"recon": (self.dec(h) - x).pow(2).sum(-1)})


class VampToy(nn.Module):
    """VampPrior-style: ``M`` fixed pseudo-inputs go through the trainable encoder next to the
    batch, and each record's KL reads all of them (rows that every record shares)."""

    def __init__(self, m: int = 4, concat: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.Linear(6, 4)
        self.dec = nn.Linear(2, 6)
        self.concat = concat
        self.register_buffer("pseudo", torch.randn(m, 6))

    def loss_terms(self, batch) -> LossTerms:
        x = batch[0]
        n = x.shape[0]
        if self.concat:
            h = self.enc(torch.cat([x, self.pseudo]))
            (mu, _), (pm, _) = h[:n].chunk(2, -1), h[n:].chunk(2, -1)
        else:
            mu, _ = self.enc(x).chunk(2, -1)
            pm, _ = self.enc(self.pseudo).chunk(2, -1)
        recon = (self.dec(mu) - x).pow(2).sum(-1)
        # -log mean_m N(mu_i; pm_m, I), up to constants: reads every pseudo-input's code
        kl = -torch.logsumexp(-0.5 * (mu[:, None, :] - pm[None]).pow(2).sum(-1), dim=1)
        return LossTerms(sample={"recon": recon, "kl": kl})


class CentredCodesVAE(nn.Module):
    """Declares codes centred on the batch mean as a pairwise term's codes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.Linear(6, 4)
        self.dec = nn.Linear(2, 6)
        self.kernel = MMD(kernel="imq", bandwidths=(1.0,))
        self.register_buffer("prior", torch.randn(8, 2))

    def loss_terms(self, batch) -> LossTerms:
        x = batch[0]
        mu, _ = self.enc(x).chunk(2, -1)
        codes = mu - mu.mean(0)
        recon = (self.dec(mu) - x).pow(2).sum(-1)
        value = self.kernel.value(codes, self.prior) if len(x) >= 2 else codes.sum() * 0
        return LossTerms(sample={"recon": recon}, batch={"mmd": value},
                         pairwise={"mmd": PairwiseTerm(codes, self.prior, self.kernel, 1.0)})

"""What the audit attacks: its configuration, the worst-case model and records, the broken
baseline and the construction of the audited mechanism (``make_mechanism``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lit_dpvae.privacy import LossTerms, NaiveDPSGD, TermwiseDPSGD
from lit_dpvae.privacy.mechanisms import Mechanism

SETUPS = ("termwise", "naive", "claimed-o1")


# -- the broken baseline ------------------------------------------------------------------------
class ClaimedO1NaiveDPSGD(NaiveDPSGD):
    """BROKEN BASELINE, for auditing only: never train with it.

    "Opacus with the divergence simply added": the whole loss ``Σ_i ℓ_i + B·λD(S)`` is attributed
    per record by the layer hooks and clipped to ``C`` (exactly ``NaiveDPSGD.aggregate``), but the
    noise is calibrated to the DP-SGD sensitivity ``C`` instead of ``2·n_max·C``. The claim is
    false (docs/privacy.md §3.2): one record can move every attributed gradient of its batch.
    """

    @property
    def sensitivity(self) -> dict[str, float]:
        return {"total": self.max_grad_norm}


# -- model and data -----------------------------------------------------------------------------
class CoupledLinearVAE(nn.Module):
    """Linear encoder/decoder with the batch-wise term ``λ (mean_i Σ_d μ_id − m₀)²`` (cf.
    ``tests/privacy/toys.MeanCoupled``): the worst case for per-record attribution of a batch term.

    The encoder weights are a fixed positive constant (no randomness) and ``m₀ = 2`` lies above
    the batch mean of records near ``+1`` (``1.2``), so a canary of large *positive* values flips
    the sign of ``mean − m₀``. That flips every other record's attributed gradient
    ``∝ (mean − m₀)(x_i, 1)`` (naive DP-SGD) and makes the clipped divergence gradient nearly
    antipodal (term-wise batch part, up to ``≈ 1.96·C_b`` of its ``2·C_b`` bound).
    """

    def __init__(self, d_in: int = 6, d_z: int = 2, lam: float = 100.0,
                 target: float = 2.0) -> None:
        super().__init__()
        self.enc = nn.Linear(d_in, d_z)
        self.dec = nn.Linear(d_z, d_in)
        self.lam, self.target = lam, target
        with torch.no_grad():
            self.enc.weight.fill_(0.1)
            self.enc.bias.zero_()
            g = torch.Generator().manual_seed(0)
            self.dec.weight.copy_(0.3 * torch.randn(d_in, d_z, generator=g))
            self.dec.bias.zero_()

    def loss_terms(self, batch: Any) -> LossTerms:
        x = batch[0]
        mu = self.enc(x)
        recon = (self.dec(mu) - x).pow(2).sum(-1)
        div = self.lam * (mu.mean(0).sum() - self.target).pow(2) if len(x) else mu.sum()
        return LossTerms(sample={"recon": recon}, batch={"div": div})


def make_pool(size: int, d_in: int, seed: int) -> Tensor:
    """Records ``1 + 0.1·N(0, I)``: the adversary's chosen dataset (all attributions aligned)."""
    g = torch.Generator().manual_seed(seed)
    return 1.0 + 0.1 * torch.randn(size, d_in, generator=g)


# -- configuration and mechanism ----------------------------------------------------------------
@dataclass
class AuditConfig:
    """Everything an audit run needs (CLI flags and YAML keys have the same names)."""

    setup: str = "termwise"
    trials: int = 2000
    batch_size: int = 8
    pool_size: int = 64
    noise_multiplier: float = 2.0
    max_grad_norm: float = 1.0
    batch_max_grad_norm: float = 1.0
    sample_share: float = 0.5
    delta: float = 1e-5
    confidence: float = 0.95
    calibration_fraction: float = 0.5
    canary_scale: float = 1000.0
    lam: float = 100.0
    d_in: int = 6
    backend: str = "ghost"
    seed: int = 0
    release: str = "parts"


def make_mechanism(cfg: AuditConfig) -> Mechanism:
    """The mechanism that ``cfg.setup`` audits, at the audit's batch size: the one place where a
    setup name becomes a mechanism."""
    n_max = cfg.batch_size + 1  # the canary is never truncated away
    if cfg.setup == "termwise":
        return TermwiseDPSGD(max_grad_norm=cfg.max_grad_norm,
                             batch_max_grad_norm=cfg.batch_max_grad_norm,
                             noise_multiplier=cfg.noise_multiplier,
                             sample_share=cfg.sample_share, backend=cfg.backend)
    if cfg.setup in ("naive", "claimed-o1"):
        cls = NaiveDPSGD if cfg.setup == "naive" else ClaimedO1NaiveDPSGD
        return cls(max_grad_norm=cfg.max_grad_norm, max_batch_size=n_max,
                   noise_multiplier=cfg.noise_multiplier,
                   expected_batch_size=float(cfg.batch_size), backend=cfg.backend)
    raise ValueError(f"unknown setup {cfg.setup!r}; choose one of {SETUPS}")


__all__ = [
    "SETUPS", "AuditConfig", "ClaimedO1NaiveDPSGD", "CoupledLinearVAE", "make_mechanism",
    "make_pool",
]

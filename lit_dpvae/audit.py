"""Empirical privacy audit: a canary-based, white-box, one-step *lower bound* on ε.

``python -m lit_dpvae audit --setup termwise`` (or ``naive``, ``claimed-o1``, ``all``; flags or
``--config audit.yaml``). Method and numbers: ``docs/audit.md``.

The audit follows the white-box "gradient canary" adversary of Nasr et al. 2021 (Adversary
instantiation, arXiv 2101.04535) and the Clopper–Pearson conversion of Jagielski et al. 2020
(arXiv 2006.07709). For ``T`` trials:

1. draw a dataset ``S`` of ``n`` records from a pool (one step at ``q = 1``: the batch is ``S``);
2. compute the mechanism's pre-noise statistics ``F(S)`` and ``F(S ∪ {canary})`` with the real
   ``Mechanism.aggregate`` (white-box: the adversary knows ``S``, the model and the canary);
3. release both with fresh noise through the real ``Mechanism.add_noise`` (``release="parts"``:
   the tuple of noisy parts the accountant covers) or ``Mechanism.privatize`` (``"update"``: the
   combined update the trainer applies, one noise draw for all parts; a post-processing);
4. score each release ``Y`` by its projection on the whitened canary direction,
   ``s = ⟨W(Y − F(S)), W(F(S∪x) − F(S))⟩ / ‖W(F(S∪x) − F(S))‖`` (``W`` divides part ``k`` by its
   *claimed* noise std ``σ_k Δ_k``): the Neyman–Pearson test for the claimed Gaussian noise.

Releases of ``S`` are negatives, releases of ``S ∪ {x}`` positives. A threshold ``t`` gives
``FPR = P(s > t | S)`` and ``FNR = P(s ≤ t | S ∪ x)``; any ``(ε, δ)``-DP mechanism satisfies
``1 − δ − FNR ≤ e^ε FPR`` and ``1 − δ − FPR ≤ e^ε FNR`` (Kairouz et al. 2015), so with
Clopper–Pearson upper bounds ``FPR⁺``, ``FNR⁺`` (each at ``1 − α/2``, jointly ``1 − α``)

    ε_lb = max(log((1 − δ − FNR⁺)/FPR⁺), log((1 − δ − FPR⁺)/FNR⁺))

holds with confidence ``1 − α`` *for a threshold fixed in advance*. The threshold is therefore
chosen (max over thresholds and both directions) on a calibration split of the trials and the
bound is evaluated on the remaining, independent trials.

Setups (``SETUPS``): term-wise DP-SGD, honest naive DP-SGD (sensitivity ``2·n_max·C``), and
``ClaimedO1NaiveDPSGD``, a **deliberately broken baseline** ("Opacus with the divergence simply
added") that attributes the whole loss per record but claims sensitivity ``C``. The model
(``CoupledLinearVAE``) and the canary (huge values) are the worst case of
docs/privacy.md §3.2: the canary flips the sign of the batch mean, hence of every other record's
attributed gradient.

The claimed ε is the accountant's (Opacus RDP) for **one step at q = 1** with the mechanism's
``σ_eff``: the audit attacks one release of one known batch, so subsampling amplification, which
needs a secret sample, and composition over steps are outside what it can test.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import beta as beta_dist
from scipy.stats import norm
from torch import Tensor, nn

from lit_dpvae.privacy import LossTerms, NaiveDPSGD, PrivacyAccountant, TermwiseDPSGD
from lit_dpvae.privacy.mechanisms import Mechanism, Stats

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


# -- statistics ---------------------------------------------------------------------------------
def clopper_pearson_upper(k: int | np.ndarray, n: int, alpha: float) -> np.ndarray:
    """One-sided ``1 − alpha`` Clopper–Pearson upper bound on a binomial rate, ``k`` of ``n``."""
    k = np.asarray(k, dtype=float)
    upper = beta_dist.ppf(1.0 - alpha, k + 1.0, np.maximum(n - k, 1e-300))
    return np.where(k >= n, 1.0, upper)


def epsilon_from_rates(fpr_upper: np.ndarray, fnr_upper: np.ndarray, delta: float) -> np.ndarray:
    """``max(log((1−δ−FNR⁺)/FPR⁺), log((1−δ−FPR⁺)/FNR⁺), 0)`` elementwise."""
    fpr = np.asarray(fpr_upper, dtype=float)
    fnr = np.asarray(fnr_upper, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.log(np.clip(1.0 - delta - fnr, 0.0, None) / fpr)
        b = np.log(np.clip(1.0 - delta - fpr, 0.0, None) / fnr)
    out = np.fmax(np.nan_to_num(a, nan=-np.inf), np.nan_to_num(b, nan=-np.inf))
    return np.maximum(out, 0.0)


def _counts(neg: np.ndarray, pos: np.ndarray, thresholds: np.ndarray) -> tuple:
    """False positives ``#(neg > t)`` and false negatives ``#(pos ≤ t)`` for each threshold."""
    neg_s, pos_s = np.sort(neg), np.sort(pos)
    fp = len(neg) - np.searchsorted(neg_s, thresholds, side="right")
    fn = np.searchsorted(pos_s, thresholds, side="right")
    return fp, fn


def epsilon_lower_bound(
    neg: np.ndarray, pos: np.ndarray, delta: float, confidence: float = 0.95,
    thresholds: np.ndarray | None = None,
) -> tuple[float, float]:
    """``(ε_lb, best threshold)``: max over ``thresholds`` (default: between observed scores) of the
    Clopper–Pearson bound. Valid at ``confidence`` only for a single threshold fixed in advance;
    ``audit_scores`` picks it on calibration trials."""
    alpha = 1.0 - confidence
    if thresholds is None:  # midpoints between consecutive observed scores, and both ends
        u = np.unique(np.concatenate([neg, pos]))
        thresholds = np.concatenate([[u[0] - 1.0], (u[1:] + u[:-1]) / 2, [u[-1] + 1.0]])
    fp, fn = _counts(neg, pos, thresholds)
    eps = epsilon_from_rates(clopper_pearson_upper(fp, len(neg), alpha / 2),
                             clopper_pearson_upper(fn, len(pos), alpha / 2), delta)
    best = np.flatnonzero(eps >= eps.max() - 1e-12)
    i = int(best[len(best) // 2])  # the middle of a tie generalises best to held-out trials
    return float(eps[i]), float(thresholds[i])


def audit_scores(
    neg: np.ndarray, pos: np.ndarray, delta: float, confidence: float = 0.95,
    calibration_fraction: float = 0.5,
) -> dict[str, float]:
    """Held-out ε lower bound: the threshold is chosen on the first ``calibration_fraction`` of
    the trials and the Clopper–Pearson bound is computed on the rest. Also returns the in-sample
    maximum over thresholds on all trials (the literature's number; optimistic, not a valid CI)."""
    n_cal = int(round(calibration_fraction * len(neg)))
    if not 0 < n_cal < len(neg):
        raise ValueError("calibration_fraction must leave trials on both sides")
    _, t = epsilon_lower_bound(neg[:n_cal], pos[:n_cal], delta, confidence)
    eps_lb, _ = epsilon_lower_bound(neg[n_cal:], pos[n_cal:], delta, confidence,
                                    thresholds=np.array([t]))
    fp, fn = _counts(neg[n_cal:], pos[n_cal:], np.array([t]))
    insample, _ = epsilon_lower_bound(neg, pos, delta, confidence)
    m = len(neg) - n_cal
    return {"eps_lb": eps_lb, "threshold": t, "fpr": float(fp[0]) / m, "fnr": float(fn[0]) / m,
            "eval_trials": m, "eps_lb_insample": insample}


def gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact ε at δ of the Gaussian mechanism with shift/noise ratio ``mu`` (Balle & Wang 2018):
    ``δ(ε) = Φ(μ/2 − ε/μ) − e^ε Φ(−μ/2 − ε/μ)``, solved by bisection."""
    if mu <= 0:
        return 0.0

    def delta_of(eps: float) -> float:
        return float(norm.cdf(mu / 2 - eps / mu) - math.exp(eps) * norm.cdf(-mu / 2 - eps / mu))

    if delta_of(0.0) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while delta_of(hi) > delta:
        lo, hi = hi, 2 * hi
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


# -- the audit ----------------------------------------------------------------------------------
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


def _flat(stats: Stats, parts: tuple[str, ...], std: dict[str, float]) -> Tensor:
    """All parts as one vector, part k divided by its claimed noise std (whitening)."""
    return torch.cat([torch.cat([t.flatten() for t in stats[p].values()]) / std[p] for p in parts])


def _flat_update(update: dict[str, Tensor], std: float) -> Tensor:
    return torch.cat([t.flatten() for t in update.values()]) / std


def run_audit(
    cfg: AuditConfig,
    model: nn.Module | None = None,
    pool: Tensor | None = None,
    canary: Tensor | None = None,
) -> dict[str, Any]:
    """Audit one setup; returns ``eps_lb`` (held-out, at ``confidence``) next to the accountant's
    one-step ε (``eps_claimed``) and diagnostics. ``model``/``pool``/``canary`` default to the
    worst case (``CoupledLinearVAE``, records near +1, canary ``canary_scale·1``)."""
    start = time.perf_counter()
    mech = make_mechanism(cfg)
    model = CoupledLinearVAE(cfg.d_in, lam=cfg.lam) if model is None else model
    pool = make_pool(cfg.pool_size, cfg.d_in, cfg.seed) if pool is None else pool
    canary = (cfg.canary_scale * torch.ones(1, pool.shape[1])) if canary is None else canary
    if cfg.batch_size > len(pool):
        raise ValueError(f"batch_size {cfg.batch_size} > pool size {len(pool)}")
    std = mech.noise_std()
    if any(s <= 0 for s in std.values()):
        raise ValueError("the audited mechanism adds no noise (noise_multiplier must be > 0)")
    if cfg.release not in ("parts", "update"):
        raise ValueError(f"release must be 'parts' or 'update', got {cfg.release!r}")
    big_b = float(cfg.batch_size)  # public expected batch size B (q = 1: B = n)
    u_std = mech.update_noise_std(big_b)

    def whiten(stats: Stats) -> Tensor:
        if cfg.release == "parts":
            return _flat(stats, mech.parts, std)
        return _flat_update(mech.combine(stats, big_b), u_std)

    def release(stats: Stats) -> Tensor:
        if cfg.release == "parts":
            return _flat(mech.add_noise(stats, gen), mech.parts, std)
        return _flat_update(mech.privatize(stats, big_b, gen), u_std)

    gen = torch.Generator().manual_seed(cfg.seed)
    neg: list[float] = []
    pos: list[float] = []
    shifts: list[float] = []
    for _ in range(cfg.trials):
        idx = torch.randperm(len(pool), generator=gen)[: cfg.batch_size].sort().values
        s = pool[idx]
        f_out = mech.aggregate(model, (s,))
        f_in = mech.aggregate(model, (torch.cat([s, canary]),))
        w_out = whiten(f_out)
        d = whiten(f_in) - w_out
        shift = float(d.norm())
        u = d / shift if shift > 0 else d
        for stats, scores in ((f_out, neg), (f_in, pos)):
            y = release(stats)
            scores.append(float((y - w_out) @ u))
        shifts.append(shift)
    result: dict[str, Any] = audit_scores(np.array(neg), np.array(pos), cfg.delta, cfg.confidence,
                          cfg.calibration_fraction)
    accountant = PrivacyAccountant("rdp")
    accountant.step(mech.noise_multiplier, 1.0)
    mean_shift = float(np.mean(shifts))
    result.update(
        setup=cfg.setup,
        release=cfg.release,
        mechanism=type(mech).__name__,
        claimed_sensitivity=mech.sensitivity,
        sigma_eff=mech.noise_multiplier,
        eps_claimed=accountant.get_epsilon(cfg.delta),
        eps_claimed_exact=gaussian_epsilon(1.0 / mech.noise_multiplier, cfg.delta),
        observed_shift=mean_shift,
        max_shift=max(shifts),
        eps_observed_pair=gaussian_epsilon(max(shifts), cfg.delta),
        trials=cfg.trials,
        delta=cfg.delta,
        confidence=cfg.confidence,
        seconds=time.perf_counter() - start,
    )
    result["violation"] = result["eps_lb"] > result["eps_claimed"]
    return result


def format_result(r: dict[str, Any]) -> str:
    verdict = "VIOLATION (eps_lb > claimed)" if r["violation"] else "consistent"
    return (f"{r['setup']:>10} [{r['mechanism']}, {r['release']}] eps_lb={r['eps_lb']:.3f} "
            f"({100 * r['confidence']:.0f}% conf., {r['eval_trials']} held-out trials/side, "
            f"FPR={r['fpr']:.4f} FNR={r['fnr']:.4f}) | accountant eps={r['eps_claimed']:.3f} "
            f"(exact Gaussian {r['eps_claimed_exact']:.3f}) at delta={r['delta']:g}, one step, "
            f"q=1, sigma_eff={r['sigma_eff']:.3g} | whitened shift max={r['max_shift']:.3f} "
            f"(claimed <= {1 / r['sigma_eff']:.3f}) | {r['seconds']:.1f}s | {verdict}")


def audit_main(argv: list[str]) -> None:
    """``audit``: run one or all setups and print ε_lb next to the accountant's ε."""
    parser = argparse.ArgumentParser(
        prog="python -m lit_dpvae audit",
        description="Canary-based one-step white-box audit: a lower bound on epsilon.")
    parser.add_argument("--config", help="YAML file with AuditConfig keys (flags override it)")
    parser.add_argument("--out", help="write the results as JSON")
    defaults = AuditConfig()
    for f in fields(AuditConfig):
        kind = type(getattr(defaults, f.name))
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=None,
                            help=f"default {getattr(defaults, f.name)}"
                            + (f"; one of {SETUPS} or 'all'" if f.name == "setup" else ""))
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    if args.config:
        import yaml

        values.update(yaml.safe_load(Path(args.config).read_text()) or {})
        unknown = set(values) - {f.name for f in fields(AuditConfig)}
        if unknown:
            parser.error(f"unknown keys in {args.config}: {sorted(unknown)}")
    values.update({k: v for k, v in vars(args).items()
                   if k not in ("config", "out") and v is not None})
    torch.set_num_threads(1)
    setups = SETUPS if values.get("setup", defaults.setup) == "all" else (None,)
    results = []
    for setup in setups:
        cfg = AuditConfig(**{**values, **({"setup": setup} if setup else {})})
        results.append(run_audit(cfg))
        print(format_result(results[-1]), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
    if any(r["setup"] != "claimed-o1" and r["violation"] for r in results):
        print("WARNING: an honest mechanism's lower bound exceeds its claimed epsilon", flush=True)


__all__ = [
    "AuditConfig", "ClaimedO1NaiveDPSGD", "CoupledLinearVAE", "audit_main", "audit_scores",
    "clopper_pearson_upper", "epsilon_from_rates", "epsilon_lower_bound", "format_result",
    "gaussian_epsilon", "run_audit",
]

"""Statistics of the audit: Clopper–Pearson bounds on the attack's error rates, the (ε, δ)
lower bound they imply (held out on calibrated thresholds) and the exact ε of a Gaussian
mechanism. Pure numpy/scipy: no model, no mechanism."""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import beta as beta_dist
from scipy.stats import norm


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


__all__ = [
    "audit_scores", "clopper_pearson_upper", "epsilon_from_rates", "epsilon_lower_bound",
    "gaussian_epsilon",
]

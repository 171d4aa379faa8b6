"""Empirical privacy audit: the statistics on known rates, and tiny audits that must expose the
broken claimed-O(1) baseline and must not accuse term-wise or honest naive DP-SGD."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lit_dpvae.audit import (
    AuditConfig,
    audit_scores,
    clopper_pearson_upper,
    epsilon_from_rates,
    epsilon_lower_bound,
    gaussian_epsilon,
    run_audit,
)
from lit_dpvae.cli import main
from lit_dpvae.privacy import PrivacyAccountant


def test_clopper_pearson_upper_on_known_rates():
    # k = 0: the exact bound solves (1 - p)^n = alpha.
    for n in (10, 100, 1000):
        assert clopper_pearson_upper(0, n, 0.025) == pytest.approx(1 - 0.025 ** (1 / n))
    # 5 of 10: the textbook 95% two-sided Clopper–Pearson interval is [0.1871, 0.8129].
    assert clopper_pearson_upper(5, 10, 0.025) == pytest.approx(0.8129, abs=1e-4)
    assert clopper_pearson_upper(10, 10, 0.025) == 1.0
    ups = clopper_pearson_upper(np.arange(11), 10, 0.05)
    assert np.all(np.diff(ups) > 0) and np.all(ups >= np.arange(11) / 10)


def test_epsilon_from_rates_both_directions():
    assert epsilon_from_rates(0.01, 0.1, 0.0) == pytest.approx(math.log(0.9 / 0.01))
    assert epsilon_from_rates(0.1, 0.01, 0.0) == pytest.approx(math.log(0.9 / 0.01))
    assert epsilon_from_rates(0.01, 0.1, 0.05) == pytest.approx(math.log(0.85 / 0.01))
    assert epsilon_from_rates(0.5, 0.5, 1e-5) == 0.0  # a coin flip proves nothing
    assert epsilon_from_rates(0.7, 0.6, 0.0) == 0.0  # worse than chance: clipped to 0


def test_perfect_separation_gives_the_largest_certifiable_epsilon():
    n, delta = 500, 1e-5
    neg, pos = np.linspace(-2, -1, n), np.linspace(1, 2, n)
    eps, t = epsilon_lower_bound(neg, pos, delta, 0.95)
    u = 1 - 0.025 ** (1 / n)  # both rates 0 of n, each bounded at 97.5%
    assert eps == pytest.approx(math.log((1 - delta - u) / u))
    assert -1 <= t < 1
    # Held-out: a threshold chosen on the first half, evaluated on the second half.
    held = audit_scores(neg, pos, delta, 0.95, calibration_fraction=0.5)
    u = 1 - 0.025 ** (1 / (n // 2))
    assert held["eps_lb"] == pytest.approx(math.log((1 - delta - u) / u))
    assert held["fpr"] == held["fnr"] == 0.0


def test_identical_score_distributions_give_no_evidence():
    rng = np.random.default_rng(0)
    neg, pos = rng.standard_normal(2000), rng.standard_normal(2000)
    assert audit_scores(neg, pos, 1e-5)["eps_lb"] < 0.3


def test_gaussian_epsilon_inverts_the_exact_privacy_curve():
    from scipy.stats import norm

    for mu, delta in ((0.5, 1e-5), (1.0, 1e-5), (3.0, 1e-6)):
        eps = gaussian_epsilon(mu, delta)
        curve = norm.cdf(mu / 2 - eps / mu) - math.exp(eps) * norm.cdf(-mu / 2 - eps / mu)
        assert curve == pytest.approx(delta, rel=1e-6)
        acc = PrivacyAccountant("rdp")
        acc.step(1 / mu, 1.0)
        assert eps <= acc.get_epsilon(delta)  # RDP is an upper bound on the exact curve
    assert gaussian_epsilon(0.0, 1e-5) == 0.0


def _tiny(setup: str) -> dict:
    # sigma_eff = 4: one-step accountant eps 1.01 at delta = 1e-5. 300 trials: 150 held out.
    # Seeds 0-3 give claimed-o1 eps_lb 2.8-3.6 and eps_lb 0 for both honest mechanisms.
    return run_audit(AuditConfig(setup=setup, trials=300, noise_multiplier=4.0, seed=0))


def test_audit_exposes_the_claimed_o1_baseline():
    r = _tiny("claimed-o1")
    assert r["mechanism"] == "ClaimedO1NaiveDPSGD"
    assert r["max_shift"] * r["sigma_eff"] > 10  # the canary moves the statistic by ~17·C, not C
    assert r["eps_lb"] > r["eps_claimed"] + 1.0
    assert r["violation"]


@pytest.mark.parametrize("setup", ["termwise", "naive"])
def test_audit_does_not_accuse_honest_mechanisms(setup):
    r = _tiny(setup)
    # White-box check of the claimed sensitivity on every audited pair (float32 slack) ...
    assert r["max_shift"] * r["sigma_eff"] <= 1 + 1e-4
    # ... and the worst-case canary is nearly tight, so the audit is not vacuous.
    assert r["max_shift"] * r["sigma_eff"] > 0.9
    assert r["eps_lb"] <= r["eps_claimed"]
    assert not r["violation"]


def test_cli_audit_with_config_and_flags(tmp_path, capsys):
    cfg = tmp_path / "audit.yaml"
    cfg.write_text("setup: claimed-o1\ntrials: 40\nnoise_multiplier: 4.0\n")
    out = tmp_path / "res.json"
    main(["audit", "--config", str(cfg), "--trials", "60", "--out", str(out)])
    (res,) = json.loads(out.read_text())
    assert res["trials"] == 60 and res["setup"] == "claimed-o1"
    assert "eps_lb=" in capsys.readouterr().out
    cfg.write_text("bogus: 1\n")
    with pytest.raises(SystemExit):
        main(["audit", "--config", str(cfg)])


def test_update_release_equals_parts_release_for_one_part_mechanisms():
    # One part: privatize draws exactly add_noise's noise, divided by B, so the scores coincide.
    a = run_audit(AuditConfig(setup="naive", trials=60, release="parts"))
    b = run_audit(AuditConfig(setup="naive", trials=60, release="update"))
    assert a["max_shift"] == pytest.approx(b["max_shift"], rel=1e-4)
    assert a["eps_lb_insample"] == pytest.approx(b["eps_lb_insample"], rel=1e-4)
    # Two parts: the combined update is a post-processing of the parts, so it shifts less.
    t = run_audit(AuditConfig(setup="termwise", trials=20, release="update"))
    assert t["max_shift"] * t["sigma_eff"] < 0.8

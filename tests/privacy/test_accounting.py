"""Accounting: ε against independent Opacus computations, calibration, joint σ, checkpointing."""

from __future__ import annotations

import math

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from lit_dpvae.privacy import (
    PrivacyAccountant,
    TermwiseDPSGD,
    calibrate_noise,
    check_budget,
    joint_noise_multiplier,
    split_noise_multiplier,
)

DELTA = 1e-5
HISTORY = [(1.1, 0.01, 300), (0.8, 0.02, 50)]


def _replay(accountant: PrivacyAccountant) -> None:
    for sigma, q, steps in HISTORY:
        for _ in range(steps):
            accountant.step(sigma, q)


def test_rdp_epsilon_equals_an_independent_rdp_computation():
    ours = PrivacyAccountant("rdp")
    _replay(ours)
    assert ours.history == HISTORY and ours.steps == 350
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = sum(
        rdp_analysis.compute_rdp(q=q, noise_multiplier=s, steps=t, orders=orders)
        for s, q, t in HISTORY
    )
    eps, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=DELTA)
    assert math.isclose(ours.get_epsilon(DELTA), eps, rel_tol=1e-12)


def test_prv_epsilon_equals_opacus_prv_for_the_same_history():
    ours = PrivacyAccountant("prv")
    _replay(ours)
    theirs = PRVAccountant()
    theirs.history = list(HISTORY)
    assert math.isclose(ours.get_epsilon(DELTA), theirs.get_epsilon(delta=DELTA), rel_tol=1e-9)
    # PRV is tighter than RDP for the same history.
    rdp = PrivacyAccountant("rdp")
    _replay(rdp)
    assert ours.get_epsilon(DELTA) < rdp.get_epsilon(DELTA)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
@pytest.mark.parametrize("target", [1.0, 3.0, 10.0])
def test_calibrated_sigma_reaches_the_target_within_tolerance(accountant, target):
    q, steps, tol = 256 / 60000, 2000, 0.01
    sigma = calibrate_noise(target, DELTA, q, steps, accountant=accountant, epsilon_tolerance=tol)
    acc = PrivacyAccountant(accountant)
    acc._impl.history = [(sigma, q, steps)]
    eps = acc.get_epsilon(DELTA)
    assert target - tol - 1e-9 <= eps <= target


def test_joint_sigma_and_split():
    for share in (0.1, 0.5, 0.9):
        s, b = split_noise_multiplier(2.0, share)
        assert math.isclose(joint_noise_multiplier([s, b]), 2.0)
    assert split_noise_multiplier(2.0, 1.0) == (2.0, math.inf)
    assert joint_noise_multiplier([2.0, math.inf]) == 2.0
    assert joint_noise_multiplier([2.0, 0.0]) == 0.0  # a noiseless part is not private
    mech = TermwiseDPSGD(
        batch_max_grad_norm=1.0, max_grad_norm=1.0, noise_multiplier=1.3, sample_share=0.3)
    sigmas = mech.noise_multipliers
    assert math.isclose(joint_noise_multiplier(list(sigmas.values())), 1.3)
    # Whitened joint sensitivity sqrt(Σ (Δ_k/(σ_k Δ_k))²) = 1/σ_eff.
    sens = mech.sensitivity
    whitened = math.sqrt(sum((sens[k] / (sigmas[k] * sens[k])) ** 2 for k in sens))
    assert math.isclose(whitened, 1 / 1.3)


def test_state_dict_round_trip_continues_epsilon():
    first = PrivacyAccountant("rdp")
    for _ in range(100):
        first.step(1.0, 0.01)
    resumed = PrivacyAccountant("rdp")
    resumed.load_state_dict(first.state_dict())
    for acc in (first, resumed):
        for _ in range(100):
            acc.step(1.0, 0.01)
    assert resumed.steps == 200
    assert resumed.get_epsilon(DELTA) == first.get_epsilon(DELTA)
    with pytest.raises(ValueError, match="same accountant"):
        PrivacyAccountant("prv").load_state_dict(first.state_dict())


def test_non_private_steps_make_epsilon_infinite():
    acc = PrivacyAccountant()
    assert acc.get_epsilon(DELTA) == 0.0
    acc.step(0.0, 0.1)
    assert acc.get_epsilon(DELTA) == math.inf


@pytest.mark.parametrize(
    "eps, delta, n, match",
    [(0.0, 1e-5, None, "target_epsilon"), (math.inf, 1e-5, None, "target_epsilon"),
     (1.0, 0.0, None, "target_delta"), (1.0, 1.0, None, "target_delta"),
     (1.0, 1e-3, 5000, "1/N")],
)
def test_bad_budgets_are_refused(eps, delta, n, match):
    with pytest.raises(ValueError, match=match):
        check_budget(eps, delta, n)


def test_bad_accountant_and_calibration_inputs():
    with pytest.raises(ValueError, match="accountant"):
        PrivacyAccountant("moments")
    with pytest.raises(ValueError, match="sample_rate"):
        calibrate_noise(1.0, DELTA, 0.0, 10)
    with pytest.raises(ValueError, match="steps"):
        calibrate_noise(1.0, DELTA, 0.1, 0)

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

from lit_dpvae.audit.runner import format_result, run_audit, run_audits
from lit_dpvae.audit.setups import (
    SETUPS,
    AuditConfig,
    ClaimedO1NaiveDPSGD,
    CoupledLinearVAE,
    make_mechanism,
    make_pool,
)
from lit_dpvae.audit.statistics import (
    audit_scores,
    clopper_pearson_upper,
    epsilon_from_rates,
    epsilon_lower_bound,
    gaussian_epsilon,
)

__all__ = [
    "SETUPS", "AuditConfig", "ClaimedO1NaiveDPSGD", "CoupledLinearVAE",
    "audit_scores", "clopper_pearson_upper", "epsilon_from_rates", "epsilon_lower_bound",
    "format_result", "gaussian_epsilon", "make_mechanism", "make_pool", "run_audit", "run_audits",
]

"""PrivacyReport: an allow-list of public settings, the ε curve, JSON round trips and the
optimizer it names (issue 17 and its review)."""

from __future__ import annotations

import json
import math

import torch

from lit_dpvae.checkpoints import describe_optimizer
from lit_dpvae.privacy import PrivacyAccountant, TermwiseDPSGD
from lit_dpvae.privacy.report import PrivacyReport, epsilon_curve
from lit_dpvae.strategy import DPStrategy


class Diagnostic(TermwiseDPSGD):
    """A user mechanism that keeps record-derived values on ``self`` (as a debugging aid)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.diagnostic_seed = 987654321
        self.recent_values = [0.125, 0.5]


def test_settings_publish_constructor_arguments_only_never_other_attributes():
    mechanism = Diagnostic(max_grad_norm=0.7, sample_share=0.8)
    settings = mechanism.settings()
    assert settings["max_grad_norm"] == 0.7 and settings["sample_share"] == 0.8
    assert "diagnostic_seed" not in settings and "recent_values" not in settings
    assert "batch_max_grad_norm" not in settings  # C/(2B) waits for the sampling
    mechanism.set_sampling(50.0)
    assert mechanism.settings()["batch_max_grad_norm"] == 0.7 / 100  # resolved C_b
    assert "noise_multiplier" not in settings  # reported as sigma_eff


def test_dp_sgd_reports_no_batch_part_settings():
    mechanism = Diagnostic(max_grad_norm=0.7, sample_share=1.0, batch_params=["encoder."])
    mechanism.set_sampling(50.0)
    settings = mechanism.settings()
    assert settings["sample_share"] == 1.0 and settings["max_grad_norm"] == 0.7
    assert "batch_max_grad_norm" not in settings and "batch_params" not in settings


def test_a_strategy_with_the_auto_mechanism_reports_before_any_fit():
    report = DPStrategy(target_epsilon=1.0).privacy_report()
    assert report.mechanism == "auto" and report.steps == 0 and report.epsilon == 0.0
    assert report.epsilon_curve == []


def test_the_curve_ends_at_the_spent_epsilon_and_its_marks_nest_as_the_run_grows():
    accountant = PrivacyAccountant("rdp")
    for _ in range(300):
        accountant.step(1.1, 0.02)
    state = accountant.state_dict()
    curve = epsilon_curve(state, 1e-5)
    assert curve[-1] == (300, accountant.get_epsilon(1e-5))
    assert len(curve) <= 41 and all(a < b for (_, a), (_, b) in zip(curve, curve[1:]))
    for _ in range(200):
        accountant.step(1.1, 0.02)
    longer = dict(epsilon_curve(accountant.state_dict(), 1e-5))
    for steps, eps in curve[:-1]:  # the shorter run's strided marks are among the longer's
        if steps % 16 == 0:
            assert longer[steps] == eps


def test_json_round_trip_keeps_an_infinite_epsilon():
    report = PrivacyReport(mechanism="nonprivate", epsilon=math.inf, delta=1e-5, sigma_eff=0.0,
                           steps=3, accountant={"accountant": "rdp", "history": [],
                                                "non_private_steps": 3})
    text = json.dumps(report.to_dict(), allow_nan=False)
    back = PrivacyReport.from_dict(json.loads(text))
    assert back.epsilon == math.inf and back.steps == 3 and back.mechanism == "nonprivate"
    assert "inf" in report.table()


def test_the_optimizer_is_named_with_its_configured_learning_rate():
    params = [torch.nn.Parameter(torch.zeros(2))]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    opt.step()
    scheduler.step()  # the current lr is now 0.01: a schedule's state, not the setting
    described = describe_optimizer([opt])
    assert described["class"] == "torch.optim.sgd.SGD" and described["momentum"] == 0.9
    assert described["lr"] == 0.1
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0)
    for metric in (1.0, 1.0, 1.0):  # reduces in place and keeps no initial_lr
        plateau.step(metric)
    assert opt.param_groups[0]["lr"] < 0.1 and describe_optimizer([opt])["lr"] == 0.1

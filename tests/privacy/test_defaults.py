"""The library's privacy defaults (issue 15; docs/privacy.md §3.3 *Defaults*, *Parameter
subset*, §8.5): ``mechanism="auto"``, C_p = C/16 with shares proportional to sensitivity,
term-wise C_b = C/(2B), and term-wise's batch part confined to a parameter subset — its bound
on neighbouring batches, the released zeros outside the subset and the per-coordinate noise."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from lit_dpvae.data import ArrayDataModule
from lit_dpvae.models import ClusterVAE, InfoVAE, SparseVAE, VanillaVAE
from lit_dpvae.privacy import PairwiseDPSGD, TermwiseDPSGD, global_norm
from lit_dpvae.privacy.mechanisms import AutoMechanism, build_mechanism, choose
from lit_dpvae.strategy import DPStrategy
from tests.lightning_toys import make_trainer
from tests.privacy.test_mechanisms import REL_TOL
from tests.privacy.toys import ToyVAE, neighbours

SHAPE = (1, 4, 4)


def small(cls, **kw):
    return cls(data_shape=SHAPE, latent_dim=2, hidden=(8,), **kw)


# ---- mechanism="auto" -------------------------------------------------------------------------
@pytest.mark.parametrize("make, name, share", [
    (lambda: small(VanillaVAE), "termwise", 1.0),
    (lambda: small(InfoVAE, lam=0.0), "termwise", 1.0),
    (lambda: small(InfoVAE), "pairwise", None),
    (lambda: small(SparseVAE), "termwise", 1.0),  # the Hoyer term is sample-wise
    (lambda: small(SparseVAE, divergence="dim_mmd"), "pairwise", None),
    (lambda: small(ClusterVAE), "pairwise", None),
    (lambda: small(ClusterVAE, divergence="aggregate_kl"), "termwise", 0.5),
    (lambda: ToyVAE(), "termwise", 0.5),  # declares nothing: term-wise handles any term
])
def test_auto_chooses_from_the_declared_terms(make, name, share):
    model = make()
    chosen, why = AutoMechanism().resolve(model)
    assert chosen.name == name and why
    # a batch-wise part covers what the model declares its gradient can reach (not the decoder)
    declared = getattr(model, "batch_term_parameters", lambda: None)()
    assert declared == (None if isinstance(model, ToyVAE) else ("encoder.",))
    if name == "termwise":
        chosen.set_sampling(32.0)
        assert chosen.sample_share == share
        assert chosen.parts == (("sample",) if share == 1.0 else ("sample", "batch"))
        assert chosen.batch_params == (None if share == 1.0 else declared)
    else:
        assert chosen.num_pairwise_terms == 1
        assert chosen.pair_max_grad_norm == pytest.approx(chosen.max_grad_norm / 16)
        assert chosen.batch_params == declared
        assert not chosen.covers("pairwise", "decoder.head.weight")
        assert chosen.covers("pairwise", "encoder.head.weight")


def test_auto_passes_settings_and_user_settings_win():
    chosen, _ = AutoMechanism(max_grad_norm=2.0, pair_max_grad_norm=0.5,
                              sample_share=0.7).resolve(small(InfoVAE))
    assert (chosen.max_grad_norm, chosen.pair_max_grad_norm, chosen.sample_share) == (2.0, 0.5,
                                                                                      0.7)
    with pytest.warns(UserWarning, match="does not use"):  # a pairwise setting, term-wise chosen
        chosen, _ = AutoMechanism(pair_max_grad_norm=0.5).resolve(
            small(ClusterVAE, divergence="aggregate_kl"))
    assert chosen.name == "termwise"
    with pytest.raises(ValueError, match="unknown setting"):
        build_mechanism("auto", max_grad_nrom=1.0)
    chosen, _ = AutoMechanism(batch_params=["encoder.head."]).resolve(small(InfoVAE))
    assert chosen.batch_params == ("encoder.head.",)


def test_auto_refuses_a_bad_declaration():
    class Bad(ToyVAE):
        def batch_term_compositions(self):
            return {"div": "sample-wise"}

    with pytest.raises(ValueError, match="'pairwise' or 'batch-wise'"):
        choose(Bad())

    class OneString(InfoVAE):  # a string would be split into one-letter prefixes
        def batch_term_parameters(self):
            return "encoder."

    model = OneString(data_shape=SHAPE, latent_dim=2, hidden=(8,))
    with pytest.raises(ValueError, match=r"batch_term_parameters\(\) must be a non-empty list"):
        AutoMechanism().resolve(model)


def test_auto_in_fit_records_the_chosen_mechanism_and_resumes(tmp_path):
    data = ArrayDataModule(torch.rand(80, *SHAPE, generator=torch.Generator().manual_seed(0))
                           .numpy(), value_range=(0.0, 1.0), batch_size=16)
    strategy = DPStrategy(noise_multiplier=1.0, target_epsilon=50.0, target_delta=1e-3,
                          noise_seed=1)
    assert strategy.mechanism_name == "auto"
    model = small(InfoVAE)
    trainer = make_trainer(strategy, tmp_path, max_steps=3)
    trainer.fit(model, data)
    assert strategy.mechanism_name == "pairwise" and isinstance(strategy.mechanism,
                                                               PairwiseDPSGD)
    assert strategy.run.mechanism is strategy.mechanism
    report = strategy.privacy_report()
    assert report.mechanism == "pairwise" and math.isfinite(report.epsilon)
    ckpt = tmp_path / "a.ckpt"
    trainer.save_checkpoint(ckpt)
    # a resume under "auto" resolves the same mechanism and continues the accountant
    again = DPStrategy(noise_multiplier=1.0, target_epsilon=50.0, target_delta=1e-3)
    trainer2 = make_trainer(again, tmp_path, max_steps=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer2.fit(small(InfoVAE), data, ckpt_path=ckpt)
    assert not [w for w in caught if "other pairwise settings" in str(w.message)]
    assert again.privacy_report().steps == 5
    # a resume that changes a setting (here the pairwise part's subset) says so
    changed = DPStrategy(noise_multiplier=1.0, target_epsilon=50.0, target_delta=1e-3,
                         batch_params=["encoder.head."])
    was = r"batch_params=\['encoder.head.'\] \(was \['encoder.'\]\)"
    with pytest.warns(UserWarning, match=was):
        make_trainer(changed, tmp_path, max_steps=4).fit(small(InfoVAE), data, ckpt_path=ckpt)
    # an explicit other mechanism is refused on that checkpoint
    other = DPStrategy(mechanism="termwise", noise_multiplier=1.0, target_epsilon=50.0,
                       target_delta=1e-3)
    with pytest.raises(Exception, match="pairwise"):
        make_trainer(other, tmp_path, max_steps=6).fit(small(InfoVAE), data, ckpt_path=ckpt)


# ---- PairwiseDPSGD defaults -------------------------------------------------------------------
@pytest.mark.parametrize("c, terms", [(1.0, 1), (0.3, 2)])
def test_pairwise_defaults_split_the_budget_by_sensitivity(c, terms):
    mech = PairwiseDPSGD(max_grad_norm=c, num_pairwise_terms=terms, noise_multiplier=1.7)
    assert mech.pair_max_grad_norm == pytest.approx(c / 16)
    sens = mech.sensitivity
    assert sens == {"sample": pytest.approx(c), "pairwise": pytest.approx(c * terms / 2)}
    assert mech.shares["sample"] == pytest.approx(1 / (1 + terms / 2))
    mech.check_noise_composition()  # the parts compose to σ_eff
    b = 50.0
    assert mech.update_noise_std(b) == pytest.approx(1.7 * (c + c * terms / 2) / b)
    # the proportional split is the least noisy one for these bounds
    for gs in (0.2, 0.4, 0.6, 0.8):
        other = PairwiseDPSGD(max_grad_norm=c, num_pairwise_terms=terms, noise_multiplier=1.7,
                              sample_share=gs)
        assert other.update_noise_std(b) >= mech.update_noise_std(b) * (1 - 1e-12)


def test_pairwise_refuses_a_model_with_another_term_count():
    mech = PairwiseDPSGD(num_pairwise_terms=2, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="calibrated for 2"):
        mech.aggregate(small(InfoVAE), (torch.rand(4, *SHAPE),))
    with pytest.raises(ValueError, match="num_pairwise_terms"):
        PairwiseDPSGD(num_pairwise_terms=0)


# ---- TermwiseDPSGD defaults -------------------------------------------------------------------
def test_termwise_batch_clip_defaults_to_c_over_2b():
    mech = TermwiseDPSGD(max_grad_norm=0.8, noise_multiplier=1.0)
    with pytest.raises(RuntimeError, match="set_sampling"):
        mech.sensitivity  # noqa: B018 - C_b needs the public expected batch size
    assert "set with the sampling" in repr(mech)
    mech.set_sampling(40.0)
    assert mech.batch_max_grad_norm == pytest.approx(0.8 / 80)
    assert mech.sensitivity["batch"] == pytest.approx(mech.sensitivity["sample"] / 40)
    assert mech.sample_share == 0.5
    mech.check_noise_composition()
    # no batch-part warning with the defaults: its noise equals the sample part's
    assert mech.balance_warning(40.0) is None
    # an explicit C_b needs no sampling; γ stays 1/2 unless set
    set_cb = TermwiseDPSGD(max_grad_norm=0.8, batch_max_grad_norm=0.1, noise_multiplier=1.0)
    assert set_cb.sensitivity == {"sample": 0.8, "batch": 0.2} and set_cb.sample_share == 0.5
    set_cb.check_noise_composition()


# ---- term-wise batch part on a parameter subset ----------------------------------------------
SUBSET = ("enc.2.",)  # ToyVAE's encoder output layer


def subset_mech(**kw):
    mech = TermwiseDPSGD(max_grad_norm=0.5, batch_max_grad_norm=0.05, batch_params=SUBSET,
                         noise_multiplier=1.0, **kw)
    mech.set_sampling(8.0)
    return mech


def test_subset_batch_part_is_zero_outside_and_bounded_on_neighbours():
    torch.manual_seed(0)
    model = ToyVAE(d_in=16, lam=50.0)
    mech = subset_mech()
    names = [n for n, _ in model.named_parameters()]
    inside = [n for n in names if n.startswith(SUBSET)]
    assert inside and len(inside) < len(names)
    worst = 0.0
    for s, s_plus in neighbours(SHAPE, torch.Generator().manual_seed(3)):
        a = mech.aggregate(model, (s.flatten(1),))
        b = mech.aggregate(model, (s_plus.flatten(1),))
        assert set(a["batch"]) == set(inside)  # nothing released outside the subset
        d = float(global_norm({k: a["batch"][k] - b["batch"][k] for k in inside}))
        assert math.isfinite(d) and d <= mech.sensitivity["batch"] * (1 + REL_TOL)
        worst = max(worst, d)
        assert float(global_norm(a["batch"])) <= 0.05 * (1 + REL_TOL)
    assert worst > 0.5 * mech.sensitivity["batch"]  # the bound is approached, not vacuous


def test_subset_noise_is_per_coordinate():
    model = ToyVAE(d_in=16)
    mech = subset_mech()
    b = 8.0
    inside, outside = mech.update_noise_std(b, "enc.2.weight"), mech.update_noise_std(b,
                                                                                     "dec.0.weight")
    sigma_s, sigma_b = mech.noise_multipliers["sample"], mech.noise_multipliers["batch"]
    assert outside == pytest.approx(sigma_s * 0.5 / b)
    assert inside == pytest.approx(math.hypot(sigma_s * 0.5 / b, sigma_b * 0.1))
    assert mech.update_noise_std(b) == pytest.approx(inside)
    zeros = {part: {n: torch.zeros(4000) for n in mech.select(dict(model.named_parameters()),
                                                                 part)}
             for part in mech.parts}
    out = mech.privatize(zeros, b, torch.Generator().manual_seed(0))
    assert float(out["enc.2.weight"].std()) == pytest.approx(inside, rel=0.05)
    assert float(out["dec.0.weight"].std()) == pytest.approx(outside, rel=0.05)


def test_subset_must_match_a_parameter():
    mech = TermwiseDPSGD(batch_params=["nope."], batch_max_grad_norm=0.1, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="match no trainable parameter"):
        mech.aggregate(ToyVAE(d_in=16), (torch.randn(3, 16),))
    with pytest.raises(ValueError, match="prefixes"):
        TermwiseDPSGD(batch_params="encoder.")


def test_privatize_refuses_a_statistic_outside_its_parts_coverage():
    model = ToyVAE(d_in=16)
    mech = subset_mech()
    stats = mech.aggregate(model, (torch.randn(5, 16),))
    stats["batch"]["dec.0.weight"] = torch.zeros_like(model.dec[0].weight)  # not covered
    with pytest.raises(ValueError, match="outside the parameters it covers"):
        mech.privatize(stats, 8.0, torch.Generator().manual_seed(0))


def test_dp_adam_gets_each_parameters_noise_std():
    from lit_dpvae.optim import DPAdamBC

    model = ToyVAE(d_in=16)
    mech = subset_mech()
    opt = DPAdamBC(model.parameters(), lr=1e-3)
    opt.set_noise(mech, 8.0, model)
    assert opt.param_noise_std[model.enc[2].weight] == pytest.approx(
        mech.update_noise_std(8.0, "enc.2.weight"))
    assert opt.param_noise_std[model.dec[0].weight] == pytest.approx(
        mech.update_noise_std(8.0, "dec.0.weight"))
    assert opt.param_noise_std[model.dec[0].weight] < opt.noise_std


def test_report_of_a_strategy_that_never_sampled(tmp_path):
    """validate/test only: the default C_b = C/(2B) is unknown, the report still works."""
    strategy = DPStrategy(target_epsilon=3.0, target_delta=1e-3)
    model = small(ClusterVAE, divergence="aggregate_kl")
    strategy.connect(model)
    assert strategy.mechanism_name == "termwise"
    report = strategy.privacy_report()
    assert report.mechanism == "termwise" and report.steps == 0


def test_subset_prefix_that_spans_modules_warns_and_bad_batch_sizes_are_refused():
    mech = TermwiseDPSGD(batch_params=["enc."], batch_max_grad_norm=0.1)
    params = dict(ToyVAE(d_in=16).named_parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mech.select(params, "batch")  # ends with '.': no warning
    loose = TermwiseDPSGD(batch_params=["enc.2"], batch_max_grad_norm=0.1)
    with pytest.warns(UserWarning, match="end a module prefix with"):  # 'enc.2' spans modules
        loose.select({**params, "enc.20.weight": params["enc.2.weight"]}, "batch")
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="expected_batch_size"):
            TermwiseDPSGD().set_sampling(bad)

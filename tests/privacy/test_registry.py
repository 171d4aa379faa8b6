"""The mechanism registry: every registered mechanism meets the interface contract (the tests
are parametrised over the registry, so a new mechanism is covered by registering it), and a
toy mechanism added by one class and one registration trains through the strategy."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch

from lit_dpvae.privacy import LossTerms, global_norm
from lit_dpvae.privacy.collectives import LOCAL, Collectives
from lit_dpvae.privacy.mechanisms import (
    AutoMechanism,
    Mechanism,
    Stats,
    build_mechanism,
    effective_noise_multiplier,
    mechanism_class,
    mechanism_names,
    register_mechanism,
    unregister_mechanism,
)
from lit_dpvae.strategy import DPStrategy
from tests.lightning_toys import ToyData, ToyLitVAE
from tests.privacy.toys import diff_norms, neighbours

REL_TOL = 1e-5


def _candidate_models():
    """Models a mechanism may need: opaque batch-wise terms, none, pairwise terms."""
    return [ToyLitVAE(batch_term=True), ToyLitVAE(batch_term=False), ToyLitVAE(pairwise=True)]


def _compatible(mechanism: Mechanism):
    """The first candidate model the mechanism accepts, with a batch of it ("auto": the first
    candidate, whatever it chooses for it)."""
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(0))
    mechanism.set_sampling(7.0)  # the strategy does this before the first step
    for model in _candidate_models():
        if isinstance(mechanism, AutoMechanism):
            return model
        try:
            mechanism.aggregate(model, (x,))
        except ValueError:
            continue
        return model
    raise AssertionError(f"{mechanism!r} accepts none of the candidate models")


def check_mechanism_contract(name: str) -> None:
    """What every registered mechanism must do (the strategy and the accountant rely on it)."""
    cls = mechanism_class(name)
    mech = build_mechanism(name)
    assert mech.name == name and isinstance(mech, cls)
    if isinstance(mech, AutoMechanism):  # a placeholder: what it chooses meets the contract
        for model in _candidate_models():
            chosen, why = mech.resolve(model)
            assert chosen.name in mechanism_names() and chosen.name != "auto" and why
        return
    mech.set_sampling(5.0)  # before the first step, as the strategy does
    assert mech.noise_multiplier == 0.0  # σ belongs to the budget until it sets it
    if mech.private:
        mech.noise_multiplier = 1.3
    parts = mech.parts
    assert parts and set(mech.summed_over_records) >= set(parts)
    assert set(mech.sensitivity) == set(parts) == set(mech.noise_multipliers)
    if mech.private:
        assert all(0 < s < math.inf for s in mech.sensitivity.values())
        assert math.isclose(effective_noise_multiplier(mech), 1.3, rel_tol=1e-12)
    model = _compatible(mech)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    stats = mech.aggregate(model, (x,), LOCAL)
    assert list(stats) == list(parts)
    for part in parts:
        assert {n: t.shape for n, t in stats[part].items()} == {n: p.shape
                                                                for n, p in params.items()}
    empty = mech.aggregate(model, (x[:0],))
    assert all(float(global_norm(v)) == 0.0 for v in empty.values())
    update = mech.privatize(stats, 5.0, torch.Generator().manual_seed(2))
    assert set(update) == set(params)
    if not mech.private:
        return
    # Each part's noise has std σ_k Δ_k (a part's statistic of zeros, ~10⁵ coordinates).
    big = torch.nn.Sequential(torch.nn.Linear(400, 250))
    noisy = mech.add_noise(mech.zeros(big), torch.Generator().manual_seed(3))
    for part in parts:
        values = torch.cat([v.flatten() for v in noisy[part].values()])
        want = mech.noise_multipliers[part] * mech.sensitivity[part]
        assert abs(float(values.std()) / want - 1) < 0.02, part
    # Add/remove neighbours (random and adversarial records) move each part by at most Δ_k.
    worst = {part: 0.0 for part in parts}
    for s, s_plus in neighbours((6,), torch.Generator().manual_seed(4)):
        for part, d in diff_norms(mech, model, s, s_plus).items():
            assert math.isfinite(d) and d <= mech.sensitivity[part] * (1 + REL_TOL), (part, d)
            worst[part] = max(worst[part], d)
    assert all(w > 0 for w in worst.values()), worst  # not vacuous


@pytest.mark.parametrize("name", mechanism_names())
def test_every_registered_mechanism_meets_the_contract(name):
    check_mechanism_contract(name)


@pytest.mark.parametrize("name", mechanism_names())
def test_every_registered_mechanism_trains_through_the_strategy(name, tmp_path):
    model = _compatible(build_mechanism(name))
    budget = {} if not mechanism_class(name).private else {"target_epsilon": 4.0}
    strategy = DPStrategy(mechanism=name, noise_seed=3, **budget)
    _fit(strategy, model, tmp_path)
    assert strategy.run.budget.steps == 4
    report = strategy.privacy_report()
    assert report.mechanism == (name if name != "auto" else strategy.mechanism_name)
    assert report.steps == 4 and strategy.mechanism_name != "auto"
    assert report.epsilon <= 4.0 * (1 + 1e-6) if strategy.is_private else math.isinf(
        report.epsilon)


def test_registry_refuses_what_it_cannot_build():
    with pytest.raises(ValueError, match="unknown mechanism 'nope'"):
        build_mechanism("nope")
    with pytest.raises(ValueError, match="unknown setting.*max_grad_nrom.*takes.*max_grad_norm"):
        build_mechanism("termwise", batch_max_grad_norm=1.0, max_grad_nrom=1.0)
    with pytest.raises(ValueError, match="target_epsilion.*DPStrategy itself takes.*target_eps"):
        DPStrategy(target_epsilion=3.0)  # a strategy keyword's typo names both lists
    with pytest.warns(UserWarning, match="non-private mechanism ignores target_epsilon"):
        DPStrategy(mechanism="nonprivate", target_epsilon=3.0)
    with pytest.warns(UserWarning, match="does not use \\['pair_max_grad_norm'\\]"):
        build_mechanism("termwise", batch_max_grad_norm=1.0, pair_max_grad_norm=1.0)
    with pytest.raises(ValueError, match="already registered"):
        register_mechanism("termwise")(type("Other", (Mechanism,), {}))
    with pytest.raises(ValueError, match="its settings are its own"):
        build_mechanism(build_mechanism("termwise", batch_max_grad_norm=1.0), max_grad_norm=2.0)
    with pytest.raises(TypeError, match="not a Mechanism"):
        register_mechanism("plain")(object)


# -- a toy mechanism: one class, one registration -----------------------------------------
class SampleOnlyDPSGD(Mechanism):
    """DP-SGD of the per-record terms only (a toy: what TermwiseDPSGD does with γ = 1)."""

    parts = ("sample",)
    summed_over_records = {"sample": True}

    def __init__(self, *, max_grad_norm: float = 1.0, noise_multiplier: float = 0.0,
                 backend: str = "ghost") -> None:
        self.max_grad_norm = float(max_grad_norm)
        super().__init__(noise_multiplier=noise_multiplier, backend=backend)

    @property
    def sensitivity(self) -> dict[str, float]:
        return {"sample": self.max_grad_norm}

    def aggregate(self, module, batch, comm: Collectives = LOCAL) -> Stats:
        n = self.start(module, batch, comm)
        if self.skip(n, comm):
            return {"sample": comm.all_reduce(self.zeros(module)["sample"])}

        def run() -> tuple[torch.Tensor, LossTerms]:
            terms = self.forward_terms(module, batch, n)
            return terms.per_record().sum(), terms

        sample, _, _ = self.clipper.clipped_sum(module, run, self.max_grad_norm, n)
        return {"sample": comm.all_reduce(sample)}


@pytest.fixture
def toy_registered():
    register_mechanism("sample_only")(SampleOnlyDPSGD)
    yield "sample_only"
    unregister_mechanism("sample_only")


def _fit(strategy, model, tmp_path, steps: int = 4, ckpt_path=None) -> pl.Trainer:
    trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=steps,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, ToyData(n=60, sample_rate=0.2), ckpt_path=ckpt_path)
    return trainer


def test_a_toy_mechanism_is_one_class_and_one_registration(toy_registered, tmp_path):
    """Registered by name, the toy trains through the strategy, is covered by the contract
    checks, checkpoints under its name, and (being DP-SGD) releases exactly term-wise γ = 1's
    updates on the same seeds."""
    assert toy_registered in mechanism_names()
    check_mechanism_contract(toy_registered)
    toy = DPStrategy(mechanism=toy_registered, target_epsilon=6.0, noise_multiplier=2.0,
                     max_grad_norm=0.4, noise_seed=5)
    trainer = _fit(toy, ToyLitVAE(batch_term=False), tmp_path)
    ref = DPStrategy(mechanism="termwise", sample_share=1.0, target_epsilon=6.0,
                     noise_multiplier=2.0, max_grad_norm=0.4, noise_seed=5)
    ref_model = ToyLitVAE(batch_term=False)
    _fit(ref, ref_model, tmp_path)
    assert toy.privacy_state_dict()["mechanism"] == toy_registered
    assert trainer.global_step == 4 and toy.epsilon() == ref.epsilon() <= 6.0 * (1 + 1e-6)
    start = ToyLitVAE(batch_term=False).state_dict()
    for name, value in trainer.lightning_module.state_dict().items():
        assert torch.equal(value, ref_model.state_dict()[name]), name
    assert any(not torch.equal(start[k], ref_model.state_dict()[k]) for k in start)
    ckpt = tmp_path / "toy.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = DPStrategy(mechanism=toy_registered, target_epsilon=6.0, noise_multiplier=2.0,
                         max_grad_norm=0.4)
    _fit(resumed, ToyLitVAE(batch_term=False), tmp_path, steps=6, ckpt_path=ckpt)
    assert resumed.accountant.steps == 6 and toy.epsilon() < resumed.epsilon() <= 6.0 * (1 + 1e-6)
    with pytest.raises(ValueError, match="mechanism='sample_only'"):  # resume with another
        _fit(DPStrategy(mechanism="termwise", sample_share=1.0, target_epsilon=6.0,
                        noise_multiplier=2.0),
             ToyLitVAE(batch_term=False), tmp_path, steps=6, ckpt_path=ckpt)


def test_a_mechanism_object_keeps_its_settings_in_one_place(tmp_path):
    """The strategy takes a Mechanism object (LightningCLI class_path) as it is."""
    from lit_dpvae.privacy import TermwiseDPSGD

    mech = TermwiseDPSGD(max_grad_norm=0.3, batch_max_grad_norm=0.05)
    strategy = DPStrategy(mechanism=mech, target_epsilon=3.0, noise_seed=1)
    assert strategy.mechanism is mech and strategy.mechanism_name == "termwise"
    _fit(strategy, ToyLitVAE(), tmp_path)
    assert mech.noise_multiplier > 0 and strategy.privacy_report().sensitivity == {
        "sample": 0.3, "batch": 0.1}


class TwoParts(SampleOnlyDPSGD):
    """A two-part toy that does not override ``noise_multipliers`` (the reviewer's case)."""

    parts = ("sample", "again")
    summed_over_records = {"sample": True, "again": True}

    @property
    def sensitivity(self) -> dict[str, float]:
        return {"sample": self.max_grad_norm, "again": self.max_grad_norm}

    def aggregate(self, module, batch, comm: Collectives = LOCAL) -> Stats:
        stats = super().aggregate(module, batch)  # nested: keeps the caller's collectives
        return {"sample": stats["sample"], "again": stats["sample"]}


def test_the_default_per_part_noise_composes_to_sigma_eff():
    """Every part gets σ_eff·√P by default, so the release is one Gaussian mechanism at the
    σ_eff the accountant records; a mechanism whose parts compose to less is refused."""
    mech = TwoParts(noise_multiplier=1.3)
    assert mech.noise_multipliers == {"sample": 1.3 * math.sqrt(2), "again": 1.3 * math.sqrt(2)}
    assert math.isclose(effective_noise_multiplier(mech), 1.3)

    class UnderNoised(TwoParts):
        @property
        def noise_multipliers(self):
            return {p: self.noise_multiplier for p in self.parts}

    bad = UnderNoised(noise_multiplier=1.3)
    with pytest.raises(ValueError, match="compose to σ_eff=0.919"):
        bad.privatize(bad.zeros(ToyLitVAE()), 5.0)
    with pytest.raises(ValueError, match="finite"):
        bad.noise_multiplier = math.inf


def test_a_nested_aggregate_keeps_the_callers_collectives():
    from lit_dpvae.privacy import collectives

    seen = []

    class Spy(Collectives):
        world_size = 1

        def all_reduce(self, stats):
            seen.append(collectives.current() is spy)
            return stats

    spy = Spy()
    TwoParts(noise_multiplier=1.0).aggregate(ToyLitVAE(batch_term=False),
                                             (torch.randn(4, 6),), spy)
    assert seen == [True]


def test_a_two_record_first_batch_does_not_end_the_probe():
    """The replacement check needs ≥ 3 records: after a 2-record batch the next one is probed."""
    mech = build_mechanism("termwise", sample_share=1.0)
    mech.noise_multiplier = 1.0
    model = ToyLitVAE(batch_term=False)
    mech.aggregate(model, (torch.randn(2, 6),))
    assert mech._probed is None
    mech.aggregate(model, (torch.randn(3, 6),))
    assert mech._probed is model


def test_a_mechanism_object_belongs_to_one_strategy():
    from lit_dpvae.privacy import TermwiseDPSGD

    mech = TermwiseDPSGD(batch_max_grad_norm=1.0, )
    first = DPStrategy(mechanism=mech, target_epsilon=1.0)
    assert first.mechanism is mech
    with pytest.raises(ValueError, match="already belongs to another strategy"):
        DPStrategy(mechanism=mech, target_epsilon=1.0)
    import pickle

    assert pickle.loads(pickle.dumps(mech)).name == "termwise"  # spawned processes


def test_a_part_without_a_positive_finite_sensitivity_is_refused():
    class Zero(SampleOnlyDPSGD):
        @property
        def sensitivity(self):
            return {"sample": 0.0}

    mech = Zero(noise_multiplier=1.0)
    with pytest.raises(ValueError, match="finite bound > 0"):
        mech.privatize(mech.zeros(ToyLitVAE()), 5.0)


def test_loading_one_checkpoint_into_a_trained_module_counts_it_once(tmp_path):
    """The two hooks of one load (on_load_checkpoint, then the strategy's weight restore) and a
    second load of the same checkpoint compose its spend once (second review)."""
    from lit_dpvae.privacy.accounting import PrivacyAccountant
    from lit_dpvae.privacy.provenance import combine_provenance

    def prov(history, mechanism="termwise"):
        acc = PrivacyAccountant("rdp")
        acc.load_state_dict({"accountant": "rdp", "history": history, "non_private_steps": 0})
        return {"mechanism": mechanism, "accountant": acc}

    own, ckpt = prov([(3.0, 0.1, 1)]), prov([(1.5, 0.1, 8)])
    once = combine_provenance(own, ckpt)
    twice = combine_provenance(once, prov([(1.5, 0.1, 8)]))
    assert once["accountant"].history == twice["accountant"].history == [(3.0, 0.1, 1),
                                                                         (1.5, 0.1, 8)]
    prv = prov([(1.5, 0.1, 8)])
    prv["accountant"] = PrivacyAccountant.from_state_dict(
        {"accountant": "prv", "history": [(1.5, 0.1, 8)], "non_private_steps": 0})
    assert combine_provenance(own, prv)["mechanism"] == "mixed"  # refused by a private fit
    assert combine_provenance(prov([], "nonprivate"), prv)["mechanism"] == "nonprivate"

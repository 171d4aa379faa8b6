"""TermwiseDPStrategy on one device and across 2 CPU processes (ddp_spawn, gloo)."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch

from lit_dpvae.callbacks import PrivacySpend
from lit_dpvae.strategy import PrivacyConfigError, TermwiseDPStrategy
from tests.lightning_toys import RecordRanks, ToyData, ToyLitVAE, make_strategy, make_trainer


@pytest.mark.parametrize("mechanism", ["termwise", "pairwise", "dpsgd"])
def test_two_processes_match_one_device_and_stay_identical(tmp_path, mechanism):
    """Same records, sampler seed and noise seed: the 2-process run (global batch split across
    ranks, divergence on the gathered global batch, sums all-reduced, noise added identically)
    ends with the weights of the 1-device run; replicas are bit-identical; no hang on empty
    local batches; both ranks take the same number of steps."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    steps = 8
    pairwise = mechanism == "pairwise"
    extra = {"mechanism": mechanism, "pair_max_grad_norm": 0.05} if pairwise else {}
    # dpsgd: no batch-wise term (term-wise with γ = 1): an empty rank's logged terms once had
    # no keys, and train/* logging's all-reduce then waited forever
    model = dict(pairwise=pairwise, batch_term=mechanism != "dpsgd")
    if mechanism == "dpsgd":
        extra = {"sample_share": 1.0}
    make_trainer(make_strategy(**extra), one, max_steps=steps,
                 callbacks=[RecordRanks(str(one))]).fit(ToyLitVAE(**model),
                                                        ToyData(sample_rate=0.06))
    make_trainer(make_strategy(start_method="spawn", **extra), two, devices=2, max_steps=steps,
             callbacks=[RecordRanks(str(two))]).fit(ToyLitVAE(**model),
                                                    ToyData(sample_rate=0.06))
    ref = torch.load(one / "rank0.pt")
    ranks = [torch.load(two / f"rank{r}.pt") for r in range(2)]
    assert ref["steps"] == ranks[0]["steps"] == ranks[1]["steps"] == steps
    assert any(s == 0 for r in ranks for s in r["sizes"]), "the test must include empty batches"
    for r in range(2):  # the ranks' local batches partition the global one
        assert len(ranks[r]["sizes"]) == steps
    assert [a + b for a, b in zip(ranks[0]["sizes"], ranks[1]["sizes"])] == ref["sizes"]
    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), f"replicas drifted: {name}"
        torch.testing.assert_close(value, ref["state"][name], rtol=1e-5, atol=1e-6)
    assert ranks[0]["epsilon"] == ref["epsilon"] > 0
    # train/* shows the global batch's values whatever the number of processes (it once showed
    # rank 0's share: train/loss halved next to an unhalved recon).
    compared = 0
    for t, size in enumerate(ranks[0]["sizes"]):
        if size:  # a rank with an empty local batch logs nothing at that step
            assert set(ranks[0]["logged"][t]) == set(ref["logged"][t]) >= {"train/loss"}
            for key, value in ref["logged"][t].items():
                assert math.isclose(ranks[0]["logged"][t][key], value, rel_tol=1e-5,
                                    abs_tol=1e-6), (t, key)
            compared += 1
    assert compared >= 3
    start = ToyLitVAE().state_dict()
    assert any(not torch.allclose(start[k], ref["state"][k]) for k in start)


def test_logged_epsilon_equals_the_accountant_and_sigma_is_calibrated(tmp_path):
    spend = PrivacySpend(log_every_n_steps=1)
    strategy = TermwiseDPStrategy(target_epsilon=2.0, target_delta=1e-3, max_grad_norm=0.5,
                                  noise_seed=1)
    trainer = make_trainer(strategy, tmp_path, max_steps=10, callbacks=[spend])
    trainer.fit(ToyLitVAE(), ToyData(n=200, sample_rate=0.1))
    assert strategy.accountant.steps == 10
    eps = strategy.epsilon()
    assert 2.0 - 0.05 <= eps <= 2.0  # calibrated for exactly the planned 10 steps
    assert math.isclose(float(trainer.callback_metrics["privacy/epsilon"]), eps, rel_tol=1e-6)
    assert float(trainer.callback_metrics["privacy/steps"]) == 10
    assert math.isclose(float(trainer.callback_metrics["privacy/delta"]), 1e-3, rel_tol=1e-6)
    assert math.isclose(float(trainer.callback_metrics["privacy/sigma_eff"]),
                        strategy.mechanism.noise_multiplier)


def test_two_processes_stop_together_at_the_budget_and_finish_the_run(tmp_path):
    """σ fixed, the budget stops the run long before max_steps: with 2 processes the last step
    that fits is the last step taken (Lightning refuses a skipped step, ``None``, in
    distributed training), both ranks stop there and end the run normally (on_train_end)."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    budget = dict(noise_multiplier=2.0, target_epsilon=1.0, target_delta=1e-3)
    make_trainer(make_strategy(**budget), one, max_steps=10_000, max_epochs=None,
                 callbacks=[RecordRanks(str(one))]).fit(ToyLitVAE(), ToyData(sample_rate=0.06))
    make_trainer(make_strategy(start_method="spawn", **budget), two, devices=2,
                 max_steps=10_000, max_epochs=None,
                 callbacks=[RecordRanks(str(two))]).fit(ToyLitVAE(), ToyData(sample_rate=0.06))
    ref = torch.load(one / "rank0.pt")
    ranks = [torch.load(two / f"rank{r}.pt") for r in range(2)]
    assert 0 < ref["steps"] < 10_000 and ref["epsilon"] <= 1.0
    assert ranks[0]["steps"] == ranks[1]["steps"] == ref["steps"]
    assert ranks[0]["epsilon"] == ranks[1]["epsilon"] == ref["epsilon"]


def test_training_stops_before_the_budget_would_be_exceeded(tmp_path):
    strategy = make_strategy(noise_multiplier=2.0, target_epsilon=1.0, target_delta=1e-3)
    trainer = make_trainer(strategy, tmp_path, max_steps=10_000, max_epochs=None)
    # With σ fixed, target_epsilon is a stop rule: the run ends at the last step that fits.
    trainer.fit(ToyLitVAE(), ToyData(n=200, sample_rate=0.1))
    assert strategy.budget_exhausted
    steps = strategy.accountant.steps
    assert 0 < steps < 10_000
    assert strategy.epsilon() <= 1.0 < strategy.accountant.epsilon_after(
        1e-3, strategy.mechanism.noise_multiplier, 0.1, 1)
    # Resuming a spent budget is refused before any step.
    ckpt = tmp_path / "spent.ckpt"
    trainer.save_checkpoint(ckpt)
    again = make_strategy(noise_multiplier=2.0, target_epsilon=1.0, target_delta=1e-3)
    with pytest.raises(PrivacyConfigError, match="already spent"):
        make_trainer(again, tmp_path, max_steps=20_000, max_epochs=None).fit(
            ToyLitVAE(), ToyData(n=200, sample_rate=0.1), ckpt_path=str(ckpt))


def test_resume_from_a_mid_run_checkpoint_matches_an_uninterrupted_run(tmp_path):
    """With exact_resume=True (testing only) a continuation replays the uninterrupted run bit for
    bit; by default every resume draws fresh noise, so two continuations of one checkpoint
    differ (their difference would otherwise be a noise-free function of the data)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(epochs, folder, ckpt=None, **kwargs):
        strategy = make_strategy(noise_seed=5, **kwargs)
        saver = ModelCheckpoint(dirpath=tmp_path / folder, save_last=True, save_top_k=0)
        trainer = make_trainer(strategy, tmp_path, max_steps=-1, max_epochs=epochs,
                           enable_checkpointing=True, callbacks=[saver])
        model = ToyLitVAE()
        trainer.fit(model, ToyData(n=40, sample_rate=0.25), ckpt_path=ckpt)
        return model, strategy

    full_model, full = run(3, "full")
    run(1, "part")  # writes part/last.ckpt after epoch 1 of 3
    last = str(tmp_path / "part" / "last.ckpt")
    assert torch.load(last, weights_only=False)["global_step"] == 4
    resumed_model, resumed = run(3, "a", ckpt=last, exact_resume=True)
    assert resumed.accountant.steps == full.accountant.steps == 12
    assert resumed.epsilon() == full.epsilon()
    for (name, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    fork_1, s1 = run(3, "b", ckpt=last)
    fork_2, s2 = run(3, "c", ckpt=last)
    assert s1.accountant.steps == s2.accountant.steps == 12 and s1.epsilon() == full.epsilon()
    for a, b, c in zip(fork_1.state_dict().values(), fork_2.state_dict().values(),
                       full_model.state_dict().values()):
        assert not torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize(
    "trainer_kwargs, match",
    [
        ({"accumulate_grad_batches": 2}, "accumulate_grad_batches"),
        ({"gradient_clip_val": 1.0}, "gradient_clip_val"),
        ({"precision": "16-mixed"}, "precision"),
        ({"precision": "bf16-mixed"}, "precision"),
    ],
)
def test_unsafe_trainer_settings_are_refused_before_the_first_step(tmp_path, trainer_kwargs,
                                                                   match):
    model = ToyLitVAE()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PrivacyConfigError, match=match):
        make_trainer(make_strategy(), tmp_path, **trainer_kwargs).fit(model, ToyData())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_batchnorm_and_non_poisson_loaders_are_refused(tmp_path):
    from lit_dpvae.privacy.capture import UnsupportedModuleError

    with pytest.raises(UnsupportedModuleError, match="GroupNorm"):
        make_trainer(make_strategy(), tmp_path).fit(ToyLitVAE(batchnorm=True), ToyData())
    with pytest.raises(PrivacyConfigError, match="Poisson"):
        make_trainer(make_strategy(), tmp_path).fit(ToyLitVAE(), ToyData(poisson=False))


def test_bad_strategy_settings_are_refused():
    with pytest.raises(PrivacyConfigError, match="budget"):
        TermwiseDPStrategy()
    with pytest.raises(ValueError, match="mechanism"):
        TermwiseDPStrategy(mechanism="magic", noise_multiplier=1.0)
    with pytest.raises(ValueError, match="target_delta"):
        TermwiseDPStrategy(target_epsilon=1.0, target_delta=2.0)


def test_delta_must_be_below_one_over_n(tmp_path):
    strategy = TermwiseDPStrategy(target_epsilon=1.0, target_delta=0.05)
    with pytest.raises(ValueError, match="1/N"):
        make_trainer(strategy, tmp_path).fit(ToyLitVAE(), ToyData(n=40))


def test_strategy_is_registered_by_name():
    from lightning.pytorch.strategies import StrategyRegistry

    assert "termwise_dp" in StrategyRegistry


def test_manual_optimization_is_refused(tmp_path):
    class Manual(ToyLitVAE):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(PrivacyConfigError, match="manual optimization"):
        make_trainer(make_strategy(), tmp_path).fit(Manual(), ToyData())


def test_sigma_too_small_and_unbounded_plans_are_refused(tmp_path):
    with pytest.raises(PrivacyConfigError, match="too small"):
        make_trainer(make_strategy(noise_multiplier=0.3, target_epsilon=0.5, target_delta=1e-3),
                 tmp_path).fit(ToyLitVAE(), ToyData(n=200))
    with pytest.raises(PrivacyConfigError, match="unbounded"):
        make_trainer(TermwiseDPStrategy(target_epsilon=1.0, target_delta=1e-3), tmp_path,
                 max_steps=-1, max_epochs=-1).fit(ToyLitVAE(), ToyData(n=200))


def test_resuming_needs_the_privacy_state_and_the_same_mechanism(tmp_path):
    plain = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                       enable_progress_bar=False, enable_model_summary=False)
    plain.fit(ToyLitVAE(), ToyData(poisson=False))
    plain.save_checkpoint(tmp_path / "plain.ckpt")
    with pytest.raises(PrivacyConfigError, match="no privacy state"):
        make_trainer(make_strategy(), tmp_path, max_steps=4).fit(
            ToyLitVAE(), ToyData(), ckpt_path=str(tmp_path / "plain.ckpt"))
    trainer = make_trainer(make_strategy(), tmp_path, max_steps=2)
    trainer.fit(ToyLitVAE(), ToyData())
    trainer.save_checkpoint(tmp_path / "termwise.ckpt")
    naive = make_strategy(mechanism="naive", batch_max_grad_norm=1.0)
    with pytest.raises(PrivacyConfigError, match="same mechanism"):
        make_trainer(naive, tmp_path, max_steps=4).fit(
            ToyLitVAE(), ToyData(), ckpt_path=str(tmp_path / "termwise.ckpt"))

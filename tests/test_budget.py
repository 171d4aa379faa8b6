"""The stop rule and the privacy state across fits, reloaded loaders and resumes (issue 13,
classes 2 and 6): whatever changes between or during fits, the final ε stays ≤ target_epsilon,
and no continuation silently resets, raises or replays the privacy state."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch

from lit_dpvae.privacy import poisson_dataloader
from lit_dpvae.strategy import PrivacyConfigError, TermwiseDPStrategy
from tests.lightning_toys import ToyData, ToyLitVAE, make_strategy, make_trainer

TARGET, DELTA = 2.0, 1e-3


class GrowingData(ToyData):
    """A data module whose sample rate grows at every reload of its train loader."""

    def __init__(self, rates: list[float]) -> None:
        super().__init__(n=200, sample_rate=rates[0])
        self.rates, self.loads = rates, 0

    def train_dataloader(self):
        self.sample_rate = self.rates[min(self.loads, len(self.rates) - 1)]
        self.loads += 1
        return super().train_dataloader()


def _budgeted(**kwargs) -> TermwiseDPStrategy:
    return make_strategy(**{"noise_multiplier": None, "target_epsilon": TARGET,
                        "target_delta": DELTA, **kwargs})


def test_a_second_fit_with_a_larger_sample_rate_stays_within_the_target(tmp_path):
    strategy = _budgeted(noise_multiplier=3.0)  # σ fixed: target_epsilon is the stop rule
    trainer = make_trainer(strategy, tmp_path, max_steps=10, max_epochs=None)
    model = ToyLitVAE()
    trainer.fit(model, ToyData(n=200, sample_rate=0.05))
    assert strategy.epsilon() <= TARGET and strategy.accountant.steps == 10
    trainer.fit_loop.epoch_loop.max_steps = 400  # continue, now with q = 0.5
    with pytest.warns(UserWarning, match="sample rate changed"):
        trainer.fit(model, ToyData(n=200, sample_rate=0.5))
    assert strategy.budget_exhausted
    assert 10 < strategy.accountant.steps < 400
    assert strategy.epsilon() <= TARGET * (1 + 1e-6)


def test_reloaded_loaders_with_a_growing_batch_stay_within_the_target(tmp_path):
    strategy = _budgeted()
    trainer = make_trainer(strategy, tmp_path, max_steps=-1, max_epochs=30,
                       reload_dataloaders_every_n_epochs=1)
    trainer.fit(ToyLitVAE(), GrowingData([0.02, 0.1, 0.3, 0.6, 0.9]))
    assert strategy.budget_exhausted
    assert strategy.epsilon() <= TARGET * (1 + 1e-6)


def test_resume_with_another_batch_size_or_budget(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    first = _budgeted(noise_multiplier=3.0)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    make_trainer(first, tmp_path, max_steps=20, max_epochs=None, enable_checkpointing=True,
             callbacks=[saver]).fit(ToyLitVAE(), ToyData(n=200, sample_rate=0.05))
    last = str(tmp_path / "ckpt" / "last.ckpt")
    # another batch size (q 0.05 -> 0.5), planned for far more steps: stops at the target
    resumed = _budgeted(noise_multiplier=3.0)
    with pytest.warns(UserWarning, match="sample rate changed"):
        make_trainer(resumed, tmp_path, max_steps=2000, max_epochs=None).fit(
            ToyLitVAE(), ToyData(n=200, sample_rate=0.5), ckpt_path=last)
    assert resumed.budget_exhausted and 20 < resumed.accountant.steps < 2000
    assert resumed.epsilon() <= TARGET * (1 + 1e-6)
    # a raised target (or none at all) is refused ...
    for kwargs in ({"target_epsilon": 2 * TARGET}, {"target_epsilon": None}):
        bigger = make_strategy(noise_multiplier=1.0, target_delta=DELTA, **kwargs)
        with pytest.raises(PrivacyConfigError, match="allow_budget_increase"):
            make_trainer(bigger, tmp_path, max_steps=200, max_epochs=None).fit(
                ToyLitVAE(), ToyData(n=200, sample_rate=0.05), ckpt_path=last)
    # ... unless acknowledged, and then said out loud, with the stop rule at the new target
    allowed = _budgeted(noise_multiplier=3.0, target_epsilon=2 * TARGET,
                        allow_budget_increase=True)
    with pytest.warns(UserWarning, match="budget of the whole run is now"):
        make_trainer(allowed, tmp_path, max_steps=5000, max_epochs=None).fit(
            ToyLitVAE(), ToyData(n=200, sample_rate=0.5), ckpt_path=last)
    assert TARGET < allowed.epsilon() <= 2 * TARGET * (1 + 1e-6)


def test_a_stop_rule_step_count_is_never_reused_for_another_sample_rate():
    """Unit level: the plan is redone when q changes in place (a sampler mutated mid-run)."""
    strategy = _budgeted()
    strategy.mechanism.noise_multiplier = 3.0
    loader = poisson_dataloader(ToyData(n=200).data, 0.05, seed=1)
    run, budget = strategy.run, strategy.budget
    run.sampler = loader.batch_sampler
    run.read_sampling(announce=False)
    assert not budget.next_step_exceeds(3.0, run.sample_rate)
    stop_small_q = budget.stop_at
    loader.batch_sampler.sample_rate = 0.9
    with pytest.warns(UserWarning, match="sample rate changed"):
        run.read_sampling(announce=True)
    assert run.sample_rate == 0.9
    assert not budget.next_step_exceeds(3.0, run.sample_rate)
    assert budget.stop_at < stop_small_q


# ---- warm starts: weights that already spent privacy -------------------------------------------
def test_a_new_strategy_on_dp_trained_weights_continues_their_accountant(tmp_path):
    model = ToyLitVAE()
    first = _budgeted()
    make_trainer(first, tmp_path, max_steps=10, max_epochs=None).fit(model, ToyData(n=200))
    spent = first.epsilon()
    second = _budgeted()
    with pytest.warns(UserWarning, match="warm start"):
        make_trainer(second, tmp_path, max_steps=10, max_epochs=None).fit(model, ToyData(n=200))
    assert second.accountant.steps == 20 and spent < second.epsilon() <= TARGET * (1 + 1e-6)
    # σ was calibrated for what was left: larger than the first run's
    assert second.mechanism.noise_multiplier > first.mechanism.noise_multiplier
    public = _budgeted(warm_start="public")
    with pytest.warns(UserWarning, match="warm_start='public'"):
        make_trainer(public, tmp_path, max_steps=2, max_epochs=None).fit(model, ToyData(n=200))
    assert public.accountant.steps == 2


def test_dp_fine_tuning_of_non_private_weights_is_refused(tmp_path):
    model = ToyLitVAE()
    make_trainer(TermwiseDPStrategy(mechanism="nonprivate"), tmp_path, max_steps=2).fit(
        model, ToyData(n=200))
    with pytest.raises(PrivacyConfigError, match="trained without privacy"):
        make_trainer(_budgeted(), tmp_path, max_steps=2, max_epochs=None).fit(model, ToyData(n=200))


def test_load_from_checkpoint_carries_the_privacy_spend(tmp_path):
    from lit_dpvae.data import DigitsDataModule
    from lit_dpvae.models import VanillaVAE

    model = VanillaVAE(data_shape=(1, 8, 8), latent_dim=2, hidden=(8,))
    data = DigitsDataModule(batch_size=64, seed=1)
    kwargs = dict(max_grad_norm=1.0, target_epsilon=TARGET, target_delta=1e-4,
                  sample_share=1.0)
    first = TermwiseDPStrategy(**kwargs)
    trainer = make_trainer(first, tmp_path, max_steps=5, max_epochs=None, limit_val_batches=0)
    trainer.fit(model, data)
    trainer.save_checkpoint(tmp_path / "dp.ckpt")
    loaded = VanillaVAE.load_from_checkpoint(tmp_path / "dp.ckpt")
    second = TermwiseDPStrategy(**kwargs)
    with pytest.warns(UserWarning, match="warm start"):
        make_trainer(second, tmp_path, max_steps=5, max_epochs=None, limit_val_batches=0).fit(
            loaded, DigitsDataModule(batch_size=64, seed=2))
    assert second.accountant.steps == 10
    assert first.epsilon() < second.epsilon() <= TARGET * (1 + 1e-6)
    torch.testing.assert_close(second.accountant.history[0][0], first.accountant.history[0][0])


def test_a_larger_delta_at_resume_is_refused(tmp_path):
    first = _budgeted(noise_multiplier=3.0, target_delta=1e-5)
    trainer = make_trainer(first, tmp_path, max_steps=5, max_epochs=None)
    trainer.fit(ToyLitVAE(), ToyData(n=200))
    path = tmp_path / "a.ckpt"
    trainer.save_checkpoint(path)
    with pytest.raises(PrivacyConfigError, match="target_delta"):
        make_trainer(_budgeted(noise_multiplier=3.0, target_delta=4e-3), tmp_path, max_steps=50,
                 max_epochs=None).fit(ToyLitVAE(), ToyData(n=200), ckpt_path=str(path))


def test_copies_and_interleaved_strategies_keep_the_weights_spend(tmp_path):
    a = _budgeted(noise_multiplier=1.5)
    ta = make_trainer(a, tmp_path, max_steps=10, max_epochs=None)
    model = ToyLitVAE()
    ta.fit(model, ToyData(n=200))
    # a copy by load_state_dict carries the spend (fingerprint of the weights)
    copy = ToyLitVAE()
    copy.load_state_dict(model.state_dict())
    c = _budgeted(noise_multiplier=1.5)
    with pytest.warns(UserWarning, match="warm start"):
        make_trainer(c, tmp_path, max_steps=5, max_epochs=None).fit(copy, ToyData(n=200))
    assert c.accountant.steps == 15
    # B continues the same object to the end of the budget; A's second fit adopts B's steps
    b = _budgeted(noise_multiplier=1.5)
    with pytest.warns(UserWarning, match="warm start"):
        make_trainer(b, tmp_path, max_steps=10**6, max_epochs=None).fit(model, ToyData(n=200))
    assert b.budget_exhausted
    ta.fit_loop.epoch_loop.max_steps = 10**6
    with pytest.warns(UserWarning, match="warm start"):
        ta.fit(model, ToyData(n=200))
    assert a.accountant.steps == b.accountant.steps
    assert a.epsilon() == pytest.approx(b.epsilon())
    assert a.epsilon() <= TARGET * (1 + 1e-6)


def test_validate_then_save_keeps_the_privacy_state(tmp_path):
    trainer = make_trainer(_budgeted(noise_multiplier=2.0), tmp_path, max_steps=8, max_epochs=None)
    trainer.fit(ToyLitVAE(), ToyData(n=200))
    trainer.save_checkpoint(tmp_path / "dp.ckpt")
    fresh = _budgeted(noise_multiplier=2.0)
    checker = make_trainer(fresh, tmp_path, max_steps=8, max_epochs=None, limit_val_batches=1)
    model = ToyLitVAE()
    checker.strategy._lightning_module = model
    checker.strategy.run.restored = None
    state = torch.load(tmp_path / "dp.ckpt", weights_only=False)
    fresh.load_checkpoint(tmp_path / "dp.ckpt")
    assert fresh.restored is not None
    again = fresh.privacy_state_dict()
    assert again["accountant"] == state["lit_dpvae_privacy"]["accountant"]


def test_exact_resume_from_an_end_of_epoch_checkpoint_never_replays_its_batches(tmp_path):
    """After an end-of-epoch checkpoint Lightning still reports the finished epoch as current;
    the sampler must continue with the next epoch's Poisson draws (replaying them would put two
    steps on one subsample), and exact_resume must then match the uninterrupted run bit for bit
    (a model that samples: InfoVAE)."""
    import glob

    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    from lit_dpvae.data import DigitsDataModule
    from lit_dpvae.models import InfoVAE

    class Batches(Callback):
        def __init__(self):
            self.seen = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.seen.append(float(batch[0].sum()))

    def run(folder, ckpt=None):
        pl.seed_everything(0, verbose=False)
        model = InfoVAE(data_shape=(1, 8, 8), latent_dim=4, hidden=(16,), lam=1.0,
                        bandwidths=(1.0,), n_prior_samples=16)
        strategy = TermwiseDPStrategy(noise_multiplier=1.0, batch_max_grad_norm=1e-3,
                                      sample_share=0.9, noise_seed=7, exact_resume=True)
        batches = Batches()
        saver = ModelCheckpoint(dirpath=tmp_path / folder, save_top_k=-1, every_n_epochs=1)
        trainer = make_trainer(strategy, tmp_path, max_steps=-1, max_epochs=3,
                           enable_checkpointing=True, callbacks=[saver, batches],
                           limit_val_batches=1)
        trainer.fit(model, DigitsDataModule(batch_size=400, seed=3), ckpt_path=ckpt)
        return model, batches.seen

    full, seen_full = run("full")
    ckpt = sorted(glob.glob(str(tmp_path / "full" / "epoch=0-*.ckpt")))[0]
    resumed, seen_resumed = run("resumed", ckpt)
    assert seen_resumed == seen_full[len(seen_full) - len(seen_resumed):]
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_partial_and_frozen_copies_keep_the_spend_but_fresh_models_do_not(tmp_path):
    model = ToyLitVAE()
    first = _budgeted(noise_multiplier=1.5)
    make_trainer(first, tmp_path, max_steps=6, max_epochs=None).fit(model, ToyData(n=200))
    partial = ToyLitVAE()
    partial.enc.load_state_dict(model.enc.state_dict())  # the encoder only
    for p in partial.enc.parameters():
        p.requires_grad_(False)
    second = _budgeted(noise_multiplier=1.5)
    with pytest.warns(UserWarning, match="warm start"):
        make_trainer(second, tmp_path, max_steps=6, max_epochs=None).fit(partial, ToyData(n=200))
    assert second.accountant.steps == 12
    fresh = _budgeted(noise_multiplier=1.5)  # a new model with the same initial values
    make_trainer(fresh, tmp_path, max_steps=6, max_epochs=None).fit(ToyLitVAE(), ToyData(n=200))
    assert fresh.accountant.steps == 6


def test_load_from_checkpoint_of_any_module_carries_the_spend_in_a_new_process(tmp_path,
                                                                               monkeypatch):
    from lit_dpvae.privacy import provenance

    trainer = make_trainer(_budgeted(noise_multiplier=1.5), tmp_path, max_steps=6, max_epochs=None)
    trainer.fit(ToyLitVAE(), ToyData(n=200))
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    monkeypatch.setattr(provenance, "SPENT_WEIGHTS", {})  # as in a new process
    loaded = ToyLitVAE.load_from_checkpoint(tmp_path / "a.ckpt")  # not a BaseVAE
    second = _budgeted(noise_multiplier=1.5)
    with pytest.warns(UserWarning, match="warm start"):
        make_trainer(second, tmp_path, max_steps=6, max_epochs=None).fit(loaded, ToyData(n=200))
    assert second.accountant.steps == 12


def test_weights_loaded_any_way_carry_the_spend(tmp_path, monkeypatch):
    """In a new process (empty registry): copies of a loaded module, weights restored by
    Trainer.validate(ckpt_path=...), and an exported model file all continue the spend."""
    from torch.utils.data import DataLoader, TensorDataset

    from lit_dpvae.privacy import provenance

    trainer = make_trainer(_budgeted(noise_multiplier=1.5), tmp_path, max_steps=6, max_epochs=None)
    trainer.fit(ToyLitVAE(), ToyData(n=200))
    trainer.save_checkpoint(tmp_path / "a.ckpt")

    def fresh_process():
        monkeypatch.setattr(provenance, "SPENT_WEIGHTS", {})

    def steps_after_fit(model) -> int:
        strategy = _budgeted(noise_multiplier=1.5)
        with pytest.warns(UserWarning, match="warm start"):
            make_trainer(strategy, tmp_path, max_steps=6, max_epochs=None).fit(
                model, ToyData(n=200))
        return strategy.accountant.steps

    fresh_process()
    copy = ToyLitVAE()
    copy.load_state_dict(ToyLitVAE.load_from_checkpoint(tmp_path / "a.ckpt").state_dict())
    assert steps_after_fit(copy) == 12
    class Validated(ToyLitVAE):
        def validation_step(self, batch, batch_idx):
            return None

    fresh_process()
    model = Validated()
    make_trainer(_budgeted(noise_multiplier=1.5), tmp_path).validate(
        model, DataLoader(TensorDataset(torch.zeros(4, 6), torch.zeros(4).long()), batch_size=2),
        ckpt_path=str(tmp_path / "a.ckpt"))
    assert steps_after_fit(model) == 12


def test_a_checkpoint_saved_after_loading_dp_weights_resumes_with_their_sigma(tmp_path):
    """load_from_checkpoint, save with a strategy that never trained, resume: the resumed run
    continues the spend with the last private σ (not σ = 0, which would stop it at once)."""
    trainer = make_trainer(_budgeted(noise_multiplier=3.0), tmp_path, max_steps=4, max_epochs=None)
    trainer.fit(ToyLitVAE(), ToyData(n=200))
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    loaded = ToyLitVAE.load_from_checkpoint(tmp_path / "a.ckpt")
    saver = make_trainer(_budgeted(noise_multiplier=3.0), tmp_path)
    saver.strategy.connect(loaded)
    state = saver.strategy.privacy_state_dict()
    assert state["noise_multiplier"] == 3.0 and state["accountant"]["history"]
    resumed = _budgeted(noise_multiplier=3.0)
    checkpoint = torch.load(tmp_path / "a.ckpt", weights_only=False)
    checkpoint["lit_dpvae_privacy"] = state
    torch.save(checkpoint, tmp_path / "b.ckpt")
    make_trainer(resumed, tmp_path, max_steps=8, max_epochs=None).fit(
        ToyLitVAE(), ToyData(n=200), ckpt_path=str(tmp_path / "b.ckpt"))
    assert resumed.accountant.steps == 8 and resumed.mechanism.noise_multiplier == 3.0


def test_a_resume_does_not_mark_the_initial_weights_as_trained(tmp_path):
    """Lightning calls on_load_checkpoint before it loads the weights: fingerprinting them
    there registered the *initial* values as spent, so any fresh model of the same seed then
    looked warm-started (found by a helper's full-suite run: test order changed ε)."""
    from lit_dpvae.data import DigitsDataModule
    from lit_dpvae.models import InfoVAE

    def model():
        torch.manual_seed(0)
        return InfoVAE(data_shape=(1, 8, 8), latent_dim=2, hidden=(8,), lam=1.0,
                       n_prior_samples=8)

    first = _budgeted(noise_multiplier=1.5, target_delta=1e-5)
    trainer = make_trainer(first, tmp_path, max_steps=2, max_epochs=None)
    trainer.fit(model(), DigitsDataModule(batch_size=200, seed=1))
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    resumed = _budgeted(noise_multiplier=1.5, target_delta=1e-5)
    make_trainer(resumed, tmp_path, max_steps=4, max_epochs=None).fit(
        model(), DigitsDataModule(batch_size=200, seed=1), ckpt_path=tmp_path / "a.ckpt")
    assert resumed.accountant.steps == 4
    type(model()).load_from_checkpoint(tmp_path / "a.ckpt")  # the other loader
    fresh = _budgeted(noise_multiplier=1.5, target_delta=1e-5)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="warm start")
        make_trainer(fresh, tmp_path, max_steps=2, max_epochs=None).fit(
            model(), DigitsDataModule(batch_size=200, seed=1))
    assert fresh.accountant.steps == 2


def test_weights_loaded_into_a_module_that_already_carries_a_spend_keep_both(tmp_path):
    """validate(ckpt_path=...) loads another run's weights into a module that already trained:
    its spend must become that checkpoint's (composed with its own), not stay the smaller old
    one (found by the adversarial review: the next fit dropped the checkpoint's 40 steps)."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader

    class Validated(ToyLitVAE):
        def validation_step(self, batch, batch_idx):
            return self.loss_terms(batch).mean_loss()

    first = _budgeted(noise_multiplier=1.5, target_delta=1e-5)
    make_trainer(first, tmp_path, max_steps=8, max_epochs=None, enable_checkpointing=True,
                 callbacks=[ModelCheckpoint(dirpath=tmp_path / "b", save_last=True,
                                            save_top_k=0)]).fit(Validated(), ToyData(n=200))
    from lit_dpvae.privacy import provenance

    provenance.SPENT_WEIGHTS.clear()  # as in a new process
    module = Validated()
    make_trainer(_budgeted(noise_multiplier=3.0, target_delta=1e-5), tmp_path, max_steps=1,
                 max_epochs=None).fit(module, ToyData(n=200))
    make_trainer(_budgeted(noise_multiplier=3.0, target_delta=1e-5), tmp_path).validate(
        module, dataloaders=DataLoader(ToyData(n=200).data, batch_size=8),
        ckpt_path=tmp_path / "b" / "last.ckpt", verbose=False)
    again = _budgeted(noise_multiplier=1.5, target_delta=1e-5)
    with pytest.warns(UserWarning, match="warm start"):
        make_trainer(again, tmp_path, max_steps=2, max_epochs=None).fit(module, ToyData(n=200))
    assert again.accountant.steps == 1 + 8 + 2  # its own step, the checkpoint's 8, this fit's

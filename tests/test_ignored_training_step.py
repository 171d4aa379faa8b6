"""A model's own training_step never runs under DPStrategy: the fit says so instead of silently
dropping what it adds or logs (issue 17)."""

from __future__ import annotations

import warnings

from lit_dpvae.models import VanillaVAE
from lit_dpvae.refusals import ignored_training_step
from tests.lightning_toys import ToyData, ToyLitVAE, make_strategy, make_trainer


class Penalised(ToyLitVAE):
    training_step_runs_without_dp_only = False  # a real extra: what the warning is for

    def training_step(self, batch, batch_idx):
        loss = self.loss_terms(batch).mean_loss() + 0.1 * sum(p.abs().sum()
                                                               for p in self.parameters())
        self.log("train/penalty", loss)
        return loss


class OwnStep(VanillaVAE):
    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) * 2


def _fit_warnings(model, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(make_strategy(), tmp_path, max_steps=2).fit(model, ToyData())
    return [str(w.message) for w in caught if "does not run" in str(w.message)]


def test_a_training_step_the_strategy_skips_is_named_in_a_warning(tmp_path):
    (message,) = _fit_warnings(Penalised(), tmp_path)
    assert "Penalised.training_step" in message and "loss_terms" in message
    assert "ignored under DP" in message


def test_no_warning_for_the_library_step_or_a_declared_non_private_equivalent(tmp_path):
    assert _fit_warnings(ToyLitVAE(), tmp_path) == []  # declares it returns loss_terms' loss
    assert ignored_training_step(VanillaVAE(data_shape=(2,), latent_dim=1, hidden=(4,))) is None


def test_a_pairing_subclass_overriding_training_step_is_warned_about():
    message = ignored_training_step(OwnStep(data_shape=(2,), latent_dim=1, hidden=(4,)))
    assert message is not None and "OwnStep.training_step" in message

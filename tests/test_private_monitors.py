"""Callbacks and schedulers that act on ``train/*`` (exact statistics of private batches) are
refused under a private mechanism: the weights would depend on private records without noise."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from lit_dpvae.strategy import PrivacyConfigError
from tests.lightning_toys import ToyData, ToyLitVAE, make_strategy, make_trainer


class Plateau(ToyLitVAE):
    def __init__(self, monitor: str) -> None:
        super().__init__()
        self.monitor = monitor

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": plateau, "monitor": self.monitor}}


@pytest.mark.parametrize("callback", [EarlyStopping(monitor="train/loss"),
                                      ModelCheckpoint(monitor="train/recon")],
                         ids=["early_stopping", "checkpoint"])
def test_a_callback_monitoring_a_train_metric_is_refused(tmp_path, callback):
    trainer = make_trainer(make_strategy(), tmp_path, callbacks=[callback],
                           enable_checkpointing=isinstance(callback, ModelCheckpoint))
    with pytest.raises(PrivacyConfigError, match=r"monitor='train/.*exact statistic"):
        trainer.fit(ToyLitVAE(), ToyData())
    assert trainer.global_step == 0


def test_a_scheduler_on_a_train_metric_is_refused_and_one_on_nothing_private_is_not(tmp_path):
    trainer = make_trainer(make_strategy(), tmp_path)
    with pytest.raises(PrivacyConfigError, match=r"ReduceLROnPlateau\(monitor='train/loss'\)"):
        trainer.fit(Plateau("train/loss"), ToyData())
    assert trainer.global_step == 0
    ok = make_trainer(make_strategy(), tmp_path, max_steps=2,
                      callbacks=[EarlyStopping(monitor="val/loss", check_on_train_epoch_end=False)])
    ok.fit(ToyLitVAE(), ToyData())
    assert ok.global_step == 2


def test_exact_losses_reach_no_callback_name_or_lr_finder(tmp_path):
    """The value training_step hands Lightning (every callback's ``outputs``) is a constant;
    a checkpoint file name with a train/* value and the LR finder are refused."""
    from lightning.pytorch.callbacks import Callback, LearningRateFinder

    class Outputs(Callback):
        seen: list = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.seen.append(float(outputs["loss"]))

    spy = Outputs()
    make_trainer(make_strategy(), tmp_path, max_steps=3, callbacks=[spy]).fit(ToyLitVAE(),
                                                                              ToyData())
    assert spy.seen == [0.0, 0.0, 0.0]
    named = ModelCheckpoint(dirpath=tmp_path / "c", filename="{train/loss:.3f}")
    for callback, match in ((named, "filename"), (LearningRateFinder(), "LearningRateFinder")):
        trainer = make_trainer(make_strategy(), tmp_path, callbacks=[callback],
                               enable_checkpointing=isinstance(callback, ModelCheckpoint))
        with pytest.raises(PrivacyConfigError, match=match):
            trainer.fit(ToyLitVAE(), ToyData())


def test_without_privacy_nothing_is_refused(tmp_path):
    trainer = make_trainer(make_strategy(mechanism="nonprivate", noise_multiplier=None,
                                         max_grad_norm=None, batch_max_grad_norm=None),
                           tmp_path, max_steps=2, callbacks=[EarlyStopping(monitor="train/loss")])
    trainer.fit(ToyLitVAE(), ToyData())
    assert trainer.global_step == 2

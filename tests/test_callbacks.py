"""ImageLogger (issue 13, class 8): prior samples by default; reconstructions of validation records
(which the DP guarantee does not cover) only on request, with a warning."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import WandbLogger

from lit_dpvae.callbacks import ImageLogger
from lit_dpvae.data import DigitsDataModule
from lit_dpvae.models import VanillaVAE
from lit_dpvae.strategy import TermwiseDPStrategy


def _fit(tmp_path, monkeypatch, images: ImageLogger) -> list[str]:
    """One private epoch of a tiny model on the digits; returns the keys sent to W&B images."""
    keys: list[str] = []
    monkeypatch.setattr(WandbLogger, "log_image",
                        lambda self, key, images, step=None, **kw: keys.append(key))
    strategy = TermwiseDPStrategy(noise_multiplier=1.0, max_grad_norm=1.0, sample_share=1.0,
                                  target_delta=1e-4, noise_seed=0)
    trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_epochs=1,
                         limit_train_batches=2, limit_val_batches=1,
                         logger=WandbLogger(offline=True, save_dir=tmp_path), callbacks=[images],
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False,
                         default_root_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(VanillaVAE(data_shape=(1, 8, 8), latent_dim=2, hidden=(16,)),
                    DigitsDataModule(batch_size=64, seed=1, limit_train=400))
    return keys


def test_by_default_only_prior_samples_are_logged(tmp_path, monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default raises no exposure warning
        images = ImageLogger(num_images=8, dirpath=str(tmp_path))
    assert images.reconstructions is False
    keys = _fit(tmp_path, monkeypatch, images)
    assert keys == ["images/samples"]
    assert [p.name for p in images.saved] == ["samples_epoch000.png"]
    assert not list((tmp_path / "images").glob("reconstructions*"))


def test_reconstructions_are_opt_in_and_name_the_exposure(tmp_path, monkeypatch):
    with pytest.warns(UserWarning, match="NOT covered by the differential-privacy guarantee"):
        images = ImageLogger(num_images=8, dirpath=str(tmp_path), reconstructions=True)
    keys = _fit(tmp_path, monkeypatch, images)
    assert sorted(keys) == ["images/reconstructions", "images/samples"]
    assert sorted(p.name for p in images.saved) == ["reconstructions_epoch000.png",
                                                    "samples_epoch000.png"]
    assert all(p.is_file() for p in images.saved)

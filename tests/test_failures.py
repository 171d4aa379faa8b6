"""Failures never lose the run: a NaN mid-run or a full disk raises a clear error and the last
good checkpoint (with its privacy state) survives; bad CLI input is refused with a clear error."""

from __future__ import annotations

import errno
import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lit_dpvae.cli import cli_main
from lit_dpvae.privacy import LossTermsError
from lit_dpvae.strategy import CHECKPOINT_KEY, TermwiseDPStrategy
from tests.lightning_toys import ToyData, ToyLitVAE

ROOT = Path(__file__).resolve().parents[1]


class AtStep(Callback):
    def __init__(self, step: int, action) -> None:
        self.step, self.action = step, action

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            self.action(pl_module)


def _fit(tmp_path, callback, **kwargs):
    strategy = TermwiseDPStrategy(noise_multiplier=1.0, max_grad_norm=0.5,
                                  batch_max_grad_norm=0.1, noise_seed=1)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_last=True,
                            save_top_k=0)
    trainer = pl.Trainer(strategy=strategy, accelerator="cpu", max_steps=10, logger=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[saver, callback], default_root_dir=tmp_path)
    trainer.fit(ToyLitVAE(), ToyData(n=40, sample_rate=0.25))


def _last_good(tmp_path) -> dict:
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert checkpoint[CHECKPOINT_KEY]["accountant"]["history"]
    return checkpoint


def test_nan_mid_run_raises_and_keeps_the_last_checkpoint(tmp_path):
    def poison(module):
        with torch.no_grad():
            module.enc[0].weight.fill_(float("nan"))

    with pytest.raises(LossTermsError, match="NaN"):
        _fit(tmp_path, AtStep(5, poison))
    checkpoint = _last_good(tmp_path)
    assert checkpoint["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())


def test_disk_full_while_saving_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import fsspec.implementations.local as local

    def fill_disk(module):
        def no_space(self, *args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(local.LocalFileOpener, "write", no_space)

    with pytest.raises(OSError, match="No space left"):
        _fit(tmp_path, AtStep(5, fill_disk))
    monkeypatch.undo()
    checkpoint = _last_good(tmp_path)
    assert checkpoint["global_step"] == 4
    leftovers = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert leftovers == ["last.ckpt"], leftovers


@pytest.mark.parametrize(
    "override, match",
    [
        ("--trainer.strategy.init_args.mechanism=lit_dpvae.privacy.mechanisms.AutoMechanism "
         "--trainer.strategy.init_args.mechanism.init_args.max_grad_norm=-1", "max_grad_norm"),
        ("--trainer.strategy.init_args.mechanism=lit_dpvae.privacy.TermwiseDPSGD "
         "--trainer.strategy.init_args.mechanism.init_args.sample_share=1.5", "sample_share"),
        ("--trainer.strategy.init_args.target_delta=0.5", "1/N"),
    ],
)
def test_corrupt_config_values_are_refused(tmp_path, monkeypatch, capsys, override, match):
    """Refused by the constructors (one ``error:`` line naming the value) or by the strategy
    at setup (a PrivacyConfigError from Python)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises((SystemExit, Exception)) as info:
        cli_main(["fit", "--config", str(ROOT / "experiments/configs/quickstart.yaml"),
                  "--trainer.logger=false", "--trainer.max_steps=2", *override.split()])
    if isinstance(info.value, SystemExit):
        (line, _tip) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("error: ") and re.search(match, line), line
    else:
        assert re.search(match, str(info.value))


def test_missing_dataset_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Exception, match="dataset-fashion-mnist|data_dir"):
        cli_main(["fit", "--config",
                  str(ROOT / "experiments/configs/fashion_mnist/info_eps10.yaml"),
                  "--trainer.logger=false", "--trainer.max_steps=1",
                  "--data.init_args.data_dir", str(tmp_path / "no_such_folder")])

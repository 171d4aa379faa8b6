"""No record value of your own data reaches hparams, a checkpoint or an offline W&B run: a fit of
each of the own-data modules with ``WandbLogger(offline=True)``, then a search of the run's files
(config, history, the binary run log) and the checkpoint's bytes for values planted in the
records. The schema and paths (public) may be there; the records may not."""

from __future__ import annotations

import struct
import time
import warnings

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from PIL import Image

from lit_dpvae.data import ArrayDataModule, ImageFolderDataModule, TabularDataModule
from lit_dpvae.models import VanillaVAE
from lit_dpvae.strategy import DPStrategy

SECRET_NUMBER = 0.7771234567  # a record value planted in every numeric data set
SECRET_TEXT = "ZQX-patient-4711"  # a record's text in a column the schema drops


def _patterns() -> list[bytes]:
    f32 = float(np.float32(SECRET_NUMBER))
    return [b"0.777123", SECRET_TEXT.encode(), struct.pack("<f", SECRET_NUMBER),
            struct.pack("<d", SECRET_NUMBER), struct.pack("<d", f32)]


def _data(kind: str, tmp_path):
    g = np.random.default_rng(0)
    if kind == "arrays":
        x = g.uniform(0, 1, (120, 6)).astype(np.float32)
        x[:, 0] = SECRET_NUMBER
        return ArrayDataModule(x, value_range=(0, 1), batch_size=12)
    if kind == "table":
        df = pd.DataFrame({"v": np.full(120, SECRET_NUMBER), "w": g.uniform(0, 1, 120),
                           "c": g.choice(["a", "b"], 120), "name": [SECRET_TEXT] * 120})
        schema = {"v": {"type": "numeric", "bounds": [0, 1]},
                  "w": {"type": "numeric", "bounds": [0, 1]},
                  "c": {"type": "categorical", "categories": ["a", "b"]}}
        return TabularDataModule(df, schema, batch_size=12)
    root = tmp_path / SECRET_TEXT.replace("patient", "folder")  # a path is public: fine
    for k in ("a", "b"):
        (root / k).mkdir(parents=True)
        for i in range(60):
            Image.fromarray((g.random((4, 4)) * 255).astype(np.uint8)).save(root / k / f"{i}.png")
    return ImageFolderDataModule(root, size=4, batch_size=12)


@pytest.mark.parametrize("kind", ["arrays", "table", "images"])
def test_own_data_reaches_no_log_config_or_checkpoint(tmp_path, monkeypatch, kind):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    dm = _data(kind, tmp_path)
    schema = getattr(dm, "schema", None)
    model = VanillaVAE(data_shape=dm.data_shape, latent_dim=2, hidden=(8,), schema=schema,
                       conditional=kind == "images", num_classes=dm.num_classes)
    logger = WandbLogger(offline=True, save_dir=tmp_path / "runs", project="own-data")
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    strategy = DPStrategy(target_epsilon=3.0, sample_share=1.0, noise_seed=0)
    trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=3,
                         limit_val_batches=1, logger=logger, callbacks=[saver],
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, dm)
    logger.experiment.finish()
    assert strategy.accountant.steps == 3
    run_dirs = list((tmp_path / "runs" / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1, "the offline W&B run wrote no files"
    run_log = list(run_dirs[0].glob("*.wandb"))  # offline: the config is in here
    assert run_log
    for _ in range(100):  # wandb's service may still be flushing the run log after finish()
        if b"batch_size" in run_log[0].read_bytes():
            break
        time.sleep(0.1)
    assert b"batch_size" in run_log[0].read_bytes()  # the config was recorded
    files = [p for p in run_dirs[0].rglob("*") if p.is_file()]
    checkpoint = tmp_path / "ckpt" / "last.ckpt"
    for path in [*files, checkpoint]:
        raw = path.read_bytes()
        for pattern in _patterns():
            assert pattern not in raw, f"{pattern!r} in {path.name}"
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert "data" not in saved["datamodule_hyper_parameters"]
    assert "x" not in saved["datamodule_hyper_parameters"]

"""ArrayDataModule: your own arrays (or .npy/.npz files) as a private data module, with a
declared public value range (never measured from the records) and declared classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lit_dpvae.data import ArrayDataModule, DataError
from lit_dpvae.privacy import is_poisson_loader


def _records(n=120, d=10, seed=0):
    g = np.random.default_rng(seed)
    return g.uniform(-3.0, 3.0, size=(n, d)).astype(np.float32), g.integers(0, 4, size=n)


def test_arrays_are_split_rescaled_by_the_declared_range_and_poisson_sampled():
    x, y = _records()
    dm = ArrayDataModule(x, y, value_range=(-3.0, 3.0), num_classes=4, batch_size=16,
                         test_size=0.25, val_size=0.1)
    dm.setup()
    splits = dm.splits
    sizes = {k: len(v[0]) for k, v in splits.items()}
    assert sizes == {"train": 81, "val": 9, "test": 30}
    all_x = torch.cat([v[0] for v in splits.values()])
    want = torch.from_numpy((x + 3.0) / 6.0)
    # every record is there once, mapped by the declared range (not the data's min/max)
    assert torch.allclose(all_x.sort(0).values, want.sort(0).values)
    assert dm.data_shape == (10,) and dm.num_classes == 4
    assert is_poisson_loader(dm.train_dataloader())
    assert "x" not in dm.hparams and "y" not in dm.hparams  # record values never logged


def test_values_outside_the_declared_range_are_refused_without_printing_them():
    x, y = _records()
    x[7, 3] = 123.456
    dm = ArrayDataModule(x, y, value_range=(-3.0, 3.0), num_classes=4)
    with pytest.raises(DataError, match="1 records have values outside") as info:
        dm.setup()
    assert "123" not in str(info.value)


def test_labels_need_a_declared_number_of_classes_and_paths_load(tmp_path):
    x, y = _records()
    with pytest.raises(DataError, match="declared num_classes"):
        ArrayDataModule(x, y, value_range=(-3, 3))
    np.savez(tmp_path / "d.npz", x=x, y=y)
    dm = ArrayDataModule(tmp_path / "d.npz", value_range=(-3, 3), num_classes=4,
                         rescale=False)
    dm.setup()
    assert dm.hparams["x"] == tmp_path / "d.npz"  # a path is a fine hyper-parameter
    assert float(torch.cat([v[0] for v in dm.splits.values()]).min()) < 0  # not rescaled
    np.save(tmp_path / "x.npy", x)
    unlabeled = ArrayDataModule(str(tmp_path / "x.npy"), value_range=(-3, 3))
    unlabeled.setup()
    assert unlabeled.num_classes == 1
    with pytest.raises(DataError, match="no array 'x'"):
        np.savez(tmp_path / "bad.npz", records=x)
        ArrayDataModule(tmp_path / "bad.npz", value_range=(-3, 3))


def test_a_vae_trains_privately_on_an_array_data_module(tmp_path):
    import lightning.pytorch as pl

    from lit_dpvae.models import VanillaVAE
    from lit_dpvae.strategy import DPStrategy

    x, _ = _records(n=200)
    dm = ArrayDataModule(x, value_range=(-3.0, 3.0), rescale=False, batch_size=32)
    model = VanillaVAE(data_shape=(10,), latent_dim=2, hidden=(16,), likelihood="gaussian")
    strategy = DPStrategy(target_epsilon=3.0, sample_share=1.0, noise_seed=1)
    pl.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=5, logger=False,
               enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, limit_val_batches=0,
               default_root_dir=tmp_path).fit(model, dm)
    assert strategy.accountant.steps == 5 and 0 < strategy.epsilon() <= 3.0 * (1 + 1e-6)


@pytest.mark.parametrize(("labels", "conditional"), [(False, False), (True, False), (True, True)])
def test_a_fit_with_a_logger_accepts_the_data_modules_hparams(tmp_path, labels, conditional):
    """Lightning refuses a fit whose model and data module log one key with two values; the
    README's own ``ArrayDataModule(x, y, ..., num_classes=10)`` next to an unconditional model
    (num_classes=0) was refused that way under any default Trainer."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    from lit_dpvae.models import SparseVAE
    from lit_dpvae.strategy import DPStrategy

    x, y = _records(n=120)
    dm = ArrayDataModule(x, y if labels else None, value_range=(-3.0, 3.0), rescale=False,
                         num_classes=4 if labels else None, batch_size=32)
    kw = {"conditional": True, "num_classes": dm.num_classes} if conditional else {}
    model = SparseVAE(data_shape=(10,), latent_dim=2, hidden=(8,), likelihood="gaussian", **kw)
    strategy = DPStrategy(target_epsilon=3.0, noise_seed=1)
    pl.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=2,
               logger=CSVLogger(tmp_path), enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
               default_root_dir=tmp_path).fit(model, dm)
    assert strategy.accountant.steps == 2
    assert "num_classes" not in dm.hparams and dm.num_classes == (4 if labels else 1)


def test_any_map_style_dataset_becomes_a_private_data_module(tmp_path):
    """PrivateDataModule: Poisson batches (q = B/N) from a user's Dataset; the dataset is not a
    hyper-parameter; the strategy accepts the loader and accounts q."""
    import lightning.pytorch as pl
    from torch.utils.data import Dataset

    from lit_dpvae.data import PrivateDataModule
    from lit_dpvae.models import VanillaVAE
    from lit_dpvae.strategy import DPStrategy

    class Records(Dataset):
        def __init__(self, n):
            self.x = torch.rand(n, 10)

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i], 0

    with pytest.raises(TypeError, match="map-style"):
        PrivateDataModule(iter(range(3)))
    dm = PrivateDataModule(Records(200), val=Records(20), batch_size=25)
    assert dm.sample_rate == 25 / 200 and "train" not in dm.hparams
    assert is_poisson_loader(dm.train_dataloader())
    model = VanillaVAE(data_shape=(10,), latent_dim=2, hidden=(16,))
    strategy = DPStrategy(target_epsilon=3.0, sample_share=1.0, noise_seed=2)
    pl.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=4, logger=False,
               enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, limit_val_batches=1,
               default_root_dir=tmp_path).fit(model, dm)
    assert strategy.accountant.steps == 4
    assert strategy.privacy_report().sample_rate == 25 / 200


def test_a_resume_from_a_checkpoint_on_an_epochs_last_batch_replays_no_batch(tmp_path):
    """A step checkpoint written on the last batch of an epoch (Lightning still calls that
    epoch current, with every batch done and no epoch finished): the resumed run must continue
    with the next epoch's Poisson draws, never replay this epoch's (a replay of T batches is
    each record's data used twice under one step's accounting)."""
    import warnings

    import lightning.pytorch as pl

    from lit_dpvae.models import VanillaVAE
    from lit_dpvae.strategy import DPStrategy

    n = 125
    x = np.random.default_rng(0).uniform(0, 1, (n, 4))
    x[:, 0] = np.arange(n) / n  # record ids in column 0

    class Batches(pl.Callback):
        def __init__(self):
            self.seen = []

        def on_train_batch_start(self, trainer, module, batch, index):
            ids = tuple(sorted(round(v * n) for v in batch[0][:, 0].tolist()))
            self.seen.append((trainer.global_step, ids))

    def fit(folder, ckpt=None, every=None):
        dm = ArrayDataModule(x, value_range=(0, 1), batch_size=10, val_size=10, test_size=25)
        model = VanillaVAE(data_shape=(4,), latent_dim=2, hidden=(8,))
        strategy = DPStrategy(target_epsilon=5.0, sample_share=1.0, noise_seed=3,
                              exact_resume=True)
        record = Batches()
        saver = [pl.callbacks.ModelCheckpoint(dirpath=folder, every_n_train_steps=every,
                                              save_top_k=-1, filename="{step}")] if every else []
        trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=27,
                             logger=False, enable_checkpointing=bool(every),
                             callbacks=[record, *saver], enable_progress_bar=False,
                             enable_model_summary=False, limit_val_batches=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(model, dm, ckpt_path=ckpt)
        return record.seen, trainer

    full, trainer = fit(tmp_path / "a", every=9)
    assert trainer.num_training_batches == 9  # 90 training records, q = 1/9
    resumed, _ = fit(tmp_path / "b", ckpt=tmp_path / "a" / "step=9.ckpt")
    first_epoch = {ids for step, ids in full if step < 9}
    assert len(resumed) == 18
    assert not [ids for _, ids in resumed if ids in first_epoch and ids]
    assert [ids for _, ids in resumed] == [ids for step, ids in full if step >= 9]  # exact


def test_labels_listed_in_a_cli_config_are_not_copied_into_the_run_folder(tmp_path,
                                                                         monkeypatch):
    """LightningCLI writes the resolved config into the run folder: a data module's record-carrying
    arguments given as values (labels listed in the YAML) are left out of it and of the
    checkpoints; a path stays."""
    import yaml

    from lit_dpvae.cli import main

    monkeypatch.chdir(tmp_path)
    x, _ = _records(n=60)
    labels = [int(v) for v in np.random.default_rng(5).integers(0, 4, 60)]
    np.save("x.npy", x)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({"data": {
        "class_path": "lit_dpvae.data.ArrayDataModule",
        "init_args": {"x": "x.npy", "y": labels, "value_range": [-3, 3], "num_classes": 4,
                      "batch_size": 10}}}))
    main(["fit", "--config", "cfg.yaml", "--model", "lit_dpvae.models.VanillaVAE",
          "--model.hidden", "[8]", "--model.latent_dim", "2", "--trainer.max_steps", "2",
          "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
          "--trainer.logger.save_dir", "logs", "--trainer.enable_progress_bar=false",
          "--test_after_fit=false", "--trainer.strategy", "lit_dpvae.strategy.DPStrategy",
          "--trainer.strategy.target_epsilon", "3",
          "--trainer.strategy.mechanism", "lit_dpvae.privacy.TermwiseDPSGD",
          "--trainer.strategy.mechanism.sample_share", "1"])
    (saved,) = list(tmp_path.rglob("config*.yaml"))  # the run folder's (runs/fit-<time>/)
    assert saved.parent.parent == tmp_path / "runs"
    config = yaml.safe_load(saved.read_text())
    assert config["data"]["init_args"]["y"] == "<left out - record values>"
    assert config["data"]["init_args"]["x"] == "x.npy"
    hparams = yaml.unsafe_load(next((tmp_path / "logs").rglob("hparams.yaml")).read_text())
    assert "y" not in hparams and hparams["x"] == "x.npy"


def test_a_subclass_declaring_its_own_data_arguments_keeps_its_parents():
    class Weighted(ArrayDataModule):
        data_arguments = ("weights",)

        def __init__(self, x, y=None, weights=None, **kwargs):
            super().__init__(x, y, **kwargs)

    x, y = _records(n=30)
    dm = Weighted(x, [int(v) for v in y], weights=[0.5] * 30, value_range=(-3, 3),
                  num_classes=4)
    assert not {"x", "y", "weights"} & set(dm.hparams)

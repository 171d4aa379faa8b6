"""ImageFolderDataModule: a folder of PNG/JPEG images (labels from sub-folders), resized and
scaled to [0, 1]; a private fit on it; ``sample`` writes the same layout back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lit_dpvae.data import DataError, ImageFolderDataModule


def make_folder(root, per_class=12, classes=("cat", "dog"), size=(10, 12), mode="L"):
    g = np.random.default_rng(0)
    for k, name in enumerate(classes):
        folder = root / name if name else root
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape = size[::-1] if mode == "L" else (*size[::-1], 3)
            arr = (g.random(shape) * 100 + 100 * k).astype(np.uint8)
            ext = "png" if i % 2 else "JPG"
            Image.fromarray(arr, mode=None).save(folder / f"{i}.{ext}")
    return root


def test_labels_come_from_sub_folders_and_images_are_resized_and_scaled(tmp_path):
    root = make_folder(tmp_path / "imgs")
    dm = ImageFolderDataModule(root, size=8, batch_size=4, test_size=0.25, val_size=2)
    dm.setup()
    assert dm.classes == ["cat", "dog"] and dm.num_classes == 2 and dm.data_shape == (1, 8, 8)
    x = torch.cat([v[0] for v in dm.splits.values()])
    y = torch.cat([v[1] for v in dm.splits.values()])
    assert x.shape == (24, 1, 8, 8) and float(x.min()) >= 0 and float(x.max()) <= 1
    assert (x[y == 1].mean() > x[y == 0].mean()) and y.bincount().tolist() == [12, 12]
    rgb = ImageFolderDataModule(make_folder(tmp_path / "rgb", mode="RGB"), size=(6, 5),
                                image_channels=3, classes=["dog", "cat", "bird"])
    rgb.setup()
    assert rgb.data_shape == (3, 6, 5) and rgb.num_classes == 3
    assert "cat" in str(rgb.hparams["classes"]) and "x" not in rgb.hparams


def test_bad_folders_are_refused_with_the_fix(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ImageFolderDataModule(tmp_path / "nope")
    root = make_folder(tmp_path / "a")
    with pytest.raises(DataError, match="not among the declared classes"):
        ImageFolderDataModule(root, classes=["cat"])
    (root / "stray.png").write_bytes(b"")
    with pytest.raises(DataError, match="both images and sub-folders"):
        ImageFolderDataModule(root)
    flat = make_folder(tmp_path / "flat", classes=("",))
    (flat / "broken.png").write_bytes(b"not a png")
    dm = ImageFolderDataModule(flat, size=4)
    assert dm.num_classes == 1
    with pytest.raises(DataError, match="cannot read image .*broken.png"):
        dm.setup()


def test_a_vae_trains_privately_on_a_png_folder_and_samples_back_to_one(tmp_path):
    import lightning.pytorch as pl

    from lit_dpvae.cli import sample_main
    from lit_dpvae.models import VanillaVAE
    from lit_dpvae.strategy import DPStrategy

    root = make_folder(tmp_path / "imgs", per_class=30)
    dm = ImageFolderDataModule(root, size=8, batch_size=8)
    model = VanillaVAE(data_shape=dm.data_shape, latent_dim=2, hidden=(16,), conditional=True,
                       num_classes=dm.num_classes)
    strategy = DPStrategy(target_epsilon=3.0, sample_share=1.0, noise_seed=3)
    trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=4,
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model, dm)
    assert strategy.accountant.steps == 4
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    sample_main(["--ckpt", str(tmp_path / "run.ckpt"), "--num", "10", "--out",
                 str(tmp_path / "synthetic"), "--label-weights", "3,1"])
    assert sorted(p.name for p in (tmp_path / "synthetic").iterdir()) == ["0", "1"]
    counts = [len(list((tmp_path / "synthetic" / k).glob("*.png"))) for k in ("0", "1")]
    assert counts == [8, 2]  # public weights 3:1, rounded to counts
    with pytest.raises(SystemExit):  # a second draw into the same folder would mix the two
        sample_main(["--ckpt", str(tmp_path / "run.ckpt"), "--num", "4", "--out",
                     str(tmp_path / "synthetic")])
    with pytest.raises(SystemExit):
        sample_main(["--ckpt", str(tmp_path / "run.ckpt"), "--out", str(tmp_path / "x.txt")])
    back = ImageFolderDataModule(tmp_path / "synthetic", size=8, test_size=2, val_size=1)
    back.setup()
    x = torch.cat([v[0] for v in back.splits.values()])
    assert x.shape == (10, 1, 8, 8) and set(x.unique().tolist()) <= {0.0, 1.0}  # Bernoulli draws

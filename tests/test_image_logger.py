"""ImageLogger and image_grid, pixel by pixel: what each grid holds, where it goes (PNG files, W&B
images, nothing else), and that no record value leaves the callback unless
``reconstructions=True``. A stand-in model returns known pixel values so every assertion is
exact; one test checks the grid of a real VanillaVAE, one runs it inside ``Trainer.fit``."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import Logger, WandbLogger
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from lit_dpvae.callbacks import ImageLogger, image_grid
from lit_dpvae.data import DigitsDataModule
from lit_dpvae.models import VanillaVAE

# Pixel values (0..255) that tell the grids' sources apart: none of them is another's.
SAMPLE, RECORD, RECON, PAD = 128, 51, 204, 255


def _cell(grid: np.ndarray, i: int, h: int, w: int, ncol: int = 8, pad: int = 1) -> np.ndarray:
    """The pixels of image ``i`` in a grid written by ``image_grid``."""
    r, c = divmod(i, ncol)
    top, left = pad + r * (h + pad), pad + c * (w + pad)
    return grid[top : top + h, left : left + w]


class StandInVAE(torch.nn.Module):
    """The part of BaseVAE that ImageLogger uses; samples are ``SAMPLE`` everywhere and a
    reconstruction is ``RECON`` everywhere. Records every call."""

    def __init__(self, data_shape=(1, 4, 5), conditional=False, num_classes=3) -> None:
        super().__init__()
        self.data_shape = tuple(data_shape)
        self.conditional = conditional
        self.num_classes = num_classes
        self.calls: list[tuple] = []

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def sample(self, n, labels=None):
        self.calls.append(("sample", n, labels))
        return torch.full((n, *self.data_shape), SAMPLE / 255)

    def reconstruct(self, x, y=None):
        self.calls.append(("reconstruct", x.clone(), y))
        return torch.full_like(x, RECON / 255)


class StandInTrainer:
    """The Trainer attributes ImageLogger reads; counts every read of the validation loaders."""

    def __init__(self, root: Path, loggers=(), val_dataloaders=None, epoch: int = 0) -> None:
        self.loggers = list(loggers)
        self.default_root_dir = str(root)
        self.current_epoch = epoch
        self.global_step = 7
        self.sanity_checking = False
        self.loader = val_dataloaders
        self.val_reads = 0

    @property
    def val_dataloaders(self):
        self.val_reads += 1
        return self.loader


class RecordingWandb(WandbLogger):
    """A WandbLogger that keeps what would be uploaded instead of uploading it."""

    def __init__(self, save_dir) -> None:
        super().__init__(offline=True, save_dir=str(save_dir))
        self.images: list[tuple[str, list, int | None]] = []
        self.metrics: list[dict] = []

    def log_image(self, key, images, step=None, **kwargs):
        self.images.append((key, images, step))

    def log_metrics(self, metrics, step=None):
        self.metrics.append(dict(metrics))


def _records(n: int = 5, shape=(1, 4, 5)) -> DataLoader:
    """A validation loader: records ``RECORD`` everywhere, labels ``2, 1, 0, 2, 1, ...``."""
    labels = torch.tensor([2, 1, 0] * n)[:n]
    return DataLoader(TensorDataset(torch.full((n, *shape), RECORD / 255), labels), batch_size=n)


def _all_pixels(logger: RecordingWandb, saved: list[Path]) -> set[int]:
    """Every pixel value sent to W&B or written to a PNG."""
    arrays = [np.asarray(im) for _, ims, _ in logger.images for im in ims]
    arrays += [np.asarray(Image.open(p)) for p in saved]
    return set(np.unique(np.concatenate([a.ravel() for a in arrays])).tolist())


# -- image_grid ---------------------------------------------------------------------------------
def test_image_grid_geometry_padding_and_pixels():
    h, w = 3, 2
    images = torch.stack([torch.full((1, h, w), i / 10) for i in range(10)])
    images[4, 0, 2, 1] = 0.6  # one distinct pixel: rows are H, columns are W
    grid = image_grid(images, ncol=4)
    assert grid.mode == "L"
    a = np.asarray(grid)
    assert a.shape == (3 * (h + 1) + 1, 4 * (w + 1) + 1)  # 3 rows of 4, 1-pixel padding
    for i in range(10):
        expected = np.full((h, w), round(i / 10 * 255), dtype=np.uint8)
        if i == 4:
            expected[2, 1] = round(0.6 * 255)
        np.testing.assert_array_equal(_cell(a, i, h, w, ncol=4), expected)
    # padding lines and the two empty cells of the last row are white
    assert (a[0] == PAD).all() and (a[:, 0] == PAD).all() and (a[h + 1] == PAD).all()
    assert (_cell(a, 10, h, w, ncol=4) == PAD).all() and (_cell(a, 11, h, w, ncol=4) == PAD).all()


def test_image_grid_clamps_to_the_unit_interval_and_keeps_colour_channels():
    images = torch.zeros(2, 3, 2, 2)
    images[0, 0] = 2.0  # red above 1: clamped to 255
    images[0, 1] = -1.0  # green below 0: clamped to 0
    images[1, 2] = 0.2  # blue
    grid = image_grid(images, ncol=2)
    assert grid.mode == "RGB"
    a = np.asarray(grid)
    assert a.shape == (2 + 2, 2 * 3 + 1, 3)
    assert (_cell(a, 0, 2, 2, ncol=2) == [255, 0, 0]).all()
    assert (_cell(a, 1, 2, 2, ncol=2) == [0, 0, 51]).all()


# -- what is logged -----------------------------------------------------------------------------
def test_default_logs_only_the_samples_grid_and_never_reads_records(tmp_path):
    model, wandb = StandInVAE(), RecordingWandb(tmp_path)
    trainer = StandInTrainer(tmp_path, [wandb], _records())
    cb = ImageLogger(num_images=6, min_cell=0, dirpath=str(tmp_path / "out"))
    grids = cb.log_grids(trainer, model)
    assert list(grids) == ["images/samples"]
    assert trainer.val_reads == 0  # the validation records are not even loaded
    assert [c[0] for c in model.calls] == ["sample"] and model.calls[0][1:] == (6, None)
    # one W&B image at the trainer's step, the same pixels as the PNG file
    ((key, images, step),) = wandb.images
    assert key == "images/samples" and step == 7 and len(images) == 1
    a = np.asarray(images[0])
    assert a.shape == (4 + 2, 8 * (5 + 1) + 1)  # one row of 6 cells in a grid 8 cells wide
    for i in range(6):
        assert (_cell(a, i, 4, 5) == SAMPLE).all()
    assert [p.name for p in cb.saved] == ["samples_epoch000.png"]
    assert cb.saved[0].parent == tmp_path / "out" / "images"
    np.testing.assert_array_equal(np.asarray(Image.open(cb.saved[0])), a)
    assert wandb.metrics == []  # grids only, no scalar or array metric
    assert RECORD not in _all_pixels(wandb, cb.saved)
    assert _all_pixels(wandb, cb.saved) == {SAMPLE, PAD}


def test_reconstructions_pair_each_record_with_its_reconstruction(tmp_path):
    model, wandb = StandInVAE(), RecordingWandb(tmp_path)
    trainer = StandInTrainer(tmp_path, [wandb], _records(n=5), epoch=3)
    with pytest.warns(UserWarning, match="NOT covered"):
        cb = ImageLogger(num_images=6, min_cell=0, dirpath=str(tmp_path), reconstructions=True)
    grids = cb.log_grids(trainer, model)
    assert list(grids) == ["images/samples", "images/reconstructions"]
    # num_images // 2 = 3 pairs: record, reconstruction, record, ...
    a = np.asarray(grids["images/reconstructions"])
    for i in range(3):
        assert (_cell(a, 2 * i, 4, 5) == RECORD).all()
        assert (_cell(a, 2 * i + 1, 4, 5) == RECON).all()
    assert (_cell(a, 6, 4, 5) == PAD).all()
    ((_, x, y),) = [c for c in model.calls if c[0] == "reconstruct"]
    assert x.shape == (3, 1, 4, 5) and y is None  # unconditional: the loader's labels are not used
    assert sorted(k for k, _, _ in wandb.images) == ["images/reconstructions", "images/samples"]
    assert sorted(p.name for p in cb.saved) == ["reconstructions_epoch003.png",
                                                "samples_epoch003.png"]
    assert RECORD in _all_pixels(wandb, cb.saved)  # the exposure the flag opts into


def test_conditional_models_get_balanced_sample_labels_and_record_labels(tmp_path):
    model = StandInVAE(conditional=True, num_classes=3)
    trainer = StandInTrainer(tmp_path, [], [_records(n=5)])  # a list of loaders: the first
    with pytest.warns(UserWarning):
        cb = ImageLogger(num_images=4, min_cell=0, dirpath=str(tmp_path), reconstructions=True)
    cb.log_grids(trainer, model)
    (sample,) = [c for c in model.calls if c[0] == "sample"]
    assert sample[1] == 4 and sample[2].tolist() == [0, 1, 2, 0]
    (recon,) = [c for c in model.calls if c[0] == "reconstruct"]
    assert recon[1].shape[0] == 2 and recon[2].tolist() == [2, 1]  # num_images // 2 records


def test_samples_grid_of_a_real_model_is_exactly_its_samples(tmp_path):
    model = VanillaVAE(data_shape=(1, 8, 8), latent_dim=2, hidden=(16,)).eval()
    wandb = RecordingWandb(tmp_path)

    class Unreadable:
        def __iter__(self):
            raise AssertionError("ImageLogger read a validation record")

    trainer = StandInTrainer(tmp_path, [wandb], Unreadable())
    torch.manual_seed(3)
    grids = ImageLogger(num_images=8, min_cell=0, dirpath=str(tmp_path)).log_grids(trainer, model)
    torch.manual_seed(3)
    expected = np.asarray(image_grid(model.sample(8, mean=True)))
    assert expected.shape == (10, 73)
    np.testing.assert_array_equal(np.asarray(grids["images/samples"]), expected)
    np.testing.assert_array_equal(np.asarray(wandb.images[0][1][0]), expected)


def test_every_n_epochs_and_sanity_check(tmp_path):
    model = StandInVAE()
    trainer = StandInTrainer(tmp_path)
    cb = ImageLogger(num_images=2, every_n_epochs=2, min_cell=0, dirpath=str(tmp_path))
    trainer.sanity_checking = True
    cb.on_validation_epoch_end(trainer, model)
    assert cb.saved == [] and model.calls == []
    trainer.sanity_checking = False
    for epoch in range(4):
        trainer.current_epoch = epoch
        cb.on_validation_epoch_end(trainer, model)
    assert [p.name for p in cb.saved] == ["samples_epoch001.png", "samples_epoch003.png"]


def test_records_that_are_not_images_are_skipped_with_a_warning(tmp_path):
    model, wandb = StandInVAE(data_shape=(6,)), RecordingWandb(tmp_path)
    cb = ImageLogger(min_cell=0, dirpath=str(tmp_path))
    with pytest.warns(UserWarning, match="not images"):
        assert cb.log_grids(StandInTrainer(tmp_path, [wandb]), model) == {}
    assert model.calls == [] and wandb.images == [] and cb.saved == []
    assert not (tmp_path / "images").exists()


def test_without_a_loader_reconstructions_fall_back_to_samples_only(tmp_path):
    with pytest.warns(UserWarning):
        cb = ImageLogger(num_images=2, min_cell=0, dirpath=str(tmp_path), reconstructions=True)
    grids = cb.log_grids(StandInTrainer(tmp_path, [], None), StandInVAE())
    assert list(grids) == ["images/samples"]


# -- no logger, other loggers, W&B disabled ----------------------------------------------------
def test_no_logger_writes_png_files_under_the_default_root_dir(tmp_path):
    cb = ImageLogger(num_images=3)
    cb.log_grids(StandInTrainer(tmp_path / "root", []), StandInVAE())
    assert [p.relative_to(tmp_path).as_posix() for p in cb.saved] == [
        "root/images/samples_epoch000.png"]
    assert np.asarray(Image.open(cb.saved[0])).shape == (6 * 16, (6 * 8 + 1) * 16)  # min_cell


def test_with_wandb_disabled_the_real_logger_takes_the_grids(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    wandb = WandbLogger(offline=True, save_dir=str(tmp_path))  # log_image not replaced
    cb = ImageLogger(num_images=2, min_cell=0, dirpath=str(tmp_path))
    grids = cb.log_grids(StandInTrainer(tmp_path, [wandb]), StandInVAE())
    assert list(grids) == ["images/samples"] and cb.saved[0].is_file()


class RecordingLogger(Logger):
    """A non-W&B logger that keeps every metric and hyper-parameter it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[dict] = []
        self.hparams: list = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics, step=None):
        self.metrics.append(dict(metrics))

    def log_hyperparams(self, params, *args, **kwargs):
        self.hparams.append(params)


@pytest.mark.parametrize("reconstructions", [False, True])
def test_in_fit_other_loggers_receive_no_image_and_pngs_are_written(tmp_path, reconstructions):
    logger = RecordingLogger()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cb = ImageLogger(num_images=4, min_cell=0, dirpath=str(tmp_path),
                         reconstructions=reconstructions)
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=2,
                             limit_val_batches=1, logger=logger, callbacks=[cb],
                             enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=tmp_path)
        trainer.fit(VanillaVAE(data_shape=(1, 8, 8), latent_dim=2, hidden=(16,)),
                    DigitsDataModule(batch_size=32, seed=1, limit_train=128))
    names = sorted(p.name for p in cb.saved)
    expected = ["samples_epoch000.png"]
    if reconstructions:
        expected = ["reconstructions_epoch000.png", *expected]
    assert names == expected
    keys = {k for m in logger.metrics for k in m}
    assert keys and not any(k.startswith("images") for k in keys)
    assert all(isinstance(v, (int, float)) for m in logger.metrics for v in m.values())


def test_written_grids_are_enlarged_to_a_viewable_size_by_whole_pixel_blocks(tmp_path):
    """Default ``min_cell=64``: 4-pixel-high images are enlarged 16×, nearest neighbour, so each
    pixel of the decoded grid becomes a 16×16 block (no interpolated values)."""
    model, wandb = StandInVAE(), RecordingWandb(tmp_path)
    trainer = StandInTrainer(tmp_path, [wandb], _records())
    cb = ImageLogger(num_images=6, dirpath=str(tmp_path / "out"))
    grid = np.asarray(cb.log_grids(trainer, model)["images/samples"])
    written = np.asarray(Image.open(cb.saved[0]))
    assert written.shape == (grid.shape[0] * 16, grid.shape[1] * 16)
    np.testing.assert_array_equal(written[::16, ::16], grid)
    np.testing.assert_array_equal(written, np.kron(grid, np.ones((16, 16), dtype=grid.dtype)))
    np.testing.assert_array_equal(np.asarray(wandb.images[0][1][0]), written)

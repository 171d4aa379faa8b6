"""Image grids of prior samples and, opt-in, of held-out reconstructions (W&B or PNG files)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_only, rank_zero_warn
from PIL import Image


def image_grid(images: torch.Tensor, ncol: int = 8, pad: int = 1) -> Image.Image:
    """``[n, C, H, W]`` in [0, 1] (C = 1 or 3) -> one PIL image, ``ncol`` images per row."""
    images = images.detach().float().clamp(0, 1).cpu()
    n, c, h, w = images.shape
    nrow = max(1, -(-n // ncol))
    grid = np.ones((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), dtype=np.float32)
    for i in range(n):
        r, col = divmod(i, ncol)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top : top + h, left : left + w] = images[i].permute(1, 2, 0).numpy()
    array = (grid * 255).round().astype(np.uint8)
    return Image.fromarray(array[..., 0] if c == 1 else array)


class ImageLogger(Callback):
    """After each validation epoch, logs ``images/samples`` (decoded prior samples; one row per
    label in conditional mode) and, only with ``reconstructions=True``,
    ``images/reconstructions`` (validation records next to their reconstructions).

    The grids are PNG files under ``<dirpath>/images/`` (default: the Trainer's
    ``default_root_dir``) and, with a ``WandbLogger``, W&B images too. Samples are
    post-processing of the privately trained weights, so they carry the training guarantee. A
    reconstruction grid publishes the validation records themselves (and near-copies of them):
    those records are outside the DP guarantee, which covers only the training records, so it is
    off by default and warns when turned on. No training record and no gradient is ever logged.

    Args:
        num_images: records / samples per grid.
        every_n_epochs: period in validation epochs.
        dirpath: where the ``images/`` folder goes.
        reconstructions: also log validation records and their reconstructions (publishes those
            records; default False).
        min_cell: written and logged grids are enlarged by a whole factor (nearest neighbour)
            until each image is at least this many pixels high (0: as decoded; 8×8 digits
            become 64×64).
    """

    def __init__(self, num_images: int = 16, every_n_epochs: int = 1,
                 dirpath: str | None = None, reconstructions: bool = False,
                 min_cell: int = 64) -> None:
        self.min_cell = int(min_cell)
        self.num_images = int(num_images)
        self.dirpath = dirpath
        self.every_n_epochs = int(every_n_epochs)
        self.reconstructions = bool(reconstructions)
        self.saved: list[Path] = []
        if self.reconstructions:
            rank_zero_warn(
                "ImageLogger(reconstructions=True) publishes validation records next to their "
                "reconstructions (PNG files and W&B images). Those records are not training "
                "records and are NOT covered by the differential-privacy guarantee: log them only "
                "if the validation data may be published."
            )

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        self.log_grids(trainer, pl_module)

    def log_grids(self, trainer: pl.Trainer, pl_module: Any) -> dict[str, Image.Image]:
        shape = tuple(getattr(pl_module, "data_shape", ()))
        if len(shape) != 3:
            rank_zero_warn(f"ImageLogger: records of shape {shape} are not images; skipping")
            return {}
        self._cell = int(shape[1])
        grids = {"images/samples": image_grid(self._samples(pl_module))}
        held_out = self._held_out(trainer) if self.reconstructions else None
        if held_out is not None:
            x, y = held_out
            y = y if getattr(pl_module, "conditional", False) else None
            with torch.no_grad():
                x_hat = pl_module.reconstruct(x.to(pl_module.device),
                                              y.to(pl_module.device) if y is not None else None)
            pairs = torch.stack([x.cpu(), x_hat.cpu()], 1).flatten(0, 1)
            grids["images/reconstructions"] = image_grid(pairs)
        self._write(trainer, grids)
        return grids

    def _samples(self, pl_module: Any) -> torch.Tensor:
        labels = None
        if getattr(pl_module, "conditional", False):
            labels = torch.arange(self.num_images) % pl_module.num_classes
        # decoder means make readable grids; a custom module's sample may not take ``mean``
        kwargs = {"mean": True} if "mean" in inspect.signature(pl_module.sample).parameters \
            else {}
        with torch.no_grad():
            return pl_module.sample(self.num_images, labels=labels, **kwargs).cpu()

    def _held_out(self, trainer: pl.Trainer) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        loaders = trainer.val_dataloaders
        if loaders is None:
            return None
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        batch = next(iter(loader))
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        y = batch[1] if isinstance(batch, (list, tuple)) and len(batch) > 1 else None
        k = min(self.num_images // 2 or 1, x.shape[0])
        return x[:k], None if y is None else y[:k]

    def _write(self, trainer: pl.Trainer, grids: dict[str, Image.Image]) -> None:
        from lightning.pytorch.loggers import WandbLogger

        factor = max(1, -(-self.min_cell // max(getattr(self, "_cell", 1), 1)))
        if factor > 1:  # a viewable size: whole-pixel blocks, no interpolation
            grids = {k: g.resize((g.width * factor, g.height * factor), Image.NEAREST)
                     for k, g in grids.items()}

        wandb = next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)
        if wandb is not None:
            for key, image in grids.items():
                wandb.log_image(key=key, images=[image], step=trainer.global_step)
        root = Path(self.dirpath or trainer.default_root_dir) / "images"
        root.mkdir(parents=True, exist_ok=True)
        for key, image in grids.items():
            path = root / f"{key.split('/')[-1]}_epoch{trainer.current_epoch:03d}.png"
            image.save(path)
            self.saved.append(path)

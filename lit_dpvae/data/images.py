"""A folder of images (PNG/JPEG) as a private data module.

Layout: ``root/<class>/<image>`` (labels from the sub-folders, in sorted order, or in the order
of a declared ``classes`` list) or ``root/<image>`` (no labels). Every image is converted to
``image_channels`` (1: grey, 3: RGB), resized to ``size`` and scaled to [0, 1]; the whole folder is
loaded into memory once (for larger collections, wrap your own Dataset in
:class:`lit_dpvae.data.PrivateDataModule`).

What is public: the class names (the sub-folder names, or ``classes``), the image size and the
number of images N. The images are private; the test split carved from them is not protected
(docs/privacy.md §1). ``python -m lit_dpvae sample --out folder/`` writes the same layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lit_dpvae.data.base import Split, VAEDataModule, carve
from lit_dpvae.data.checks import DataError

EXTENSIONS = (".png", ".jpg", ".jpeg")


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)


class ImageFolderDataModule(VAEDataModule):
    """Images from a folder, Poisson-sampled for training.

    Args:
        root: the folder (``root/<class>/*.png`` or ``root/*.png``).
        size: the ``(height, width)`` every image is resized to (an int for square images).
        image_channels: 1 (grey, default) or 3 (RGB) (not ``channels``: that is the conv
            widths of a model, and Lightning merges the two modules' hyper-parameters).
        classes: the public class names in label order (sub-folder names); default: the
            sub-folders in sorted order. A sub-folder that is not listed is an error.
        test_size: test records carved from the images (count or fraction, default 0.2).
        batch_size: expected batch size B of the Poisson sampling (sample rate q = B/N).
        **kwargs: :class:`VAEDataModule` arguments.
    """

    def __init__(self, root: str | Path, *, size: int | Sequence[int] = 28, image_channels: int = 1,
                 classes: Sequence[str] | None = None, test_size: int | float = 0.2,
                 batch_size: int = 64, **kwargs: Any) -> None:
        super().__init__(batch_size, **kwargs)
        if image_channels not in (1, 3):
            raise DataError(f"image_channels must be 1 (grey) or 3 (RGB), got {image_channels}")
        hw = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
        if len(hw) != 2 or min(hw) < 1:
            raise DataError(f"size must be an int or (height, width), got {size}")
        self.root, self.size, self.channels = Path(root), hw, int(image_channels)
        self.test_size = test_size
        self.classes, self._files = self._index(classes)

    def _index(self, classes: Sequence[str] | None) -> tuple[list[str], list[tuple[Path, int]]]:
        if not self.root.is_dir():
            raise DataError(f"image folder {self.root} does not exist")
        subdirs = sorted(p.name for p in self.root.iterdir() if p.is_dir()
                         and not p.name.startswith("."))
        loose = _images_in(self.root)
        if subdirs and loose:
            raise DataError(
                f"{self.root} has both images and sub-folders: put every image in a class "
                "sub-folder (labelled) or none (unlabelled)")
        if not subdirs:
            if classes is not None:
                raise DataError(f"classes were declared but {self.root} has no class sub-folders")
            if not loose:
                raise DataError(f"{self.root} has no {'/'.join(EXTENSIONS)} images")
            return [], [(p, 0) for p in loose]
        names = list(subdirs) if classes is None else [str(c) for c in classes]
        unknown = sorted(set(subdirs) - set(names))
        if unknown:
            raise DataError(f"sub-folders {unknown} of {self.root} are not among the declared "
                            f"classes {names}: add them to classes, or move them out")
        files = [(p, names.index(d)) for d in subdirs for p in _images_in(self.root / d)]
        if not files:
            raise DataError(f"the class sub-folders of {self.root} hold no images")
        return names, files

    @property
    def data_shape(self) -> tuple[int, ...]:
        return (self.channels, *self.size)

    @property
    def num_classes(self) -> int:
        return max(1, len(self.classes))

    def _load(self) -> dict[str, Split]:
        from PIL import Image, UnidentifiedImageError

        mode = "L" if self.channels == 1 else "RGB"
        h, w = self.size
        x = np.empty((len(self._files), self.channels, h, w), dtype=np.float32)
        for i, (path, _) in enumerate(self._files):
            try:
                with Image.open(path) as img:
                    img = img.convert(mode)
                    if img.size != (w, h):
                        img = img.resize((w, h), Image.Resampling.BILINEAR)
                    arr = np.asarray(img, dtype=np.float32) / 255.0
            except (OSError, UnidentifiedImageError) as error:
                raise DataError(f"cannot read image {path}: {error}; remove or fix it") from None
            x[i] = arr[None] if self.channels == 1 else arr.transpose(2, 0, 1)
        y = torch.tensor([label for _, label in self._files], dtype=torch.int64)
        if len(x) < 3:
            raise DataError(f"{self.root} has {len(x)} images: at least 3 are needed")
        gen = torch.Generator().manual_seed(self.data_seed + 1)
        train, test = carve((torch.from_numpy(x), y), self.test_size, gen, what="test_size")
        return {"train": train, "test": test}

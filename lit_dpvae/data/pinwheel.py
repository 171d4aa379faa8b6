"""The 2-D pinwheel clustering toy of Johnson et al. 2016, "Composing graphical models with neural
networks for structured representations and fast inference" (arXiv 1603.06277).

Arm ``k`` of ``K`` is a Gaussian stretched along the radius (``radial_std``) and thin across it
(``tangential_std``), centred at radius 1, then rotated by ``2πk/K + rate·exp(r)`` where ``r`` is
the point's radial coordinate, so arms curl outwards. Values are real, not in [0, 1]: models on
this data need a Gaussian or Laplace likelihood, never a Bernoulli one.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lit_dpvae.data.base import Split, VAEDataModule, carve


def make_pinwheel(
    num_arms: int = 5,
    num_per_arm: int = 100,
    *,
    radial_std: float = 0.3,
    tangential_std: float = 0.05,
    rate: float = 0.25,
    scale: float = 1.0,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Pinwheel points and their arm labels (Johnson et al. 2016, arXiv 1603.06277).

    Shapes: ``-> (x float64 [K·n, 2], y int64 [K·n])``, in random order. The reference code
    multiplies by 10 (``scale=10``); the default here keeps points within about ±2.
    """
    if num_arms < 1 or num_per_arm < 1:
        raise ValueError(f"need num_arms >= 1 and num_per_arm >= 1, got {num_arms}, {num_per_arm}")
    rng = np.random.default_rng(seed)
    offsets = np.linspace(0.0, 2.0 * np.pi, num_arms, endpoint=False)
    polar = rng.standard_normal((num_arms * num_per_arm, 2)) * np.array(
        [radial_std, tangential_std]
    )
    polar[:, 0] += 1.0
    labels = np.repeat(np.arange(num_arms), num_per_arm)
    angles = offsets[labels] + rate * np.exp(polar[:, 0])
    cos, sin = np.cos(angles), np.sin(angles)
    # row vector times [[cos, -sin], [sin, cos]], as in the reference implementation
    points = np.stack(
        [polar[:, 0] * cos + polar[:, 1] * sin, -polar[:, 0] * sin + polar[:, 1] * cos], axis=1
    )
    order = rng.permutation(len(labels))
    return scale * points[order], labels[order].astype(np.int64)


class PinwheelDataModule(VAEDataModule):
    """Pinwheel toy data generated from ``data_seed``; records ``[2]`` (real-valued), labels = arm.

    Needs a Gaussian/Laplace likelihood (values are not in [0, 1]).

    Args:
        batch_size: expected global batch size (default 100).
        num_arms: number of arms ``K`` (= ``num_classes``).
        num_per_arm: records per arm before the split (DP needs many: default 2000).
        radial_std: shape of the arms, see :func:`make_pinwheel`.
        tangential_std: shape of the arms, see :func:`make_pinwheel`.
        rate: shape of the arms, see :func:`make_pinwheel`.
        scale: shape of the arms, see :func:`make_pinwheel`.
        test_size: test records, an int (count) or a float in (0, 1) (fraction, default 0.2).
        **kwargs: the remaining :class:`VAEDataModule` arguments (unknown keys are errors).
    """

    unit_interval = False

    def __init__(
        self,
        batch_size: int = 100,
        *,
        num_arms: int = 5,
        num_per_arm: int = 2000,
        radial_std: float = 0.3,
        tangential_std: float = 0.05,
        rate: float = 0.25,
        scale: float = 1.0,
        test_size: int | float = 0.2,
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size, **kwargs)
        self.num_arms = int(num_arms)
        self.num_per_arm = int(num_per_arm)
        self.shape_params = dict(
            radial_std=radial_std, tangential_std=tangential_std, rate=rate, scale=scale
        )
        self.test_size = test_size

    @property
    def data_shape(self) -> tuple[int, ...]:
        return (2,)

    @property
    def num_classes(self) -> int:
        return self.num_arms

    def _load(self) -> dict[str, Split]:
        points, labels = make_pinwheel(
            self.num_arms, self.num_per_arm, seed=self.data_seed, **self.shape_params
        )
        x = torch.from_numpy(points).to(torch.float32)
        y = torch.from_numpy(labels)
        gen = torch.Generator().manual_seed(self.data_seed + 1)
        train, test = carve((x, y), self.test_size, gen, what="test_size")
        return {"train": train, "test": test}

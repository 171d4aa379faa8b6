"""Load-time checks on a dataset split: bad data fails in ``setup``, never mid-training.

Pure torch; importing it never imports Lightning.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class DataError(ValueError):
    """A dataset (file or generated split) breaks what the data modules promise."""


def check_split(
    name: str,
    x: Tensor,
    y: Tensor,
    *,
    data_shape: tuple[int, ...],
    num_classes: int,
    unit_interval: bool = True,
) -> tuple[Tensor, Tensor]:
    """Check one split and return it as ``(x float32, y int64)``.

    Checks, in order: as many records as labels; at least one record; record shape
    ``data_shape``; every value finite; values in ``[0, 1]`` (when ``unit_interval``);
    integer labels in ``[0, num_classes)``.

    Args:
        name: the split's name, used in error messages (``"train"``, ``"val"``, ``"test"``).
        x: records ``[n, *data_shape]``.
        y: labels ``[n]``.
        data_shape: the shape of one record.
        num_classes: labels must lie in ``[0, num_classes)``.
        unit_interval: require ``0 <= x <= 1`` (Bernoulli/continuous-Bernoulli likelihoods).

    Raises:
        DataError: naming the split and the problem.
    """
    x = torch.as_tensor(x)
    y = torch.as_tensor(y)
    if x.shape[:1] != y.shape[:1] or y.dim() != 1:
        raise DataError(
            f"{name} split: record/label count mismatch: {tuple(x.shape)} records vs "
            f"{tuple(y.shape)} labels (expected [n, ...] records and [n] labels)"
        )
    if x.shape[0] == 0:
        raise DataError(f"{name} split is empty")
    if tuple(x.shape[1:]) != tuple(data_shape):
        raise DataError(
            f"{name} split: record shape {tuple(x.shape[1:])} != data_shape {tuple(data_shape)}"
        )
    x = x.to(torch.float32)
    lo_t, hi_t = torch.aminmax(x)  # NaN propagates, so both are finite iff every value is
    lo, hi = float(lo_t), float(hi_t)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        bad = ~torch.isfinite(x)  # counts only: which record has them is about that record
        raise DataError(
            f"{name} split: {int(bad.sum())} NaN/Inf values in "
            f"{int(bad.reshape(len(bad), -1).any(1).sum())} records; find them with "
            "numpy.isfinite on your data and fix or drop them"
        )
    if unit_interval and (lo < 0.0 or hi > 1.0):  # counts only: no record value in errors
        outside = int(((x < 0.0) | (x > 1.0)).reshape(len(x), -1).any(1).sum())
        raise DataError(
            f"{name} split: {outside} records have values out of [0, 1] after scaling"
        )
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise DataError(f"{name} split: labels must be integers, got {y.dtype}")
    y = y.to(torch.int64)
    outside = int(((y < 0) | (y >= num_classes)).sum())
    if outside:
        raise DataError(
            f"{name} split: {outside} labels out of range [0, {num_classes})"
        )
    return x.contiguous(), y.contiguous()

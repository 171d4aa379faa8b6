"""Float32 matmul precision while the clipped statistics are formed.

TF32 (``set_float32_matmul_precision("high")``, which Lightning recommends on tensor-core GPUs)
and bf16 (``"medium"``, also used by oneDNN on CPUs with AVX512-BF16/AMX) round the *inputs* of
a float32 matmul to 10 or 7 mantissa bits. A per-record norm computed in float32 and a clipped
sum computed as such a matmul then disagree: record i's contribution can reach ``C(1+u)²``
(u = 2⁻¹¹ or 2⁻⁸), and a Gram-matrix norm (K rows per record) can be under-estimated by
cancellation. So every mechanism forms its statistics under IEEE float32 matmuls
(``ieee_fp32_matmul``) and restores the user's setting afterwards (docs/privacy.md §7).
cuDNN convolutions keep their setting: their rounding is record-local (a record's activations
and backprops depend on that record only), and per-record conv gradients and sums are matmuls.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

_FULL = ("ieee", "highest")


def _matmul_backends() -> list[Any]:
    return [torch.backends.cuda.matmul, torch.backends.mkldnn.matmul]  # type: ignore[attr-defined]


def _new_api() -> bool:
    return all(hasattr(b, "fp32_precision") for b in _matmul_backends())


def reduced_fp32_matmul() -> bool:
    """Whether float32 matmuls on CUDA or oneDNN may round their inputs (TF32/bf16).

    Never raises: ``torch.get_float32_matmul_precision()`` does when the per-backend API
    (``torch.backends.cuda.matmul.fp32_precision = "tf32"``) left the backends inconsistent.
    """
    if not _new_api():  # torch < 2.9
        return torch.get_float32_matmul_precision() != "highest"
    generic = getattr(torch.backends, "fp32_precision", "none")
    for backend in _matmul_backends():
        value = backend.fp32_precision
        if value == "none":  # inherits the generic setting
            value = generic
        if value not in ("none", *_FULL):
            return True
    return False


@contextlib.contextmanager
def ieee_fp32_matmul() -> Iterator[None]:
    """IEEE float32 matmuls on CUDA and oneDNN inside the block; the previous per-backend
    settings are restored on exit (also on error)."""
    if not _new_api():  # torch < 2.9: the legacy switch
        before = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(before)
        return
    backends = _matmul_backends()
    saved = [b.fp32_precision for b in backends]
    try:
        for b in backends:
            b.fp32_precision = "ieee"
        yield
    finally:
        for b, value in zip(backends, saved):
            b.fp32_precision = value

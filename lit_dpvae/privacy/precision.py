"""Float32 precision while the clipped statistics are formed.

TF32 (``set_float32_matmul_precision("high")``, which Lightning suggests on tensor-core GPUs;
cuDNN convolutions use it by default) and bf16 (``"medium"``, which oneDNN honours on CPUs with
AVX512-BF16/AMX) round the *inputs* of float32 matmuls and convolutions to 10 or 7 mantissa
bits. A per-record norm and a clipped sum computed by differently rounded kernels then disagree
(record i's contribution can reach ``C(1+u)²``, u = 2⁻¹¹ or 2⁻⁸; a Gram-matrix norm can be
under-estimated by cancellation), and a kernel chosen per batch shape can round the *other*
records differently once a record joins. So every mechanism forms its statistics under IEEE
float32 matmuls, convolutions and RNNs on CUDA/cuDNN and oneDNN (``ieee_fp32``), and restores the
user's settings afterwards (docs/privacy.md §7). Inside the block torch's legacy getter
``torch.backends.cudnn.allow_tf32`` raises (torch refuses to summarise per-operator "ieee"
settings in one legacy flag); nothing in a model's forward should read it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

_FULL = ("ieee", "none")  # "none" with no parent setting is the IEEE default


def fp32_precision_ops() -> list[Any]:
    """The per-operator float32 precision settings of every kernel family."""
    b: Any = torch.backends
    return [b.cuda.matmul, b.cudnn.conv, b.cudnn.rnn, b.mkldnn.matmul, b.mkldnn.conv,
            b.mkldnn.rnn]


def _new_api() -> bool:
    return all(hasattr(op, "fp32_precision") for op in fp32_precision_ops())


def reduced_fp32_matmul() -> bool:
    """Whether float32 matmuls on CUDA or oneDNN may round their inputs (TF32/bf16).

    Never raises: ``torch.get_float32_matmul_precision()`` does when the per-backend API
    (``torch.backends.cuda.matmul.fp32_precision = "tf32"``) left the backends inconsistent.
    """
    if not _new_api():  # torch < 2.9
        return torch.get_float32_matmul_precision() != "highest"
    b: Any = torch.backends
    return any(op.fp32_precision not in _FULL for op in (b.cuda.matmul, b.mkldnn.matmul))


@contextlib.contextmanager
def ieee_fp32() -> Iterator[None]:
    """IEEE float32 matmuls, convolutions and RNNs (CUDA, cuDNN, oneDNN) inside the block; the
    previous settings come back on exit, also on error, value for value (as torch's own
    ``torch.backends.cudnn.flags()`` does: a setting inherited from a parent comes back set)."""
    if not _new_api():  # torch < 2.9: the legacy switches
        before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(before[0])
            torch.backends.cudnn.allow_tf32 = before[1]
        return
    saved = [(op, op.fp32_precision) for op in fp32_precision_ops()]
    try:
        for op, _ in saved:
            op.fp32_precision = "ieee"
        yield
    finally:
        for op, value in saved:
            op.fp32_precision = value

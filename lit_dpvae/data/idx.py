"""A vectorised reader for IDX files (the MNIST / Fashion-MNIST format).

Format (LeCun et al., http://yann.lecun.com/exdb/mnist/): two zero bytes, a dtype code byte, a
byte ``ndim``, ``ndim`` big-endian uint32 dimensions, then the values in C order, big-endian.
Files may be gzip-compressed (detected from the content, not the name). Every header field is
checked against the payload, so a truncated or corrupt file fails here with a message that names
the file and the problem. Pure numpy; importing it never imports Lightning.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from lit_dpvae.data.checks import DataError

#: IDX dtype codes and the (big-endian) numpy dtypes they stand for.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"


class IDXFormatError(DataError):
    """An IDX file is corrupt, truncated, or not what the caller expected."""


def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as err:
        raise IDXFormatError(f"{path}: truncated or corrupt gzip stream ({err})") from err


def read_idx(
    path: str | Path,
    *,
    dtype: np.dtype | type | None = None,
    ndim: int | None = None,
) -> np.ndarray:
    """Read one IDX file (raw or gzip) into a numpy array of the header's shape.

    Args:
        path: the file (``*-ubyte`` or ``*-ubyte.gz``).
        dtype: if given, the dtype the header must declare (e.g. ``np.uint8``).
        ndim: if given, the number of dimensions the header must declare.

    Returns:
        A new (writable) array in native byte order with the header's shape.

    Raises:
        FileNotFoundError: the file does not exist.
        IDXFormatError: bad magic number, unknown or unexpected dtype code, unexpected number of
            dimensions, payload shorter or longer than the header says, corrupt gzip stream.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise IDXFormatError(f"{path}: truncated IDX header ({len(data)} bytes, need at least 4)")
    if data[0] != 0 or data[1] != 0:
        raise IDXFormatError(
            f"{path}: bad magic number 0x{data[:4].hex()} (an IDX file starts with two zero bytes)"
        )
    code, rank = data[2], data[3]
    if code not in IDX_DTYPES:
        raise IDXFormatError(
            f"{path}: unknown dtype code 0x{code:02x} in the magic number "
            f"(known: {', '.join(f'0x{c:02x}' for c in IDX_DTYPES)})"
        )
    file_dtype = IDX_DTYPES[code]
    if dtype is not None and file_dtype.newbyteorder("=") != np.dtype(dtype).newbyteorder("="):
        raise IDXFormatError(
            f"{path}: wrong dtype code 0x{code:02x} ({file_dtype}); expected {np.dtype(dtype)}"
        )
    if ndim is not None and rank != ndim:
        raise IDXFormatError(f"{path}: header declares {rank} dimensions; expected {ndim}")
    header_len = 4 + 4 * rank
    if len(data) < header_len:
        raise IDXFormatError(
            f"{path}: truncated IDX header ({len(data)} bytes, {rank} dimensions need {header_len})"
        )
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=rank, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * file_dtype.itemsize
    payload = len(data) - header_len
    if payload != expected:
        what = "truncated" if payload < expected else "trailing bytes"
        raise IDXFormatError(
            f"{path}: size mismatch with the header ({what}): shape {shape} of {file_dtype} needs "
            f"{expected} bytes of data, the file has {payload}"
        )
    array = np.frombuffer(data, dtype=file_dtype, offset=header_len).reshape(shape)
    return array.astype(file_dtype.newbyteorder("="))


def find_idx_file(data_dir: str | Path, stem: str) -> Path:
    """The file for ``stem`` (e.g. ``train-images-idx3-ubyte``) in ``data_dir``.

    Tries ``stem``, ``stem.gz`` and the dotted variant (``train-images.idx3-ubyte[.gz]``).

    Raises:
        FileNotFoundError: none of them exists; the message lists the names tried.
    """
    data_dir = Path(data_dir)
    dotted = stem.replace("-idx", ".idx", 1)
    names = [stem, f"{stem}.gz", dotted, f"{dotted}.gz"]
    for name in names:
        if (data_dir / name).is_file():
            return data_dir / name
    raise FileNotFoundError(f"{data_dir}: no IDX file named any of {', '.join(names)}")


def read_idx_split(data_dir: str | Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of one split (``prefix`` ``"train"`` or ``"t10k"``) of an IDX folder.

    Returns:
        ``(images uint8 [n, rows, cols], labels uint8 [n])``.

    Raises:
        FileNotFoundError: a file is missing.
        IDXFormatError: a file is corrupt, or images and labels differ in count.
    """
    images_path = find_idx_file(data_dir, f"{prefix}-images-idx3-ubyte")
    labels_path = find_idx_file(data_dir, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(images_path, dtype=np.uint8, ndim=3)
    labels = read_idx(labels_path, dtype=np.uint8, ndim=1)
    if images.shape[0] != labels.shape[0]:
        raise IDXFormatError(
            f"{data_dir}: image/label count mismatch in the {prefix!r} split: "
            f"{images.shape[0]} images ({images_path.name}) vs {labels.shape[0]} labels "
            f"({labels_path.name})"
        )
    return images, labels

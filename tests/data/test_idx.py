"""The IDX reader: exact round trips (raw and gzip) and a named error for each corruption."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from data_helpers import write_idx, write_idx_folder

from lit_dpvae.data import IDXFormatError, find_idx_file, read_idx, read_idx_split


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(3 * 5 * 4, dtype=np.uint8).reshape(3, 5, 4),
        np.array([9, 0, 3, 7], dtype=np.uint8),
        np.arange(-6, 6, dtype=np.int16).reshape(2, 6),
        np.linspace(-1, 1, 10, dtype=np.float32),
        np.array([[1.5, -2.25]], dtype=np.float64),
        np.array([-(2**31), 2**31 - 1], dtype=np.int32),
    ],
    ids=["uint8-3d", "uint8-1d", "int16", "float32", "float64", "int32"],
)
def test_round_trip_is_exact(tmp_path, array, gz):
    path = write_idx(tmp_path / "a-idx-ubyte", array, gz=gz)
    back = read_idx(path)
    assert back.dtype == array.dtype.newbyteorder("=")
    assert back.shape == array.shape
    np.testing.assert_array_equal(back, array)
    back[...] = 0  # writable, native byte order


def test_gzip_is_detected_from_content_not_name(tmp_path):
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    path = write_idx(tmp_path / "no-suffix", array, gz=True)
    np.testing.assert_array_equal(read_idx(path), array)


def _raw(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.tobytes()


IMAGES = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)


@pytest.mark.parametrize(
    ("data", "kwargs", "message"),
    [
        (b"\x01\x00" + _raw(IMAGES)[2:], {}, "bad magic number"),
        (b"\x00\x00\x07\x03" + _raw(IMAGES)[4:], {}, "unknown dtype code 0x07"),
        (_raw(IMAGES), {"dtype": np.float32}, "wrong dtype code 0x08"),
        (_raw(IMAGES), {"ndim": 1}, "declares 3 dimensions; expected 1"),
        (_raw(IMAGES)[:-1], {}, "size mismatch with the header (truncated)"),
        (_raw(IMAGES) + b"\x00", {}, "size mismatch with the header (trailing bytes)"),
        (_raw(IMAGES)[:9], {}, "truncated IDX header"),
        (b"\x00\x00", {}, "truncated IDX header"),
        (gzip.compress(_raw(IMAGES))[:-6], {}, "truncated or corrupt gzip"),
    ],
    ids=[
        "magic",
        "unknown-dtype",
        "wrong-dtype",
        "wrong-ndim",
        "truncated",
        "trailing",
        "short-header",
        "tiny",
        "gzip",
    ],
)
def test_corruption_names_the_problem(tmp_path, data, kwargs, message):
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(data)
    with pytest.raises(IDXFormatError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        read_idx(path, **kwargs)
    assert str(path) in str(e.value)


def test_missing_file_lists_names_tried(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte\.gz"):
        find_idx_file(tmp_path, "train-images-idx3-ubyte")


def test_find_prefers_standard_names_and_accepts_dotted(tmp_path):
    write_idx(tmp_path / "train-images.idx3-ubyte", IMAGES)
    assert find_idx_file(tmp_path, "train-images-idx3-ubyte").name == "train-images.idx3-ubyte"
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", IMAGES, gz=True)
    assert find_idx_file(tmp_path, "train-images-idx3-ubyte").name == "train-images-idx3-ubyte.gz"


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
def test_read_split(tmp_path, gz):
    arrays = write_idx_folder(tmp_path, n_train=20, n_test=5, gz=gz)
    for prefix in ("train", "t10k"):
        images, labels = read_idx_split(tmp_path, prefix)
        np.testing.assert_array_equal(images, arrays[f"{prefix}_images"])
        np.testing.assert_array_equal(labels, arrays[f"{prefix}_labels"])


def test_image_label_count_mismatch(tmp_path):
    write_idx_folder(tmp_path, n_train=20, n_test=5, gz=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(19, dtype=np.uint8))
    with pytest.raises(IDXFormatError, match="image/label count mismatch.*20 images.*19 labels"):
        read_idx_split(tmp_path, "train")


def test_labels_must_be_ubyte_1d(tmp_path):
    write_idx_folder(tmp_path, n_train=4, n_test=2, gz=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(2, dtype=np.int32))
    with pytest.raises(IDXFormatError, match="wrong dtype code 0x0c"):
        read_idx_split(tmp_path, "t10k")

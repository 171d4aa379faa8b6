"""LightningDataModules for DP VAEs: Poisson-sampled training batches (rank-synchronised, empty
batches allowed), sequential val/test loaders, and load-time checks of every split.

- :class:`DigitsDataModule`: scikit-learn's embedded 8×8 digits, the default (no files needed).
- :class:`PinwheelDataModule`: 2-D pinwheel toy (real-valued; Gaussian/Laplace likelihood).
- :class:`FashionMNISTDataModule`, :class:`MNISTDataModule`: 28×28 IDX folders on disk.

Your own data (README, *Your own data*):

- :class:`ArrayDataModule`: numpy/torch arrays or ``.npy``/``.npz`` files.
- :class:`ImageFolderDataModule`: a folder of PNG/JPEG images (labels from sub-folders).
- :class:`TabularDataModule`: a CSV/parquet file or DataFrame with a public :class:`Schema`.
- :class:`PrivateDataModule`: any map-style ``Dataset``.
"""

from lit_dpvae.data.arrays import ArrayDataModule, load_arrays
from lit_dpvae.data.base import VAEDataModule
from lit_dpvae.data.checks import DataError, check_split
from lit_dpvae.data.digits import DigitsDataModule
from lit_dpvae.data.idx import IDXFormatError, find_idx_file, read_idx, read_idx_split
from lit_dpvae.data.images import ImageFolderDataModule
from lit_dpvae.data.mnist import (
    FASHION_MNIST_DIR,
    FashionMNISTDataModule,
    IDXDataModule,
    MNISTDataModule,
)
from lit_dpvae.data.pinwheel import PinwheelDataModule, make_pinwheel
from lit_dpvae.data.schema import Column, Schema, read_table, write_table
from lit_dpvae.data.tabular import TabularDataModule
from lit_dpvae.data.wrap import PrivateDataModule

__all__ = [
    "ArrayDataModule",
    "Column",
    "FASHION_MNIST_DIR",
    "DataError",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "IDXDataModule",
    "ImageFolderDataModule",
    "IDXFormatError",
    "MNISTDataModule",
    "PinwheelDataModule",
    "PrivateDataModule",
    "Schema",
    "TabularDataModule",
    "VAEDataModule",
    "check_split",
    "find_idx_file",
    "load_arrays",
    "make_pinwheel",
    "read_idx",
    "read_idx_split",
    "read_table",
    "write_table",
]

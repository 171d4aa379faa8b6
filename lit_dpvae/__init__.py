"""lit_dpvae: differentially private VAEs for PyTorch Lightning (term-wise DP-SGD)."""

__version__ = "0.1.0"  #: kept equal to pyproject.toml's version (tests/test_packaging.py)

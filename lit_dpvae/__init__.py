"""lit_dpvae: differentially private VAEs for PyTorch Lightning (term-wise DP-SGD)."""

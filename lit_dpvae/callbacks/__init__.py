"""Callbacks: privacy spend (ε, δ, σ, steps) and image grids of samples (and, opt-in, of
held-out reconstructions)."""

from lit_dpvae.callbacks.images import ImageLogger, image_grid
from lit_dpvae.callbacks.privacy import PrivacySpend

__all__ = ["ImageLogger", "PrivacySpend", "image_grid"]

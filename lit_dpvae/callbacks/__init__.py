"""Callbacks: privacy spend (ε, δ, σ, steps), the privacy report, image grids of samples
(and, opt-in, of held-out reconstructions), and an exponential moving average of the
parameters."""

from lit_dpvae.callbacks.ema import ParamEMA
from lit_dpvae.callbacks.images import ImageLogger, image_grid
from lit_dpvae.callbacks.privacy import PrivacySpend
from lit_dpvae.callbacks.report import PrivacyReporter

__all__ = ["ImageLogger", "ParamEMA", "PrivacyReporter", "PrivacySpend", "image_grid"]

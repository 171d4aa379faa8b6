"""DP-safe encoder/decoder building blocks (no BatchNorm, no ConvTranspose2d)."""

from lit_dpvae.nn.blocks import (
    ConvDecoder,
    ConvEncoder,
    MLPDecoder,
    MLPEncoder,
    build_encoder_decoder,
    make_activation,
)

__all__ = [
    "ConvDecoder",
    "ConvEncoder",
    "MLPDecoder",
    "MLPEncoder",
    "build_encoder_decoder",
    "make_activation",
]

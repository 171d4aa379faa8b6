"""nn blocks: DP-safe layers only (Opacus' validator), shapes for MLP/conv, conditional inputs."""

from __future__ import annotations

import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn

from lit_dpvae.nn import ConvDecoder, ConvEncoder, MLPDecoder, MLPEncoder, build_encoder_decoder
from tests.models.conftest import PAIRINGS, model_class

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 7, 9)]


def _blocks(shape, num_classes, group_norm):
    kw = dict(num_classes=num_classes, group_norm=group_norm)
    return [
        MLPEncoder(shape, 3, hidden=(16, 8), **kw),
        MLPDecoder(3, shape, hidden=(8, 16), **kw),
        ConvEncoder(shape, 3, channels=(4, 8), **kw),
        ConvDecoder(3, shape, channels=(4, 8), **kw),
    ]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("num_classes", [0, 3])
@pytest.mark.parametrize("group_norm", [0, 2])
def test_blocks_are_opacus_valid_and_shaped(shape, num_classes, group_norm):
    enc_mlp, dec_mlp, enc_conv, dec_conv = _blocks(shape, num_classes, group_norm)
    x = torch.rand(5, *shape)
    y = torch.nn.functional.one_hot(torch.arange(5) % 3, 3).float() if num_classes else None
    for enc in (enc_mlp, enc_conv):
        assert ModuleValidator.validate(enc, strict=True) == []
        mu, log_var = enc(x, y)
        assert mu.shape == log_var.shape == (5, 3)
    for dec in (dec_mlp, dec_conv):
        assert ModuleValidator.validate(dec, strict=True) == []
        assert dec(torch.randn(5, 3), y).shape == (5, *shape)
    for block in (enc_mlp, dec_mlp, enc_conv, dec_conv):
        kinds = {type(m) for m in block.modules() if any(True for _ in m.parameters(False))}
        assert kinds <= {nn.Linear, nn.Conv2d, nn.GroupNorm}, kinds


def test_conditional_blocks_refuse_missing_or_extra_labels():
    enc = MLPEncoder((1, 8, 8), 2, num_classes=3)
    with pytest.raises(ValueError, match="conditional"):
        enc(torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match="unconditional"):
        ConvEncoder((1, 8, 8), 2)(torch.rand(2, 1, 8, 8), torch.zeros(2, 3))


def test_bad_configuration_errors():
    with pytest.raises(ValueError, match="arch"):
        build_encoder_decoder("resnet", (1, 8, 8), 2)
    with pytest.raises(ValueError, match="activation"):
        MLPEncoder((4,), 2, activation="swishy")
    with pytest.raises(ValueError, match="divide"):
        MLPEncoder((4,), 2, hidden=(10,), group_norm=3)


@pytest.mark.parametrize("name", PAIRINGS)
@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_whole_models_are_opacus_valid(name, arch):
    model = model_class(name)(
        data_shape=(1, 8, 8), latent_dim=4, arch=arch, hidden=(16,), channels=(4, 8), group_norm=2
    )
    assert ModuleValidator.validate(model, strict=True) == []
    assert list(model.prior.parameters()) == []  # prior parameters are buffers

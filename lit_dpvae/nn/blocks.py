"""DP-safe encoder/decoder blocks: MLP and convolutional, GroupNorm or nothing, never BatchNorm.

Every trainable parameter lives in an ``nn.Linear``, ``nn.Conv2d`` or ``nn.GroupNorm`` that is
called once per forward on batch-first input (``[n, ...]`` or ``[n*K, ...]`` record-major), so
per-sample gradient hooks attribute each row to one record. The decoder upsamples with
``nn.Upsample(mode="nearest")`` + ``nn.Conv2d``: Opacus' fast path does not cover
``ConvTranspose2d``.

Encoders map ``x [n, *data_shape]`` (and one-hot labels ``[n, num_classes]`` in conditional
mode) to ``(mu, log_var)``, each ``[n, latent_dim]``. Decoders map ``z [m, latent_dim]`` (and
labels) to likelihood parameters ``[m, *data_shape]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import prod
from typing import Any

import torch
from torch import Tensor, nn

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "leaky_relu": nn.LeakyReLU,
    "softplus": nn.Softplus,
}


def make_activation(name: str) -> nn.Module:
    """An activation module by name (``relu``, ``elu``, ``silu``, ``gelu``, ``tanh`` …)."""
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; choose one of {sorted(_ACTIVATIONS)}"
        ) from None


def _norm(channels: int, groups: int) -> nn.Module:
    """GroupNorm with ``groups`` groups (0 = no normalisation). GroupNorm normalises each record
    on its own, unlike BatchNorm, so per-record terms stay per-record."""
    if groups <= 0:
        return nn.Identity()
    if channels % groups:
        raise ValueError(f"group_norm={groups} groups must divide the width {channels}")
    return nn.GroupNorm(groups, channels)


def _with_labels(h: Tensor, y_onehot: Tensor | None, num_classes: int) -> Tensor:
    if num_classes == 0:
        if y_onehot is not None:
            raise ValueError("labels were given to an unconditional block (num_classes=0)")
        return h
    if y_onehot is None:
        raise ValueError(f"this block is conditional (num_classes={num_classes}): pass labels")
    return torch.cat([h, y_onehot.to(h.dtype)], dim=-1)


def _mlp(sizes: Sequence[int], activation: str, group_norm: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(a, b), _norm(b, group_norm), make_activation(activation)]
    return nn.Sequential(*layers)


class MLPEncoder(nn.Module):
    """Flatten → [x, onehot(y)] → (Linear → GroupNorm? → act)* → Linear → (mu, log_var).

    Shapes: ``x [n, *data_shape]``, ``y_onehot [n, num_classes]`` → two ``[n, latent_dim]``.
    """

    def __init__(
        self,
        data_shape: Sequence[int],
        latent_dim: int,
        hidden: Sequence[int] = (256,),
        activation: str = "relu",
        group_norm: int = 0,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        in_dim = prod(data_shape) + num_classes
        self.body = _mlp([in_dim, *hidden], activation, group_norm)
        self.head = nn.Linear(([in_dim, *hidden])[-1], 2 * latent_dim)

    def forward(self, x: Tensor, y_onehot: Tensor | None = None) -> tuple[Tensor, Tensor]:
        h = _with_labels(x.flatten(1), y_onehot, self.num_classes)
        mu, log_var = self.head(self.body(h)).chunk(2, dim=-1)
        return mu, log_var


class MLPDecoder(nn.Module):
    """[z, onehot(y)] → (Linear → GroupNorm? → act)* → Linear → params ``[m, *data_shape]``."""

    def __init__(
        self,
        latent_dim: int,
        data_shape: Sequence[int],
        hidden: Sequence[int] = (256,),
        activation: str = "relu",
        group_norm: int = 0,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.data_shape = tuple(data_shape)
        sizes = [latent_dim + num_classes, *hidden]
        self.body = _mlp(sizes, activation, group_norm)
        self.head = nn.Linear(sizes[-1], prod(data_shape))

    def forward(self, z: Tensor, y_onehot: Tensor | None = None) -> Tensor:
        h = self.body(_with_labels(z, y_onehot, self.num_classes))
        return self.head(h).view(-1, *self.data_shape)


def conv_sizes(height: int, width: int, levels: int) -> list[tuple[int, int]]:
    """Spatial sizes after each stride-2 conv (kernel 3, padding 1): ``s -> ceil(s / 2)``."""
    sizes = [(height, width)]
    for _ in range(levels):
        h, w = sizes[-1]
        sizes.append(((h + 1) // 2, (w + 1) // 2))
    return sizes


class ConvEncoder(nn.Module):
    """[x, onehot(y) as constant channels] → (Conv2d s2 → GroupNorm? → act)* → flatten → Linear
    → (mu, log_var). Any ``C×H×W`` input (e.g. 1×8×8, 1×28×28).

    Shapes: ``x [n, C, H, W]`` → two ``[n, latent_dim]``.
    """

    def __init__(
        self,
        data_shape: Sequence[int],
        latent_dim: int,
        channels: Sequence[int] = (32, 64),
        activation: str = "relu",
        group_norm: int = 0,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        if len(data_shape) != 3:
            raise ValueError(f"ConvEncoder needs data_shape (C, H, W), got {tuple(data_shape)}")
        c, height, width = data_shape
        self.num_classes = num_classes
        layers: list[nn.Module] = []
        c_in = c + num_classes
        for c_out in channels:
            layers += [
                nn.Conv2d(c_in, c_out, 3, stride=2, padding=1),
                _norm(c_out, group_norm),
                make_activation(activation),
            ]
            c_in = c_out
        self.body = nn.Sequential(*layers)
        h, w = conv_sizes(height, width, len(channels))[-1]
        self.head = nn.Linear(c_in * h * w, 2 * latent_dim)

    def forward(self, x: Tensor, y_onehot: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.num_classes:
            if y_onehot is None:
                raise ValueError("this block is conditional: pass labels")
            planes = y_onehot.to(x.dtype)[:, :, None, None].expand(-1, -1, *x.shape[-2:])
            x = torch.cat([x, planes], dim=1)
        elif y_onehot is not None:
            raise ValueError("labels were given to an unconditional block (num_classes=0)")
        mu, log_var = self.head(self.body(x).flatten(1)).chunk(2, dim=-1)
        return mu, log_var


class ConvDecoder(nn.Module):
    """[z, onehot(y)] → Linear → reshape → (Upsample nearest → Conv2d → GroupNorm? → act)* →
    Conv2d → params ``[m, C, H, W]``. Mirrors ``ConvEncoder``'s spatial sizes exactly."""

    def __init__(
        self,
        latent_dim: int,
        data_shape: Sequence[int],
        channels: Sequence[int] = (32, 64),
        activation: str = "relu",
        group_norm: int = 0,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        if len(data_shape) != 3:
            raise ValueError(f"ConvDecoder needs data_shape (C, H, W), got {tuple(data_shape)}")
        c, height, width = data_shape
        self.num_classes = num_classes
        sizes = conv_sizes(height, width, len(channels))
        rev = list(channels)[::-1]
        self.start = (rev[0], *sizes[-1])
        self.stem = nn.Sequential(
            nn.Linear(latent_dim + num_classes, prod(self.start)), make_activation(activation)
        )
        layers: list[nn.Module] = []
        c_in = rev[0]
        for i, c_out in enumerate(rev[1:] + [rev[-1]]):
            layers += [
                nn.Upsample(size=sizes[-2 - i], mode="nearest"),
                nn.Conv2d(c_in, c_out, 3, padding=1),
                _norm(c_out, group_norm),
                make_activation(activation),
            ]
            c_in = c_out
        layers.append(nn.Conv2d(c_in, c, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, z: Tensor, y_onehot: Tensor | None = None) -> Tensor:
        h = self.stem(_with_labels(z, y_onehot, self.num_classes))
        return self.body(h.view(-1, *self.start))


def build_encoder_decoder(
    arch: str,
    data_shape: Sequence[int],
    latent_dim: int,
    hidden: Sequence[int] = (256,),
    channels: Sequence[int] = (32, 64),
    activation: str = "relu",
    group_norm: int = 0,
    num_classes: int = 0,
) -> tuple[nn.Module, nn.Module]:
    """The encoder/decoder pair for ``arch`` = ``"mlp"`` (uses ``hidden``; decoder mirrors it)
    or ``"conv"`` (uses ``channels``)."""
    common: dict[str, Any] = dict(
        activation=activation, group_norm=group_norm, num_classes=num_classes
    )
    if arch == "mlp":
        enc: nn.Module = MLPEncoder(data_shape, latent_dim, hidden, **common)
        dec: nn.Module = MLPDecoder(latent_dim, data_shape, list(hidden)[::-1], **common)
        return enc, dec
    if arch == "conv":
        enc = ConvEncoder(data_shape, latent_dim, channels, **common)
        dec = ConvDecoder(latent_dim, data_shape, channels, **common)
        return enc, dec
    raise ValueError(f"unknown arch {arch!r}: use 'mlp' or 'conv' (or inject encoder/decoder)")

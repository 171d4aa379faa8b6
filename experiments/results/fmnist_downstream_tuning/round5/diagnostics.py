"""Round-5 diagnostics (issue 6): ``run_grid.py`` with one change that is not a grid setting.

    --fixed-sigma S  term-wise clipping with a fixed noise multiplier S instead of the one
                     calibrated for the grid's ε (no budget enforced; the ε actually spent is the
                     cell's ``epsilon``; the cell *name* keeps the grid's nominal ε). S = 1e-6 is
                     "clipping only" (noise std 5e-10 at B 2048).
    --pool F         the MLP encoder reads the image average-pooled by F and the MLP decoder
                     outputs it at 1/F resolution, upsampled bilinearly (data-independent,
                     parameter-free: ≈ 3.3× fewer parameters at F = 2).

Everything else is ``experiments/run_grid.py`` with the remaining arguments; the grid's md
records this script's command. Diagnostics only: never a reported (privacy-claiming) result.

    python experiments/results/fmnist_downstream_tuning/round5/diagnostics.py --fixed-sigma 0.1 \
        --grid fmnist_downstream_lp2 --out experiments/results/fmnist_downstream_tuning/round5 \
        --name sigma0.1_z32_B2048 --set 'eval_split="val"' 'seeds=[0]'
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[4]
sys.path[:0] = [str(ROOT), str(ROOT / "experiments")]

import run_grid  # noqa: E402
from torch import nn  # noqa: E402

import lit_dpvae.models.base as base  # noqa: E402
import lit_dpvae.strategy as strategy_module  # noqa: E402
from lit_dpvae.nn.blocks import MLPDecoder, MLPEncoder  # noqa: E402


class PoolEncoder(nn.Module):
    def __init__(self, inner: nn.Module, factor: int) -> None:
        super().__init__()
        self.inner, self.pool = inner, nn.AvgPool2d(factor)

    def forward(self, x, y_onehot=None):
        return self.inner(self.pool(x), y_onehot)


class UpsampleDecoder(nn.Module):
    def __init__(self, inner: nn.Module, factor: int) -> None:
        super().__init__()
        self.inner, self.factor = inner, factor

    def forward(self, z, y_onehot=None):
        return nn.functional.interpolate(self.inner(z, y_onehot), scale_factor=self.factor,
                                         mode="bilinear", align_corners=False)


def use_pool(factor: int) -> None:
    original = base.build_encoder_decoder

    def build(arch, data_shape, latent_dim, hidden=(256,), channels=(32, 64),
              activation="relu", group_norm=0, num_classes=0):
        if arch != "mlp":
            return original(arch, data_shape, latent_dim, hidden, channels, activation,
                            group_norm, num_classes)
        c, h, w = data_shape
        small = (c, h // factor, w // factor)
        common = dict(activation=activation, group_norm=group_norm, num_classes=num_classes)
        return (PoolEncoder(MLPEncoder(small, latent_dim, hidden, **common), factor),
                UpsampleDecoder(MLPDecoder(latent_dim, small, list(hidden)[::-1], **common),
                                factor))

    base.build_encoder_decoder = build


def use_fixed_sigma(sigma: float) -> None:
    calibrated = strategy_module.TermwiseDPStrategy

    class FixedSigma(calibrated):
        def __init__(self, **kw):
            kw.pop("target_epsilon", None)
            kw.pop("target_delta", None)
            super().__init__(noise_multiplier=sigma, **kw)

    strategy_module.TermwiseDPStrategy = FixedSigma


def main() -> None:
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--fixed-sigma", type=float)
    ap.add_argument("--pool", type=int)
    args, rest = ap.parse_known_args()
    if args.fixed_sigma is not None:
        use_fixed_sigma(args.fixed_sigma)
    if args.pool is not None:
        use_pool(args.pool)
    run_grid.main(rest)
    # the md names this script's command, not run_grid's
    out, name = Path(rest[rest.index("--out") + 1]), rest[rest.index("--name") + 1]
    md = out / f"{name}.md"
    here = "python " + str(Path(__file__).resolve().relative_to(ROOT))
    own = " ".join(shlex.quote(a) for a in sys.argv[1:])
    md.write_text(md.read_text().replace("python experiments/run_grid.py " + " ".join(
        shlex.quote(a) for a in rest), f"{here} {own}", 1))


if __name__ == "__main__":
    main()

"""Why SparseVAE's dimension-wise MMD does not survive DP: clipping, not noise (issue 15).

SparseVAE with its dimension-wise MMD (``divergence="dim_mmd"``: on the posterior means,
λ = 10; its default before the per-record Hoyer term) on 8×8 digits,
400 steps, one seed, the cells of ``experiments/divergence_effect.py`` with a few settings
changed. Each row separates one cause:

* ``non-private`` / ``non-private λ=…``: the divergence's effect without privacy, and how it
  depends on its weight;
* ``DP ε=10``: the library's defaults (auto → pairwise, C = 1, C_p = C/16, σ from the budget);
* ``clip only``: the same clipping with σ = 1e-4 (no privacy to speak of: it isolates clipping);
* ``clip only, C_p = …``: larger pair clipping norms (the pairwise sensitivity is 8·C_p);
* ``pair clip only``: per-record gradients unclipped (C = 1e6), every pair clipped.

``--norms`` also prints, every 50 steps of the ``clip only`` cell, the pre-clipping norms of
the per-record gradients, the pair terms ‖J_iᵀu_ij‖ and the prior terms ‖J_iᵀv_i‖ (quantiles
10/50/90 %), which give the divergence's effective weight after clipping.

    python experiments/sparse_clipping.py [--norms]        # about 6 min on one core
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import divergence_effect as de  # noqa: E402

CLIP_ONLY = {"noise_multiplier": 1e-4}
#: label -> (mechanism, ε, λ on/off, model kwargs, strategy kwargs)
ROWS = {
    "non-private": ("nonprivate", math.inf, "on", {}, {}),
    "non-private λ=0": ("nonprivate", math.inf, "off", {}, {}),
    "non-private λ=0.1": ("nonprivate", math.inf, "on", {"lam": 0.1}, {}),
    "non-private λ=1": ("nonprivate", math.inf, "on", {"lam": 1.0}, {}),
    "DP ε=10 (defaults)": ("auto", 10.0, "on", {}, {}),
    "DP ε=10 λ=0": ("auto", 10.0, "off", {}, {}),
    "DP ε=10, C_p = C/2": ("auto", 10.0, "on", {}, {"pair_max_grad_norm": 0.5}),
    "clip only": ("auto", 10.0, "on", {}, CLIP_ONLY),
    "clip only λ=0": ("auto", 10.0, "off", {}, CLIP_ONLY),
    "clip only, C_p = C/2": ("auto", 10.0, "on", {}, {**CLIP_ONLY, "pair_max_grad_norm": 0.5}),
    "clip only, C_p = 2C": ("auto", 10.0, "on", {}, {**CLIP_ONLY, "pair_max_grad_norm": 2.0}),
    "clip only, pairs unclipped": ("auto", 10.0, "on", {},
                                   {**CLIP_ONLY, "pair_max_grad_norm": 1e6}),
    "pair clip only (C = 1e6, C_p = 200)": ("auto", 10.0, "on", {},
                                            {**CLIP_ONLY, "max_grad_norm": 1e6,
                                             "pair_max_grad_norm": 200.0}),
}


def watch_norms() -> None:
    """Print pre-clipping norm quantiles every 50 steps (wraps two public functions)."""
    import torch

    import lit_dpvae.privacy.clipping as clipping
    import lit_dpvae.privacy.mechanisms.pairwise as mech

    step = {"k": 0}
    levels = torch.tensor([0.1, 0.5, 0.9])

    def q(t: torch.Tensor) -> list[float]:
        return [round(float(v), 1) for v in torch.quantile(t.float(), levels)]

    owner_vectors, clip_factors = mech.owner_vectors, clipping.clip_factors

    def watched_owner_vectors(*args, **kwargs):
        out = owner_vectors(*args, **kwargs)
        if step["k"] % 50 == 0:
            pair = out[1][~torch.eye(out[1].shape[0], dtype=torch.bool)]
            print(f"step {step['k']}: pair terms {q(pair)}, prior terms {q(out[2])}",
                  flush=True)
        step["k"] += 1
        return out

    def watched_clip_factors(norms, max_norm):
        if step["k"] % 50 == 0 and norms.dim() == 1 and max_norm == 1.0:
            print(f"step {step['k']}: per-record gradients {q(norms)}", flush=True)
        return clip_factors(norms, max_norm)

    mech.owner_vectors = watched_owner_vectors
    clipping.clip_factors = watched_clip_factors


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--norms", action="store_true", help="only the clip-only cell, with norms")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    rows = {"clip only": ROWS["clip only"]} if args.norms else ROWS
    if args.norms:
        watch_norms()
    print("| setting | Hoyer (↑) | recon | σ_eff |\n|---|---|---|---|")
    for label, (mech, eps, lam, model_kw, strategy_kw) in rows.items():
        cell = {"pairing": "sparse", "dataset": "digits", "mechanism": mech, "eps": eps,
                "lam": lam, "seed": args.seed, "key": label,
                "model_kwargs": {"divergence": "dim_mmd", **model_kw},
                "strategy_kwargs": strategy_kw}
        r = de.run_cell(cell)
        print(f"| {label} | {r['hoyer']:.3f} | {r['recon']:.2f} | "
              f"{r.get('sigma_eff', '–')} |", flush=True)


if __name__ == "__main__":
    main()

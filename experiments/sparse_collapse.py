"""Does SparseVAE's Hoyer term make codes sparse or collapse dimensions? (issue 15)

One seed, non-private, 400 steps, the cells of ``experiments/divergence_effect.py`` with λ set;
on the validation split: the standardised Hoyer sparsity (the results page's property), the raw
one, the number of dimensions whose posterior-mean std is above 10 % of the largest, and the
stds themselves.

    python experiments/sparse_collapse.py --data digits fmnist --lam 0 3 39.2   # about 2 min
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import divergence_effect as de  # noqa: E402


def spread(model, dm) -> dict:
    import torch

    from lit_dpvae.metrics.latent import hoyer_sparsity

    dm.setup("fit")
    with torch.no_grad():
        mu = torch.cat([model.encode(x, None)[0] for x, _ in dm.val_dataloader()])
    sd = mu.std(0).sort(descending=True).values
    return {"hoyer_raw": hoyer_sparsity(mu), "active": int((sd > 0.1 * sd[0]).sum()),
            "sd": [round(float(v), 3) for v in sd]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", nargs="+", default=["digits", "fmnist"])
    ap.add_argument("--lam", type=float, nargs="+", default=[0.0, 3.0, 39.2])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    measured = {}
    original = de.property_of

    def property_of(pairing, model, dm, split="test"):
        out = original(pairing, model, dm, split)
        measured.update(spread(model, dm))
        return out

    de.property_of = property_of
    print("| data | λ | Hoyer (standardised) | Hoyer (raw) | active dims | recon | stds |")
    print("|---|---|---|---|---|---|---|")
    for data in args.data:
        for lam in args.lam:
            cell = {"pairing": "sparse", "dataset": data, "mechanism": "nonprivate",
                    "eps": math.inf, "lam": "on", "seed": args.seed, "split": "val",
                    "key": f"collapse-{data}-{lam:g}", "model_kwargs": {"lam": lam}}
            r = de.run_cell(cell)
            print(f"| {data} | {lam:g} | {r['hoyer']:.3f} | {measured['hoyer_raw']:.3f} | "
                  f"{measured['active']} | {r['recon']:.1f} | {measured['sd'][:4]} … "
                  f"{measured['sd'][-1]} |", flush=True)


if __name__ == "__main__":
    main()

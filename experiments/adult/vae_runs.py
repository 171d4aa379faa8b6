"""The DP VAE rows of the Adult benchmark: ε ∈ {0.5, 1, 3, 10} (δ = 1e-5) and non-private, seeds
{0, 1, 2}, on the fixed seed-0 80/20 split of experiments/adult/common.py, scored by the same
``evaluate`` as the AIM/MST baselines. One command, from the repo root::

    python experiments/adult/vae_runs.py --out experiments/results/adult_vae.json

The JSON is rewritten after every run (``--resume`` skips runs already in it). The VAE settings
are ``experiments.adult.vae.DEFAULTS`` (chosen on a validation split of the training records,
``--validate``, never on the test split).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# One torch thread: Lightning otherwise sets cpu_count / processes threads, which thrash on a
# shared 2-core machine (step times varied 0.003-0.8 s).
os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from experiments.adult import common  # noqa: E402
from experiments.adult.vae import synthesize  # noqa: E402

EPSILONS = (0.5, 1.0, 3.0, 10.0)
SEEDS = (0, 1, 2)
DELTA = 1e-5


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="experiments/results/adult_vae.json")
    parser.add_argument("--epsilons", default=",".join(map(str, EPSILONS)))
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--no-nonprivate", action="store_true")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--validate", action="store_true",
                        help="score on a 20%% validation split of the training records instead "
                             "of the test split (for choosing settings)")
    parser.add_argument("--settings", default="{}", help="JSON overrides of vae.DEFAULTS")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    df, domain = common.load_adult()
    train, test = common.split(df)
    if args.validate:  # hold out part of the training records; the test split is not read
        train, test = common.split(train, seed=1)
    settings = json.loads(args.settings)
    out = Path(args.out)
    results = json.loads(out.read_text()) if args.resume and out.is_file() else {}
    results["meta"] = {"delta": DELTA, "n_train": len(train), "n_eval": len(test),
                       "eval_split": "validation" if args.validate else "test",
                       "settings": settings, "command": "python " + " ".join(sys.argv)}
    grid = [float(e) for e in args.epsilons.split(",")]
    keys = [(f"eps{e:g}", e) for e in grid] + ([] if args.no_nonprivate else [("nonprivate", None)])
    for seed in (int(s) for s in args.seeds.split(",")):
        for key, eps in keys:
            runs = results.setdefault(key, {}).setdefault("vae", {}).get("seeds", [])
            if any(r["seed"] == seed for r in runs):
                continue
            start = time.time()
            synthetic, info = synthesize(train, domain, eps, DELTA, seed, **settings)
            row = {"seed": seed, **common.evaluate(synthetic, train, test, domain),
                   "seconds": info["seconds"], "steps": info["steps"],
                   "epsilon_spent": info["epsilon"]}
            results[key]["vae"] = common.aggregate([*runs, row])
            common.write_results(out, results)
            print(f"{key} seed {seed}: auroc_lr {row['auroc_lr']:.3f} tvd2 {row['tvd2']:.3f} "
                  f"({time.time() - start:.0f} s)", flush=True)
    return results


if __name__ == "__main__":
    main()

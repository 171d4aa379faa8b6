"""SparseVAE's Hoyer weight λ for the Gaussian likelihood, chosen on validation splits (issue 15).

Two real-valued data sets with ``likelihood="gaussian"``: the sparse records of
``experiments/sparse_own_data.py`` (a new draw per seed) and 8×8 digits; λ ∈ {0, 3, 10, 30,
100}, without privacy and at ε = 10 (``DPStrategy(target_epsilon=10, target_delta=1e-5)``,
defaults otherwise), 400 steps, seeds 0-2; the validation split's standardised Hoyer sparsity
(``val/hoyer``) and reconstruction, mean ± std over seeds. Two workers × one torch thread.

    python experiments/sparse_gaussian_lambda.py     # about 6 min on 2 cores
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

LAMS = (0.0, 3.0, 10.0, 30.0, 100.0)


def run(job: tuple[str, float, bool, int]) -> tuple:
    import lightning.pytorch as pl
    import sparse_own_data
    import torch

    from lit_dpvae.data import ArrayDataModule, DigitsDataModule
    from lit_dpvae.models import SparseVAE
    from lit_dpvae.strategy import DPStrategy

    data, lam, private, seed = job
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    pl.seed_everything(seed, verbose=False)
    if data == "own":
        dm = ArrayDataModule(sparse_own_data.records(seed=1 + seed), value_range=(-4, 4),
                             rescale=False, batch_size=64, seed=1000 + seed)
        shape: tuple[int, ...] = (12,)
    else:
        dm, shape = DigitsDataModule(seed=1000 + seed), (1, 8, 8)
    model = SparseVAE(data_shape=shape, likelihood="gaussian", lam=lam)
    strategy = (DPStrategy(target_epsilon=10.0, target_delta=1e-5, noise_seed=10_000 + seed)
                if private else "auto")
    trainer = pl.Trainer(strategy=strategy, max_steps=400, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(model, dm)
    m = trainer.validate(model, dm, verbose=False)[0]
    return data, lam, private, seed, m["val/hoyer"], m["val/recon"]


def main() -> None:
    import numpy as np

    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("WANDB_MODE", "disabled")
    jobs = [(d, lam, p, s) for d in ("own", "digits") for lam in LAMS for p in (False, True)
            for s in (0, 1, 2)]
    cells: dict[tuple, list] = {}
    with ProcessPoolExecutor(2) as pool:
        for r in pool.map(run, jobs):
            cells.setdefault(r[:3], []).append(r[4:])
    print("| data | privacy | λ | val Hoyer (mean ± std) | margin over λ = 0 | recon |")
    print("|---|---|---|---|---|---|")
    for (data, lam, private), vals in sorted(cells.items()):
        h = np.array([v[0] for v in vals])
        base = np.mean([v[0] for v in cells[(data, 0.0, private)]])
        print(f"| {data} | {'ε = 10' if private else 'none'} | {lam:g} | {h.mean():.3f} ± "
              f"{h.std(ddof=1):.3f} | {h.mean() - base:+.3f} | "
              f"{np.mean([v[1] for v in vals]):.1f} |")


if __name__ == "__main__":
    main()

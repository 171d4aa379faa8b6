"""SparseVAE's default on data of our own: sparse real-valued records (issue 15).

2,000 records of 12 values, 3 of them N(0, 1) (clipped to ±3.9) and the rest exactly 0;
``ArrayDataModule(rescale=False)`` and the Gaussian likelihood (fixed scale 0.1), as README
says for real-valued records; 300 optimizer steps, without privacy and under
``DPStrategy(target_epsilon=3, target_delta=1e-5)`` (the library's defaults otherwise); the
validation split's standardised Hoyer sparsity (``val/hoyer``) for λ ∈ {0, 3, 10 (the
Gaussian default), 30, 300}. One seed; the noise seed is secret, so private rows vary between runs.

    python experiments/sparse_own_data.py        # about 3 min on one core
"""

from __future__ import annotations

import logging
import os
import warnings


def records(n: int = 2000, d: int = 12, active: int = 3, seed: int = 1):
    import numpy as np

    g = np.random.default_rng(seed)
    x = np.zeros((n, d), np.float32)
    for i in range(n):
        x[i, g.choice(d, active, replace=False)] = np.clip(g.normal(size=active), -3.9, 3.9)
    return x


def main() -> None:
    os.environ.setdefault("WANDB_MODE", "disabled")
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    import lightning.pytorch as pl

    from lit_dpvae.data import ArrayDataModule
    from lit_dpvae.models import SparseVAE
    from lit_dpvae.strategy import DPStrategy

    x = records()
    print("| privacy | λ | val Hoyer (standardised) | raw | recon |\n|---|---|---|---|---|")
    for private in (False, True):
        for lam in (0.0, 3.0, 10.0, 30.0, 300.0):
            pl.seed_everything(0, verbose=False)
            dm = ArrayDataModule(x, value_range=(-4, 4), rescale=False, batch_size=64)
            model = SparseVAE(data_shape=(12,), likelihood="gaussian", lam=lam)
            strategy = DPStrategy(target_epsilon=3.0, target_delta=1e-5) if private else "auto"
            trainer = pl.Trainer(strategy=strategy, max_steps=300, logger=False,
                                 enable_checkpointing=False, enable_progress_bar=False,
                                 enable_model_summary=False, accelerator="cpu", devices=1)
            trainer.fit(model, dm)
            m = trainer.validate(model, dm, verbose=False)[0]
            print(f"| {'ε = 3' if private else 'none'} | {lam:g} | {m['val/hoyer']:.3f} | "
                  f"{m['val/hoyer_raw']:.3f} | {m['val/recon']:.1f} |", flush=True)


if __name__ == "__main__":
    main()

"""The DP VAE side of the Adult benchmark: train a VAE on a table with a public schema and draw a
synthetic table of the same size (``synthesize``). Used by ``experiments/adult/benchmark.py``.

Every Adult column is integer-coded with a public domain (``adult-domain.json``); each is
declared categorical with categories ``0..k-1`` (the domain, not the values that occur).
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from torch.utils.data import TensorDataset

from lit_dpvae.data import PrivateDataModule, Schema
from lit_dpvae.models import VanillaVAE
from lit_dpvae.strategy import DPStrategy

#: The VAE's settings: fixed before the test split was read, chosen on a validation split of
#: the training records (experiments/results/adult.md, "How the VAE settings were chosen").
DEFAULTS: dict[str, Any] = {
    "latent_dim": 16, "hidden": (256, 256), "lr": 3e-3, "batch_size": 1024, "epochs": 40,
    "max_grad_norm": 1.0, "beta": 1.0, "n_samples": 1,
}


def adult_schema(domain: dict[str, int]) -> Schema:
    """Every column categorical over its public domain ``0..k-1`` (binary for k = 2)."""
    return Schema({name: ({"type": "binary"} if k == 2 else
                          {"type": "categorical", "categories": list(range(k))})
                   for name, k in domain.items()})


def synthesize(train: pd.DataFrame, domain: dict[str, int], epsilon: float | None,
               delta: float, seed: int, num: int | None = None,
               **settings: Any) -> tuple[pd.DataFrame, dict[str, Any]]:
    """``(synthetic table, info)``: a VAE trained on ``train`` at (ε, δ) (``epsilon=None``:
    non-private), then ``num`` (default ``len(train)``) rows drawn from it."""
    cfg = {**DEFAULTS, **settings}
    torch.manual_seed(seed)
    schema = adult_schema(domain)
    x_train, _ = schema.encode(train)  # every training record is trained on
    dm = PrivateDataModule(TensorDataset(x_train, torch.zeros(len(x_train), dtype=torch.int64)),
                           batch_size=int(cfg["batch_size"]))
    model = VanillaVAE(data_shape=(schema.width,), latent_dim=int(cfg["latent_dim"]),
                       hidden=tuple(cfg["hidden"]), lr=float(cfg["lr"]), schema=schema,
                       beta=float(cfg["beta"]), n_samples=int(cfg["n_samples"]))
    if epsilon is None:
        strategy = DPStrategy(mechanism="nonprivate")
    else:
        strategy = DPStrategy(target_epsilon=float(epsilon), target_delta=delta,
                              max_grad_norm=float(cfg["max_grad_norm"]), sample_share=1.0)
    trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=1,
                         max_epochs=int(cfg["epochs"]), logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0)
    start = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, dm)
    model.eval()
    num = len(train) if num is None else int(num)
    gen = torch.Generator().manual_seed(seed + 10_000)
    with torch.no_grad():
        x = torch.cat([model.sample(min(4096, num - i), generator=gen)
                       for i in range(0, num, 4096)])
    frame = schema.decode(x)
    info = {"seconds": time.time() - start, "steps": strategy.accountant.steps,
            "epsilon": None if epsilon is None else float(strategy.epsilon()),
            "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}}
    return frame.astype(np.int64), info

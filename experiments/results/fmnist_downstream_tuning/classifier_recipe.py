"""Choose the downstream classifier recipe on REAL Fashion-MNIST only (no synthetic data, no test
split): train FeatureNet on the real training pool (55 000 records, the split DP training uses)
and measure accuracy on the real validation split (5 000 records carved from the training file).

    OMP_NUM_THREADS=1 python experiments/results/fmnist_downstream_tuning/classifier_recipe.py A B

Each candidate's result is appended as a JSON line to classifier_recipe.jsonl next to this file.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from lit_dpvae.data import FashionMNISTDataModule  # noqa: E402
from lit_dpvae.metrics.generative import CLASSIFIER_HPARAMS, accuracy, train_classifier  # noqa: E402

CANDIDATES = {
    "A_current": {},
    "B_3000_cos_wd": {"steps": 3000, "schedule": "cosine", "weight_decay": 5e-4},
    "H_2000_cos_lr3e-3": {"steps": 2000, "schedule": "cosine", "lr": 3e-3},
    "I_2000_cos_lr3e-3_pool4": {"steps": 2000, "schedule": "cosine", "lr": 3e-3, "pool": 4},
    "J_2000_cos_pool7": {"steps": 2000, "schedule": "cosine", "pool": 7},
    "K_2000_cos_lr3e-3_pool4_do_flip": {"steps": 2000, "schedule": "cosine", "lr": 3e-3,
                                        "pool": 4, "dropout": 0.3, "hflip": True},
}


def main() -> None:
    torch.set_num_threads(1)
    dm = FashionMNISTDataModule(batch_size=128, seed=1000, eval_batch_size=1000)
    dm.setup("fit")
    (xtr, ytr), (xva, yva) = dm.splits["train"], dm.splits["val"]
    out = Path(__file__).with_name("classifier_recipe.jsonl")
    for name in sys.argv[1:]:
        hp = dict(CLASSIFIER_HPARAMS, **CANDIDATES[name])
        t0 = time.time()
        net = train_classifier(xtr, ytr, 10, hp)
        t = time.time() - t0
        row = {"name": name, "hparams": hp, "train_n": int(xtr.shape[0]),
               "val_n": int(xva.shape[0]), "val_acc": accuracy(net, xva, yva),
               "train_acc": accuracy(net, xtr[:10000], ytr[:10000]), "train_s": round(t, 1)}
        print(json.dumps(row), flush=True)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

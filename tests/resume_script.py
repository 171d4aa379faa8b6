"""Training run used by the kill-and-resume test (run as a subprocess).

    python tests/resume_script.py OUT_DIR STEPS [--ckpt PATH] [--sleep SECONDS]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lit_dpvae.data import DigitsDataModule
from lit_dpvae.models import InfoVAE
from lit_dpvae.strategy import TermwiseDPStrategy


class Slow(Callback):
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args) -> None:
        time.sleep(self.seconds)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("steps", type=int)
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--sleep", type=float, default=0.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    pl.seed_everything(0, verbose=False)
    model = InfoVAE(data_shape=(1, 8, 8), latent_dim=4, hidden=(32,), lam=1.0,
                    bandwidths=(1.0,), n_prior_samples=32)
    data = DigitsDataModule(batch_size=64, seed=3)
    strategy = TermwiseDPStrategy(noise_multiplier=1.0, max_grad_norm=1.0,
                                  batch_max_grad_norm=0.01, sample_share=0.9, noise_seed=7,
                                  exact_resume=True)
    saver = ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=2, save_last=True,
                            save_top_k=0)
    trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=args.steps,
                         max_epochs=None, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=2,
                         callbacks=[saver, Slow(args.sleep)], default_root_dir=out)
    trainer.fit(model, data, ckpt_path=args.ckpt)
    torch.save({"state": model.state_dict(), "epsilon": strategy.epsilon(),
                "steps": strategy.accountant.steps}, out / "final.pt")


if __name__ == "__main__":
    main()

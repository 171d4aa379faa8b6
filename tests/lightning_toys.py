"""Small deterministic LightningModules and data for strategy tests (importable by spawned
processes)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lit_dpvae.privacy import LossTerms, poisson_dataloader
from lit_dpvae.privacy.collectives import gather_for_batch_terms
from lit_dpvae.privacy.terms import PairwiseTerm
from lit_dpvae.strategy import TermwiseDPStrategy


class ToyLitVAE(pl.LightningModule):
    """Deterministic VAE-like model with a batch-wise term read through
    ``gather_for_batch_terms`` (so a multi-process run computes it on the global batch)."""

    training_step_runs_without_dp_only = True  # returns loss_terms' mean loss

    def __init__(self, batch_term: bool = True, lr: float = 0.1, batchnorm: bool = False,
                 pairwise: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.pairwise = pairwise
        if pairwise:  # an IMQ MMD against fixed (data-independent) prior samples
            from lit_dpvae.divergences import MMD

            self.mmd = MMD("imq", (1.0,), n_prior_samples=16)
            self.register_buffer("w", torch.linspace(-1, 1, 32).view(16, 2))
        norm = nn.BatchNorm1d(8) if batchnorm else nn.Identity()
        self.enc = nn.Sequential(nn.Linear(6, 8), norm, nn.Tanh(), nn.Linear(8, 4))
        self.dec = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 6))
        self.batch_term, self.lr = batch_term, lr

    def gather_for_batch_terms(self, t: Tensor) -> Tensor:
        return gather_for_batch_terms(t)

    def loss_terms(self, batch) -> LossTerms:
        x = batch[0]
        mu, log_var = self.enc(x).chunk(2, dim=-1)
        recon = (self.dec(mu) - x).pow(2).sum(-1)
        kl = 0.5 * (mu.pow(2) + log_var.exp() - 1 - log_var).sum(-1)
        terms = LossTerms(sample={"recon": recon, "kl": kl})
        if self.pairwise:
            z = self.gather_for_batch_terms(mu)
            value = self.mmd.value(z, self.w) if z.shape[0] >= 2 else z.sum() * 0.0
            terms.batch["mmd"] = value
            terms.pairwise["mmd"] = PairwiseTerm(mu, self.w, self.mmd, 1.0)
        elif self.batch_term:
            z = self.gather_for_batch_terms(mu)
            div = z.mean(0).pow(2).sum() + torch.exp(-torch.cdist(z, z).pow(2)).mean() \
                if z.shape[0] else z.sum()
            terms.batch["div"] = div
        return terms

    def training_step(self, batch, batch_idx):
        return self.loss_terms(batch).mean_loss()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class ToyData(pl.LightningDataModule):
    def __init__(self, n: int = 40, sample_rate: float = 0.1, seed: int = 7,
                 poisson: bool = True) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.data = TensorDataset(torch.randn(n, 6, generator=gen), torch.zeros(n).long())
        self.sample_rate, self.seed, self.poisson = sample_rate, seed, poisson

    def train_dataloader(self):
        if not self.poisson:
            return DataLoader(self.data, batch_size=4)
        trainer = self.trainer
        return poisson_dataloader(
            self.data, self.sample_rate, seed=self.seed,
            num_replicas=trainer.world_size if trainer else 1,
            rank=trainer.global_rank if trainer else 0,
        )


class RecordRanks(pl.Callback):
    """Each rank writes its final weights, step count and local batch sizes to ``out``."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.sizes: list[int] = []
        self.logged: list[dict[str, float]] = []  # the train/* values after each step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.sizes.append(int(batch[0].shape[0]))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.logged.append({k: float(v) for k, v in trainer.callback_metrics.items()
                            if k.startswith("train/")})

    def on_train_end(self, trainer, pl_module):
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save({"state": state, "steps": trainer.global_step, "sizes": self.sizes,
                    "logged": self.logged, "epsilon": trainer.strategy.epsilon()},
                   Path(self.out) / f"rank{trainer.global_rank}.pt")


def make_trainer(strategy, tmp_path, **kwargs) -> pl.Trainer:
    """A quiet one-device CPU Trainer for tests (``kwargs`` override)."""
    defaults = dict(accelerator="cpu", devices=1, max_steps=6, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=tmp_path)
    defaults.update(kwargs)
    return pl.Trainer(strategy=strategy, **defaults)


def make_strategy(**kwargs) -> TermwiseDPStrategy:
    """A DPStrategy with small test settings (``kwargs`` override)."""
    defaults = dict(noise_multiplier=1.0, max_grad_norm=0.5, batch_max_grad_norm=0.1,
                    noise_seed=11)
    defaults.update(kwargs)
    return TermwiseDPStrategy(**defaults)

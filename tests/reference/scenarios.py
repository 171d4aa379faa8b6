"""Fixed-seed scenarios whose per-part statistics, released updates, noise and ε are recorded in
``mechanism_reference.json`` (written by ``python -m tests.reference.record`` on the code before
the redesign of issue 14, re-recorded as float fingerprints on the code before issue 15) and must
stay equal to float tolerance (relative 1e-5): bit-identity did not survive a change of
machine, where the same code and versions round differently (2026-12-02: 82f7350 itself failed
the digests on this machine).

Only public API is used (mechanism classes' ``aggregate``/``privatize``, the strategy's
constructor keywords, a callback reading ``p.grad``), so the scenarios run unchanged on the
code before and after a refactor.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from sklearn.datasets import load_digits
from torch.utils.data import TensorDataset

from lit_dpvae.privacy import (
    NaiveDPSGD,
    NonPrivate,
    PairwiseDPSGD,
    TermwiseDPSGD,
    poisson_dataloader,
)
from tests.lightning_toys import ToyData, ToyLitVAE


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Every scenario runs on one intra-op thread: float reductions split over threads round
    differently, and Lightning sets the thread count from the machine's cores
    (``_set_num_threads_if_needed``) unless ``OMP_NUM_THREADS`` is set."""
    threads, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if env is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env


def digest(t: torch.Tensor) -> list:
    """A tensor's fingerprint: shape, sum, L2 norm, sum of |t|, and its first 4 and last 2
    entries (float64), compared to float tolerance by the test."""
    flat = t.detach().cpu().double().reshape(-1)
    return [list(t.shape), float(flat.sum()), float(flat.norm()), float(flat.abs().sum()),
            *[float(v) for v in flat[:4]], *[float(v) for v in flat[-2:]]]


def digest_dict(d: dict[str, torch.Tensor]) -> dict[str, list]:
    return {name: digest(d[name]) for name in sorted(d)}


class RecordUpdates(pl.Callback):
    """The released update of every step (``p.grad`` right before the optimizer step)."""

    def __init__(self) -> None:
        self.updates: list[str] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = {n: p.grad for n, p in pl_module.named_parameters() if p.grad is not None}
        self.updates.append(digest_dict(grads))


# -- mechanism level: one fixed batch, aggregate then privatize -------------------------------
MECHANISM_CASES: dict[str, dict[str, Any]] = {
    "nonprivate": {"cls": "NonPrivate", "kw": {}, "pairwise": False},
    "naive": {"cls": "NaiveDPSGD", "kw": {"max_grad_norm": 0.5, "max_batch_size": 12,
                                          "noise_multiplier": 1.3}, "pairwise": False},
    "termwise": {"cls": "TermwiseDPSGD", "kw": {"max_grad_norm": 0.5, "batch_max_grad_norm": 0.1,
                                                "noise_multiplier": 1.3}, "pairwise": False},
    "termwise-hooks": {"cls": "TermwiseDPSGD", "kw": {
        "max_grad_norm": 0.5, "batch_max_grad_norm": 0.1, "noise_multiplier": 1.3,
        "backend": "hooks"}, "pairwise": False},
    "termwise-functorch": {"cls": "TermwiseDPSGD", "kw": {
        "max_grad_norm": 0.5, "batch_max_grad_norm": 0.1, "noise_multiplier": 1.3,
        "backend": "functorch"}, "pairwise": False},
    "dpsgd": {"cls": "TermwiseDPSGD", "kw": {"max_grad_norm": 0.5, "sample_share": 1.0,
                                             "noise_multiplier": 0.9}, "pairwise": None},
    "pairwise": {"cls": "PairwiseDPSGD", "kw": {"max_grad_norm": 0.5, "pair_max_grad_norm": 0.05,
                                                "noise_multiplier": 1.3, "sample_share": 0.5},
                 "pairwise": True},
    "pairwise-hooks": {"cls": "PairwiseDPSGD", "kw": {
        "max_grad_norm": 0.5, "pair_max_grad_norm": 0.05, "noise_multiplier": 1.3,
        "sample_share": 0.5, "backend": "hooks"}, "pairwise": True},
}
_CLASSES = {"NonPrivate": NonPrivate, "NaiveDPSGD": NaiveDPSGD, "TermwiseDPSGD": TermwiseDPSGD,
            "PairwiseDPSGD": PairwiseDPSGD}


def mechanism_case(name: str) -> dict[str, Any]:
    with one_thread():
        return _mechanism_case(name)


def _mechanism_case(name: str) -> dict[str, Any]:
    case = MECHANISM_CASES[name]
    mech = _CLASSES[case["cls"]](**case["kw"])
    if case["cls"] == "NonPrivate":  # its one backward divides by B (issue 18)
        mech.set_sampling(10.0)
    if case["pairwise"] is None:
        model = ToyLitVAE(batch_term=False)
    else:
        model = ToyLitVAE(pairwise=case["pairwise"])
    gen = torch.Generator().manual_seed(5)
    batch = (torch.randn(12, 6, generator=gen) * 2, torch.zeros(12).long())
    torch.manual_seed(0)
    stats = mech.aggregate(model, batch)
    noise = torch.Generator().manual_seed(99)
    update = mech.privatize(stats, 10.0, noise)
    return {
        "stats": {part: digest_dict(v) for part, v in stats.items()},
        "update": digest_dict(update),
        "sensitivity": {k: float(v).hex() for k, v in mech.sensitivity.items()},
        "noise_multipliers": {k: float(v).hex() for k, v in mech.noise_multipliers.items()},
        "update_noise_std": float(mech.update_noise_std(10.0)).hex(),
    }


# -- strategy level: a short Trainer.fit ------------------------------------------------------
def _digits(n: int = 300) -> TensorDataset:
    d = load_digits()
    x = torch.tensor(d.images[:n] / 16.0, dtype=torch.float32)[:, None]
    return TensorDataset(x, torch.tensor(d.target[:n], dtype=torch.int64))


class DigitsData(pl.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        self.data = _digits()

    def train_dataloader(self):
        return poisson_dataloader(self.data, 0.1, seed=3)


def _model(kind: str) -> pl.LightningModule:
    torch.manual_seed(0)
    if kind.startswith("toy"):
        return ToyLitVAE(pairwise=kind == "toy-pairwise", batch_term=kind != "toy-nobatch")
    import lit_dpvae.models as models

    name, arch = kind.split("-")
    kw = dict(data_shape=(1, 8, 8), latent_dim=3, arch=arch, hidden=(16,), channels=(4, 8),
              group_norm=2, num_classes=10, lr=0.01)
    if name == "InfoVAE":
        kw.update(lam=1.0, beta=1.0)  # the defaults before issue 15
    if name == "ClusterVAE" and "divergence" in inspect.signature(models.ClusterVAE).parameters:
        kw["divergence"] = "aggregate_kl"  # the default before issue 15
    if name == "SparseVAE":
        kw.update(lam=0.5, reads="sample")  # reads: the default before issue 15
        if "divergence" in inspect.signature(models.SparseVAE).parameters:
            kw["divergence"] = "dim_mmd"  # the default before the per-record Hoyer term
    return getattr(models, name)(**kw)


FIT_CASES: dict[str, dict[str, Any]] = {
    "termwise-toy": {"model": "toy", "kw": {"target_epsilon": 3.0, "batch_max_grad_norm": 0.1}},
    "termwise-toy-hooks": {"model": "toy", "kw": {"noise_multiplier": 1.1,
                                                  "batch_max_grad_norm": 0.1,
                                                  "backend": "hooks"}},
    "dpsgd-toy": {"model": "toy-nobatch", "kw": {"target_epsilon": 2.0, "sample_share": 1.0}},
    "naive-toy": {"model": "toy", "kw": {"mechanism": "naive", "target_epsilon": 5.0}},
    "nonprivate-toy": {"model": "toy", "kw": {"mechanism": "nonprivate"}},
    "pairwise-toy": {"model": "toy-pairwise", "kw": {"mechanism": "pairwise",
                                                     "target_epsilon": 3.0, "sample_share": 0.5,
                                                     "pair_max_grad_norm": 0.05}},
    "pairwise-toy-prv": {"model": "toy-pairwise", "kw": {
        "mechanism": "pairwise", "target_epsilon": 3.0, "pair_max_grad_norm": 0.05,
        "accountant": "prv", "sample_share": 0.6}},
    "termwise-info-mlp": {"model": "InfoVAE-mlp", "kw": {"target_epsilon": 4.0,
                                                         "batch_max_grad_norm": 0.01}},
    "pairwise-info-mlp": {"model": "InfoVAE-mlp", "kw": {"mechanism": "pairwise",
                                                         "target_epsilon": 4.0,
                                                         "sample_share": 0.5,
                                                         "pair_max_grad_norm": 0.01}},
    "termwise-cluster-conv": {"model": "ClusterVAE-conv", "kw": {"target_epsilon": 4.0,
                                                                 "batch_max_grad_norm": 0.01}},
    "pairwise-sparse-mlp": {"model": "SparseVAE-mlp", "kw": {"mechanism": "pairwise",
                                                             "target_epsilon": 4.0,
                                                             "sample_share": 0.5,
                                                             "pair_max_grad_norm": 0.01}},
    # issue 15's default: only the budget ("auto" chooses pairwise, C_p = C/16, shares by Δ)
    "auto-info-mlp": {"model": "InfoVAE-mlp", "kw": {"mechanism": "auto",
                                                     "target_epsilon": 4.0}},
    "dpsgd-vanilla-conv": {"model": "VanillaVAE-conv", "kw": {"target_epsilon": 4.0,
                                                              "sample_share": 1.0}},
}


def fit_case(name: str, tmp_path: Any) -> dict[str, Any]:
    with one_thread():
        return _fit_case(name, tmp_path)


def _fit_case(name: str, tmp_path: Any) -> dict[str, Any]:
    from lit_dpvae.strategy import TermwiseDPStrategy

    case = FIT_CASES[name]
    kw = dict(mechanism="termwise", max_grad_norm=0.5, noise_seed=11)
    kw.update(case["kw"])
    strategy = TermwiseDPStrategy(**kw)
    model = _model(case["model"])
    data = ToyData(n=60, sample_rate=0.2) if case["model"].startswith("toy") else DigitsData()
    record = RecordUpdates()
    torch.manual_seed(1)
    trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=4,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[record])
    trainer.fit(model, data)
    state = {k: v for k, v in model.state_dict().items()}
    return {
        "updates": record.updates,
        "weights": digest_dict(state),
        "epsilon": float(strategy.epsilon()).hex(),
        "noise_multiplier": float(strategy.mechanism.noise_multiplier).hex(),
        "steps": int(trainer.global_step),
    }

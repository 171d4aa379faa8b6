"""Privacy–utility grid: {pairings} × {nonprivate, naive, termwise} × ε × seeds, one cell per run.

Every private cell of a grid uses the same budget (ε, δ = 1e-5), the same clipping norm C, the
same expected batch size B and the same number of steps; ``naive`` uses n_max = 2B. σ is
calibrated by the accountant from the planned steps. ``nonprivate`` cells do not depend on ε and
are run once per (pairing, seed). ``pairwise`` cells (grid ``fmnist_pairwise``) give the
divergence its own budget share (``pairwise_sample_share``, ``pair_max_grad_norm``).

Each finished cell is written atomically to ``<out>/<grid>/cells/<cell>.json`` (+ a sample grid
PNG); a rerun skips finished cells, so a half-finished grid resumes. The summary is
``<out>/<grid>.csv`` (one row per cell), ``<out>/<grid>.md`` (mean ± std over seeds, with the
command) and ``<out>/<grid>/curves_<metric>.png`` (privacy–utility curves).

    python experiments/run_grid.py --quick                       # digits, < 30 min on 2 cores
    python experiments/run_grid.py --grid fmnist_must_show       # see GRIDS
    python experiments/run_grid.py --grid fmnist_full            # the paper grid (estimate)

Evaluation (``lit_dpvae.metrics``) is on the real test split: −ELBO, reconstruction, MMD of the
test posterior means to the prior, Hoyer, NMI/purity (mixture priors), FID/KID and k-NN
precision/recall/density/coverage on features of a CNN trained on the real training split, and
downstream accuracy for conditional pairings. Hyper-parameters are fixed in ``GRIDS`` in advance.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# Model settings shared by all cells of a grid, per pairing.
PAIRINGS: dict[str, dict[str, Any]] = {
    "vanilla": {"cls": "VanillaVAE", "kwargs": {}},
    "vanilla_cond": {"cls": "VanillaVAE", "kwargs": {"conditional": True}},
    # Conditional VAE with the class-conditional prior N(μ_y, I) (BaseVAE ``label_prior``).
    "vanilla_cond_lp": {"cls": "VanillaVAE", "kwargs": {"conditional": True,
                                                        "label_prior": True}},
    "info": {"cls": "InfoVAE", "kwargs": {"lam": 10.0, "bandwidths": [1.0],
                                          "n_prior_samples": 128}},
    "sparse": {"cls": "SparseVAE", "kwargs": {"lam": 100.0, "n_prior_samples": 128}},
    "cluster": {"cls": "ClusterVAE", "kwargs": {"lam": 1.0, "n_components": 10,
                                                "n_prior_samples": 128}},
}

# Training settings: fixed in advance (quickstart round-2 settings, docs in experiments/
# configs/quickstart.yaml), never chosen on the test split.
COMMON = {
    "latent_dim": 8, "hidden": [32], "beta": 0.3, "batch_size": 256, "lr": 0.1,
    "momentum": 0.9, "max_grad_norm": 1.0, "batch_max_grad_norm": 1e-4, "sample_share": 0.99,
    "delta": 1e-5, "accountant": "rdp", "limit_train": None, "n_eval": 2000,
}

# Optional spec keys (absent from older grids; these defaults keep their behaviour). ``eval_split``
# "val" evaluates every metric (−ELBO, FID, downstream accuracy, ...) on the validation split
# carved from the training pool, for hyper-parameter selection without touching the test split.
# ``sample_temperature`` τ (None = 1, unchanged) draws synthetic samples at z ~ N(0, τ²I) (a
# standard-normal prior only): post-processing of the released decoder, no privacy cost.
# ``extra_temperatures`` (list) additionally records ``downstream_acc_tau<τ>`` for each τ, from the
# same trained model (selection on the validation split only). ``ema`` (decay, None = off)
# evaluates an exponential moving average of the DP-SGD iterates (warm-up decay
# min(ema, (1+t)/(10+t))): every iterate is covered by the accountant, so this is post-processing.
# ``label_prior`` (False = off) passes ``label_prior=True`` to a conditional model;
# ``label_prior_scale`` (False = off) also learns the prior's per-class diagonal scale.
# ``channels`` (None = the model default) sets the conv widths for ``arch="conv"``.
# ``optimizer`` "adam_bc" is lit_dpvae.optim.DPAdamBC (floor ``adam_bc_floor``, default 0.05);
# ``lr_schedule`` "cosine" decays the learning rate to 0 over the planned steps. ``adam_eps``
# (None = 1e-8) is the ε of Adam and DPAdamBC (an ε well above the update's noise std φ keeps
# coordinates that hold only noise from taking lr-sized steps). ``accelerator`` ("cpu"; "gpu"
# trains on one GPU, evaluation stays on the CPU) and ``data_dir`` (None = the system
# Fashion-MNIST folder) serve runs on other machines.
OPTIONAL: dict[str, Any] = {"optimizer": "sgd", "eval_split": "test", "arch": "mlp",
                            "n_synthetic": None, "classifier_steps": None,
                            "sample_temperature": None, "extra_temperatures": None,
                            "ema": None, "label_prior": False,
                            "label_prior_scale": False, "channels": None,
                            "adam_bc_floor": None, "lr_schedule": None, "adam_eps": None,
                            "accelerator": "cpu", "data_dir": None}

GRIDS: dict[str, dict[str, Any]] = {
    "quick_digits": dict(COMMON, dataset="digits", steps=150,
                         pairings=["info", "sparse", "cluster", "vanilla_cond"],
                         mechanisms=["nonprivate", "naive", "termwise"],
                         eps=[1.0, 3.0, 10.0], seeds=[0, 1]),
    "fmnist_must_show": dict(COMMON, dataset="fashion_mnist", steps=300, latent_dim=16,
                             hidden=[256], batch_size=512, n_eval=2000,
                             pairings=["sparse", "cluster"], mechanisms=["naive", "termwise"],
                             eps=[1.0, 10.0], seeds=[0, 1, 2]),
    "fmnist_downstream": dict(COMMON, dataset="fashion_mnist", steps=300, latent_dim=16,
                              hidden=[256], batch_size=512, n_eval=2000, n_synthetic=10000,
                              pairings=["vanilla_cond"], mechanisms=["nonprivate", "termwise"],
                              eps=[1.0, 10.0], seeds=[0]),
    # Selected on the validation split only (eval_split="val", ε=10, 1 seed; runs and commands in
    # experiments/results/fmnist_downstream_tuning.md): Adam lr 3e-3 (vs SGD 0.1/0.9, Adam 1e-3,
    # 1e-2), β=1, latent 4 (vs 16: the decoder then leans on the label), 1500 steps of B=1024
    # (B=2048 was not better). This grid reports the test split; DP-SGD only (γ=1).
    "fmnist_downstream_tuned": dict(COMMON, dataset="fashion_mnist", steps=1500, latent_dim=4,
                                    hidden=[256], batch_size=1024, n_eval=2000,
                                    n_synthetic=10000, optimizer="adam", lr=0.003, beta=1.0,
                                    pairings=["vanilla_cond"], mechanisms=["termwise"],
                                    eps=[1.0, 10.0], seeds=[0]),
    # Issue 6, round 2 (experiments/results/fmnist_downstream_tuning.md, runs u01–u17): selected
    # on the validation split only (eval_split="val", ε=10, seed 0), with the downstream classifier
    # recipe DOWNSTREAM_HPARAMS fixed beforehand on real data. From fmnist_downstream_tuned: latent
    # 1 (vs 4, 2: the decoder then carries the class in the label input), n_synthetic 30 000 (vs
    # 10 000, 60 000). Not better on val: β 0.5/2, hidden 128/512, 3000 steps, EMA of the
    # iterates, latent temperature τ < 1. ε=1: only the number of steps re-tuned on val (750,
    # 1500, 3000: 3000 best), hence a second grid. Both report the test split, 3 seeds; DP-SGD
    # only (γ=1).
    "fmnist_downstream_tuned2": dict(COMMON, dataset="fashion_mnist", steps=1500, latent_dim=1,
                                     hidden=[256], batch_size=1024, n_eval=2000,
                                     n_synthetic=30000, optimizer="adam", lr=0.003, beta=1.0,
                                     pairings=["vanilla_cond"], mechanisms=["termwise"],
                                     eps=[10.0], seeds=[0, 1, 2]),
    "fmnist_downstream_tuned2_eps1": dict(COMMON, dataset="fashion_mnist", steps=3000,
                                          latent_dim=1, hidden=[256], batch_size=1024,
                                          n_eval=2000, n_synthetic=30000, optimizer="adam",
                                          lr=0.003, beta=1.0, pairings=["vanilla_cond"],
                                          mechanisms=["termwise"], eps=[1.0], seeds=[0, 1, 2]),
    # Issue 6, round 3: the conditional VAE with the class-conditional prior N(μ_y, I)
    # (pairing vanilla_cond_lp), selected on the validation split only (seed 0; runs v01–v08 in
    # experiments/results/fmnist_downstream_tuning.md): latent 32 (val 0.701 vs 0.689 at 16,
    # 0.591 at 4); n_synthetic 10 000 (30 000: 0.694); 1500 steps (3000 at latent 16: 0.663 vs
    # 0.689); ε=1 keeps 1500 steps (0.670 vs 0.619 with 600). Otherwise the settings of
    # fmnist_downstream_tuned. Test split, 3 seeds; ε=1 by --set 'eps=[1.0]'.
    "fmnist_downstream_lp": dict(COMMON, dataset="fashion_mnist", steps=1500, latent_dim=32,
                                 hidden=[256], batch_size=1024, n_eval=2000,
                                 n_synthetic=10000, optimizer="adam", lr=0.003, beta=1.0,
                                 pairings=["vanilla_cond_lp"], mechanisms=["termwise"],
                                 eps=[10.0], seeds=[0, 1, 2]),
    # Issue 6, round 4 (fmnist_downstream_tuning.md round 4): B 2048 at ε = 10, chosen on the
    # validation split over 3 seeds (0.715 ± 0.010 vs 0.693 ± 0.008 at B 1024, better in every
    # seed; B 4096 0.723 on seed 0 at twice the cost). Not better on val: a learned per-class
    # prior scale (label_prior_scale), latent temperature 0.8/0.6. ε = 1 keeps
    # fmnist_downstream_lp (B 2048, 3000 steps, lr 1e-3/5e-3, hidden [128] all lower on val).
    "fmnist_downstream_lp2": dict(COMMON, dataset="fashion_mnist", steps=1500, latent_dim=32,
                                  hidden=[256], batch_size=2048, n_eval=2000,
                                  n_synthetic=10000, optimizer="adam", lr=0.003, beta=1.0,
                                  pairings=["vanilla_cond_lp"], mechanisms=["termwise"],
                                  eps=[10.0], seeds=[0, 1, 2]),
    "fmnist_full": dict(COMMON, dataset="fashion_mnist", steps=2000, latent_dim=16,
                        hidden=[400], batch_size=512, n_eval=10000, n_synthetic=60000,
                        pairings=["vanilla_cond", "info", "sparse", "cluster"],
                        mechanisms=["nonprivate", "naive", "termwise"],
                        eps=[1.0, 3.0, 10.0], seeds=[0, 1, 2]),
    # Issue 5: pairwise vs term-wise for the kernel divergences. Term-wise keeps the quickstart
    # setting (γ=0.99, C_b=1e-4: its divergence noise is not divided by B, so it must be tiny);
    # pairwise gives the divergence 10% of the budget with C_p=0.01 (noise ∝ 8·C_p/B). Fixed in
    # advance, not tuned.
    "fmnist_pairwise": dict(COMMON, dataset="fashion_mnist", steps=300, latent_dim=16,
                            hidden=[256], batch_size=512, n_eval=2000,
                            pairings=["info", "sparse"], mechanisms=["termwise", "pairwise"],
                            eps=[1.0, 10.0], seeds=[0, 1, 2], pairwise_sample_share=0.9,
                            pair_max_grad_norm=0.01),
    # Issue 6 check: does naive DP-SGD only lose because lr 0.1 makes it diverge? The same cells
    # with 10x and 100x smaller learning rates (one seed, ε=10).
    **{f"fmnist_naive_lr{tag}": dict(COMMON, dataset="fashion_mnist", steps=300, latent_dim=16,
                                      hidden=[256], batch_size=512, n_eval=2000, lr=lr,
                                      pairings=["sparse", "cluster"], mechanisms=["naive"],
                                      eps=[10.0], seeds=[0])
       for tag, lr in (("1e-2", 0.01), ("1e-3", 0.001))},
    "micro": dict(COMMON, dataset="digits", steps=3, n_eval=200, pairings=["info"],
                  mechanisms=["nonprivate", "termwise"], eps=[10.0], seeds=[0],
                  classifier_steps=20),
}

METRICS = ["neg_elbo", "recon", "kl", "mse", "latent_mmd", "latent_dim_mmd", "hoyer", "nmi",
           "purity", "fid", "kid", "precision", "recall", "density", "coverage", "downstream_acc"]
CURVE_METRICS = ["neg_elbo", "latent_mmd", "fid", "precision", "recall", "hoyer", "nmi",
                 "downstream_acc"]


# --------------------------------------------------------------------------------------------
def cells_of(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The cells of a grid; nonprivate cells carry ε = inf and are not repeated over ε."""
    from lit_dpvae.privacy.mechanisms import mechanism_names

    out = []
    for pairing in spec["pairings"]:
        for mech in spec["mechanisms"]:
            if mech not in mechanism_names():
                print(f"[grid] skipping mechanism {mech!r}: not supported by the strategy yet",
                      flush=True)
                continue
            for seed in spec["seeds"]:
                for eps in ([math.inf] if mech == "nonprivate" else spec["eps"]):
                    tag = "inf" if math.isinf(eps) else f"{eps:g}"
                    out.append({"pairing": pairing, "mechanism": mech, "eps": eps,
                                "seed": seed, "key": f"{pairing}-{mech}-eps{tag}-s{seed}"})
    return out


def make_data(spec: dict[str, Any], seed: int):
    from lit_dpvae.data import DigitsDataModule, FashionMNISTDataModule

    # The sampler seed is fixed per cell for reproducibility of the experiment (a release would
    # keep it secret; see the data module docs).
    if spec["dataset"] == "digits":
        dm = DigitsDataModule(batch_size=spec["batch_size"], seed=1000 + seed,
                              limit_train=spec["limit_train"])
    else:
        where = {"data_dir": spec["data_dir"]} if spec.get("data_dir") else {}
        dm = FashionMNISTDataModule(batch_size=spec["batch_size"], seed=1000 + seed,
                                    limit_train=spec["limit_train"], eval_batch_size=1000, **where)
    dm.setup("fit")
    return dm


def make_model(spec: dict[str, Any], pairing: str, dm):
    import lit_dpvae.models as models
    from lit_dpvae.optim import DPAdamBC

    p = PAIRINGS[pairing]
    kwargs = dict(data_shape=dm.data_shape, latent_dim=spec["latent_dim"],
                  hidden=tuple(spec["hidden"]), beta=spec["beta"], num_classes=dm.num_classes,
                  arch=spec.get("arch") or "mlp")
    kwargs.update(p["kwargs"])
    if spec.get("label_prior"):  # class-conditional prior N(μ_y, I) (conditional pairings)
        kwargs["label_prior"] = True
    if spec.get("channels"):
        if kwargs["arch"] != "conv":
            raise ValueError("channels sets conv widths: use it with arch=\"conv\" (the MLP "
                             "widths are hidden)")
        kwargs["channels"] = tuple(spec["channels"])
    if spec.get("label_prior_scale"):  # ... with a learned per-class diagonal scale
        kwargs["label_prior_scale"] = True
    model = getattr(models, p["cls"])(**kwargs)
    lr, momentum, opt = spec["lr"], spec["momentum"], spec.get("optimizer") or "sgd"

    schedule, steps = spec.get("lr_schedule"), spec["steps"]
    if schedule not in (None, "cosine"):
        raise ValueError(f"lr_schedule must be None or \"cosine\", got {schedule!r}")

    def configure_optimizers(self):  # SGD + momentum (quickstart round 2: beats Adam under noise)
        if opt == "adam":
            o = torch.optim.Adam(self.parameters(), lr=lr, eps=spec.get("adam_eps") or 1e-8)
        elif opt == "adam_bc":  # Adam with the DP noise variance removed from v̂ (lit_dpvae.optim)
            o = DPAdamBC(self.parameters(), lr=lr, floor=spec.get("adam_bc_floor") or 0.05,
                         eps=spec.get("adam_eps") or 1e-8)
        else:
            o = torch.optim.SGD(self.parameters(), lr=lr, momentum=momentum)
        if schedule is None:
            return o
        # cosine decay to 0 over the planned steps (a public schedule: post-processing)
        decay = torch.optim.lr_scheduler.LambdaLR(
            o, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps)))
        return {"optimizer": o, "lr_scheduler": {"scheduler": decay, "interval": "step"}}

    model.configure_optimizers = types.MethodType(configure_optimizers, model)
    return model


def set_sample_temperature(model, tau: float | None):
    """Make ``model.sample`` draw z ~ N(0, τ²I) (τ = None or 1: the model's own sampler)."""
    from lit_dpvae.priors import StandardNormal

    model.__dict__.pop("sample", None)  # back to the class's sampler
    if tau is None or float(tau) == 1.0:
        return model
    if not isinstance(model.prior, StandardNormal):
        raise ValueError("sample_temperature needs a standard-normal prior")
    t = float(tau)

    @torch.no_grad()
    def sample(self, n, labels=None):
        onehot = self._onehot(None if labels is None else torch.as_tensor(labels), n, "sample")
        z = self.prior_shift(t * self.prior.sample(n).to(self.device), onehot)  # μ_y + s_y τ ε
        return self.likelihood.mean(self.decode(z, onehot))

    model.sample = types.MethodType(sample, model)
    return model


class ParamEMA:
    """Exponential moving average of the trained parameters, updated after every optimizer step
    (a Lightning callback; ``apply`` copies the average into the model)."""

    def __new__(cls, decay: float):
        import lightning.pytorch as pl

        class _EMA(pl.Callback):
            def __init__(self, decay: float) -> None:
                self.decay, self.t, self.shadow = float(decay), 0, None

            @torch.no_grad()
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                params = [p.detach() for p in pl_module.parameters()]
                if self.shadow is None:
                    self.shadow = [p.clone() for p in params]
                    return
                self.t += 1
                d = min(self.decay, (1 + self.t) / (10 + self.t))
                for s, p in zip(self.shadow, params):
                    s.lerp_(p, 1 - d)

            @torch.no_grad()
            def apply(self, model) -> None:
                if self.shadow is not None:
                    for s, p in zip(self.shadow, model.parameters()):
                        p.copy_(s)

        return _EMA(decay)


def train_cell(spec: dict[str, Any], cell: dict[str, Any], dm) -> tuple[Any, dict[str, Any]]:
    import lightning.pytorch as pl

    from lit_dpvae.privacy.terms import LossTermsError
    from lit_dpvae.strategy import TermwiseDPStrategy

    pl.seed_everything(cell["seed"], verbose=False)
    model = make_model(spec, cell["pairing"], dm)
    mech = cell["mechanism"]
    # no batch-wise term (VanillaVAE): the whole budget goes to the sample part (= DP-SGD)
    share = spec["sample_share"] if model.divergence_key and model.lam else 1.0
    kw: dict[str, Any] = dict(mechanism=mech, max_grad_norm=spec["max_grad_norm"],
                              batch_max_grad_norm=spec["batch_max_grad_norm"],
                              sample_share=share, accountant=spec["accountant"],
                              noise_seed=10_000 + cell["seed"], log_train_terms=False)
    if mech != "nonprivate":
        kw.update(target_epsilon=cell["eps"], target_delta=spec["delta"])
    if mech == "naive":
        kw["max_batch_size"] = 2 * spec["batch_size"]
    if mech == "pairwise":  # the divergence's noise is O(σ·C_p/B), so it can take a real share
        kw.update(sample_share=spec.get("pairwise_sample_share", share),
                  pair_max_grad_norm=spec.get("pair_max_grad_norm", 0.01))
    strategy = TermwiseDPStrategy(**kw)
    ema = ParamEMA(spec["ema"]) if spec.get("ema") else None
    trainer = pl.Trainer(strategy=strategy, accelerator=spec.get("accelerator") or "cpu", devices=1,
                         callbacks=[ema] if ema is not None else None,
                         max_steps=spec["steps"], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0,
                         default_root_dir=str(ROOT / "runs" / "grid"))
    diverged = ""
    try:
        trainer.fit(model, dm)
    except LossTermsError as err:  # the strategy refuses a step on NaN/Inf terms: diverged
        diverged = str(err).split(".")[0]
        print(f"[grid]   diverged at step {trainer.global_step}: {diverged}", flush=True)
    if ema is not None and not diverged:
        ema.apply(model)
    model = model.cpu()  # evaluation (metrics, feature net, classifier) runs on the CPU
    info = {"steps": int(trainer.global_step), "diverged": diverged,
            "epsilon": strategy.epsilon() if strategy.is_private else math.inf,
            "sigma_eff": getattr(strategy.mechanism, "noise_multiplier", 0.0),
            "num_train": dm.num_train}
    return model.eval(), info


def evaluate(spec: dict[str, Any], model, dm, extractor, real_feats) -> dict[str, float]:
    from lit_dpvae.metrics import (
        assign_clusters,
        balanced_samples,
        cluster_purity,
        downstream_accuracy,
        elbo_metrics,
        extract_features,
        fid_kid,
        hoyer_sparsity,
        latent_dim_mmd,
        latent_mmd,
        nmi,
        posterior_means,
        prdc,
    )

    out: dict[str, float] = {}
    split = spec.get("eval_split") or "test"
    x_test, y_test = dm.splits[split]  # "val" for selection; "test" (default) for reporting
    loader = dm.val_dataloader() if split == "val" else dm.test_dataloader()
    hp = {"steps": spec["classifier_steps"]} if spec.get("classifier_steps") else None

    def guard(name, fn):
        try:
            out.update(fn())
        except Exception as err:  # a diverged model (NaN weights) must not kill the grid
            print(f"[grid]   metric {name} failed: {err!r}", flush=True)
            out[f"error_{name}"] = repr(err)[:200]

    with torch.no_grad():
        guard("elbo", lambda: elbo_metrics(model, loader))
        mu, y = posterior_means(model, loader)
        guard("latent_mmd", lambda: {"latent_mmd": latent_mmd(mu, model.prior)})
        guard("latent_dim_mmd", lambda: {"latent_dim_mmd": latent_dim_mmd(mu, model.prior)})
        guard("hoyer", lambda: {"hoyer": hoyer_sparsity(mu, standardise=True)})
        if hasattr(model.prior, "assign"):
            def clusters():
                c = assign_clusters(mu, model.prior)
                return {"nmi": nmi(y, c), "purity": cluster_purity(y, c)}
            guard("clusters", clusters)
        n = min(spec["n_eval"], x_test.shape[0])
        if model.conditional:
            fake, _ = balanced_samples(model, n, dm.num_classes, seed=1)
        else:
            torch.manual_seed(1)
            fake = model.sample(n).clamp(0, 1)
        out["_samples"] = fake[:64]  # type: ignore[assignment]
        guard("fid", lambda: fid_kid(x_test[:n], fake, extractor))
        guard("prdc", lambda: prdc(real_feats[:n], extract_features(extractor, fake)))
    if model.conditional:
        m = spec.get("n_synthetic") or dm.num_train

        def downstream(key="downstream_acc"):
            xs, ys = balanced_samples(model, m, dm.num_classes, seed=2)
            return {key: downstream_accuracy(xs, ys, x_test, y_test, dm.num_classes, hp)}
        guard("downstream", downstream)
        main_tau = spec.get("sample_temperature")
        for tau in spec.get("extra_temperatures") or []:
            set_sample_temperature(model, tau)
            guard(f"downstream_tau{tau:g}", lambda t=tau: downstream(f"downstream_acc_tau{t:g}"))
        set_sample_temperature(model, main_tau)
    return out


def write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, default=float))
    os.replace(tmp, path)


def run_grid(name: str, spec: dict[str, Any], out_dir: Path, command: str) -> list[dict]:
    from lit_dpvae.callbacks.images import image_grid
    from lit_dpvae.metrics import extract_features, feature_extractor

    cell_dir = out_dir / name / "cells"
    cells = cells_of(spec)
    todo = [c for c in cells if not (cell_dir / f"{c['key']}.json").exists()]
    print(f"[grid] {name}: {len(cells)} cells, {len(cells) - len(todo)} done, {len(todo)} to run",
          flush=True)
    if todo:
        t0 = time.time()
        dm0 = make_data(spec, 0)
        x_tr, y_tr = dm0.splits["train"]
        hp = {"steps": spec["classifier_steps"]} if spec.get("classifier_steps") else None
        cache = ROOT / "runs" / "cache" / f"features_{spec['dataset']}_{x_tr.shape[0]}.pt"
        extractor, finfo = feature_extractor(x_tr, y_tr, cache, dm0.num_classes, hp)
        x_test = dm0.splits[spec.get("eval_split") or "test"][0][: spec["n_eval"]]
        real_feats = extract_features(extractor, x_test)
        print(f"[grid] feature net ready ({time.time() - t0:.0f} s, train acc "
              f"{finfo['train_accuracy']:.3f})", flush=True)
    for i, cell in enumerate(todo):
        t0 = time.time()
        print(f"[grid] ({i + 1}/{len(todo)}) {cell['key']}", flush=True)
        dm = make_data(spec, cell["seed"])
        model, info = train_cell(spec, cell, dm)
        t_train = time.time() - t0
        set_sample_temperature(model, spec.get("sample_temperature"))
        metrics = evaluate(spec, model, dm, extractor, real_feats)
        samples = metrics.pop("_samples")
        png = out_dir / name / "samples" / f"{cell['key']}.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        image_grid(samples.float().nan_to_num(0.0), ncol=8).save(png)
        row = {**cell, **info, **metrics, "train_s": round(t_train, 1),
               "total_s": round(time.time() - t0, 1)}
        write_json_atomic(cell_dir / f"{cell['key']}.json", row)
        print(f"[grid]   done in {row['total_s']} s: " + ", ".join(
            f"{k}={row[k]:.4g}" for k in ("epsilon", "neg_elbo", "fid", "downstream_acc",
                                          *(k for k in row if k.startswith("downstream_acc_")))
            if isinstance(row.get(k), float)), flush=True)
    rows = [json.loads((cell_dir / f"{c['key']}.json").read_text()) for c in cells
            if (cell_dir / f"{c['key']}.json").exists()]
    summarise(name, spec, rows, out_dir, command)
    return rows


# --------------------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> tuple[float, float, int]:
    v = [x for x in values if isinstance(x, (int, float)) and math.isfinite(x)]
    if not v:
        return math.nan, math.nan, 0
    m = sum(v) / len(v)
    s = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return m, s, len(v)


def summarise(name: str, spec: dict[str, Any], rows: list[dict], out_dir: Path,
              command: str) -> None:
    metrics = METRICS + sorted({k for r in rows for k in r if k.startswith("downstream_acc_")})
    cols = ["key", "pairing", "mechanism", "eps", "seed", "epsilon", "steps", "diverged",
            "sigma_eff",
            "num_train", *metrics, "train_s", "total_s"]
    with open(out_dir / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in cols})
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["pairing"], r["mechanism"], r["eps"]), []).append(r)
    shown = [m for m in metrics if any(isinstance(r.get(m), (int, float)) for r in rows)]
    lines = [f"# Grid `{name}`", "", "Made by:", "", f"    {command}", "",
             f"Settings: `{json.dumps({k: v for k, v in spec.items()})}`", "",
             f"Cells: {len(rows)}; total cell time {sum(r['total_s'] for r in rows) / 60:.1f} "
             "min (train + eval, 1 torch thread).", "",
             "Mean ± std over seeds (n = number of seeds with a finite value). ↓ lower is "
             "better: neg_elbo, recon, mse, latent_mmd, latent_dim_mmd, fid, kid; ↑ higher is "
             "better: the rest. "
             "FID/KID/precision/recall/density/coverage use our own CNN features (trained on "
             "the real training split), not Inception: not comparable to published FIDs.", "",
             "Cells whose training diverged (NaN/Inf loss terms; the strategy refuses the step) "
             "are evaluated as they stood at that step; `div` counts them.", "",
             "| pairing | mechanism | ε | n | div | " + " | ".join(shown) + " |",
             "|" + "---|" * (5 + len(shown))]
    order = {"nonprivate": 0, "naive": 1, "termwise": 2, "pairwise": 3}
    for key in sorted(groups, key=lambda k: (k[0], order.get(k[1], 9), k[2])):
        g = groups[key]
        cells = []
        for m in shown:
            mean, std, n = _mean_std([r.get(m) for r in g])
            cells.append("–" if n == 0 else f"{mean:.4g} ± {std:.2g}")
        eps = "∞" if math.isinf(key[2]) else f"{key[2]:g}"
        div = sum(bool(r.get("diverged")) for r in g)
        lines.append(f"| {key[0]} | {key[1]} | {eps} | {len(g)} | {div} | " + " | ".join(cells)
                     + " |")
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    plot_curves(name, rows, out_dir, groups)


def plot_curves(name: str, rows: list[dict], out_dir: Path, groups: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairings = sorted({r["pairing"] for r in rows})
    for metric in CURVE_METRICS:
        if not any(isinstance(r.get(metric), (int, float)) for r in rows):
            continue
        fig, axes = plt.subplots(1, len(pairings), figsize=(3.6 * len(pairings), 3.0),
                                 squeeze=False)
        for ax, pairing in zip(axes[0], pairings):
            for mech, style in (("naive", "o--"), ("termwise", "s-"), ("pairwise", "^-")):
                pts = sorted((k[2], *_mean_std([r.get(metric) for r in g])[:2])
                             for k, g in groups.items() if k[0] == pairing and k[1] == mech)
                pts = [p for p in pts if math.isfinite(p[1])]
                if pts:
                    ax.errorbar([p[0] for p in pts], [p[1] for p in pts],
                                yerr=[p[2] for p in pts], fmt=style, capsize=3, label=mech)
            g = groups.get((pairing, "nonprivate", math.inf))
            if g:
                mean = _mean_std([r.get(metric) for r in g])[0]
                if math.isfinite(mean):
                    ax.axhline(mean, color="k", lw=1, ls=":", label="nonprivate")
            ax.set_xscale("log")
            ax.set_xlabel("ε")
            ax.set_title(pairing)
            ax.set_ylabel(metric)
            if ax.has_data():
                ax.legend(fontsize=7)
        fig.suptitle(f"{name}: {metric}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out_dir / name / f"curves_{metric}.png", dpi=90)
        plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grid", default=None, choices=sorted(GRIDS))
    ap.add_argument("--quick", action="store_true", help="the digits grid (quick_digits)")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results"))
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON",
                    help="override grid settings, e.g. --set steps=500 'seeds=[0,1,2]'")
    ap.add_argument("--name", default=None, help="result name (default: the grid name)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("WANDB_MODE", "disabled")
    grid = "quick_digits" if args.quick else (args.grid or "quick_digits")
    spec = dict(GRIDS[grid])
    for item in args.set:
        k, v = item.split("=", 1)
        if k not in spec and k not in OPTIONAL:
            raise SystemExit(f"unknown setting {k!r}; known: {sorted(spec)}")
        spec[k] = json.loads(v)
    name = args.name or grid
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = "python experiments/run_grid.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    run_grid(name, spec, out_dir, command)
    print(f"[grid] wrote {out_dir / name}.csv, {out_dir / name}.md, {out_dir / name}/", flush=True)


if __name__ == "__main__":
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    main()

"""Does each pairing's divergence survive DP? (issue 15)

For every divergence pairing, the property its prior asks for, with λ on (the pairing's default)
and λ = 0, without privacy and under DP with **the library's defaults**: the model is
``Pairing(data_shape=...)`` (plus the likelihood the data need), the strategy is
``DPStrategy(target_epsilon=ε, target_delta=1e-5)`` (``mechanism="auto"``) and the Trainer stops
at 400 optimizer steps. Term-wise DP-SGD gets its own λ-on cells, with its defaults
(``mechanism="termwise"``) and with its batch part confined to the encoder's output layer
(``batch_params=["encoder.head."]``, its best honest shot: the divergence reads only the codes).

Properties (on the real test split, posterior of one sample per record):

* ClusterVAE on pinwheel (25,000 records): NMI between the arms and the mixture component
  ``prior.assign(mu)`` (↑);
* SparseVAE on 8×8 digits: Hoyer sparsity of the posterior means, each dimension standardised
  (↑, Mathieu et al.);
* InfoVAE on 8×8 digits: MMD² (IMQ, InfoVAE bandwidths) between the aggregate posterior (one
  z ~ q(z|x) per test record) and N(0, I) (↓).

``--data fmnist`` runs the same pairings on Fashion-MNIST (ClusterVAE's NMI against the classes).

Reproducibility: the sampler and noise seeds are fixed per cell (``1000 + seed``,
``10000 + seed``); a release keeps them secret (docs/privacy.md). One torch thread per cell,
two cells at a time (``--workers``). Cells are cached as JSON under ``--out``/cells, so a
stopped run continues where it was.

    python experiments/divergence_effect.py                  # digits + pinwheel, ε ∈ {1, 10}
    python experiments/divergence_effect.py --data fmnist --eps 10
    python experiments/divergence_effect.py --summary        # tables + plot from the cells
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "results" / "divergence_effect"
STEPS = 400
DELTA = 1e-5
#: pairing -> (model class, small data set, property, direction: +1 higher is better)
PAIRINGS = {
    "cluster": ("ClusterVAE", "pinwheel", "nmi", +1),
    "sparse": ("SparseVAE", "digits", "hoyer", +1),
    "info": ("InfoVAE", "digits", "latent_mmd", -1),
}
#: λ-on cells' key tag of a pairing whose default term changed (cached cells of the previous
#: default are not reused), and pairings whose default term is sample-wise: no term-wise
#: variants (they need a batch-wise term: the strategy refuses the model)
KEY_TAGS = {"sparse": "hoyer"}
SAMPLE_WISE = {"sparse"}
#: private λ-on variants: name -> DPStrategy keywords besides the budget
VARIANTS = {
    "auto": {},
    "termwise": {"mechanism": "termwise"},
    "termwise_head": {"mechanism": "termwise", "batch_params": ["encoder.head."]},
}
#: diagnostic variants, run only when named (``--variants``; their λ = 0 cells too):
#: ``cliponly`` is the defaults' clipping with σ = 10⁻⁴ (no privacy to speak of): what
#: clipping alone costs the divergence, apart from the noise
DIAGNOSTIC = {"cliponly": {"noise_multiplier": 1e-4}}


def cells(data: str, eps: list[float], seeds: list[int], variants: list[str],
          split: str = "test", lam: float | None = None) -> list[dict]:
    """The grid's cells; ``split="val"`` measures on the validation split (for choosing
    defaults), ``lam`` overrides the pairing's default λ in the λ-on cells."""
    out = []
    suffix = ("" if split == "test" else f"-{split}") + ("" if lam is None else f"-lam{lam:g}")
    for pairing, (_, small, _, _) in PAIRINGS.items():
        dataset = small if data == "small" else data
        for seed in seeds:
            rows = [("nonprivate", math.inf, on_off) for on_off in ("on", "off")]
            for e in eps:
                rows += [("auto", e, "off")] + [(v, e, "on") for v in variants
                                                  if v in ("auto", *DIAGNOSTIC)
                                                  or pairing not in SAMPLE_WISE]
                rows += [(v, e, "off") for v in variants if v in DIAGNOSTIC]
            for mech, e, on_off in rows:
                tag = "inf" if math.isinf(e) else f"{e:g}"
                cell = {"pairing": pairing, "dataset": dataset, "mechanism": mech,
                        "eps": e, "lam": on_off, "seed": seed, "split": split,
                        "key": f"{pairing}-{dataset}-{mech}-eps{tag}-lam{on_off}-s{seed}"}
                if on_off == "on" and pairing in KEY_TAGS:
                    cell["key"] += f"-{KEY_TAGS[pairing]}"
                if on_off == "on" and lam is not None:
                    cell["model_kwargs"] = {"lam": lam}
                    cell["key"] += suffix
                elif split != "test":
                    cell["key"] += f"-{split}"
                out.append(cell)
    return out


def make_data(dataset: str, seed: int):
    from lit_dpvae.data import DigitsDataModule, FashionMNISTDataModule, PinwheelDataModule

    if dataset == "pinwheel":  # 5 arms × 5000 = 25,000 records, 20,000 to train
        return PinwheelDataModule(num_per_arm=5000, seed=1000 + seed), {"likelihood": "gaussian"}
    if dataset == "digits":
        return DigitsDataModule(seed=1000 + seed), {}
    if dataset == "fmnist":
        return FashionMNISTDataModule(seed=1000 + seed, eval_batch_size=1000), {}
    raise ValueError(f"unknown data set {dataset!r}")


def property_of(pairing: str, model, dm, split: str = "test") -> dict[str, float]:
    """The pairing's property on the test (or validation) split, and a few side metrics."""
    import torch

    from lit_dpvae.metrics import latent_mmd
    from lit_dpvae.metrics.generative import latent_dim_mmd
    from lit_dpvae.metrics.latent import assign_clusters, hoyer_sparsity, nmi

    dm.setup("test")
    mus, log_vars, ys, recon = [], [], [], []
    gen = torch.Generator().manual_seed(0)
    loader = dm.test_dataloader() if split == "test" else dm.val_dataloader()
    with torch.no_grad():
        for x, y in loader:
            terms = model.loss_terms(x)
            recon.append(terms.sample["recon"])
            mu, log_var = model.encode(x, None)
            mus.append(mu)
            log_vars.append(log_var)
            ys.append(y)
    mu, log_var, y = torch.cat(mus), torch.cat(log_vars), torch.cat(ys)
    z = mu + (0.5 * log_var).exp() * torch.randn(mu.shape, generator=gen)
    out = {"recon": float(torch.cat(recon).mean())}
    if pairing == "cluster":
        clusters = assign_clusters(mu, model.prior)
        out["nmi"] = nmi(y, clusters)
        out.update(component_use(y, clusters))
    elif pairing == "sparse":
        out["hoyer"] = hoyer_sparsity(mu, standardise=True)
        out["dim_mmd"] = latent_dim_mmd(z, model.prior)
    else:
        out["latent_mmd"] = latent_mmd(z, model.prior)
        out["latent_mmd_means"] = latent_mmd(mu, model.prior)
    return out


def component_use(y, clusters) -> dict[str, float]:
    """How the classes sit on the mixture: ``components`` holding ≥ 5 % of the records, and
    ``shared``, the classes whose largest component is also another class's largest (merged
    classes)."""
    import torch

    counts = torch.zeros(int(y.max()) + 1, int(clusters.max()) + 1)
    counts.index_put_((y.long(), clusters.long()), torch.ones(len(y)), accumulate=True)
    used = int((counts.sum(0) >= 0.05 * len(y)).sum())
    top = counts.argmax(1)
    shared = int(sum(int((top == t).sum()) for t in top.unique() if int((top == t).sum()) > 1))
    return {"components": float(used), "shared": float(shared)}


def run_cell(cell: dict[str, Any]) -> dict[str, Any]:
    import logging
    import warnings

    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import lightning.pytorch as pl

    import lit_dpvae.models as models
    from lit_dpvae.strategy import DPStrategy

    pl.seed_everything(cell["seed"], verbose=False)
    dm, data_kwargs = make_data(cell["dataset"], cell["seed"])
    dm.setup("fit")
    kwargs = {**data_kwargs, **cell.get("model_kwargs", {})}  # model_kwargs: diagnostics only
    if cell["lam"] == "off":
        kwargs["lam"] = 0.0
    model = getattr(models, PAIRINGS[cell["pairing"]][0])(data_shape=dm.data_shape, **kwargs)
    if cell["mechanism"] == "nonprivate":
        strategy: Any = "auto"  # Lightning's own: the plain gradient of the mean loss
    else:
        settings = {**{**VARIANTS, **DIAGNOSTIC}[cell["mechanism"]],
                    **cell.get("strategy_kwargs", {})}
        budget = {} if "noise_multiplier" in settings else {"target_epsilon": cell["eps"]}
        strategy = DPStrategy(target_delta=DELTA, noise_seed=10_000 + cell["seed"], **budget,
                              **settings)
    trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=STEPS,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0, default_root_dir=str(ROOT / "runs" / "divfx"))
    start = time.time()
    diverged = ""
    try:
        trainer.fit(model, dm)
    except ValueError as err:  # NaN/Inf terms: the strategy refuses the step
        diverged = str(err).split(".")[0]
    train_s = time.time() - start
    model = model.cpu().eval()
    result = {**cell, "steps": int(trainer.global_step), "diverged": diverged,
              "train_s": round(train_s, 1)}
    if isinstance(strategy, DPStrategy):
        report = strategy.privacy_report()
        result.update(epsilon=report.epsilon, sigma_eff=report.sigma_eff,
                      chosen=strategy.mechanism_name,
                      sensitivity=report.sensitivity, noise_multipliers=report.noise_multipliers)
    if result["steps"] == 0:  # refused before training: an untrained model is no result
        result[PAIRINGS[cell["pairing"]][2]] = None
        return result
    result.update(property_of(cell["pairing"], model, dm, cell.get("split", "test")))
    return result


def _work(args: tuple[dict, str]) -> str:
    cell, out = args
    path = Path(out) / "cells" / f"{cell['key']}.json"
    result = run_cell(cell)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=float))
    os.replace(tmp, path)
    return f"{cell['key']}: " + ", ".join(
        f"{k}={result[k]:.4g}" for k in ("nmi", "hoyer", "latent_mmd")
        if result.get(k) is not None) + \
        f" ({result['train_s']} s)"


# ---- summary ---------------------------------------------------------------------------------
def load(out: Path, split: str = "test", lam: float | None = None) -> list[dict]:
    """The cached cells measured on ``split``; λ-on cells only those run with λ = ``lam``
    (None: the pairing's default)."""
    rows = [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))]
    return [r for r in rows if r.get("split", "test") == split
            and (r["lam"] == "off" or r.get("model_kwargs", {}).get("lam") == lam)]


def mean_std(values: list[float]) -> tuple[float, float, int]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan, 0
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return m, sd, len(vals)


def group(rows: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["pairing"], r["dataset"], r["mechanism"], r["eps"], r["lam"]),
                          []).append(r)
    return groups


def _margin(g: dict, pairing: str, dataset: str, kind: str, eps: float) -> tuple[float, float]:
    """(λ on − λ off in the property's good direction, its standard error over seeds)."""
    metric, sign = PAIRINGS[pairing][2], PAIRINGS[pairing][3]
    on, off = (mean_std([r.get(metric) for r in g.get((pairing, dataset, kind, eps, lam), [])])
               for lam in ("on", "off"))
    se = math.sqrt(on[1] ** 2 / max(on[2], 1) + off[1] ** 2 / max(off[2], 1))
    return sign * (on[0] - off[0]), se


def must_show(rows: list[dict]) -> list[str]:
    """Per pairing, data set and ε: the DP margin of the defaults (auto λ on − auto λ off, in
    the property's good direction) as a fraction of the non-private margin, the issue's
    threshold (small data: ≥ 1/2 at ε ≥ 10, ≥ 1/4 below; Fashion-MNIST: > 0), and the margin's
    standard error over seeds (a margin below 1 SE is not told apart from 0)."""
    g = group(rows)
    lines = ["| pairing | data | ε | non-private margin ± SE | DP margin (auto) ± SE | "
             "fraction | needed | holds |", "|---|---|---|---|---|---|---|---|"]
    for (pairing, dataset, mech, eps, lam), _ in sorted(g.items(), key=lambda kv: str(kv[0])):
        if mech != "auto" or lam != "on":
            continue
        np_m, np_se = _margin(g, pairing, dataset, "nonprivate", math.inf)
        dp_m, dp_se = _margin(g, pairing, dataset, "auto", eps)
        frac = dp_m / np_m if np_m > 0 else math.nan
        if dataset == "fmnist":
            need, ok = "> 0", np_m > np_se and dp_m > dp_se
        else:
            threshold = 0.5 if eps >= 10 else 0.25
            need, ok = f"≥ {threshold}", np_m > np_se and frac >= threshold
        lines.append(f"| {pairing} | {dataset} | {eps:g} | {np_m:+.4f} ± {np_se:.4f} | "
                     f"{dp_m:+.4f} ± {dp_se:.4f} | {frac:.2f} | {need} | "
                     f"{'yes' if ok else '**no**'} |")
    return lines


def table(rows: list[dict]) -> list[str]:
    lines = ["| pairing | data | mechanism (chosen) | ε | λ | n | property | recon | steps |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (pairing, dataset, mech, eps, lam), rs in sorted(group(rows).items(),
                                                         key=lambda kv: str(kv[0])):
        metric = PAIRINGS[pairing][2]
        pm, ps, n = mean_std([r.get(metric) for r in rs])
        rm, rsd, _ = mean_std([r.get("recon") for r in rs])
        chosen = sorted({r.get("chosen", "-") for r in rs})
        use = ""
        if all("components" in r for r in rs):  # ClusterVAE: per seed, components/merged
            use = " (" + " ".join(f"{r['components']:.0f}/{r['shared']:.0f}" for r in rs) + ")"
        lines.append(f"| {pairing} | {dataset} | {mech} ({'/'.join(chosen)}) | "
                     f"{'∞' if math.isinf(eps) else f'{eps:g}'} | {lam} | {n} | "
                     f"{metric} {pm:.4f} ± {ps:.4f}{use} | {rm:.2f} ± {rsd:.2f} | "
                     f"{max(r['steps'] for r in rs)} |")
    return lines


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = group(rows)
    panels = sorted({(r["pairing"], r["dataset"]) for r in rows})
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols, 3.4 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (pairing, dataset) in zip(axes.flat, panels):
        metric = PAIRINGS[pairing][2]
        for lam, style in (("on", "-"), ("off", "--")):
            v = mean_std([r.get(metric) for r in g.get((pairing, dataset, "nonprivate",
                                                         math.inf, lam), [])])[0]
            if math.isfinite(v):
                ax.axhline(v, color="k", ls=style, lw=1, label=f"non-private λ {lam}")
        series = [("auto", "on"), ("auto", "off"), ("termwise", "on"), ("termwise_head", "on")]
        for mech, lam in series:
            pts = sorted((e, mean_std([r.get(metric) for r in rs])) for (p, d, m, e, la), rs
                         in g.items() if (p, d, m, la) == (pairing, dataset, mech, lam))
            if pts:
                ax.errorbar([e for e, _ in pts], [s[0] for _, s in pts],
                            yerr=[s[1] for _, s in pts], marker="o", capsize=3,
                            label=f"{mech} λ {lam}")
        ax.set_xscale("log")
        ax.set_xlabel("ε")
        ax.set_title(f"{pairing} on {dataset}: {metric}")
    fullest = max(axes.flat[:len(panels)], key=lambda a: len(a.get_legend_handles_labels()[0]))
    fullest.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def summary(out: Path, split: str = "test", lam: float | None = None) -> None:
    rows = load(out, split, lam)
    name = "summary" + ("" if split == "test" else f"-{split}") + \
        ("" if lam is None else f"-lam{lam:g}")
    lines = [f"# Divergence effect (issue 15): cells ({split} split"
             + ("" if lam is None else f", λ = {lam:g} in the λ-on cells") + ")", "",
             "Mean ± std over seeds. Made by `python experiments/divergence_effect.py` "
             "(and `--data fmnist`); see experiments/results/divergence_effect.md.", "",
             *table(rows), "", "## Must show", "", *must_show(rows)]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    if name == "summary":
        plot(rows, out / "divergence_effect.png")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", choices=("small", "fmnist"), default="small")
    ap.add_argument("--eps", type=float, nargs="+", default=[1.0, 10.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS),
                    choices=[*VARIANTS, *DIAGNOSTIC])
    ap.add_argument("--pairings", nargs="+", default=list(PAIRINGS), choices=list(PAIRINGS))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--summary", action="store_true", help="only summarise the cached cells")
    ap.add_argument("--split", choices=("test", "val"), default="test",
                    help="where the property is measured (val: for choosing defaults)")
    ap.add_argument("--lam", type=float, default=None,
                    help="λ of the λ-on cells (default: each pairing's own default)")
    args = ap.parse_args(argv)
    if not args.summary:
        (args.out / "cells").mkdir(parents=True, exist_ok=True)
        todo = [c for c in cells(args.data, args.eps, args.seeds, args.variants, args.split,
                                 args.lam)
                if c["pairing"] in args.pairings
                and not (args.out / "cells" / f"{c['key']}.json").exists()]
        print(f"{len(todo)} cells to run", flush=True)
        os.environ["OMP_NUM_THREADS"] = "1"
        os.environ.setdefault("WANDB_MODE", "disabled")
        # slow cells first, so the two workers finish together
        todo.sort(key=lambda c: (c["pairing"] != "sparse", c["mechanism"] == "nonprivate"))
        with ProcessPoolExecutor(args.workers) as pool:
            for line in pool.map(_work, [(c, str(args.out)) for c in todo]):
                print(line, flush=True)
    summary(args.out, args.split, args.lam)


if __name__ == "__main__":
    sys.exit(main())

"""Side-by-side Adult results: the DP VAE (experiments/adult/vae_runs.py) next to AIM and MST
(experiments/adult/baselines.py), the non-private VAE and the real data. Writes
``experiments/results/adult_summary.json`` ({"eps1": {"vae": {"auroc": …, "tvd2": …}, "aim": …,
"mst": …}, …}; means over seeds, logistic-regression AUROC), a markdown table and a plot::

    python experiments/adult/summary.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"
METHODS = ("vae", "aim", "mst")
COLS = (("auroc_lr", "AUROC LR"), ("acc_lr", "acc LR"), ("auroc_gb", "AUROC GB"),
        ("acc_gb", "acc GB"), ("tvd1", "TVD 1-way"), ("tvd2", "TVD 2-way"), ("seconds", "s/run"))


def merged(baselines: dict, vae: dict) -> dict:
    out: dict = {}
    for source in (baselines, vae):
        for key, value in source.items():
            if key.startswith("eps") or key == "nonprivate":
                out.setdefault(key, {}).update(value)
    return out


def summary(results: dict) -> dict:
    out = {}
    for key, methods in results.items():
        if not key.startswith("eps"):
            continue
        out[key] = {m: {"auroc": methods[m]["auroc_lr"], "tvd2": methods[m]["tvd2"],
                        "auroc_gb": methods[m]["auroc_gb"], "tvd1": methods[m]["tvd1"],
                        "n_seeds": methods[m]["n_seeds"]}
                    for m in METHODS if m in methods}
    return out


def cell(agg: dict, key: str) -> str:
    if key not in agg:
        return "–"
    mean, std = agg[key], agg.get("std", {}).get(key, 0.0)
    return f"{mean:.0f} ± {std:.0f}" if key == "seconds" else f"{mean:.3f} ± {std:.3f}"


def table(results: dict, real: dict) -> list[str]:
    lines = ["| ε | method | seeds | " + " | ".join(h for _, h in COLS) + " |",
             "|---|---|---|" + "---|" * len(COLS)]
    keys = sorted((k for k in results if k.startswith("eps")), key=lambda k: float(k[3:]))
    for key in [*keys, "nonprivate"]:
        for method in METHODS:
            agg = results.get(key, {}).get(method)
            if agg is None:
                continue
            eps = "∞" if key == "nonprivate" else key[3:]
            name = {"vae": "DP VAE (ours)", "aim": "AIM", "mst": "MST"}[method]
            if key == "nonprivate":
                name = "VAE, non-private"
            lines.append(f"| {eps} | {name} | {agg['n_seeds']} | "
                         + " | ".join(cell(agg, c) for c, _ in COLS) + " |")
    lines.append("| ∞ | real train data | – | "
                 + " | ".join(f"{real[c]:.3f}" if c in real else "–" for c, _ in COLS) + " |")
    return lines


def plot(results: dict, real: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted((k for k in results if k.startswith("eps")), key=lambda k: float(k[3:]))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, metric, label in ((axes[0], "auroc_lr", "TSTR AUROC (LR) ↑"),
                              (axes[1], "tvd2", "mean 2-way marginal TVD ↓")):
        for method, style in (("vae", "o-"), ("aim", "s--"), ("mst", "^--")):
            pts = [(float(k[3:]), results[k][method]) for k in keys if method in results[k]]
            if pts:
                ax.errorbar([e for e, _ in pts], [a[metric] for _, a in pts],
                            yerr=[a["std"][metric] for _, a in pts], fmt=style, capsize=3,
                            label={"vae": "DP VAE (ours)", "aim": "AIM", "mst": "MST"}[method])
        if "vae" in results.get("nonprivate", {}):
            ax.axhline(results["nonprivate"]["vae"][metric], color="grey", ls=":",
                       label="VAE non-private")
        if metric == "auroc_lr":
            ax.axhline(real[metric], color="black", ls="-", lw=0.8, label="real data")
        ax.set_xscale("log")
        ax.set_xlabel("ε (δ = 1e-5)")
        ax.set_title(label)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baselines", default=str(RESULTS / "adult_baselines.json"))
    parser.add_argument("--vae", default=str(RESULTS / "adult_vae.json"))
    parser.add_argument("--out", default=str(RESULTS / "adult_summary.json"))
    args = parser.parse_args(argv)
    baselines = json.loads(Path(args.baselines).read_text())
    results = merged(baselines, json.loads(Path(args.vae).read_text()))
    out = summary(results)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    plot(results, baselines["real"], Path(args.out).with_suffix(".png"))
    print("\n".join(table(results, baselines["real"])))
    return out


if __name__ == "__main__":
    main()

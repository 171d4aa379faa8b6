"""Markdown table (mean ± std over seeds) of an Adult results JSON from baselines.py::

    python experiments/adult/report.py experiments/results/adult_baselines.json \
        > experiments/results/adult_baselines.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COLS = [("auroc_lr", "AUROC LR"), ("acc_lr", "acc LR"), ("auroc_gb", "AUROC GB"),
        ("acc_gb", "acc GB"), ("tvd1", "TVD 1-way"), ("tvd2", "TVD 2-way"),
        ("seconds", "s / run")]


def fmt(agg: dict, key: str) -> str:
    if key not in agg:
        return "–"
    m, s = agg[key], agg.get("std", {}).get(key, 0.0)
    if key == "seconds":
        return f"{m:.0f} ± {s:.0f}"
    return f"{m:.3f} ± {s:.3f}"


def table(res: dict) -> list[str]:
    lines = ["| ε | method | seeds | " + " | ".join(h for _, h in COLS) + " |",
             "|---|---|---|" + "---|" * len(COLS)]
    eps_keys = sorted((k for k in res if k.startswith("eps")), key=lambda k: float(k[3:]))
    for k in eps_keys:
        for synth in ("mst", "aim"):
            if synth not in res[k]:
                continue
            agg = res[k][synth]
            seeds = ",".join(str(r["seed"]) for r in agg["seeds"])
            deg = f" ({agg['n_degenerate']} degenerate)" if agg.get("n_degenerate") else ""
            lines.append(f"| {k[3:]} | {synth.upper()} | {seeds}{deg} | "
                         + " | ".join(fmt(agg, c) for c, _ in COLS) + " |")
    if "real" in res:
        r = res["real"]
        lines.append("| ∞ | real train (train-on-real) | – | "
                     + " | ".join(f"{r[c]:.3f}" if c in r else "–" for c, _ in COLS) + " |")
    return lines


def missing(res: dict) -> list[str]:
    meta = res.get("meta", {})
    out = []
    for e in meta.get("eps", []):
        for synth in ("mst", "aim"):
            have = {r["seed"] for r in res.get(f"eps{e:g}", {}).get(synth, {}).get("seeds", [])}
            out += [f"{synth.upper()} ε={e:g} seed {s}" for s in meta.get("seeds", [])
                    if s not in have]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("json")
    res = json.loads(Path(ap.parse_args().json).read_text())
    meta = res.get("meta", {})
    print("\n".join(table(res)))
    miss = missing(res)
    print()
    print("Runs not finished: " + (", ".join(miss) if miss else "none") + ".")
    print()
    print(f"smartnoise-synth {meta.get('smartnoise_synth')}, mbi {meta.get('mbi')}, "
          f"opendp {meta.get('opendp')}; δ = {meta.get('delta')}; train {meta.get('n_train')} / "
          f"test {meta.get('n_test')} rows (split seed {meta.get('split_seed')}); "
          f"AIM settings {meta.get('aim_settings')}; MST {meta.get('mst_settings')}.")


if __name__ == "__main__":
    main()

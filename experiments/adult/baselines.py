"""smartnoise-synth AIM and MST baselines on UCI Adult, scored by experiments/adult/common.py.

One command (from the repo root, in the library's venv, after
``bash experiments/adult/make_snsynth_venv.sh`` once)::

    . /work/venv/bin/activate
    nice taskset -c 1 python experiments/adult/baselines.py \
        --out experiments/results/adult_baselines.json

The orchestration and the metrics run here (numpy/pandas/scikit-learn); each synthesizer run
is a subprocess of the snsynth venv's python running ``snsynth_worker.py`` (which documents how
the public domain is passed and that no ε goes to preprocessing). Grid: ε ∈ {0.5, 1, 3, 10},
δ = 1e-5, seeds {0, 1, 2}, all on the fixed seed-0 80/20 train split; the synthetic tables have
as many rows as the train split. Runs go MST first (all ε, seeds), then AIM seed-major (seed 0 at
every ε, then seed 1, ...), and the JSON is rewritten after every run, so an interrupted grid
leaves every finished run in it; ``--resume`` skips the runs already there.

Synthetic records are drawn with mbi's ``method="sample"`` (the worker's docstring says why: mbi
1.1.0's default ``round`` sampler creates spurious correlations between sibling columns).

AIM settings: smartnoise-synth's defaults (rounds = 16 * 14 = 224, max_model_size = 80 MB,
mirror descent 1000 iterations per round, hard-coded) take well over 30 minutes per run on one
CPU core (probe: 10 rounds of ~224 in 126 s at ε=1, rounds slowing down as the model grows), so
this benchmark bounds AIM by ``--aim-rounds`` (default 28 = 2 x 14 columns; measured 292 s at
ε=1). AIM spends 0.9 * 14 / rounds of rho on the 14 one-way marginals, then ~1/rounds per round
(more after a sigma halving): 28 rounds = 45% on one-way marginals and ~17 two-way marginals
selected; rounds = 14 would leave ~10% for a single two-way marginal. The value is recorded in
the JSON's ``meta``. MST runs with its defaults.

Time per run: ``seconds`` = the worker's fit + sample time; ``wall_seconds`` = the whole
subprocess (python/JAX start-up and CSV I/O included).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from experiments.adult.common import (  # noqa: E402
    aggregate,
    evaluate,
    load_adult,
    real_reference,
    split,
    write_results,
)

HERE = Path(__file__).resolve().parent
DEFAULT_PY = HERE / ".venv-snsynth" / "bin" / "python"


def eps_key(eps: float) -> str:
    return f"eps{eps:g}"


def run_one(args, synth: str, eps: float, seed: int, train_csv: Path, domain_json: Path,
            workdir: Path) -> tuple[dict, pd.DataFrame, float]:
    out_csv = workdir / f"{synth}_eps{eps:g}_seed{seed}.csv"
    info_json = out_csv.with_suffix(".json")
    cmd = [
        str(args.python), str(HERE / "snsynth_worker.py"), "--train", str(train_csv),
        "--domain", str(domain_json), "--synth", synth, "--epsilon", repr(float(eps)),
        "--delta", repr(float(args.delta)), "--seed", str(seed), "--out", str(out_csv),
        "--info", str(info_json),
    ]
    if synth == "aim":
        cmd += ["--aim-max-model-size", repr(float(args.aim_max_model_size)),
                "--aim-max-cells", str(args.aim_max_cells)]
        if args.aim_rounds is not None:
            cmd += ["--aim-rounds", str(args.aim_rounds)]
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONWARNINGS="ignore")
    log = out_csv.with_suffix(".log")
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log.read_text()[-2000:]
        raise RuntimeError(f"{synth} eps={eps} seed={seed} failed ({proc.returncode}):\n{tail}")
    info = json.loads(info_json.read_text())
    syn = pd.read_csv(out_csv)
    return info, syn, wall


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "experiments/results/adult_baselines.json"))
    ap.add_argument("--data", default=None, help="shared/ folder (default: found next to repo)")
    ap.add_argument("--python", default=str(DEFAULT_PY), help="the snsynth venv's python")
    ap.add_argument("--synths", nargs="+", default=["mst", "aim"], choices=["mst", "aim"])
    ap.add_argument("--eps", nargs="+", type=float, default=[0.5, 1.0, 3.0, 10.0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--aim-rounds", type=int, default=28)
    ap.add_argument("--aim-max-model-size", type=float, default=80.0)
    ap.add_argument("--aim-max-cells", type=int, default=10000)
    ap.add_argument("--workdir", default=None,
                    help="keep the synthetic CSVs and logs here (default: a temp dir)")
    ap.add_argument("--resume", action="store_true", help="skip runs already in --out")
    args = ap.parse_args(argv)
    if not Path(args.python).exists():
        sys.exit(f"{args.python} missing: run bash experiments/adult/make_snsynth_venv.sh")

    df, domain = load_adult(args.data)
    train, test = split(df)
    results: dict = {}
    if args.resume and Path(args.out).exists():
        results = json.loads(Path(args.out).read_text())
    per_seed: dict[tuple[str, str], list[dict]] = {}
    for k, v in results.items():
        if k.startswith("eps"):
            for synth, agg in v.items():
                per_seed[(k, synth)] = list(agg["seeds"])
    version = subprocess.run(
        [args.python, "-c", "import importlib.metadata as m; print(m.version('smartnoise-synth'),"
         " m.version('mbi'), m.version('opendp'))"],
        capture_output=True, text=True, check=True,
    ).stdout.split()
    results["meta"] = {
        "command": " ".join(shlex.quote(a) for a in [sys.argv[0], *sys.argv[1:]]),
        "smartnoise_synth": version[0], "mbi": version[1], "opendp": version[2],
        "delta": args.delta, "eps": args.eps, "seeds": args.seeds,
        "n_train": len(train), "n_test": len(test), "split_seed": 0,
        "aim_settings": {"rounds": args.aim_rounds, "max_model_size": args.aim_max_model_size,
                         "max_cells": args.aim_max_cells, "degree": 2},
        "mst_settings": "defaults",
        "sample_method": "sample: i.i.d. draws (mbi 1.1.0's default 'round' sampler makes "
                         "children of the same parents comonotone; see snsynth_worker.py)",
        "preprocessing": "all columns categorical with the public domain (a pre-fit "
                         "TableTransformer); 0 epsilon spent on preprocessing",
        "note": "seeds seed numpy (selection, sampling); OpenDP's Gaussian noise is unseeded",
    }
    if "real" not in results:
        results["real"] = real_reference(train, test, domain)
        write_results(args.out, results)

    order = [("mst", e, s) for e in args.eps for s in args.seeds if "mst" in args.synths]
    order += [("aim", e, s) for s in args.seeds for e in args.eps if "aim" in args.synths]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        train_csv = workdir / "train.csv"
        train.to_csv(train_csv, index=False)
        domain_json = workdir / "domain.json"
        domain_json.write_text(json.dumps(domain))
        for synth, eps, seed in order:
            key = eps_key(eps)
            done = per_seed.setdefault((key, synth), [])
            if any(r["seed"] == seed for r in done):
                continue
            info, syn, wall = run_one(args, synth, eps, seed, train_csv, domain_json, workdir)
            row = {"seed": seed, **evaluate(syn, train, test, domain),
                   "seconds": info["seconds"], "wall_seconds": wall,
                   "preprocessor_eps_spent": info["preprocessor_eps_spent"],
                   "sample_method": info["sample_method"]}
            done.append(row)
            done.sort(key=lambda r: r["seed"])
            results.setdefault(key, {})[synth] = aggregate(done)
            write_results(args.out, results)
            print(f"{synth} {key} seed {seed}: auroc_lr {row['auroc_lr']:.3f} "
                  f"auroc_gb {row['auroc_gb']:.3f} tvd1 {row['tvd1']:.3f} "
                  f"tvd2 {row['tvd2']:.3f} {info['seconds']:.0f}s", flush=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Fit one smartnoise-synth synthesizer (AIM or MST) on a train CSV and write a synthetic CSV.

Runs INSIDE the smartnoise-synth venv (``experiments/adult/make_snsynth_venv.sh``), never in the
library's venv; ``baselines.py`` calls it as a subprocess, one run per call::

    experiments/adult/.venv-snsynth/bin/python experiments/adult/snsynth_worker.py \
        --train train.csv --domain adult-domain.json --synth mst --epsilon 1 --delta 1e-5 \
        --seed 0 --out synth.csv --info info.json

Public domain, no ε on preprocessing: every column is categorical with the public domain
``0..k-1`` from ``adult-domain.json``. The snsynth ``TableTransformer`` (one
``LabelTransformer(nullable=False)`` per column) is fitted on a table made from the DOMAIN only
(``range(k)`` per column), never on the records, and handed to ``fit(transformer=...)``; it is
then already fit, so snsynth neither infers categories/bounds from the data (its default
``categorical_columns=`` path would learn the set of values present in the private data, and a
cardinality that misses unseen codes) nor spends any of ε on preprocessing. The worker checks
that the odometer spent 0, that the cardinalities equal the public domain and that the
transform is the identity on the codes.

Sampling (``--sample-method``, default ``sample``): mbi 1.1.0's default ``round`` sampler of
``MarkovRandomField.synthetic_data`` ranks the rows of each parent group by row index, without
shuffling, when it draws a child column, so two children of the same parents come out
comonotone: MST at ε=1 gave a Spearman correlation of 0.80 between ``fnlwgt`` and
``hours-per-week`` (real: -0.02) and a mean 2-way TVD (0.136) worse than independent columns
(mbi 2.0.0 fixes this by shuffling within each group, but smartnoise-synth 1.0.8 pins mbi<2 and
fails on mbi 2's Dataset API). The worker therefore makes ``method="sample"`` (i.i.d. draws from
the fitted model's conditionals, unaffected) the default of ``synthetic_data`` before calling
snsynth's own ``sample()``. This is post-processing of the DP model: no privacy cost.

Randomness: ``--seed`` seeds numpy's global generator, which snsynth/mbi use for the
exponential mechanism (AIM's/MST's selection) and for sampling the synthetic records. The
Gaussian measurement noise comes from OpenDP's ``make_gaussian`` (a system CSPRNG) and cannot be
seeded, so runs are not bit-reproducible; the seeds are replicates.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pandas as pd


def public_transformer(columns: list[str], domain: dict[str, int]):
    from snsynth.transform import LabelTransformer
    from snsynth.transform.table import TableTransformer

    kmax = max(domain[c] for c in columns)
    public = pd.DataFrame({c: np.arange(kmax) % domain[c] for c in columns})
    tt = TableTransformer([LabelTransformer(nullable=False) for _ in columns])
    tt.fit(public, epsilon=0.0)
    assert tt.fit_complete
    assert tt.cardinality == [domain[c] for c in columns], tt.cardinality
    assert tt.odometer.spent[0] == 0.0
    for c, t in zip(columns, tt.transformers, strict=True):
        assert t.categories == list(range(domain[c])), c
    return tt


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", required=True)
    ap.add_argument("--domain", required=True)
    ap.add_argument("--synth", choices=["aim", "mst"], required=True)
    ap.add_argument("--epsilon", type=float, required=True)
    ap.add_argument("--delta", type=float, required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--info", required=True)
    ap.add_argument("--aim-max-model-size", type=float, default=80.0)
    ap.add_argument("--aim-rounds", type=int, default=None)
    ap.add_argument("--aim-max-cells", type=int, default=10000)
    ap.add_argument("--sample-method", choices=["sample", "round"], default="sample")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)

    import functools

    import snsynth
    from mbi.markov_random_field import MarkovRandomField
    from snsynth.aim import AIMSynthesizer
    from snsynth.mst import MSTSynthesizer

    df = pd.read_csv(args.train)
    with open(args.domain) as f:
        domain = json.load(f)
    columns = list(df.columns)
    codes = df.to_numpy()
    for j, c in enumerate(columns):
        if codes[:, j].min() < 0 or codes[:, j].max() >= domain[c]:
            raise ValueError(f"column {c} has codes outside its public domain 0..{domain[c] - 1}")

    if not hasattr(MarkovRandomField, "_unpatched_synthetic_data"):
        MarkovRandomField._unpatched_synthetic_data = MarkovRandomField.synthetic_data
    MarkovRandomField.synthetic_data = functools.partialmethod(
        MarkovRandomField._unpatched_synthetic_data, method=args.sample_method
    )
    np.random.seed(args.seed)
    tt = public_transformer(columns, domain)
    if args.synth == "aim":
        settings = dict(
            max_model_size=args.aim_max_model_size, rounds=args.aim_rounds,
            max_cells=args.aim_max_cells, degree=2,
        )
        synth = AIMSynthesizer(
            epsilon=args.epsilon, delta=args.delta, verbose=args.verbose, **settings
        )
    else:
        settings = {}
        synth = MSTSynthesizer(epsilon=args.epsilon, delta=args.delta, verbose=args.verbose)
    t0 = time.perf_counter()
    synth.fit(df, transformer=tt, preprocessor_eps=0.0)
    t_fit = time.perf_counter() - t0
    out = synth.sample(len(df))
    seconds = time.perf_counter() - t0
    syn = pd.DataFrame(out, columns=columns).astype(np.int64)
    syn.to_csv(args.out, index=False)
    info = {
        "synth": args.synth, "epsilon": args.epsilon, "delta": args.delta, "seed": args.seed,
        "settings": settings, "preprocessor_eps_spent": float(tt.odometer.spent[0]),
        "epsilon_left_for_training": float(synth.epsilon),
        "rho": float(getattr(synth, "rho", float("nan"))),
        "sample_method": args.sample_method, "fit_seconds": t_fit, "seconds": seconds,
        "n_rows": len(syn),
        "snsynth_version": getattr(snsynth, "__version__", None),
    }
    with open(args.info, "w") as f:
        json.dump(info, f, indent=1)


if __name__ == "__main__":
    main()

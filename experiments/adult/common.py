"""Shared data, split and metric harness of the UCI Adult DP tabular-synthesis benchmark.

Importable with numpy, pandas and scikit-learn only (no torch), so that every method (the
smartnoise-synth baselines, the DP-VAEs) is scored by the same code::

    from experiments.adult.common import load_adult, split, evaluate, aggregate, write_results
    df, domain = load_adult()            # or load_adult("/path/to/shared")
    train, test = split(df)              # seed 0, 80/20, the same for every method and run seed
    row = evaluate(synthetic_df, train, test, domain)

Data: ``shared/data/adult/adult.csv`` (14 integer-coded columns) and ``adult-domain.json`` (the
public domain: a column of size k takes the values 0..k-1). The data are never copied into the
repository.

The metric recipes below were fixed before any result was seen and are not tuned on the test
split (or on anything else):

* TSTR (train on synthetic, test on real), target ``income>50K``, features = the 13 other
  columns, scored on the real TEST split:

  - ``lr``: every feature one-hot encoded over its PUBLIC domain (``OneHotEncoder`` with
    ``categories=[0..k-1]``, so unseen codes still get a column), then
    ``LogisticRegression(max_iter=1000)`` with every other setting at scikit-learn's default
    (C=1.0, lbfgs).
  - ``gb``: ``HistGradientBoostingClassifier(categorical_features=<all features>,
    random_state=0)``, every other setting default (its default early stopping on >10k rows uses
    a random_state-seeded validation split of the synthetic training data).

  AUROC from the positive-class probability, accuracy from the predicted class. Degenerate
  synthetic data (a single class in the synthetic label column) cannot train either model: the
  row then reports AUROC 0.5 and the accuracy of always predicting that one class (the majority,
  indeed only, class of the synthetic labels) on the real test split, with ``degenerate: True``.

* Marginal fidelity against the real TRAIN split: TVD of a marginal = 0.5 * L1 distance between
  the normalised histograms of the synthetic and the real records over the public domain (for
  a pair of columns, over the k_a * k_b cells). ``tvd1`` = mean over the 14 one-way marginals,
  ``tvd2`` = mean over the 91 two-way marginals (all pairs of columns, target included).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

TARGET = "income>50K"
COLUMNS = [
    "age", "workclass", "fnlwgt", "education-num", "marital-status", "occupation",
    "relationship", "race", "sex", "capital-gain", "capital-loss", "hours-per-week",
    "native-country", TARGET,
]
SPLIT_SEED = 0
TEST_FRACTION = 0.2
GB_RANDOM_STATE = 0
METRIC_KEYS = ("auroc_lr", "acc_lr", "auroc_gb", "acc_gb", "tvd1", "tvd2")

_REPO_ROOT = Path(__file__).resolve().parents[2]


def find_shared_dir() -> Path | None:
    """The project's ``shared/`` folder: ``$LIT_DPVAE_SHARED`` if set, else ``../shared`` next to
    this checkout, else (in a git worktree) ``../shared`` next to the main checkout. ``None`` if
    none of these holds ``data/adult/adult.csv``."""
    candidates = []
    if os.environ.get("LIT_DPVAE_SHARED"):
        candidates.append(Path(os.environ["LIT_DPVAE_SHARED"]))
    candidates.append(_REPO_ROOT.parent / "shared")
    dotgit = _REPO_ROOT / ".git"
    if dotgit.is_file():  # a worktree: "gitdir: <main>/.git/worktrees/<name>"
        text = dotgit.read_text().strip()
        if text.startswith("gitdir:"):
            gitdir = Path(text.split(":", 1)[1].strip())
            if gitdir.parent.name == "worktrees":
                candidates.append(gitdir.parents[2].parent / "shared")
    for c in candidates:
        if (c / "data" / "adult" / "adult.csv").is_file():
            return c
    return None


def _adult_dir(shared_dir: str | os.PathLike | None) -> Path:
    if shared_dir is None:
        shared_dir = find_shared_dir()
        if shared_dir is None:
            raise FileNotFoundError("shared/data/adult not found; pass shared_dir or --data")
    p = Path(shared_dir)
    for cand in (p, p / "adult", p / "data" / "adult"):
        if (cand / "adult.csv").is_file():
            return cand
    raise FileNotFoundError(f"no adult.csv under {p} (looked in ., adult/, data/adult/)")


def load_adult(shared_dir: str | os.PathLike | None = None) -> tuple[pd.DataFrame, dict[str, int]]:
    """Load the integer-coded Adult table and its public domain.

    ``shared_dir``: the ``shared/`` folder (or its ``data/adult`` folder itself); default
    :func:`find_shared_dir`. Returns ``(df, domain)``: ``df`` with the 14 columns of
    :data:`COLUMNS` as int64, ``domain`` = ``{column: k}`` (values 0..k-1). Raises if a code lies
    outside the public domain.
    """
    d = _adult_dir(shared_dir)
    df = pd.read_csv(d / "adult.csv")
    with open(d / "adult-domain.json") as f:
        domain = {str(k): int(v) for k, v in json.load(f).items()}
    if list(df.columns) != COLUMNS or list(domain) != COLUMNS:
        raise ValueError("adult.csv / adult-domain.json columns differ from the expected 14")
    df = df.astype(np.int64)
    check_codes(df, domain)
    return df, domain


def check_codes(df: pd.DataFrame, domain: Mapping[str, int]) -> None:
    """Raise ValueError unless ``df`` has the domain's columns, in order, with codes in 0..k-1."""
    if list(df.columns) != list(domain):
        raise ValueError(f"columns {list(df.columns)} != domain columns {list(domain)}")
    for c, k in domain.items():
        v = df[c].to_numpy()
        if len(v) and (v.min() < 0 or v.max() >= k):
            raise ValueError(f"column {c!r} has codes outside its public domain 0..{k - 1}")


def split(df: pd.DataFrame, seed: int = SPLIT_SEED) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fixed seeded 80/20 split: a permutation from ``np.random.default_rng(seed)``; the first
    ``round(0.2 * n)`` permuted rows are the test split. Both parts keep the original row order
    and get a fresh 0..m-1 index. Use the default seed 0 for every method and every run seed."""
    n = len(df)
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(TEST_FRACTION * n))
    test_idx = np.sort(perm[:n_test])
    train_idx = np.sort(perm[n_test:])
    return (
        df.iloc[train_idx].reset_index(drop=True),
        df.iloc[test_idx].reset_index(drop=True),
    )


# --------------------------------------------------------------------------------------- TSTR


def _features(domain: Mapping[str, int], target: str) -> list[str]:
    return [c for c in domain if c != target]


def _model(kind: str, domain: Mapping[str, int], features: Sequence[str]):
    if kind == "lr":
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import OneHotEncoder

        enc = OneHotEncoder(categories=[np.arange(domain[c]) for c in features])
        return make_pipeline(enc, LogisticRegression(max_iter=1000))
    if kind == "gb":
        from sklearn.ensemble import HistGradientBoostingClassifier

        return HistGradientBoostingClassifier(
            categorical_features=np.ones(len(features), dtype=bool),
            random_state=GB_RANDOM_STATE,
        )
    raise ValueError(f"unknown model {kind!r} (lr or gb)")


def tstr(
    synth: pd.DataFrame,
    test: pd.DataFrame,
    domain: Mapping[str, int],
    model: str = "lr",
    target: str = TARGET,
) -> dict[str, Any]:
    """Train ``model`` ("lr" or "gb", recipes in the module docstring) on ``synth`` and score it
    on the real ``test`` split. Returns ``{"auroc", "acc", "degenerate"}``; a single-class
    synthetic label column gives AUROC 0.5 and the accuracy of predicting that class."""
    from sklearn.metrics import accuracy_score, roc_auc_score

    check_codes(synth, domain)
    if len(synth) == 0:
        raise ValueError("empty synthetic data")
    feats = _features(domain, target)
    y_syn = synth[target].to_numpy()
    y_test = test[target].to_numpy()
    classes = np.unique(y_syn)
    if len(classes) < 2:
        return {
            "auroc": 0.5,
            "acc": float(np.mean(y_test == classes[0])),
            "degenerate": True,
        }
    clf = _model(model, domain, feats)
    clf.fit(synth[feats].to_numpy(), y_syn)
    x_test = test[feats].to_numpy()
    proba = clf.predict_proba(x_test)[:, list(clf.classes_).index(1)]
    return {
        "auroc": float(roc_auc_score(y_test, proba)),
        "acc": float(accuracy_score(y_test, clf.predict(x_test))),
        "degenerate": False,
    }


# ---------------------------------------------------------------------------------- marginals


def _hist(codes: np.ndarray, size: int) -> np.ndarray:
    h = np.bincount(codes, minlength=size).astype(np.float64)
    s = h.sum()
    return h / s if s > 0 else h


def marginal_tvds(
    synth: pd.DataFrame, real: pd.DataFrame, domain: Mapping[str, int], ways: int
) -> dict[tuple[str, ...], float]:
    """TVD of every ``ways``-way marginal (1 or 2) between ``synth`` and ``real``, over the
    public domain: ``{(col,) or (col_a, col_b): 0.5 * ||p_synth - p_real||_1}``."""
    check_codes(synth, domain)
    check_codes(real, domain)
    cols = list(domain)
    xs = synth.to_numpy(dtype=np.int64)
    xr = real.to_numpy(dtype=np.int64)
    sizes = [domain[c] for c in cols]
    out: dict[tuple[str, ...], float] = {}
    if ways == 1:
        for j, c in enumerate(cols):
            out[(c,)] = 0.5 * float(
                np.abs(_hist(xs[:, j], sizes[j]) - _hist(xr[:, j], sizes[j])).sum()
            )
    elif ways == 2:
        for a, b in combinations(range(len(cols)), 2):
            size = sizes[a] * sizes[b]
            ps = _hist(xs[:, a] * sizes[b] + xs[:, b], size)
            pr = _hist(xr[:, a] * sizes[b] + xr[:, b], size)
            out[(cols[a], cols[b])] = 0.5 * float(np.abs(ps - pr).sum())
    else:
        raise ValueError("ways must be 1 or 2")
    return out


def mean_tvd(
    synth: pd.DataFrame, real: pd.DataFrame, domain: Mapping[str, int], ways: int
) -> float:
    """Mean TVD over all ``ways``-way marginals (see :func:`marginal_tvds`)."""
    return float(np.mean(list(marginal_tvds(synth, real, domain, ways).values())))


# ----------------------------------------------------------------------------------- results


def evaluate(
    synth: pd.DataFrame,
    train: pd.DataFrame,
    test: pd.DataFrame,
    domain: Mapping[str, int],
) -> dict[str, Any]:
    """All metrics of one synthetic table: ``auroc_lr, acc_lr, auroc_gb, acc_gb`` (TSTR on the
    real test split), ``tvd1, tvd2`` (against the real TRAIN split), ``degenerate``, ``n_rows``.
    ``synth`` must have the 14 columns in :data:`COLUMNS` order with codes in the domain."""
    synth = synth[list(domain)].astype(np.int64)
    lr = tstr(synth, test, domain, "lr")
    gb = tstr(synth, test, domain, "gb")
    return {
        "auroc_lr": lr["auroc"], "acc_lr": lr["acc"],
        "auroc_gb": gb["auroc"], "acc_gb": gb["acc"],
        "tvd1": mean_tvd(synth, train, domain, 1),
        "tvd2": mean_tvd(synth, train, domain, 2),
        "degenerate": bool(lr["degenerate"] or gb["degenerate"]),
        "n_rows": int(len(synth)),
    }


def real_reference(
    train: pd.DataFrame, test: pd.DataFrame, domain: Mapping[str, int]
) -> dict[str, Any]:
    """The reference row: the real TRAIN split itself as "synthetic" data (TSTR becomes
    train-on-real-test-on-real; tvd1 = tvd2 = 0 by construction)."""
    return evaluate(train, train, test, domain)


def aggregate(per_seed: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean over seeds of every numeric field (``auroc_lr`` …, ``seconds``), their sample std
    (ddof=1; 0 for one seed) under ``"std"``, ``n_degenerate`` and the per-seed dicts under
    ``"seeds"``."""
    if not per_seed:
        raise ValueError("no seeds")
    keys = [
        k for k, v in per_seed[0].items()
        if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
        and k not in ("seed", "n_rows")
    ]
    out: dict[str, Any] = {}
    std: dict[str, float] = {}
    for k in keys:
        vals = np.array([float(r[k]) for r in per_seed if k in r])
        out[k] = float(vals.mean())
        std[k] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
    out["std"] = std
    out["n_seeds"] = len(per_seed)
    out["n_degenerate"] = int(sum(bool(r.get("degenerate", False)) for r in per_seed))
    out["seeds"] = [dict(r) for r in per_seed]
    return out


def _jsonable(o: Any) -> Any:
    if isinstance(o, Mapping):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, np.generic):
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def write_results(path: str | os.PathLike, results: Mapping[str, Any]) -> Path:
    """Write ``results`` as indented JSON (numpy scalars converted, NaN/inf -> null), creating
    the parent folder; atomic (temp file + rename). Returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(_jsonable(results), indent=1) + "\n")
    tmp.replace(p)
    return p

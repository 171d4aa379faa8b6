"""The Adult benchmark's data split and metric harness (experiments/adult/common.py).

Fast (a few seconds on one core); uses only numpy/pandas/scikit-learn. The tests that need the
real data read it from the project's shared/ folder and skip, saying so, where it is absent.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from experiments.adult import common
from experiments.adult.common import (
    COLUMNS,
    TARGET,
    aggregate,
    evaluate,
    find_shared_dir,
    load_adult,
    marginal_tvds,
    mean_tvd,
    split,
    tstr,
    write_results,
)

SHARED = find_shared_dir()
needs_data = pytest.mark.skipif(
    SHARED is None, reason="shared/data/adult/adult.csv not found (set LIT_DPVAE_SHARED)"
)

TOY_DOMAIN = {"a": 3, "b": 4, "y": 2}


def _toy(n=200, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 3, n)
    b = rng.integers(0, 4, n)
    y = ((a + b + rng.integers(0, 2, n)) > 3).astype(np.int64)
    return pd.DataFrame({"a": a, "b": b, "y": y})


def test_tvd_of_a_table_with_itself_is_zero():
    df = _toy()
    assert mean_tvd(df, df, TOY_DOMAIN, 1) == 0.0
    assert mean_tvd(df, df, TOY_DOMAIN, 2) == 0.0
    # row order and table size do not matter, only the normalised histograms
    doubled = pd.concat([df, df.iloc[::-1]], ignore_index=True)
    assert mean_tvd(doubled, df, TOY_DOMAIN, 2) == pytest.approx(0.0, abs=1e-12)


def test_tvd_of_disjoint_supports_is_one():
    x = pd.DataFrame({"a": [0, 0, 1], "b": [0, 1, 1], "y": [0, 0, 0]})
    z = pd.DataFrame({"a": [2, 2], "b": [2, 3], "y": [1, 1]})
    assert mean_tvd(x, z, TOY_DOMAIN, 1) == pytest.approx(1.0)
    assert mean_tvd(x, z, TOY_DOMAIN, 2) == pytest.approx(1.0)
    assert len(marginal_tvds(x, z, TOY_DOMAIN, 2)) == 3


def test_tvd_value_and_pair_cells():
    # one column half moved: TVD 0.5; a pair whose 1-way marginals agree but whose joint differs
    x = pd.DataFrame({"a": [0, 1], "b": [0, 1], "y": [0, 1]})
    z = pd.DataFrame({"a": [0, 1], "b": [1, 0], "y": [0, 0]})
    one = marginal_tvds(x, z, TOY_DOMAIN, 1)
    assert one[("a",)] == 0.0 and one[("b",)] == 0.0 and one[("y",)] == pytest.approx(0.5)
    two = marginal_tvds(x, z, TOY_DOMAIN, 2)
    assert two[("a", "b")] == pytest.approx(1.0)


def test_codes_outside_the_public_domain_are_refused():
    bad = pd.DataFrame({"a": [3], "b": [0], "y": [0]})
    with pytest.raises(ValueError, match="outside its public domain"):
        mean_tvd(bad, _toy(), TOY_DOMAIN, 1)


def test_degenerate_single_class_synthetic_labels():
    test = _toy(seed=1)
    syn = _toy(seed=2).assign(y=0)
    for model in ("lr", "gb"):
        r = tstr(syn, test, TOY_DOMAIN, model, target="y")
        assert r["degenerate"] is True
        assert r["auroc"] == 0.5
        assert r["acc"] == pytest.approx(float(np.mean(test["y"] == 0)))
    ok = tstr(_toy(seed=2), test, TOY_DOMAIN, "lr", target="y")
    assert ok["degenerate"] is False and ok["auroc"] > 0.7


def test_aggregate_and_write_results(tmp_path):
    rows = [{"seed": s, "auroc_lr": 0.6 + 0.1 * s, "seconds": 2.0, "degenerate": s == 1}
            for s in range(3)]
    agg = aggregate(rows)
    assert agg["auroc_lr"] == pytest.approx(0.7)
    assert agg["std"]["auroc_lr"] == pytest.approx(0.1)
    assert agg["n_degenerate"] == 1 and len(agg["seeds"]) == 3 and "seed" not in agg["std"]
    p = write_results(tmp_path / "sub" / "r.json", {"x": agg, "nan": float("nan")})
    import json

    back = json.loads(p.read_text())
    assert back["x"]["auroc_lr"] == pytest.approx(0.7) and back["nan"] is None


def test_split_is_deterministic_and_80_20():
    df = pd.DataFrame({"i": np.arange(1001)})
    tr, te = split(df)
    tr2, te2 = split(df, seed=0)
    assert tr.equals(tr2) and te.equals(te2)
    assert len(te) == 200 and len(tr) == 801
    assert set(tr["i"]).isdisjoint(te["i"]) and len(set(tr["i"]) | set(te["i"])) == 1001
    assert not split(df, seed=1)[1].equals(te)


@needs_data
def test_adult_loads_splits_and_real_tstr_beats_085():
    df, domain = load_adult(SHARED)
    assert list(df.columns) == COLUMNS and list(domain) == COLUMNS and len(df) == 48842
    train, test = split(df)
    assert (len(train), len(test)) == (39074, 9768)
    tr2, te2 = split(load_adult(SHARED)[0])
    assert train.equals(tr2) and test.equals(te2)
    r = tstr(train, test, domain, "lr")
    assert r["auroc"] > 0.85 and not r["degenerate"]
    assert mean_tvd(train, train, domain, 2) == 0.0
    assert len(marginal_tvds(test, train, domain, 2)) == 91
    assert 0.0 < mean_tvd(test, train, domain, 2) < 0.1


@needs_data
def test_evaluate_row_on_a_small_synthetic_table():
    df, domain = load_adult(SHARED)
    train, test = split(df)
    # independent columns (the product of the train 1-way marginals): 1-way TVD small, 2-way not
    rng = np.random.default_rng(0)
    syn = pd.DataFrame({c: rng.choice(train[c].to_numpy(), 3000) for c in COLUMNS})
    row = evaluate(syn, train, test.iloc[:3000], domain)
    assert set(common.METRIC_KEYS) <= set(row) and row["n_rows"] == 3000
    assert row["tvd1"] < row["tvd2"]
    assert 0.4 <= row["auroc_lr"] <= 0.6 and not row["degenerate"]
    assert TARGET in syn

"""experiments/divergence_effect.py: the cells it runs, one real (short) cell, the must-show
verdicts."""

from __future__ import annotations

import json
import math

from experiments import divergence_effect as dfx


def test_cells_cover_every_pairing_lambda_and_mechanism():
    cells = dfx.cells("small", [1.0, 10.0], [0, 1], ["auto", "termwise"])
    keys = {c["key"] for c in cells}
    # SparseVAE's default term is sample-wise: no term-wise cells (the strategy refuses them)
    assert len(keys) == len(cells) == 2 * (2 * (2 + 2 * 3) + (2 + 2 * 2))
    assert not any(c["pairing"] == "sparse" and c["mechanism"] == "termwise" for c in cells)
    # the new default's λ-on cells never reuse a cached cell of the previous default
    assert "sparse-digits-auto-eps10-lamon-s0-hoyer" in keys
    assert {c["dataset"] for c in cells if c["pairing"] == "cluster"} == {"pinwheel"}
    assert "info-digits-auto-eps10-lamoff-s1" in keys  # λ = 0 under the defaults (DP-SGD)
    assert not any(c["mechanism"] == "termwise" and c["lam"] == "off" for c in cells)


def test_one_cell_uses_the_library_defaults(monkeypatch):
    monkeypatch.setattr(dfx, "STEPS", 3)
    cell = {"pairing": "info", "dataset": "digits", "mechanism": "auto", "eps": 10.0,
            "lam": "on", "seed": 0, "key": "t"}
    out = dfx.run_cell(cell)
    assert out["chosen"] == "pairwise" and out["steps"] == 3 and not out["diverged"]
    assert out["sensitivity"] == {"sample": 1.0, "pairwise": 0.5}  # C_p = C/16
    assert 0 < out["epsilon"] <= 10.0 and math.isfinite(out["latent_mmd"])


def test_a_refused_cell_records_no_property(monkeypatch):
    monkeypatch.setattr(dfx, "STEPS", 2)
    cell = {"pairing": "sparse", "dataset": "digits", "mechanism": "termwise", "eps": 10.0,
            "lam": "on", "seed": 0, "key": "t"}
    out = dfx.run_cell(cell)  # term-wise needs a batch-wise term; the Hoyer term is sample-wise
    assert out["steps"] == 0 and out["diverged"] and out["hoyer"] is None
    assert dfx.mean_std([out["hoyer"]])[2] == 0


def _rows(pairing, dataset, values):
    metric = dfx.PAIRINGS[pairing][2]
    return [{"pairing": pairing, "dataset": dataset, "mechanism": mech, "eps": eps, "lam": lam,
             metric: v + 0.001 * s, "recon": 1.0, "steps": 400}
            for (mech, eps, lam), v in values.items() for s in range(3)]


def test_must_show_verdicts():
    np_, dp = ("nonprivate", math.inf), ("auto", 10.0)
    passing = _rows("cluster", "pinwheel", {(*np_, "on"): 0.9, (*np_, "off"): 0.5,
                                            (*dp, "on"): 0.8, (*dp, "off"): 0.55})
    failing = _rows("info", "digits", {(*np_, "on"): 0.1, (*np_, "off"): 0.5,  # ↓ better
                                       (*dp, "on"): 0.5, (*dp, "off"): 0.6})
    lines = dfx.must_show(passing + failing)
    cluster = next(line for line in lines if line.startswith("| cluster"))
    info = next(line for line in lines if line.startswith("| info"))
    assert "| 0.62 | ≥ 0.5 | yes |" in cluster
    assert "| 0.25 | ≥ 0.5 | **no** |" in info


def test_validation_cells_and_lambda_overrides_are_kept_apart(tmp_path):
    test = {c["key"] for c in dfx.cells("small", [10.0], [0], ["auto"])}
    val3 = dfx.cells("small", [10.0], [0], ["auto"], split="val", lam=3.0)
    val10 = dfx.cells("small", [10.0], [0], ["auto"], split="val", lam=10.0)
    assert all(c["split"] == "val" for c in val3) and not test & {c["key"] for c in val3}
    on3 = [c for c in val3 if c["lam"] == "on"]
    assert on3 and all(c["model_kwargs"] == {"lam": 3.0} and c["key"].endswith("-val-lam3")
                       for c in on3)
    # λ = 0 cells do not depend on the override: shared between the λ grids
    off = lambda cs: {c["key"] for c in cs if c["lam"] == "off"}  # noqa: E731
    assert off(val3) == off(val10) and {c["key"] for c in val3 if c["lam"] == "on"}.isdisjoint(
        c["key"] for c in val10)
    # the summary reads one split and one λ only
    (tmp_path / "cells").mkdir()
    rows = [{**c, "hoyer": 0.5} for c in val3 + val10 if c["pairing"] == "sparse"]
    rows.append({**next(c for c in dfx.cells("small", [10.0], [0], ["auto"])
                         if c["pairing"] == "sparse"), "hoyer": 0.1})
    for i, r in enumerate(rows):
        (tmp_path / "cells" / f"{i}.json").write_text(json.dumps(r))
    got = dfx.load(tmp_path, "val", 3.0)
    assert {r["key"] for r in got} == {c["key"] for c in val3 if c["pairing"] == "sparse"}
    assert len(dfx.load(tmp_path)) == 1


def test_diagnostic_variants_run_only_when_named_with_their_own_lambda_off_cells():
    default = dfx.cells("small", [10.0], [0], list(dfx.VARIANTS))
    assert not any(c["mechanism"] in dfx.DIAGNOSTIC for c in default)
    cells = dfx.cells("small", [10.0], [0], ["auto", "cliponly"])
    clip = {(c["pairing"], c["lam"]) for c in cells if c["mechanism"] == "cliponly"}
    # every pairing, sample-wise SparseVAE too, gets clip-only cells with λ on and λ = 0
    assert clip == {(p, lam) for p in dfx.PAIRINGS for lam in ("on", "off")}
    assert len({c["key"] for c in cells}) == len(cells)


def test_component_use_counts_used_components_and_merged_classes():
    import torch

    # classes 0, 1 share component 4; class 2 sits on 7; component 9 holds 1 of 100 (< 5 %)
    y = torch.tensor([0] * 33 + [1] * 33 + [2] * 34)
    clusters = torch.tensor([4] * 33 + [4] * 33 + [7] * 33 + [9])
    assert dfx.component_use(y, clusters) == {"components": 2.0, "shared": 2.0}
    assert dfx.component_use(y, torch.tensor([1] * 33 + [2] * 33 + [3] * 34)) == {
        "components": 3.0, "shared": 0.0}

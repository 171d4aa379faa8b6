"""experiments/divergence_effect.py: the cells it runs, one real (short) cell, the must-show
verdicts."""

from __future__ import annotations

import math

from experiments import divergence_effect as dfx


def test_cells_cover_every_pairing_lambda_and_mechanism():
    cells = dfx.cells("small", [1.0, 10.0], [0, 1], ["auto", "termwise"])
    keys = {c["key"] for c in cells}
    assert len(keys) == len(cells) == 3 * 2 * (2 + 2 * 3)
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

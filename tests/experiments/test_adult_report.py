"""experiments/adult/report.py: the markdown table and the list of unfinished runs."""

from __future__ import annotations

from experiments.adult.common import aggregate
from experiments.adult.report import missing, table


def test_table_and_missing_runs():
    rows = [{"seed": s, "auroc_lr": 0.8, "acc_lr": 0.7, "auroc_gb": 0.8, "acc_gb": 0.7,
             "tvd1": 0.01, "tvd2": 0.05, "seconds": 90.0, "degenerate": False} for s in (0, 1)]
    res = {
        "meta": {"eps": [1.0, 3.0], "seeds": [0, 1]},
        "eps1": {"mst": aggregate(rows)},
        "real": {"auroc_lr": 0.916, "tvd1": 0.0},
    }
    lines = table(res)
    assert lines[2].startswith("| 1 | MST | 0,1 | 0.800 ± 0.000 |") and "90 ± 0" in lines[2]
    assert lines[-1].startswith("| ∞ | real train") and "0.916" in lines[-1]
    assert missing(res) == ["AIM ε=1 seed 0", "AIM ε=1 seed 1", "MST ε=3 seed 0",
                            "MST ε=3 seed 1", "AIM ε=3 seed 0", "AIM ε=3 seed 1"]

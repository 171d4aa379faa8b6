"""Smoke test of experiments/bench_step.py: runs --quick, checks the JSON (no timing checks)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "bench_step.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_finite_positive_ratios(bench, tmp_path):
    out = tmp_path / "bench.json"
    returned = bench.main(["--quick", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(returned))
    expected = set(bench.config_names())
    assert {"TermwiseDPSGD-ghost", "TermwiseDPSGD-hooks", "TermwiseDPSGD-functorch",
            "NaiveDPSGD-ghost", "NonPrivate", "non-private", "opacus-dpsgd-hooks",
            "opacus-dpsgd-ghost"} <= expected
    for model in ("mlp", "conv"):
        ratios = data[model]
        assert set(ratios) == expected
        assert ratios["non-private"] == 1.0
        for name, ratio in ratios.items():
            assert math.isfinite(ratio) and ratio > 0, (model, name, ratio)
        assert all(v > 0 for v in data["step_ms"][model].values())
        memory = data["peak_memory_mb"][model]
        assert set(memory) == {"TermwiseDPSGD-ghost", "non-private", "baseline"}
        for name, mb in memory.items():
            assert math.isfinite(mb) and mb > 0, (model, name, mb)


def test_models_follow_the_loss_terms_contract(bench):
    for name in ("mlp", "conv"):
        model = bench.build_model(name)
        terms = model.loss_terms(bench.make_data(name, 5))
        assert terms.validate() == 5
        assert set(terms.sample) == {"recon", "kl"} and set(terms.batch) == {"mmd"}
        assert not model.loss_terms(bench.make_data(name, 3), batch_terms=False).batch


def test_mmd_is_zero_mean_for_identical_distributions(bench):
    import torch

    gen = torch.Generator().manual_seed(0)
    values = [
        float(bench.imq_mmd2(torch.randn(128, 4, generator=gen),
                             torch.randn(128, 4, generator=gen), 8.0))
        for _ in range(20)
    ]
    shifted = float(bench.imq_mmd2(torch.randn(128, 4, generator=gen) + 2.0,
                                   torch.randn(128, 4, generator=gen), 8.0))
    assert abs(sum(values) / len(values)) < 5e-3
    assert shifted > 0.05


def test_memory_only_replaces_peak_memory_and_keeps_timings(bench, tmp_path):
    out = tmp_path / "bench.json"
    out.write_text(json.dumps({"mlp": {"non-private": 1.0}, "step_ms": {"mlp": {"x": 2.0}},
                               "peak_memory_mb": {"conv": {"old": 1.0}}}))
    bench.main(["--quick", "--memory-only", "--models", "mlp", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["mlp"] == {"non-private": 1.0} and data["step_ms"] == {"mlp": {"x": 2.0}}
    assert data["peak_memory_mb"]["conv"] == {"old": 1.0}  # models not measured are kept
    assert set(data["peak_memory_mb"]["mlp"]) == {"TermwiseDPSGD-ghost", "non-private",
                                                  "baseline"}
    assert all(mb > 0 for mb in data["peak_memory_mb"]["mlp"].values())
    assert data["settings"]["memory_batch_size"] == 16  # --quick
    # A subset of configurations keeps the others' numbers.
    bench.main(["--quick", "--memory-only", "--models", "mlp", "--memory-configs", "non-private",
                "--json", str(out)])
    again = json.loads(out.read_text())["peak_memory_mb"]["mlp"]
    assert again["TermwiseDPSGD-ghost"] == data["peak_memory_mb"]["mlp"]["TermwiseDPSGD-ghost"]
    with pytest.raises(SystemExit, match="contradict"):
        bench.main(["--quick", "--memory-only", "--no-memory"])

"""experiments/run_grid.py: the grid files (YAML, checked on load; the same cells as the Python
dict they replaced), and a smoke run of a 2-cell micro grid (3 steps): CSV/MD/plots, resume."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BEFORE = ROOT / "tests" / "reference" / "run_grid_before.json"


def _load():
    spec = importlib.util.spec_from_file_location("run_grid", ROOT / "experiments" / "run_grid.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_micro_grid_writes_csv_md_plots_and_resumes(tmp_path, capsys):
    grid = _load()
    args = ["--grid", "micro", "--out", str(tmp_path)]
    grid.main(args)
    rows = list(csv.DictReader(open(tmp_path / "micro.csv")))
    assert [r["mechanism"] for r in rows] == ["nonprivate", "termwise"]
    private = rows[1]
    assert 0 < float(private["epsilon"]) <= 10.0 + 1e-9 and private["steps"] == "3"
    for key in ("neg_elbo", "latent_mmd", "fid", "precision", "coverage"):
        assert private[key] != "", key
    md = (tmp_path / "micro.md").read_text()
    assert "python experiments/run_grid.py --grid micro" in md and "| info | termwise | 10 |" in md
    assert "Grid file `experiments/grids/micro.yaml`: A smoke grid" in md
    assert "![micro: neg_elbo](micro/curves_neg_elbo.png)" in md  # the page shows a few plots
    assert (tmp_path / "micro" / "curves_neg_elbo.png").exists()
    assert (tmp_path / "micro" / "curves_fid.png").exists() and "curves_fid.png)" not in md
    # ... and every cell's values, as the CSV has them
    assert f"| info-termwise-eps10-s0 | info | termwise | 10.0 | 0 | {private['epsilon']} |" in md
    assert len(list((tmp_path / "micro" / "samples").glob("*.png"))) == 2

    # resume: a finished cell is not rerun; a deleted one is
    cells = tmp_path / "micro" / "cells"
    before = json.loads((cells / "info-termwise-eps10-s0.json").read_text())
    (cells / "info-nonprivate-epsinf-s0.json").unlink()
    capsys.readouterr()
    grid.main(args)
    out = capsys.readouterr().out
    assert "2 cells, 1 done, 1 to run" in out and "info-termwise-eps10-s0" not in out
    assert json.loads((cells / "info-termwise-eps10-s0.json").read_text()) == before
    assert len(list(csv.DictReader(open(tmp_path / "micro.csv")))) == 2


def test_sample_temperature_and_a_grid_file_given_by_path(tmp_path):
    import torch

    grid = _load()
    dm = types.SimpleNamespace(data_shape=(1, 8, 8), num_classes=3)
    spec = dict(grid.load_grid(grid.grid_path("micro")), latent_dim=2, hidden=[8])
    model = grid.make_model(dict(spec, sample_temperature=0.0), "vanilla_cond", dm).eval()
    assert model.sample_temperature == 0.0  # a model option now, not a patched method
    labels = torch.tensor([0, 0, 1, 1])
    x = model.sample(4, labels, mean=True)  # τ = 0: z = 0, one image per label
    torch.testing.assert_close(x[0], x[1])
    assert not torch.allclose(x[0], x[2])
    with pytest.raises(ValueError, match="standard-normal prior"):
        grid.make_model(dict(spec, sample_temperature=0.5), "cluster", dm)
    with pytest.raises(ValueError, match="standard-normal prior"):
        grid.make_model(dict(spec, extra_temperatures=[0.5]), "cluster", dm)

    path = tmp_path / "tiny.yaml"
    path.write_text((ROOT / "experiments" / "grids" / "micro.yaml").read_text())
    args = [str(path), "--out", str(tmp_path), "--set", 'pairings=["vanilla_cond"]',
            'mechanisms=["termwise"]', "sample_temperature=0.5", "extra_temperatures=[0.0]"]
    grid.main(args)
    rows = list(csv.DictReader(open(tmp_path / "tiny.csv")))  # named after the file
    assert rows[0]["downstream_acc"] != "" and rows[0]["downstream_acc_tau0"] != ""


def test_ema_of_the_iterates_is_applied_after_training(tmp_path):
    import torch

    from lit_dpvae.callbacks import ParamEMA

    grid = _load()
    ema = ParamEMA(0.1)
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        for value in (0.0, 1.0, 2.0):
            model.weight.fill_(value)
            ema.on_train_batch_end(None, model, None, None, 0)
    ema.apply(model)
    # d = min(0.1, (1+t)/(10+t)) = 0.1: 0 -> 0.9 -> 0.9 + 0.9·1.1 = 1.89
    assert torch.allclose(model.weight, torch.full((1, 2), 1.89))
    args = ["--grid", "micro", "--out", str(tmp_path), "--set", 'mechanisms=["termwise"]',
            "ema=0.9"]
    grid.main(args)
    rows = list(csv.DictReader(open(tmp_path / "micro.csv")))
    assert rows[0]["neg_elbo"] != ""


def test_label_prior_key_reaches_the_model():
    grid = _load()
    dm = types.SimpleNamespace(data_shape=(1, 8, 8), num_classes=3)
    spec = dict(grid.load_grid(grid.grid_path("micro")), latent_dim=2, hidden=[8])
    assert not grid.make_model(spec, "vanilla_cond", dm).hparams.get("label_prior", False)
    model = grid.make_model(dict(spec, label_prior=True), "vanilla_cond", dm)
    assert model.hparams["label_prior"] is True
    # The pairing of the round-3 grid is the same model.
    lp = grid.make_model(spec, "vanilla_cond_lp", dm)
    assert lp.hparams["label_prior"] is True and lp.label_means is not None
    assert grid.load_grid(grid.grid_path("fmnist_downstream_lp"))["pairings"] == ["vanilla_cond_lp"]


def test_label_prior_scale_and_channels_keys_reach_the_model():
    grid = _load()
    dm = types.SimpleNamespace(data_shape=(1, 8, 8), num_classes=3)
    spec = dict(grid.load_grid(grid.grid_path("micro")), latent_dim=2, hidden=[8])
    plain = grid.make_model(spec, "vanilla_cond_lp", dm)
    assert plain.label_log_scales is None and plain.hparams["channels"] == (32, 64)
    model = grid.make_model(dict(spec, label_prior_scale=True, arch="conv", channels=[4, 8],
                                 sample_temperature=0.5), "vanilla_cond_lp", dm)
    assert model.label_log_scales is not None
    assert model.hparams["channels"] == (4, 8)
    with pytest.raises(ValueError, match="arch=\"conv\""):
        grid.make_model(dict(spec, channels=[4, 8]), "vanilla_cond_lp", dm)
    # The temperature sampler draws μ_y + s_y ⊙ τε.
    import torch

    with torch.no_grad():
        model.label_log_scales.weight.normal_()
    labels = torch.tensor([1, 2])
    torch.manual_seed(0)
    eps = model.prior.sample(2)
    torch.manual_seed(0)
    got = model.sample(2, labels, mean=True)
    onehot = torch.nn.functional.one_hot(labels, 3).float()
    with torch.no_grad():
        z = model.label_means(onehot) + model.label_log_scales(onehot).exp() * 0.5 * eps
        torch.testing.assert_close(got, model.likelihood.mean(model.decode(z, onehot)))


def test_optimizer_keys_reach_the_optimizer():
    import torch

    from lit_dpvae.optim import DPAdamBC

    grid = _load()
    dm = types.SimpleNamespace(data_shape=(1, 8, 8), num_classes=3)
    spec = dict(grid.load_grid(grid.grid_path("micro")), latent_dim=2, hidden=[8], steps=10,
                lr=0.1)
    sgd = grid.make_model(spec, "vanilla_cond_lp", dm).configure_optimizers()  # the grids' default
    assert type(sgd) is torch.optim.SGD and sgd.param_groups[0]["momentum"] == 0.9
    assert sgd.param_groups[0]["lr"] == 0.1
    opt = grid.make_model(dict(spec, optimizer="adam", adam_eps=0.5), "vanilla_cond_lp",
                          dm).configure_optimizers()
    assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["eps"] == 0.5
    bc = grid.make_model(dict(spec, optimizer="adam_bc", adam_bc_floor=0.2), "vanilla_cond_lp",
                         dm).configure_optimizers()
    assert isinstance(bc, DPAdamBC) and bc.param_groups[0]["floor"] == 0.2
    conf = grid.make_model(dict(spec, lr_schedule="cosine"), "vanilla_cond_lp",
                           dm).configure_optimizers()
    decay = conf["lr_scheduler"]["scheduler"]
    assert conf["lr_scheduler"]["interval"] == "step"
    lrs = []
    for _ in range(10):
        lrs.append(conf["optimizer"].param_groups[0]["lr"])
        conf["optimizer"].step()
        decay.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[5] == pytest.approx(0.05)
    assert conf["optimizer"].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="lr_schedule"):
        grid.make_model(dict(spec, lr_schedule="step"), "vanilla_cond_lp", dm)


def test_data_dir_and_accelerator_keys(tmp_path):
    grid = _load()
    spec = dict(grid.load_grid(grid.grid_path("fmnist_downstream_lp2")),
                data_dir=str(tmp_path / "fm"))
    with pytest.raises(FileNotFoundError, match="fm does not exist"):
        grid.make_data(spec, 0)  # the folder reaches the data module
    assert grid.OPTIONAL["accelerator"] == "cpu" and grid.OPTIONAL["data_dir"] is None


def test_grid_files_expand_to_the_cells_of_the_dict_they_replaced():
    grid = _load()
    before = json.loads(BEFORE.read_text())["grids"]
    assert grid.grid_names() == sorted(before)
    for name, old in before.items():
        spec = grid.load_grid(grid.grid_path(name))
        # the same settings, types included (1 and 1.0 are different settings in a summary page)
        assert json.dumps(spec, sort_keys=True) == json.dumps(old["spec"], sort_keys=True), name
        cells = [[c["pairing"], c["mechanism"], c["eps"], c["seed"], c["key"]]
                 for c in grid.cells_of(spec)]
        want = [[p, m, math.inf if e == "inf" else e, s, k] for p, m, e, s, k in old["cells"]]
        assert cells == want, name
        assert grid.grid_description(grid.grid_path(name)).strip(), f"{name}: no description"


def test_grid_file_checks(tmp_path):
    grid = _load()
    text = (ROOT / "experiments" / "grids" / "micro.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(text + "learning_rate: 0.1\n")
    with pytest.raises(grid.GridError, match="unknown key\\(s\\) 'learning_rate'"):
        grid.load_grid(bad)
    bad.write_text(text.replace("steps: 3\n", ""))
    with pytest.raises(grid.GridError, match="missing key\\(s\\) 'steps'"):
        grid.load_grid(bad)
    bad.write_text(text.replace("pairings: [info]", "pairings: [infovae]"))
    with pytest.raises(grid.GridError, match="unknown pairing"):
        grid.load_grid(bad)
    bad.write_text(text.replace("seeds: [0]", "seeds: 0"))
    with pytest.raises(grid.GridError, match="'seeds' must be a non-empty list"):
        grid.load_grid(bad)
    bad.write_text("- just a list\n")
    with pytest.raises(grid.GridError, match="mapping"):
        grid.load_grid(bad)
    with pytest.raises(grid.GridError, match="no grid 'nope'"):
        grid.grid_path("nope")
    # --set is checked the same way, before anything runs
    with pytest.raises(SystemExit, match="unknown key\\(s\\) 'stpes'"):
        grid.main(["--grid", "micro", "--out", str(tmp_path), "--set", "stpes=5"])
    with pytest.raises(SystemExit):
        grid.main([str(bad), "--grid", "micro"])  # one grid at a time
    assert not (tmp_path / "micro.md").exists()

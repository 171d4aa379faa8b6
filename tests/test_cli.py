"""The command line: every shipped config instantiates, and fit -> sample works end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lit_dpvae.cli import cli_main, main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "experiments" / "configs").rglob("*.yaml"))


def test_configs_exist():
    names = {p.relative_to(ROOT / "experiments" / "configs").as_posix() for p in CONFIGS}
    assert "quickstart.yaml" in names
    for pairing in ("vanilla", "info", "sparse", "cluster"):
        assert f"fashion_mnist/{pairing}_eps1.yaml" in names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_instantiates(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = cli_main(["--config", str(config), "--trainer.logger=false"], run=False)
    strategy = cli.trainer.strategy
    assert type(strategy).__name__ == "DPStrategy"
    assert strategy.target_epsilon is not None
    # the mechanism's settings live on the mechanism object (one place), as the YAML says
    import yaml

    init = yaml.safe_load(config.read_text())["trainer"]["strategy"]["init_args"].get(
        "mechanism", {"class_path": "AutoMechanism"})  # the default: chosen when fit starts
    assert type(strategy.mechanism).__name__ == init["class_path"].rsplit(".", 1)[-1]
    for key, value in (init.get("init_args") or {}).items():
        assert getattr(strategy.mechanism, key) == value, key
    assert cli.model.data_shape == tuple(cli.datamodule.data_shape)


def test_unknown_config_keys_are_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        cli_main(["--config", str(ROOT / "experiments/configs/quickstart.yaml"),
                  "--model.init_args.no_such_option=1"], run=False)


def test_fit_then_sample_writes_a_labelled_synthetic_dataset(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main([
        "fit", "--config", str(ROOT / "experiments/configs/quickstart.yaml"),
        "--trainer.logger=false", "--trainer.max_epochs=1", "--trainer.limit_val_batches=1",
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.dirpath", str(tmp_path / "ckpt"),
        "--trainer.callbacks.save_last=true",
        "--model.init_args.conditional=true",
    ])
    out = capsys.readouterr().out
    assert "lit_dpvae result: epsilon=" in out and "test_loss=" in out
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    assert ckpt.is_file()
    # The releasable artefact keeps the weights and the privacy summary, not the secrets.
    main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "model.pt")])
    import torch

    artefact = torch.load(tmp_path / "model.pt", weights_only=False)
    assert set(artefact) == {"lit_dpvae_export", "lit_dpvae_model_class", "hyper_parameters",
                             "state_dict", "privacy"}
    assert 0 < artefact["privacy"]["epsilon"] <= 3.0 and artefact["privacy"]["steps"] > 0
    main(["sample", "--ckpt", str(tmp_path / "model.pt"), "--num", "25",
          "--out", str(tmp_path / "synth.npz")])
    data = np.load(tmp_path / "synth.npz")
    assert data["x"].shape == (25, 1, 8, 8)
    assert np.isfinite(data["x"]).all() and data["x"].min() >= 0 and data["x"].max() <= 1
    assert sorted(set(data["y"].tolist())) == list(range(10))


def test_help_lists_lightning_and_own_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in ("fit", "validate", "test"):
        assert f"\n    {name} " in out
    for name in ("sample", "export", "audit"):
        assert f"\n  {name} " in out, name
    assert "Canary-based one-step white-box audit" in out


def test_audit_parser_has_a_flag_per_config_field(capsys):
    from dataclasses import fields

    from lit_dpvae.audit import AuditConfig
    from lit_dpvae.cli import audit_parser

    args = audit_parser().parse_args(["--batch-size", "4", "--setup", "all"])
    assert args.batch_size == 4 and args.setup == "all" and args.trials is None
    assert set(vars(args)) == {"config", "out"} | {f.name for f in fields(AuditConfig)}
    with pytest.raises(SystemExit):
        main(["audit", "--help"])
    assert "--noise-multiplier" in capsys.readouterr().out


def test_a_pre_hoyer_sparse_export_loads_with_the_mmd_it_was_trained_with(tmp_path):
    """An export (or checkpoint) written before SparseVAE's Hoyer term has no ``divergence``
    hyper-parameter: the CLI's loader rebuilds the dimension-wise MMD model it was trained
    with, and plain ``load_from_checkpoint`` refuses it with the fix (not the Hoyer objective
    with the MMD's λ)."""
    import torch

    from lit_dpvae.cli import EXPORT_KEY, load_model
    from lit_dpvae.models import SparseVAE
    from lit_dpvae.strategy import MODEL_CLASS_KEY

    for divergence, saved in (("dim_mmd", False), ("hoyer", True)):
        model = SparseVAE(data_shape=(1, 8, 8), latent_dim=3, hidden=(8,), divergence=divergence)
        hparams = dict(model.hparams)
        if not saved:  # as an older version wrote it
            hparams.pop("divergence")
        path = tmp_path / f"{divergence}.pt"
        torch.save({EXPORT_KEY: True, MODEL_CLASS_KEY: "lit_dpvae.models.SparseVAE",
                    "hyper_parameters": hparams, "state_dict": model.state_dict(),
                    "privacy": {}}, path)
        loaded = load_model(path)
        assert loaded.sparsity_term == divergence and loaded.lam == model.lam
        assert loaded.batch_term_compositions() == model.batch_term_compositions()


def _array_fit(tmp_path, values, strategy: bool) -> list[str]:
    np.save(tmp_path / "x.npy", values.astype(np.float32))
    args = ["fit", "--model", "lit_dpvae.models.VanillaVAE", "--model.likelihood", "gaussian",
            "--data", "lit_dpvae.data.ArrayDataModule", "--data.x", str(tmp_path / "x.npy"),
            "--data.value_range", "[-1, 1]", "--data.rescale", "false",
            "--trainer.logger=false", "--trainer.max_steps=2", "--trainer.limit_val_batches=1",
            "--trainer.enable_checkpointing=false", "--trainer.default_root_dir", str(tmp_path)]
    if strategy:
        args += ["--trainer.strategy", "lit_dpvae.strategy.DPStrategy",
                 "--trainer.strategy.target_epsilon", "3"]
    return args


def test_values_outside_the_declared_range_are_one_error_line(tmp_path, monkeypatch, capsys):
    """New-user trial (2026-12-04): a DataError at fit time was a full traceback."""
    monkeypatch.chdir(tmp_path)
    values = np.random.default_rng(0).normal(0, 3, (200, 6))
    with pytest.raises(SystemExit) as exit_info:
        main(_array_fit(tmp_path, values, strategy=True))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "outside the declared value_range" in err and "Traceback" not in err


def test_a_fit_without_a_dp_strategy_says_it_is_not_private(tmp_path, monkeypatch, capsys):
    """New-user trial (2026-12-04): forgetting --trainer.strategy trained without a word."""
    monkeypatch.chdir(tmp_path)
    values = np.random.default_rng(0).uniform(-1, 1, (200, 6))
    main(_array_fit(tmp_path, values, strategy=False))
    assert "NOT differentially private" in capsys.readouterr().out

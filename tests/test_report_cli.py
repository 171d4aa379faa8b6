"""Issue 17: the privacy report (run folder, checkpoint, export, offline W&B run), ``report`` and
``plan``, resume continuity, and the command line's error format."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from lit_dpvae.cli import cli_main, main
from lit_dpvae.privacy.accounting import calibrate_noise
from lit_dpvae.privacy.report import REPORT_FILES, REPORT_KEY
from tests.wandb_log import config_and_summary

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "experiments/configs/quickstart.yaml")
#: Every field the report must hold (issue 17), with the settings of the mechanism auto chose.
FIELDS = {"mechanism", "epsilon", "delta", "target_epsilon", "sigma_eff", "steps",
          "planned_steps", "sample_rate", "num_records", "expected_batch_size", "sensitivity",
          "noise_multipliers", "noise_std", "mechanism_settings", "accountant", "epsilon_curve",
          "optimizer", "world_size", "versions", "covers", "not_covered", "created"}
SETTINGS = {"max_grad_norm", "pair_max_grad_norm", "sample_share", "shares", "backend"}
SECRETS = ("noise_generator", "sampler_seed", "rng", "generator")


def _fit(tmp_path, monkeypatch, *extra, wandb=True):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline" if wandb else "disabled")
    monkeypatch.setenv("WANDB_SILENT", "true")
    import wandb as wandb_lib

    wandb_lib.teardown()  # W&B keeps the mode of an earlier test's (disabled) session
    args = ["fit", "--config", QUICKSTART, "--trainer.max_steps=6",
            "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--test_after_fit=false", *extra]
    if not wandb:
        args.append("--trainer.logger=false")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(args)
    runs = sorted((tmp_path / "runs" / "quickstart").glob("fit-*"))
    return runs


def _assert_full_report(report: dict, steps: int) -> None:
    assert FIELDS <= set(report), FIELDS - set(report)
    assert report["mechanism"] == "pairwise" and report["steps"] == steps
    assert report["target_epsilon"] == 3.0 and report["delta"] == 1e-5
    assert 0 < report["epsilon"] <= 3.0 and report["sigma_eff"] > 0
    assert report["num_records"] == 1294 and report["planned_steps"] == steps
    assert math.isclose(report["expected_batch_size"], report["sample_rate"] * 1294)
    assert set(report["sensitivity"]) == set(report["noise_multipliers"]) == {"sample",
                                                                              "pairwise"}
    assert {"sample", "pairwise", "update/sample", "update/pairwise"} <= set(report["noise_std"])
    assert SETTINGS <= set(report["mechanism_settings"])
    assert report["mechanism_settings"]["pair_max_grad_norm"] == 0.0625  # C/16, the default
    assert report["accountant"]["accountant"] == "rdp"
    assert sum(h[2] for h in report["accountant"]["history"]) == steps
    curve = report["epsilon_curve"]
    assert curve[-1][0] == steps and math.isclose(curve[-1][1], report["epsilon"])
    assert all(a[1] <= b[1] for a, b in zip(curve, curve[1:]))  # ε only grows
    assert report["optimizer"]["class"].endswith("Adam") and report["optimizer"]["lr"] == 1e-3
    assert {"lit_dpvae", "torch", "lightning", "opacus"} <= set(report["versions"])
    assert any("Validation and test" in c for c in report["not_covered"])
    text = json.dumps(report)
    assert not any(f'"{secret}"' in text for secret in SECRETS)


def test_a_fit_writes_the_report_next_to_last_ckpt_and_into_checkpoint_export_and_wandb(
        tmp_path, monkeypatch, capsys):
    runs = _fit(tmp_path, monkeypatch)
    assert len(runs) == 1
    run = runs[0]
    out = capsys.readouterr().out
    assert "privacy report" in out and "epsilon spent" in out
    assert f"run folder: {run.relative_to(tmp_path)}" in out
    for name in ("config.yaml", "checkpoints/last.ckpt", "run.json", *REPORT_FILES):
        assert (run / name).is_file(), name
    report = json.loads((run / "privacy_report.json").read_text())
    _assert_full_report(report, steps=6)
    markdown = (run / "privacy_report.md").read_text()
    assert "| epsilon spent |" in markdown and "## What it does not cover" in markdown
    assert "![epsilon vs steps](epsilon_curve.png)" in markdown
    # the checkpoint embeds the same report
    checkpoint = torch.load(run / "checkpoints/last.ckpt", map_location="cpu",
                            weights_only=False)
    embedded = checkpoint[REPORT_KEY]
    _assert_full_report(embedded, steps=6)
    assert embedded["epsilon"] == report["epsilon"]
    assert embedded["accountant"] == report["accountant"]
    # the export holds it too, without the checkpoint's secrets
    main(["export", "--ckpt", str(run / "checkpoints/last.ckpt"), "--out", "model.pt"])
    artefact = torch.load(tmp_path / "model.pt", map_location="cpu", weights_only=False)
    _assert_full_report(artefact["privacy"], steps=6)
    # the offline W&B run: the DP settings in its config, the whole report in its summary
    wandb_id = json.loads((run / "run.json").read_text())["wandb_id"]
    logs = list((tmp_path / "runs" / "wandb").glob(f"offline-run-*-{wandb_id}/*.wandb"))
    assert len(logs) == 1
    for _ in range(100):  # wandb's service may still be writing the log
        config, summary = config_and_summary(logs[0])
        if "privacy/report" in summary:
            break
        time.sleep(0.1)
    settings = config["privacy"]
    assert settings["mechanism"] == "pairwise" and settings["pair_max_grad_norm"] == 0.0625
    assert settings["target_epsilon"] == 3.0 and settings["num_records"] == 1294
    assert settings["sensitivity"] == report["sensitivity"]
    assert settings["optimizer"]["lr"] == 1e-3
    _assert_full_report(summary["privacy/report"], steps=6)
    assert math.isclose(summary["privacy/final_epsilon"], report["epsilon"])
    # `report` prints it for the checkpoint and for the export
    capsys.readouterr()
    main(["report", "--ckpt", str(run / "checkpoints/last.ckpt"), "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert {k: v for k, v in printed.items() if k != "created"} == \
        {k: v for k, v in embedded.items() if k != "created"}
    main(["report", "--ckpt", "model.pt"])
    table = capsys.readouterr().out
    assert "epsilon spent" in table and f"{report['epsilon']:.4g}" in table


def test_plan_shows_sigma_steps_and_epsilon_per_epoch_before_any_training(
        tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(["plan", "--config", QUICKSTART, "--json"])
    plan = json.loads(capsys.readouterr().out)
    assert not list(tmp_path.iterdir()), "plan wrote files"
    assert plan["mechanism"] == "pairwise" and plan["planned_steps"] == 400
    assert plan["num_records"] == 1294 and plan["steps_per_epoch"] == 20
    expected = calibrate_noise(3.0, 1e-5, plan["sample_rate"], 400)
    assert math.isclose(plan["sigma_eff"], expected, rel_tol=1e-9)
    epochs = plan["epochs"]
    assert [e["epoch"] for e in epochs] == list(range(1, 21))
    assert epochs[-1]["steps"] == 400 and 2.9 < epochs[-1]["epsilon"] <= 3.0
    assert set(plan["parts"]) == {"sample", "pairwise"} and not plan["warnings"]
    assert plan["parts"]["sample"]["parameters"] == 45664


def test_plan_warns_when_a_parts_noise_makes_its_signal_hopeless(tmp_path, monkeypatch, capsys):
    """Term-wise's batch part on all 45,664 parameters: its signal (one clipped vector) is
    below its noise's norm even summed over all 400 steps."""
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = main_plan(["--config", QUICKSTART, "--trainer.strategy.mechanism=termwise"])
    assert plan["parts"]["batch"]["snr_run_max"] < 1
    assert plan["parts"]["sample"]["snr_run_max"] > 1
    out = capsys.readouterr().out
    assert "warning: part 'batch'" in out and "cannot move the model" in out


def main_plan(argv):
    from lit_dpvae.commands import plan_main

    return plan_main(argv)


def test_a_resumed_fit_continues_its_run_folder_and_its_wandb_run(tmp_path, monkeypatch):
    budget = ["--trainer.strategy.init_args.noise_multiplier=1.0",
              "--trainer.strategy.init_args.target_epsilon=50"]
    (run,) = _fit(tmp_path, monkeypatch, "--trainer.max_steps=4", *budget)
    wandb_id = json.loads((run / "run.json").read_text())["wandb_id"]
    again = _fit(tmp_path, monkeypatch, "--trainer.max_steps=8", *budget,
                 "--ckpt_path", str((run / "checkpoints/last.ckpt").relative_to(tmp_path)))
    assert again == [run], "a resume opened a new run folder"
    assert (run / "config.yaml").is_file() and (run / "config-2.yaml").is_file()
    report = json.loads((run / "privacy_report.json").read_text())
    assert report["steps"] == 8 and sum(h[2] for h in report["accountant"]["history"]) == 8
    # last.ckpt is the resumed run's last state (not the first run's, with a last-v1.ckpt
    # beside it), and its report is the folder's
    assert sorted(p.name for p in (run / "checkpoints").glob("last*")) == ["last.ckpt"]
    last = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 8 and last[REPORT_KEY]["steps"] == 8
    assert last[REPORT_KEY]["epsilon"] == report["epsilon"]
    logs = list((tmp_path / "runs" / "wandb").glob("offline-run-*"))
    assert len(logs) == 2 and all(p.name.endswith(f"-{wandb_id}") for p in logs)


def test_each_fit_gets_its_own_folder_and_nothing_is_overwritten(tmp_path, monkeypatch):
    first = _fit(tmp_path, monkeypatch, wandb=False)
    second = _fit(tmp_path, monkeypatch, wandb=False)
    assert len(first) == 1 and len(second) == 2
    for run in second:
        assert (run / "config.yaml").is_file() and (run / "checkpoints/last.ckpt").is_file()


# -- the command line's error format ------------------------------------------------------------
def _error(capsys, argv):
    with pytest.raises(SystemExit) as exit_info, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[0].startswith("error: ") and err[-1].startswith("tip: ")
    assert len(err) == 2 and not any(line.startswith("usage:") for line in err)
    return err[0]


def test_cli_errors_are_one_line_with_did_you_mean(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = _error(capsys, ["fit", "--config", QUICKSTART, "--model.init_args.lamm=3"])
    assert line == "error: model: InfoVAE has no option 'lamm' (did you mean 'lam'?)"
    typo = tmp_path / "typo.yaml"
    typo.write_text(Path(QUICKSTART).read_text().replace("max_steps:", "max_stepz:")
                    .replace("target_delta:", "target_deltaa:"))
    line = _error(capsys, ["fit", "--config", str(typo)])
    assert "did you mean 'trainer.max_steps'" in line or "did you mean 'target_delta'" in line
    line = _error(capsys, ["fit", "--config", QUICKSTART, "--trainer.logger=false",
                           "--trainer.strategy.init_args.target_epsilon=-1"])
    assert line == "error: target_epsilon must be a positive finite number, got -1.0"
    line = _error(capsys, ["predict", "--config", QUICKSTART])
    assert "'predict' is not a lit-dpvae subcommand" in line and "sample" in line
    line = _error(capsys, ["fitt", "--config", QUICKSTART])
    assert line == "error: 'fitt' is not a lit-dpvae subcommand (did you mean 'fit'?)"
    line = _error(capsys, ["fit", "--config", QUICKSTART, "--trainer.logger=false",
                           "--ckpt_path", "last"])
    assert "--ckpt_path last" in line and "name the checkpoint file" in line
    line = _error(capsys, ["sample", "--ckpt", "nope.ckpt", "--out", "x.npz"])
    assert "nope.ckpt does not exist" in line
    assert not list((tmp_path / "runs").glob("*/fit-*")), "a failed fit left its run folder"
    assert not list((tmp_path / "runs").glob("*/fit-*/checkpoints")), "a failed fit trained"


def test_top_level_help_lists_every_subcommand_without_importing_torch():
    code = ("import sys; from lit_dpvae.entry import main; main(['--help']); "
            "print('torch loaded' if 'torch' in sys.modules else 'no torch')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    for name in ("fit", "validate", "test", "plan", "report", "sample", "export", "audit"):
        assert f"\n  {name} " in out, name
    assert "predict" not in out and out.strip().endswith("no torch")


def test_a_refused_configuration_is_an_error_line_and_leaves_no_wandb_run(
        tmp_path, monkeypatch, capsys):
    """Lightning opens the W&B run before the strategy refuses the Trainer: the command line
    prints the refusal as an error (no traceback) and removes the run that took no step."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    with pytest.raises(SystemExit) as exit_info, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli_main(["fit", "--config", QUICKSTART, "--trainer.accumulate_grad_batches=2"],
                 exit_on_refusal=True)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: TermwiseDPStrategy refuses this configuration" in err
    assert "accumulate_grad_batches=2" in err and "Traceback" not in err
    assert not list((tmp_path / "runs" / "wandb").glob("offline-run-*"))

"""Command line (``lit-dpvae``, ``python -m lit_dpvae``; ``lit_dpvae.entry`` lists it):
``fit|validate|test --config cfg.yaml`` (LightningCLI, one run folder per command:
``lit_dpvae.runs``), ``plan --config cfg.yaml`` and ``report --ckpt …``
(``lit_dpvae.commands``), ``sample --ckpt run.ckpt --num 10000 --out synthetic.npz``,
``export --ckpt run.ckpt --out model.pt`` (the releasable artefact) and ``audit --setup all``
(empirical ε lower bounds, docs/audit.md). Errors are one line (``lit_dpvae.cli_errors``).

Configs select a model (``lit_dpvae.models.*``), a data module (``lit_dpvae.data.*``) and the
strategy with all DP knobs under ``trainer.strategy.init_args``. The data shape and the number
of classes are linked from the data module to the model. The default logger is W&B, offline
unless you log in (``WANDB_MODE=online``), and ``fit`` ends with a test run, the privacy report
table and where the run's files are.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import os
import sys
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lit_dpvae.cli_errors import PROG, ConciseArgumentParser, OneLineParser
from lit_dpvae.data import VAEDataModule
from lit_dpvae.entry import SUBCOMMANDS  # ours, next to LightningCLI's
from lit_dpvae.models import BaseVAE


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help with the epilog printed as written (the subcommand table)."""


SUBCOMMANDS_EPILOG = "more subcommands (lit-dpvae SUBCOMMAND --help):\n" + "\n".join(
    f"  {name:<10}{text}" for name, text in SUBCOMMANDS.items())

DEFAULT_LOGGER = {
    "class_path": "lightning.pytorch.loggers.WandbLogger",
    "init_args": {"project": "lit_dpvae", "offline": True, "save_dir": "runs"},
}


class DPVAECLI(LightningCLI):
    """LightningCLI with the data→model links, a run folder per command (``lit_dpvae.runs``:
    config, ``checkpoints/last.ckpt``, privacy report, images) and a privacy report after
    ``fit``."""

    run_dir: Path | None = None
    last_trainer: Any = None  #: the last command's Trainer (``cli_main``'s failure handling)
    created_run_dir: Path | None = None  #: the run folder the last command created
    outside_wandb_run: Any = None  #: a W&B run open before the command (never closed by it)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, validate and test (``predict`` has nothing to predict for a VAE: use
        ``sample`` for synthetic records)."""
        subcommands = dict(LightningCLI.subcommands())
        subcommands.pop("predict", None)
        return subcommands

    def instantiate_classes(self) -> None:
        """A constructor's refusal of a configured value (e.g. ``target_epsilon`` ≤ 0) as one
        ``error:`` line instead of a traceback through jsonargparse's Union types."""
        from lit_dpvae.cli_errors import concise_error, exit_with

        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as error:
            exit_with(concise_error(str(error)), self.subcommand)

    def before_instantiate_classes(self) -> None:
        """Give the command its run folder: ``trainer.default_root_dir``, and the W&B run id
        of the folder (a resumed fit continues its run)."""
        if self.subcommand not in ("fit", "validate", "test"):
            return
        from lit_dpvae.runs import choose_run_folder, read_run_file

        config = self.config[self.subcommand]
        if self.subcommand == "fit" and str(config.get("ckpt_path")) in ("last", "best", "hpc"):
            from lit_dpvae.cli_errors import exit_with

            exit_with(f"--ckpt_path {config.get('ckpt_path')}: every fit has its own run folder, "
                      "so there is no 'last' of this one to resume; name the checkpoint file, "
                      "e.g. --ckpt_path runs/<...>/fit-<time>/checkpoints/last.ckpt", "fit")
        self.run_dir, how = choose_run_folder(config.trainer.get("default_root_dir"),
                                              self.subcommand, config.get("ckpt_path"))
        if how == "new":
            DPVAECLI.created_run_dir = self.run_dir
        config.trainer.default_root_dir = str(self.run_dir)
        wandb_id = read_run_file(self.run_dir).get("wandb_id")
        loggers = config.trainer.get("logger")
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            if str(getattr(logger, "class_path", "")).endswith("WandbLogger") and wandb_id:
                init = logger.init_args
                if init.get("id") is None and init.get("version") is None:
                    init.id = wandb_id

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """The run folder's checkpoints (``last.ckpt`` on by default) and, for a DP fit, the
        privacy report (``PrivacyReporter``) unless the config lists its own."""
        from lit_dpvae.callbacks import PrivacyReporter

        trainer = DPVAECLI.last_trainer = super().instantiate_trainer(**kwargs)
        for logger in trainer.loggers:  # Lightning passes anonymous=None, which W&B 0.31
            getattr(logger, "_wandb_init", {}).pop("anonymous", None)  # warns about
        if self.run_dir is None:
            return trainer
        for callback in trainer.checkpoint_callbacks:
            if not isinstance(callback, ModelCheckpoint):  # e.g. OnExceptionCheckpoint
                continue
            if callback.dirpath is None:
                callback.dirpath = str(self.run_dir / "checkpoints")
            if callback.save_last is None:
                callback.save_last = True
        if self.subcommand == "fit" and hasattr(trainer.strategy, "privacy_report") \
                and not any(isinstance(c, PrivacyReporter) for c in trainer.callbacks):
            trainer.callbacks.append(PrivacyReporter(dirpath=self.run_dir, verbose=False))
        return trainer

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.link_arguments("data.data_shape", "model.init_args.data_shape",
                              apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.init_args.num_classes",
                              apply_on="instantiate")
        parser.link_arguments("data.schema", "model.init_args.schema", apply_on="instantiate")
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="run the test split after fit and print the test loss")

    def before_fit(self) -> None:
        """A fit without a DP strategy is not private: say so before training, loudly (a
        command line that forgot ``--trainer.strategy`` otherwise trained without a word)."""
        if not hasattr(self.trainer.strategy, "privacy_report"):
            rank_zero_only(print)(
                "lit_dpvae: WARNING: no DP strategy (--trainer.strategy "
                "lit_dpvae.strategy.DPStrategy --trainer.strategy.target_epsilon ...): this fit "
                "is NOT differentially private and no ε bounds its release", flush=True)

    def after_fit(self) -> None:
        trainer, strategy = self.trainer, self.trainer.strategy
        report = {}
        if hasattr(strategy, "privacy_report"):  # a DP strategy
            spent = strategy.privacy_report()
            report.update(epsilon=spent.epsilon, delta=spent.delta, steps=spent.steps)
        if self.config_init[self.subcommand].get("test_after_fit", True):
            results = trainer.test(self.model, datamodule=self.datamodule, verbose=False)
            if results:
                report["test_loss"] = results[0].get("test/loss", math.nan)
                # the pairing's latent property (ClusterVAE nmi, SparseVAE hoyer, InfoVAE
                # latent_mmd) on the test split, next to the ε it was trained under
                report.update({f"test_{k}": v for k, v in
                               getattr(self.model, "last_latent_metrics", {}).items()})
        if report:
            parts = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in report.items()]
            rank_zero_only(print)("lit_dpvae result: " + " ".join(parts), flush=True)
        rank_zero_only(self._print_run_files)()

    def _print_run_files(self) -> None:
        """The report table and where the run's files went."""
        from lit_dpvae.callbacks import PrivacyReporter

        reporter = next((c for c in self.trainer.callbacks if isinstance(c, PrivacyReporter)),
                        None)
        if reporter is not None and reporter.report is not None and not reporter.verbose:
            print(reporter.report.table(), flush=True)
        if self.run_dir is None:
            return
        checkpoint = self.trainer.checkpoint_callback
        last = Path(getattr(checkpoint, "dirpath", None) or self.run_dir / "checkpoints")
        def shown(path: Path) -> str:  # relative to the working folder when inside it
            try:
                return str(path.relative_to(Path.cwd().resolve()))
            except ValueError:
                return str(path)

        lines = [f"run folder: {shown(self.run_dir)}"]
        for label, path in (("config", self.run_dir / "config.yaml"),
                            ("checkpoint", last / "last.ckpt"),
                            ("privacy report", self.run_dir / "privacy_report.md"),
                            ("images", self.run_dir / "images")):
            if path.exists():
                lines.append(f"  {label:<15}{shown(path)}")
        print("\n".join(lines), flush=True)


class ScrubbedSaveConfig(SaveConfigCallback):
    """LightningCLI's resolved config, written into the run folder (``config.yaml``; a resume
    adds ``config-2.yaml``, …) without record values: a data module's declared record-carrying
    arguments (``data_arguments``, :mod:`lit_dpvae.hparams`) that are not paths (e.g. labels
    listed in the YAML) are replaced by a marker."""

    def __init__(self, parser: Any, config: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["save_to_log_dir"] = False  # the run folder instead of the logger's shared one
        super().__init__(parser, scrub_config(config), *args, **kwargs)

    def save_config(self, trainer: Any, pl_module: Any, stage: str) -> None:
        from lit_dpvae.runs import config_file

        if trainer.is_global_zero:
            run = Path(trainer.default_root_dir)
            run.mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, config_file(run), skip_none=False, overwrite=False,
                             multifile=self.multifile)


def scrub_config(config: Any) -> Any:
    """A copy of a parsed config with the data module's declared data arguments that hold
    records (anything but a path or None) replaced by ``"<left out - record values>"``."""
    import copy

    from lit_dpvae.hparams import declared_data, declared_data_arguments

    class_path = config.get("data.class_path") if "data.class_path" in config else None
    if not class_path:
        return config
    module_name, _, class_name = str(class_path).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        return config
    config = copy.deepcopy(config)
    for name in declared_data_arguments(cls):
        key = f"data.init_args.{name}"
        if key in config and declared_data(config[key]) is not None:
            config[key] = "<left out - record values>"
    return config


def cli_main(args: list[str] | None = None, run: bool = True,
             exit_on_refusal: bool = False) -> DPVAECLI:
    """Run LightningCLI in a run folder; ``exit_on_refusal``: a refused configuration
    (``PrivacyConfigError``) is an ``error:`` line and exit status 2 (the command line), not an
    exception (Python callers)."""
    from lit_dpvae.data.checks import DataError
    from lit_dpvae.privacy.budget import PrivacyConfigError
    from lit_dpvae.runs import RUN_DIR_ENV, RUN_OWNER_ENV

    DPVAECLI.last_trainer = DPVAECLI.created_run_dir = None
    wandb = sys.modules.get("wandb")
    DPVAECLI.outside_wandb_run = getattr(wandb, "run", None) if wandb is not None else None
    try:
        cli = build_cli(args, run)
    except (PrivacyConfigError, DataError) as error:  # a refusal: the message is the fix
        finish_wandb(exit_code=1, trainer=DPVAECLI.last_trainer)
        drop_empty_run_folder()
        if not exit_on_refusal:
            raise
        from lit_dpvae.cli_errors import exit_with

        exit_with(str(error), tip="docs/refusals.md lists every refused setting and why"
                  if isinstance(error, PrivacyConfigError) else
                  "fix the data or the data module's settings (README: Your own data)")
    except BaseException:
        finish_wandb(exit_code=1, trainer=DPVAECLI.last_trainer)
        drop_empty_run_folder()
        raise
    else:
        finish_wandb(exit_code=0)  # flushed: config, summary, report (offline files complete)
        return cli
    finally:  # the next command in this process gets its own folder
        if os.environ.get(RUN_OWNER_ENV) == str(os.getpid()):
            os.environ.pop(RUN_DIR_ENV, None)
            os.environ.pop(RUN_OWNER_ENV, None)


def drop_empty_run_folder() -> None:
    """A failed command's run folder that this command created and that holds nothing but
    run.json and the config that failed is removed (a folder with anything else is kept)."""
    run = DPVAECLI.created_run_dir
    if run is None or not run.is_dir():
        return
    names = {p.name for p in run.iterdir()}
    if names <= {"run.json"} | {n for n in names if n.startswith("config") and
                                n.endswith(".yaml")}:  # nothing was trained or written
        import shutil

        shutil.rmtree(run, ignore_errors=True)


def finish_wandb(exit_code: int, trainer: Any = None) -> None:
    """Close the W&B run a command opened, if any (without importing wandb otherwise). A
    failed command that took no step leaves no offline run behind (Lightning opens the run
    before the strategy can refuse the configuration)."""
    wandb = sys.modules.get("wandb")
    run = getattr(wandb, "run", None) if wandb is not None else None
    if run is None or run is DPVAECLI.outside_wandb_run:  # a run the caller opened is theirs
        return
    folder = Path(run.dir).parent if run.offline else None
    wandb.finish(exit_code=exit_code)
    if exit_code and folder is not None and not getattr(trainer, "global_step", 0):
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


class _DropTips(logging.Filter):
    """Lightning's advertisement lines ("💡 Tip: … litlogger / litmodels")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("💡 Tip")


#: Warnings that every command printed and that say nothing about the user's run.
QUIET_WARNINGS = (
    "LightningCLI's args parameter is intended",  # main() passes argv on purpose
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning vs torch 2.13
)


def quiet_defaults() -> None:
    """Silence the default path's spurious messages (nothing about privacy is hidden: the
    library's own warnings and every warning about the user's config still show)."""
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in log.filters):
            log.addFilter(_DropTips())


def build_cli(args: list[str] | None, run: bool) -> DPVAECLI:
    """The LightningCLI of this package (``cli_main`` without the run-folder bookkeeping)."""
    quiet_defaults()
    words = sys.argv[1:] if args is None else args
    ConciseArgumentParser.subcommand_hint = next(
        (w for w in words if w in ("fit", "validate", "test")), None)
    return DPVAECLI(
        BaseVAE,
        VAEDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults={"logger": DEFAULT_LOGGER, "use_distributed_sampler": False},
        save_config_callback=ScrubbedSaveConfig,
        save_config_kwargs={"overwrite": True},
        parser_class=ConciseArgumentParser,
        parser_kwargs={"epilog": SUBCOMMANDS_EPILOG, "formatter_class": _HelpFormatter,
                       "prog": PROG},
        args=args,
        run=run,
    )


EXPORT_KEY = "lit_dpvae_export"


def load_model(ckpt: str | Path) -> BaseVAE:
    """The model of a checkpoint written by ``TermwiseDPStrategy`` or of a file written by
    ``export`` (both record the model class)."""
    from lit_dpvae.strategy import CHECKPOINT_KEY, MODEL_CLASS_KEY

    path = Path(ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    class_path = checkpoint.get(MODEL_CLASS_KEY)
    if class_path is None:
        raise ValueError(
            f"{path} does not record its model class (it was not written by "
            "TermwiseDPStrategy); load it with YourModel.load_from_checkpoint instead"
        )
    module_name, _, class_name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    saved = checkpoint.get("hyper_parameters") or {}
    legacy = getattr(cls, "legacy_hparams", dict)(saved)  # keys an older version did not save
    if checkpoint.get(EXPORT_KEY):
        model = cls(**legacy)
        model.load_state_dict(checkpoint["state_dict"])
        privacy = checkpoint.get("privacy") or {}
        if "accountant" in privacy:  # fine-tuning these weights continues their spend
            from lit_dpvae.privacy.accounting import provenance_from_checkpoint
            from lit_dpvae.privacy.provenance import mark_loaded

            mark_loaded(model, provenance_from_checkpoint(
                {CHECKPOINT_KEY: {"mechanism": privacy.get("mechanism"),
                                  "accountant": privacy["accountant"]}}))
    else:
        model = cls.load_from_checkpoint(path, map_location="cpu",
                                         **{k: v for k, v in legacy.items() if k not in saved})
    model.eval()
    return model


def export_main(argv: list[str]) -> Path:
    """``export``: the releasable artefact of a training checkpoint — weights, hyper-parameters,
    model class and the privacy report (``PrivacyReport``: mechanism, clipping norms, σ per
    part, q, N, steps, accountant history, ε curve, versions). Everything secret is
    left out: the noise generator and sampler seeds, RNG states, optimizer state and loops."""
    from lit_dpvae.privacy.report import PrivacyReport
    from lit_dpvae.strategy import CHECKPOINT_KEY, MODEL_CLASS_KEY

    parser = OneLineParser(prog="lit-dpvae export",
                                     description=SUBCOMMANDS["export"])
    parser.add_argument("--ckpt", required=True, help="checkpoint written by fit")
    parser.add_argument("--out", required=True, help="output file (load with load_model/sample)")
    args = parser.parse_args(argv)
    if not Path(args.ckpt).is_file():
        parser.error(f"--ckpt {args.ckpt} does not exist")
    checkpoint = torch.load(args.ckpt, map_location="cpu", weights_only=False)
    privacy = checkpoint.get(CHECKPOINT_KEY)
    if privacy is None or MODEL_CLASS_KEY not in checkpoint:
        raise ValueError(f"{args.ckpt} was not written by TermwiseDPStrategy: nothing to export")
    summary = PrivacyReport.from_checkpoint(checkpoint).public()  # no seeds, no RNG states
    artefact = {
        EXPORT_KEY: True,
        MODEL_CLASS_KEY: checkpoint[MODEL_CLASS_KEY],
        # LightningCLI adds bookkeeping keys such as ``_class_path``: constructor arguments only
        "hyper_parameters": {k: v for k, v in checkpoint.get("hyper_parameters", {}).items()
                             if not k.startswith("_")},
        "state_dict": checkpoint["state_dict"],
        "privacy": summary,  # the whole public report (PrivacyReport.to_dict)
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(artefact, out)
    print(f"wrote {out}: {PrivacyReport.from_dict(summary).line()}", flush=True)
    return out


def sample_main(argv: list[str]) -> Path:
    """``sample``: write ``num`` synthetic records drawn from the model's likelihood (``--mean``:
    the decoder means) as npz (``x``, and ``y`` for conditional models), a CSV/parquet table
    with the schema's column names and categories (tabular models), or a folder of PNG images
    (``--out`` a folder; one sub-folder per label for conditional models)."""
    parser = OneLineParser(prog="lit-dpvae sample",
                                     description=SUBCOMMANDS["sample"])
    parser.add_argument("--ckpt", required=True, help="checkpoint written by fit, or export")
    parser.add_argument("--num", type=int, default=10000, help="number of records")
    parser.add_argument("--out", required=True,
                        help="output: .npz (keys x, and y if labelled), .csv/.parquet (tabular "
                             "models), or a folder for PNG images (ends with / or has no suffix)")
    parser.add_argument("--mean", action="store_true",
                        help="write the decoder means instead of draws of the likelihood")
    parser.add_argument("--label-weights", default=None,
                        help="conditional models: comma-separated public class weights for "
                             "the labels (default: balanced classes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=1000)
    args = parser.parse_args(argv)
    if args.num < 1:
        parser.error("--num must be >= 1")
    out = Path(args.out)
    try:
        kind = sample_format(out)
    except ValueError as error:
        parser.error(str(error))
    if kind == "png" and out.is_dir() and any(out.iterdir()):
        parser.error(f"--out {out} is a folder that is not empty: choose a new folder (images "
                     "from two draws would mix)")
    torch.manual_seed(args.seed)
    try:
        model = load_model(args.ckpt)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    schema = model.hparams.get("schema")
    if kind == "table" and schema is None:
        parser.error(f"{out.suffix} output needs a tabular model (trained with a schema); write "
                     ".npz or a PNG folder")
    if kind == "png" and len(model.data_shape) != 3:
        parser.error(f"a PNG folder needs image records [C, H, W], this model's are "
                     f"{list(model.data_shape)}: write .npz" + (" or .csv" if schema else ""))
    labels_all = sample_labels(model, args.num, args.label_weights, parser)
    xs = []
    with torch.no_grad():
        for start in range(0, args.num, args.batch):
            n = min(args.batch, args.num - start)
            labels = None if labels_all is None else labels_all[start : start + n]
            xs.append(model.sample(n, labels=labels, mean=args.mean).cpu().numpy())
    x = np.concatenate(xs)
    y = None if labels_all is None else labels_all.numpy()
    if kind == "table":
        from lit_dpvae.data.schema import write_table

        write_table(schema.decode(x, y if schema.label is not None else None), out)
    elif kind == "png":
        write_png_folder(out, x, y)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(out, **({"x": x} if y is None else {"x": x, "y": y}))
    print(f"wrote {x.shape[0]} {'mean' if args.mean else 'sampled'} records to {out}", flush=True)
    return out


def sample_format(out: Path) -> str:
    """``npz``, ``table`` (.csv/.parquet) or ``png`` (a folder) from an output path."""
    if out.suffix == ".npz":
        return "npz"
    if out.suffix in (".csv", ".parquet", ".pq"):
        return "table"
    if out.suffix == "" or str(out).endswith("/") or out.is_dir():
        return "png"
    raise ValueError(f"--out {out}: write .npz, .csv, .parquet or a folder (PNG images)")


def sample_labels(model: BaseVAE, num: int, weights: str | None,
                  parser: argparse.ArgumentParser) -> torch.Tensor | None:
    """Labels of a conditional model's records: balanced (each class ⌊num/K⌋ or one more), or
    in the proportions of public ``weights`` (rounded to counts, largest remainders)."""
    if not model.conditional:
        if weights is not None:
            parser.error("--label-weights is for conditional models")
        return None
    k = model.num_classes
    if weights is None:
        return torch.arange(num) % k
    try:
        w = np.array([float(v) for v in weights.split(",")])
    except ValueError:
        parser.error(f"--label-weights must be {k} comma-separated numbers")
    if w.shape != (k,) or not np.all(w >= 0) or not w.sum() > 0:
        parser.error(f"--label-weights needs {k} non-negative weights with a positive sum")
    exact = w / w.sum() * num
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(counts - exact)[: num - counts.sum()]] += 1
    return torch.from_numpy(np.repeat(np.arange(k), counts))


def write_png_folder(out: Path, x: np.ndarray, y: np.ndarray | None) -> None:
    """PNG images ``out/<label>/<index>.png`` (``out/<index>.png`` without labels); labels are
    zero-padded so that their sorted order is their numeric order (ImageFolderDataModule)."""
    from PIL import Image

    pixels = np.round(np.clip(x, 0.0, 1.0) * 255).astype(np.uint8)
    width = len(str(int(y.max()))) if y is not None and len(y) else 1
    digits = len(str(len(x) - 1))
    for i, img in enumerate(pixels):
        folder = out if y is None else out / f"{int(y[i]):0{width}d}"
        folder.mkdir(parents=True, exist_ok=True)
        arr = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
        Image.fromarray(arr).save(folder / f"{i:0{digits}d}.png")


def audit_parser() -> argparse.ArgumentParser:
    """The ``audit`` subcommand's flags: ``--config``, ``--out`` and one per ``AuditConfig`` field
    (``--batch-size`` for ``batch_size``; YAML keys keep the field names)."""
    from lit_dpvae.audit import SETUPS, AuditConfig

    parser = OneLineParser(prog="lit-dpvae audit",
                                     description=SUBCOMMANDS["audit"])
    parser.add_argument("--config", help="YAML file with AuditConfig keys (flags override it)")
    parser.add_argument("--out", help="write the results as JSON")
    defaults = AuditConfig()
    for f in fields(AuditConfig):
        kind = type(getattr(defaults, f.name))
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=None,
                            help=f"default {getattr(defaults, f.name)}"
                            + (f"; one of {SETUPS} or 'all'" if f.name == "setup" else ""))
    return parser


def audit_main(argv: list[str]) -> list[dict[str, Any]]:
    """``audit``: run one or all setups and print ε_lb next to the accountant's ε."""
    from lit_dpvae.audit import AuditConfig, run_audits

    parser = audit_parser()
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    if args.config:
        import yaml

        values.update(yaml.safe_load(Path(args.config).read_text()) or {})
        unknown = set(values) - {f.name for f in fields(AuditConfig)}
        if unknown:
            parser.error(f"unknown keys in {args.config}: {sorted(unknown)}")
    values.update({k: v for k, v in vars(args).items()
                   if k not in ("config", "out") and v is not None})
    torch.set_num_threads(1)
    return run_audits(values, out=args.out)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    from lit_dpvae.entry import TRAINING, unknown_subcommand

    if argv and not argv[0].startswith("-") and argv[0] not in {**TRAINING, **SUBCOMMANDS}:
        unknown_subcommand(argv[0])
    if argv and argv[0] == "sample":
        sample_main(argv[1:])
        return
    if argv and argv[0] == "export":
        export_main(argv[1:])
        return
    if argv and argv[0] == "audit":
        audit_main(argv[1:])
        return
    if argv and argv[0] in ("report", "plan"):
        from lit_dpvae import commands

        (commands.report_main if argv[0] == "report" else commands.plan_main)(argv[1:])
        return
    cli_main(argv, exit_on_refusal=True)

"""The privacy report of a fit: its settings in the logger's run config when training starts;
at the end the report files next to the checkpoints, the logger's summary and the ε plot."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lit_dpvae.callbacks.privacy import dp_strategy
from lit_dpvae.privacy.report import PrivacyReport


def report_folder(trainer: pl.Trainer) -> Path:
    """Where a fit's report goes: the folder holding its checkpoint folder (the CLI's run
    folder, Lightning's ``version_k``), else the logger's or the Trainer's root folder."""
    callback = trainer.checkpoint_callback
    dirpath = getattr(callback, "dirpath", None)
    if dirpath:
        return Path(dirpath).parent
    return Path(trainer.log_dir or trainer.default_root_dir)


class PrivacyReporter(Callback):
    """Writes and logs the run's :class:`~lit_dpvae.privacy.report.PrivacyReport`.

    - training start: the DP settings (mechanism, every clipping norm and budget share, σ per
      part, q, N, expected batch size, planned steps, target ε and δ, accountant, the optimizer
      that runs) go to every logger's hyper-parameters under ``privacy`` (the W&B run config);
    - training end (rank 0): ``privacy_report.json``, ``privacy_report.md`` and
      ``epsilon_curve.png`` in ``dirpath`` (default: next to the checkpoint folder), the
      spend in the W&B summary and the ε plot as a W&B image, and the short table printed.

    ``lit-dpvae fit`` adds one unless the config lists it. The same report is embedded in every
    checkpoint (``REPORT_KEY``) and in ``export`` files; ``lit-dpvae report --ckpt`` prints it.

    Args:
        dirpath: folder of the report files (default: see ``report_folder``).
        verbose: print the table at the end of training.
    """

    def __init__(self, dirpath: str | Path | None = None, verbose: bool = True) -> None:
        self.dirpath = dirpath
        self.verbose = verbose
        self.report: PrivacyReport | None = None
        self.paths: dict[str, Path] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        dp_strategy(trainer, "PrivacyReporter")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        settings = dp_strategy(trainer, "PrivacyReporter").privacy_report(curve=False).settings()
        for logger in trainer.loggers:
            logger.log_hyperparams({"privacy": settings})

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.report = report = dp_strategy(trainer, "PrivacyReporter").privacy_report()
        if not trainer.is_global_zero:
            return
        folder = Path(self.dirpath) if self.dirpath else report_folder(trainer)
        self.paths = report.write(folder)
        self._log_summary(trainer, report)
        if self.verbose:
            print(report.table(), flush=True)
            print(f"privacy report: {self.paths['md']} (and .json"
                  + (", epsilon_curve.png)" if "png" in self.paths else ")"), flush=True)

    def _log_summary(self, trainer: pl.Trainer, report: PrivacyReport) -> None:
        from lightning.pytorch.loggers import WandbLogger

        spent = {f"privacy/final_{k.split('/')[1]}": v if math.isfinite(v) else str(v)
                 for k, v in report.metrics().items()}
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                run = logger.experiment
                run.summary.update({**spent, "privacy/report": report.to_dict()})
                if "png" in self.paths:
                    logger.log_image(key="privacy/epsilon_curve",
                                     images=[str(self.paths["png"])])

"""Privacy-spend logging and an optional, stricter budget stop."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback


def dp_strategy(trainer: pl.Trainer, who: str = "PrivacySpend") -> Any:
    """The trainer's ``DPStrategy`` (a TypeError naming callback ``who`` otherwise)."""
    from lit_dpvae.strategy import TermwiseDPStrategy

    strategy = trainer.strategy
    if not isinstance(strategy, TermwiseDPStrategy):
        raise TypeError(
            f"{who} needs Trainer(strategy=DPStrategy(...)): with another strategy there is no "
            "privacy accountant to report"
        )
    return strategy


class PrivacySpend(Callback):
    """Logs ``privacy/epsilon``, ``privacy/delta``, ``privacy/sigma_eff`` and ``privacy/steps``.

    ε is computed by the strategy's accountant (its state travels in every checkpoint, so a
    resumed run continues ε). It is logged every ``log_every_n_steps`` steps (default: the
    Trainer's) and on the last step of each epoch; ε is shown in the progress bar.

    Args:
        max_epsilon: optional stricter budget: stop training once ε reaches it. The strategy's
            ``target_epsilon`` is always enforced before a step would exceed it.
        log_every_n_steps: logging period (PRV accounting costs ~0.1 s per evaluation).
    """

    def __init__(self, max_epsilon: float | None = None, log_every_n_steps: int | None = None):
        if max_epsilon is not None and not max_epsilon > 0:
            raise ValueError(f"max_epsilon must be > 0, got {max_epsilon}")
        self.max_epsilon = max_epsilon
        self.log_every_n_steps = log_every_n_steps
        self.last: dict[str, float] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        dp_strategy(trainer)

    def metrics(self, trainer: pl.Trainer) -> dict[str, float]:
        return dp_strategy(trainer).privacy_report(curve=False).metrics()

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.last = self.metrics(trainer)
        for key, value in self.last.items():
            shown = value if math.isfinite(value) else float("inf")
            pl_module.log(key, shown, prog_bar=key == "privacy/epsilon", on_step=True,
                          on_epoch=False, rank_zero_only=True)
        if self.max_epsilon is not None and self.last["privacy/epsilon"] >= self.max_epsilon:
            trainer.should_stop = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        # Trainer sets log_every_n_steps dynamically (not in its stubs)
        every = self.log_every_n_steps or trainer.log_every_n_steps or 1  # type: ignore[attr-defined]
        last = batch_idx + 1 >= trainer.num_training_batches
        if trainer.global_step % every == 0 or last or self.max_epsilon is not None:
            self._log(trainer, pl_module)

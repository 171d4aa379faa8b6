"""Trainer settings that would silently break the privacy guarantee, refused together before
the first step (docs/refusals.md)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.plugins.precision import DoublePrecision, Precision

from lit_dpvae.privacy.budget import PrivacyConfigError


def refuse_unsafe_trainer(trainer: pl.Trainer, precision_plugin: Any) -> None:
    """Raise one PrivacyConfigError listing every unsafe setting of ``trainer``."""
    problems = []
    if trainer.accumulate_grad_batches != 1:
        problems.append(
            f"accumulate_grad_batches={trainer.accumulate_grad_batches}: accumulating Poisson "
            "batches changes the sampling the accountant assumes. Use a larger batch_size "
            "(sample rate) instead.")
    if trainer.gradient_clip_val:
        problems.append(
            "gradient_clip_val is set: clipping the noisy update is not per-record clipping "
            "and hides misconfigured C. Set max_grad_norm / batch_max_grad_norm instead.")
    if type(precision_plugin) not in (Precision, DoublePrecision):
        problems.append(
            f"precision plugin {type(precision_plugin).__name__} ({trainer.precision}): mixed "
            "or half precision scales/rounds p.grad after clipping (16-mixed's GradScaler "
            "unscales p.grad only; bf16 rounding moves clipped norms past C). Use "
            "precision='32-true'.")
    module = trainer.lightning_module
    if module is not None and not module.automatic_optimization:
        problems.append(
            "manual optimization: the strategy computes the private gradient itself; keep "
            "automatic_optimization=True and let configure_optimizers return one optimizer.")
    if problems:
        raise PrivacyConfigError(
            "TermwiseDPStrategy refuses this configuration:\n  - " + "\n  - ".join(problems))

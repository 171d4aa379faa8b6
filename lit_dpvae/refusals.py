"""Trainer settings that would silently break the privacy guarantee, refused together before
the first step (docs/refusals.md), and the step count a fit plans its budget for."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.plugins.precision import DoublePrecision, Precision
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

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
    if module is not None and trainer.state.fn == "fit":
        message = ignored_training_step(module)
        if message:
            rank_zero_warn(message)


def refuse_private_monitors(trainer: pl.Trainer) -> None:
    """Refuse a callback or learning-rate scheduler that acts on a ``train/*`` metric (or writes
    one into checkpoint file names), and Lightning's ``LearningRateFinder`` (it picks the rate
    from the training losses of the private batches).

    ``train/*`` are exact, un-noised statistics of private batches (``log_train_terms``): an
    ``EarlyStopping``/``ModelCheckpoint`` or ``ReduceLROnPlateau`` monitoring one makes the
    training (when to stop, which weights are kept, the learning rate) a function of private
    records that no noise covers, and the released weights are no longer DP. Monitoring
    ``val/*`` is allowed (held-out records, outside the guarantee: docs/privacy.md §7).
    """
    from lightning.pytorch.callbacks import LearningRateFinder

    found = [f"{type(c).__name__}(monitor={c.monitor!r})" for c in trainer.callbacks
             if str(getattr(c, "monitor", None) or "").startswith("train/")]
    found += [f"{type(c).__name__}(filename={c.filename!r})" for c in trainer.callbacks
              if "{train/" in str(getattr(c, "filename", None) or "")]  # exact values in names
    found += [type(c).__name__ for c in trainer.callbacks if isinstance(c, LearningRateFinder)]
    found += [f"{type(c.scheduler).__name__}(monitor={c.monitor!r})"
              for c in getattr(trainer, "lr_scheduler_configs", None) or []
              if str(c.monitor or "").startswith("train/")]
    if found:
        raise PrivacyConfigError(
            f"{', '.join(found)} acts on an exact statistic of private batches: when training "
            "stops, which checkpoint is kept or the learning rate would depend on private "
            "records without noise, and the weights would not be DP. Monitor a validation "
            "metric (val/*), or use a fixed schedule (BaseVAE(lr_schedule='cosine')).")


def ignored_training_step(module: Any) -> str | None:
    """The warning for a ``training_step`` the strategy never runs (None: nothing to say).

    DPStrategy computes each step from ``loss_terms(batch)``; a model's own ``training_step``
    (penalties added to the loss, metrics it logs) is silently skipped. BaseVAE's own step and
    a class that declares ``training_step_runs_without_dp_only = True`` (its step is only the
    non-private equivalent of ``loss_terms``) are not warned about.
    """
    from lit_dpvae.models.base import BaseVAE

    cls = type(module)
    if getattr(cls, "training_step_runs_without_dp_only", False):
        return None
    if isinstance(module, BaseVAE) and cls.training_step is BaseVAE.training_step:
        return None
    return (
        f"DPStrategy does not run {cls.__name__}.training_step: every private step is computed "
        "from loss_terms(batch) by the mechanism, so whatever training_step adds to the loss or "
        "logs is ignored under DP. Put extra penalties into loss_terms (per-record terms in "
        "LossTerms.sample, batch terms in LossTerms.batch). If training_step only returns the "
        "non-private equivalent of loss_terms, set training_step_runs_without_dp_only = True on "
        "the class.")


def planned_steps(trainer: pl.Trainer, steps_per_epoch: int) -> int:
    """The steps a fit will take (``max_steps``, else ``max_epochs`` × limited epoch length)."""
    if trainer.max_steps and trainer.max_steps > 0:
        return int(trainer.max_steps)
    if trainer.max_epochs is None or trainer.max_epochs < 0:
        raise PrivacyConfigError(
            "cannot plan the privacy budget of an unbounded run: set max_steps or max_epochs")
    limit = trainer.limit_train_batches
    if isinstance(limit, int):
        steps_per_epoch = min(steps_per_epoch, limit)
    elif limit is not None and limit < 1.0:
        steps_per_epoch = max(1, int(steps_per_epoch * limit))
    return int(trainer.max_epochs) * steps_per_epoch

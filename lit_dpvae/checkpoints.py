"""What the strategy adds to a Lightning checkpoint, and how weights loaded from one carry its
privacy spend.

- ``CHECKPOINT_KEY``: the privacy state (accountant, σ, target, secret seeds for a resume);
- ``MODEL_CLASS_KEY``: the model class, so ``export``/``load_model`` rebuild it;
- hyper-parameters are scrubbed of record values (``lit_dpvae.hparams``);
- ``load_from_checkpoint`` of any LightningModule marks the loaded weights with the
  checkpoint's spend, so a later fit continues it (``warm_start``, docs/privacy.md §4).
"""

from __future__ import annotations

import pathlib
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lit_dpvae.hparams import scrub_mapping
from lit_dpvae.privacy.accounting import CHECKPOINT_KEY, provenance_from_checkpoint
from lit_dpvae.privacy.budget import PrivacyConfigError
from lit_dpvae.privacy.provenance import mark_loaded, weights_provenance
from lit_dpvae.privacy.report import REPORT_KEY, PrivacyReport, json_safe
from lit_dpvae.privacy.rng import rng_state

MODEL_CLASS_KEY = "lit_dpvae_model_class"

# A data module's file path (``ArrayDataModule("x.npz")``) is a hyper-parameter: checkpoints that
# hold one load with ``weights_only=True`` (a path object runs no code).
torch.serialization.add_safe_globals([pathlib.Path, pathlib.PosixPath, pathlib.PurePosixPath,
                                      pathlib.WindowsPath, pathlib.PureWindowsPath])

__all__ = ["CHECKPOINT_KEY", "MODEL_CLASS_KEY", "REPORT_KEY", "add_privacy", "changed_settings",
           "describe_optimizer", "mark_loaded_checkpoint", "restored_privacy", "spend_of_weights",
           "warn_changed_settings"]


def restored_privacy(checkpoint: dict[str, Any], path: Any, mechanism: str,
                     private: bool, settings: dict[str, Any] | None = None
                     ) -> dict[str, Any] | None:
    """The privacy state a resume from ``checkpoint`` continues (None: nothing was spent, a
    fresh run). Refuses a checkpoint of another mechanism, and a trained checkpoint without a
    privacy state for a private run (its spend is unknown); warns when the resume changes the
    mechanism's public ``settings`` (``warn_changed_settings``)."""
    state = checkpoint.get(CHECKPOINT_KEY)
    if state is None:
        if private and checkpoint.get("global_step", 0) > 0:
            raise PrivacyConfigError(
                f"{path} has no privacy state: it was not written by TermwiseDPStrategy, so "
                "the privacy already spent on it is unknown. Start from scratch, or from a "
                "checkpoint written by this strategy.")
        return None
    if state["mechanism"] != mechanism:
        raise PrivacyConfigError(
            f"checkpoint was trained with mechanism={state['mechanism']!r}, this run uses "
            f"{mechanism!r}: resume with the same mechanism")
    spent = state["noise_generator"] is not None or state["accountant"].get("history") \
        or state["accountant"].get("non_private_steps")
    if spent and settings is not None:
        warn_changed_settings(checkpoint, path, mechanism, settings)
    return state if spent else None


def changed_settings(checkpoint: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """``{setting: (checkpoint's value, this run's value)}`` for the public mechanism settings
    (``Mechanism.settings()``, JSON-safe) a resume changes, from the checkpoint's report (a
    checkpoint without one, or a setting either side lacks, changes nothing here)."""
    before = (checkpoint.get(REPORT_KEY) or {}).get("mechanism_settings") or {}
    now = json_safe(settings)
    return {k: (before[k], now[k]) for k in sorted(set(before) & set(now))
            if before[k] != now[k]}


def warn_changed_settings(checkpoint: dict[str, Any], path: Any, mechanism: str,
                          settings: dict[str, Any]) -> None:
    """Warn (rank 0) when a resume changes the mechanism's public settings: ε stays valid, but
    the privacy report's settings then describe only the steps after the resume."""
    changed = changed_settings(checkpoint, settings)
    if not changed:
        return
    listed = ", ".join(f"{k}={v[1]!r} (was {v[0]!r})" for k, v in changed.items())
    rank_zero_warn(
        f"{path} was trained with other {mechanism} settings; this run resumes with {listed}. "
        "ε stays valid (every step is accounted with its own σ_eff and q), but the privacy "
        "report's settings describe the steps after this resume. Pass the old settings "
        "explicitly to keep the run uniform.")


def spend_of_weights(module: Any, budget_state: dict[str, Any]) -> dict[str, Any] | None:
    """The privacy state to checkpoint for weights a strategy never trained (validate/test,
    then save): the spend they already carry, with the σ of their last private step (for a
    resume). None when they carry none."""
    found = weights_provenance(module)
    if found is None or not found[1].steps:
        return None
    mechanism, spent = found
    history = spent.history
    return {**budget_state, "rng": rng_state(), "mechanism": mechanism,
            "noise_multiplier": float(history[-1][0]) if history else 0.0,
            "accountant": spent.state_dict(), "noise_generator": None, "sampler_seed": None,
            "epsilon": spent.get_epsilon(budget_state["target_delta"])}


def add_privacy(checkpoint: dict[str, Any], state: dict[str, Any],
                module: pl.LightningModule | None, report: PrivacyReport | None = None) -> None:
    """Write the privacy state, the public report (``REPORT_KEY``) and the model class into
    ``checkpoint``; scrub its hyper-parameters (set after setup, e.g. in on_fit_start)."""
    checkpoint[CHECKPOINT_KEY] = state
    if report is not None:
        checkpoint[REPORT_KEY] = report.to_dict()
    for key in ("hyper_parameters", "datamodule_hyper_parameters"):
        if isinstance(checkpoint.get(key), dict):
            scrub_mapping(checkpoint[key], owner=key)
    if module is not None:
        checkpoint[MODEL_CLASS_KEY] = f"{type(module).__module__}.{type(module).__qualname__}"


def describe_optimizer(optimizers: list[Any]) -> dict[str, Any]:
    """The optimizer that runs the private updates (class and its first group's plain
    hyper-parameters, e.g. ``lr``): what the report shows instead of a model's unused ``lr``."""
    if not optimizers:
        return {}
    optimizer = getattr(optimizers[0], "optimizer", optimizers[0])
    group = optimizer.param_groups[0] if getattr(optimizer, "param_groups", None) else {}
    # the constructor's values (``defaults``): a scheduler changes the groups' lr in place
    # (ReduceLROnPlateau keeps no initial_lr), and a rate driven by metrics is not a setting
    group = {**group, **getattr(optimizer, "defaults", {})}
    plain = (bool, int, float, str)
    out: dict[str, Any] = {"class": f"{type(optimizer).__module__}.{type(optimizer).__name__}"}
    for key, value in group.items():
        if value is False or value is None:  # flags left off (amsgrad, foreach, …)
            continue
        if isinstance(value, plain):
            out[key] = value
        elif isinstance(value, tuple) and all(isinstance(v, plain) for v in value):
            out[key] = list(value)
    return out


def mark_loaded_checkpoint(module: Any, checkpoint: Any) -> None:
    """``module``'s weights were just restored from ``checkpoint``: they carry its spend."""
    if isinstance(checkpoint, dict):
        mark_loaded(module, provenance_from_checkpoint(checkpoint))


def carry_spend_through_load_from_checkpoint() -> None:
    """Any LightningModule loaded with ``load_from_checkpoint`` from a checkpoint with a privacy
    state remembers the spend (as ``BaseVAE.on_load_checkpoint`` does for our models), so a later
    fit continues it, in this process or another. Lightning has no public hook for every module
    class, so its loader is wrapped (idempotent); if its internals move, BaseVAE's hook and the
    in-process fingerprints remain (docs/privacy.md §4)."""
    from lightning.pytorch.core import saving

    original = getattr(saving, "_load_state", None)
    if original is None or getattr(original, "_lit_dpvae", False):
        return

    def load_state(cls: Any, checkpoint: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        obj = original(cls, checkpoint, *args, **kwargs)
        if isinstance(obj, pl.LightningModule):
            mark_loaded_checkpoint(obj, checkpoint)
        return obj

    load_state._lit_dpvae = True  # type: ignore[attr-defined]
    saving._load_state = load_state  # type: ignore[assignment]


carry_spend_through_load_from_checkpoint()

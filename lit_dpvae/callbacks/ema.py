"""Exponential moving average of the trained parameters (``ParamEMA``).

Privacy: the average is a deterministic function of the parameter iterates, and every iterate of
a private run is itself post-processing of the released noisy updates (docs/privacy.md §1 and
§9). So evaluating, sampling from or releasing the averaged weights costs no privacy beyond what
the accountant already charges for the run; the callback never reads data or gradients.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn


class ParamEMA(Callback):
    """Keeps ``θ̄ ← d·θ̄ + (1 − d)·θ`` after every optimizer step, with the warm-up decay
    ``d_t = min(decay, (1 + t) / (10 + t))``.

    The average starts as a copy of the parameters after the first training batch (t = 0) and is
    updated after each later one (t = 1, 2, ...; the warm-up lets early iterates fade quickly).
    It covers every parameter of the module (``module.parameters()``, frozen ones too, which it
    keeps equal to their value), not buffers. It is updated once per optimizer step: a batch that
    leaves ``trainer.global_step`` unchanged (gradient accumulation, a skipped step) is not
    counted. The shadow weights live on the parameters' device and dtype and travel in the
    Trainer's checkpoints (``state_dict``), so a resumed run continues the same average.

    The trained module keeps its last iterate unless ``apply_on_train_end=True``; otherwise call
    :meth:`apply` (copy the average into the module) and :meth:`restore` (put the iterate back),
    or use ``with ema.averaged(module): ...``.

    Privacy: post-processing of the DP iterates, no privacy cost (module docstring).

    Args:
        decay: the largest decay ``d`` (in [0, 1); 0 keeps the last iterate).
        apply_on_train_end: copy the average into the module when training ends normally (not
            after an exception, where the module keeps the iterate it had).
    """

    def __init__(self, decay: float, apply_on_train_end: bool = False) -> None:
        decay = float(decay)
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ParamEMA: decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.apply_on_train_end = bool(apply_on_train_end)
        self.t = 0
        self.shadow: list[Tensor] | None = None
        self._backup: list[Tensor] | None = None
        self._seen_step: int | None = None

    # ---- the average ---------------------------------------------------------------------------
    def decay_at(self, t: int) -> float:
        """The decay used for the t-th update (t ≥ 1)."""
        return min(self.decay, (1 + t) / (10 + t))

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """Fold the module's current parameters into the average (the first call copies them)."""
        params = [p.detach() for p in module.parameters()]
        if self.shadow is None:
            self.shadow = [p.clone() for p in params]
            return
        if len(params) != len(self.shadow):
            raise RuntimeError(
                f"ParamEMA: the module has {len(params)} parameters, the average {len(self.shadow)}"
            )
        if params and self.shadow[0].device != params[0].device:  # e.g. resumed on another device
            self.shadow = [s.to(p.device) for s, p in zip(self.shadow, params)]
        self.t += 1
        d = self.decay_at(self.t)
        for s, p in zip(self.shadow, params):
            s.lerp_(p, 1 - d)

    def _require(self, module: nn.Module) -> list[Tensor]:
        if self.shadow is None:
            raise RuntimeError("ParamEMA: no average yet (nothing was trained)")
        n = sum(1 for _ in module.parameters())
        if n != len(self.shadow):
            raise RuntimeError(
                f"ParamEMA: the module has {n} parameters, the average {len(self.shadow)}"
            )
        return self.shadow

    @torch.no_grad()
    def apply(self, module: nn.Module) -> None:
        """Copy the average into the module's parameters, keeping the current ones for
        :meth:`restore`. Does nothing before the first update."""
        if self.shadow is None:
            return
        shadow = self._require(module)
        params = list(module.parameters())
        self._backup = [p.detach().clone() for p in params]
        for s, p in zip(shadow, params):
            p.copy_(s)

    @torch.no_grad()
    def restore(self, module: nn.Module) -> None:
        """Put back the parameters that the last :meth:`apply` replaced."""
        if self._backup is None:
            raise RuntimeError("ParamEMA.restore: apply was not called (nothing to restore)")
        for b, p in zip(self._backup, module.parameters()):
            p.copy_(b)
        self._backup = None

    @contextmanager
    def averaged(self, module: nn.Module) -> Iterator[nn.Module]:
        """``with ema.averaged(module):`` the module holds the average inside the block."""
        self.apply(module)
        try:
            yield module
        finally:
            if self._backup is not None:
                self.restore(module)

    # ---- Lightning hooks -----------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._seen_step = int(trainer.global_step)  # the iterate of the last step already seen

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if trainer is not None:
            step = int(trainer.global_step)
            if step == self._seen_step:  # no optimizer step since the last update
                return
            self._seen_step = step
        self.update(pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.apply_on_train_end:
            self.apply(pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "t": self.t,
            "shadow": self.shadow,
            "seen_step": self._seen_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.t = int(state_dict["t"])
        self.shadow = state_dict["shadow"]
        self._seen_step = state_dict.get("seen_step")

"""Layer capture and the layer rules of per-record attribution: which layers a model may use
(``check_module``), which parameters are trained (``named_trainable``), the inputs and outputs of
every trainable layer call in a forward (``capture_layers``), the rows each record owns in a
call (``rows_per_record``), and which layers may use closed forms (``is_plain_linear``).
docs/privacy.md §2."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from opacus.validators import ModuleValidator
from torch import Tensor, nn


class UnsupportedModuleError(ValueError):
    """The model has a layer (e.g. BatchNorm) that no per-record mechanism can make private."""


class AttributionError(RuntimeError):
    """The network cannot be attributed record by record (so per-record clipping is impossible)."""


def check_module(module: nn.Module) -> None:
    """Refuse layers that break per-record privacy, naming the replacement.

    Uses Opacus' ``ModuleValidator`` (BatchNorm, unsupported layers, ...). BatchNorm normalises
    with batch statistics, so one record changes every other record's output: no per-record
    clipping can bound that, and its running buffers leak data without noise.
    """
    errors = ModuleValidator.validate(module, strict=False)
    if errors:
        lines = "\n  - ".join(str(e) for e in errors)
        raise UnsupportedModuleError(
            f"{type(module).__name__} cannot be trained with per-record DP:\n  - {lines}\n"
            "BatchNorm mixes records within a batch; replace it with nn.GroupNorm or "
            "nn.LayerNorm (opacus.validators.ModuleValidator.fix(model) does this for you)."
        )


def named_trainable(module: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable parameters by name, in ``named_parameters`` order (the noise order too)."""
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


@dataclass
class LayerCall:
    """One call of a trainable layer during a forward."""

    module: nn.Module
    activations: list[Tensor]  # detached inputs
    output: Tensor
    #: The inputs with their graph (the pairwise Gram pass backpropagates from a layer's input).
    inputs: list[Tensor] = field(default_factory=list)


@dataclass
class Capture:
    """Inputs and outputs of every call of every trainable layer during one forward."""

    calls: list[LayerCall] = field(default_factory=list)


def trainable_layers(module: nn.Module) -> list[nn.Module]:
    """The layers with trainable parameters of their own."""
    return [
        m for m in module.modules() if any(p.requires_grad for p in m.parameters(recurse=False))
    ]


@contextmanager
def capture_layers(module: nn.Module) -> Iterator[Capture]:
    """Record ``(inputs, output)`` of each trainable layer call while the context is open."""
    capture = Capture()

    def hook(m: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if not torch.is_grad_enabled():
            return
        if not isinstance(output, Tensor):
            raise AttributionError(
                f"layer {type(m).__name__} with its own parameters returns "
                f"{type(output).__name__}; per-record attribution needs layers that return one "
                "tensor. Put the parameters in standard layers (Linear, Conv2d, GroupNorm, ...)."
            )
        raw = [t for t in inputs if isinstance(t, Tensor)]
        capture.calls.append(LayerCall(m, [t.detach() for t in raw], output, raw))

    hook._lit_dpvae_capture = True  # type: ignore[attr-defined]  # see is_plain_linear
    handles = [m.register_forward_hook(hook) for m in trainable_layers(module)]
    try:
        yield capture
    finally:
        for h in handles:
            h.remove()


def rows_per_record(call: LayerCall, n: int) -> int:
    """How many rows of the call's output each record owns (K samples per record: K)."""
    rows = call.output.shape[0] if call.output.dim() > 0 else 0
    if n == 0 or rows % n != 0 or rows == 0:
        raise AttributionError(
            f"layer {type(call.module).__name__} was called with {rows} rows for a batch of {n} "
            "records. Every trainable layer must see the batch first: n rows, or n·K rows in "
            "record-major order (a [n, K, ...] tensor reshaped to [n·K, ...])."
        )
    return rows // n


_LINEAR_FORWARD = nn.Linear.forward


def refuse_parameter_hooks(module: nn.Module) -> None:
    """A gradient hook on a trainable parameter (``p.register_hook``) rewrites that parameter's
    gradient wherever autograd forms it, after the engine measured the norm it clips: the
    released sum would not be the clipped one. Refused, naming the parameter."""
    hooked = [name for name, p in module.named_parameters()
              if p.requires_grad and getattr(p, "_backward_hooks", None)]
    if hooked:
        raise UnsupportedModuleError(
            f"trainable parameters {hooked} have gradient hooks (Tensor.register_hook): they "
            "would change the gradients after per-record clipping. Remove the hooks (use a "
            "module forward hook on the layer's output, or transform the loss instead)."
        )


def is_plain_linear(module: nn.Module) -> bool:
    """A layer that computes exactly ``x W^T + b`` from its own parameters ``weight`` (and
    ``bias``): type exactly ``nn.Linear`` (a subclass's ``forward`` may use other parameters or
    another map), its own parameters are the Parameters ``weight``/``bias`` and nothing else
    (``torch.nn.utils.weight_norm`` keeps the type but makes ``weight`` a derived tensor of
    ``weight_g``/``weight_v``), and no forward or forward-pre hook other than the engine's
    capture hook can change its input or output (a hook that rescales the output would make
    the captured output differ from ``x W^T + b``). Only such a layer may use the closed forms
    of the ghost norm, the latent Gram and ``grad_input = b W``."""
    if type(module) is not nn.Linear or nn.Linear.forward is not _LINEAR_FORWARD:
        return False
    overrides = {"forward", "_call_impl", "_wrapped_call_impl", "__call__"}
    if overrides & set(vars(module)):
        return False  # an instance-level forward (e.g. accelerate's functools.partial wrap)
    own = dict(module.named_parameters(recurse=False))
    if set(own) - {"weight", "bias"} or not isinstance(module.weight, nn.Parameter):
        return False
    if module.bias is not None and not isinstance(module.bias, nn.Parameter):
        return False
    hooks = list(module._forward_hooks.values()) + list(module._forward_pre_hooks.values())
    global_hooks = (list(nn.modules.module._global_forward_hooks.values())
                    + list(nn.modules.module._global_forward_pre_hooks.values()))
    return all(getattr(h, "_lit_dpvae_capture", False) for h in hooks + global_hooks)



"""Per-record clipped gradient sums, behind one interface with three backends.

Every backend computes, for a loss ``Σ_i ℓ_i`` whose records flow through the network separately,

    clipped_sum = Σ_i c_i ∇ℓ_i,      c_i = min(1, C / (‖∇ℓ_i‖ + 1e-6)),

where ``∇ℓ_i`` is the gradient *attributed to record i* by the layers: every trainable layer sees
record ``i`` in row ``i`` of its input (or rows ``i·m … i·m+m−1``, record-major, when a model
draws ``m`` reparameterisation samples per record), and the per-record gradient of a layer is
built from row ``i``'s activation and backprop. For a loss that is a sum of per-record terms this
is exactly ``∇ℓ_i``; for a loss that couples records (naive DP-SGD) it is what Opacus' hooks
attribute to record ``i`` — every record's attribution then depends on the whole batch.

Backends (same numbers up to float rounding; tests compare them with a one-record-at-a-time loop):

- ``"ghost"`` (default): one forward, one backward to the layer *outputs* (no parameter gradients
  accumulated), per-record norms from the ghost identity ``‖a_i‖²·‖b_i‖²`` (float64) where it
  is exact (a plain ``nn.Linear``, ``is_plain_linear``, on a 2-D input, one row per record: no
  cancellation; ``_ghost_norm_is_exact``), then the clipped sum as one local vector-Jacobian
  product per layer with the backprops rescaled by ``c_i``. No per-sample gradient of such a
  layer is ever materialised, and there is no second backward through the network. Every other
  layer call (Conv, GroupNorm, a Linear subclass, a Linear on ``[n, T, d]`` or ``[n, H, W, C]``
  inputs or with K rows per record, ...) gets per-record gradients
  from Opacus' samplers in blocks of records (a conv's unfolded input is k² times its
  activation); when ``rows × parameters`` exceeds ``_MATERIALISE_LIMIT`` and the layer is called
  once, they are not kept for the whole batch: one pass over the blocks takes the norms, a
  second recomputes each block and adds ``Σ c_i g_i`` with the same ``weighted_sum``.
- ``"hooks"``: Opacus' ``GradSampleModule`` materialises ``p.grad_sample`` for every parameter.
- ``"functorch"``: as ``"ghost"``, but every layer's per-sample gradients come from
  ``torch.func`` (Opacus' ``ft_compute_per_sample_gradient``), never from a hand-written sampler.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.functorch import ft_compute_per_sample_gradient
from opacus.validators import ModuleValidator
from torch import Tensor, nn

BACKENDS = ("ghost", "hooks", "functorch")
_EPS = 1e-6


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


def weighted_sum(factors: Tensor, grads: Tensor) -> Tensor:
    """``Σ_i c_i g_i`` over the leading dim, with ``c_i = 0`` meaning *exactly* zero even when
    ``g_i`` holds Inf/NaN (plain ``0 · inf`` would be NaN and leak into the release)."""
    flat = grads.reshape(grads.shape[0], -1)
    dropped = factors == 0
    if bool(dropped.any()):
        flat = flat.masked_fill(dropped[:, None], 0.0)
    return (factors.to(flat.dtype) @ flat).view(grads.shape[1:])


def clip_factors(norms: Tensor, max_norm: float) -> Tensor:
    """``c_i = min(1, C / (‖g_i‖ + 1e-6))``; records with a non-finite norm get ``c_i = 0``."""
    factors = (max_norm / (norms + _EPS)).clamp(max=1.0)
    return torch.where(torch.isfinite(norms), factors, torch.zeros_like(factors))


@dataclass
class LayerCall:
    module: nn.Module
    activations: list[Tensor]  # detached inputs
    output: Tensor
    #: The inputs with their graph (the pairwise Gram pass backpropagates from a layer's input).
    inputs: list[Tensor] = field(default_factory=list)


@dataclass
class Capture:
    """Inputs and outputs of every call of every trainable layer during one forward."""

    calls: list[LayerCall] = field(default_factory=list)


def _trainable_layers(module: nn.Module) -> list[nn.Module]:
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
    handles = [m.register_forward_hook(hook) for m in _trainable_layers(module)]
    try:
        yield capture
    finally:
        for h in handles:
            h.remove()


def rows_per_record(call: LayerCall, n: int) -> int:
    rows = call.output.shape[0] if call.output.dim() > 0 else 0
    if n == 0 or rows % n != 0 or rows == 0:
        raise AttributionError(
            f"layer {type(call.module).__name__} was called with {rows} rows for a batch of {n} "
            "records. Every trainable layer must see the batch first: n rows, or n·K rows in "
            "record-major order (a [n, K, ...] tensor reshaped to [n·K, ...])."
        )
    return rows // n


# Elements of the per-row working set of one sampler call (a conv's unfolded input, the per-row
# gradients): blocks of records are sized so that rows × this stays ≤ _SAMPLER_BLOCK.
_SAMPLER_BLOCK = 1 << 24

# Above this many elements (rows × the layer's trainable parameters) a layer's per-sample
# gradients are not kept for the whole batch: a first pass over blocks of records takes their
# norms, a second pass recomputes each block and adds Σ c_i g_i (twice the sampler work, memory
# of one block). Below it, one pass keeps them all.
_MATERIALISE_LIMIT = 1 << 26


def _trainable_numel(call: LayerCall) -> int:
    return sum(p.numel() for p in call.module.parameters(recurse=False) if p.requires_grad)


def _record_blocks(call: LayerCall, n: int) -> list[tuple[int, int]]:
    """Record ranges ``[lo, hi)`` for the sampler calls of one layer call. Blocks only when every
    input of the call has the batch's rows first (an EmbeddingBag's flat indices do not: one
    block); a block's working set is ``rows × max(input per row × kernel size, parameters)``."""
    m = rows_per_record(call, n)
    rows = n * m
    acts = call.activations
    if not acts or not all(a.dim() > 0 and a.shape[0] == rows for a in acts):
        return [(0, n)]
    per_row = acts[0][0].numel()
    if isinstance(call.module, nn.modules.conv._ConvNd):
        per_row *= math.prod(call.module.kernel_size)  # the sampler's unfold
    per_row = max(per_row, _trainable_numel(call), 1)
    records = max(1, _SAMPLER_BLOCK // (per_row * m))
    return [(lo, min(n, lo + records)) for lo in range(0, n, records)]


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


def _ghost_norm_is_exact(call: LayerCall, backprops: Tensor, n: int) -> bool:
    """Whether the ghost identity gives this call's per-record norms *exactly*: a plain Linear
    layer (:func:`is_plain_linear`), called on one 2-D input with one row per record. Then
    ``‖g_i‖² = ‖a_i‖²‖b_i‖² (+ ‖b_i‖²)``, a product of sums of squares: no cancellation, relative
    rounding only (docs/privacy.md §2). For ``[n, T, d]`` inputs the identity becomes
    ``Σ_tt' (b_t·b_t')(a_t·a_t')``, which cancels in floating point, and Opacus returns no norm at
    all for 4-D inputs; such calls take the per-sample route."""
    acts = call.activations
    return (
        is_plain_linear(call.module)
        and len(acts) == 1
        and acts[0].dim() == 2
        and backprops.dim() == 2
        and acts[0].shape[0] == n
        and backprops.shape[0] == n
    )


def _ghost_norms(call: LayerCall, backprops: Tensor, n: int) -> dict[nn.Parameter, Tensor]:
    """Per-record squared norms ``[n]`` in float64 of a call that passed
    :func:`_ghost_norm_is_exact`, one entry per trainable parameter of the layer. Float64: the
    squares of float32 values never underflow or overflow there, whereas in float32 an input of
    2.5e-23 squares to 0 and its record would be released unclipped."""
    module = call.module
    assert isinstance(module, nn.Linear)
    dtype = torch.float64
    b_sq = backprops.to(dtype).pow(2).sum(1)
    out: dict[nn.Parameter, Tensor] = {}
    if module.weight.requires_grad:
        out[module.weight] = call.activations[0].to(dtype).pow(2).sum(1) * b_sq
    if module.bias is not None and module.bias.requires_grad:
        out[module.bias] = b_sq
    return out


def _sq_norms(grads: Tensor, n: int) -> Tensor:
    """``‖g_i‖²`` ``[n]`` of materialised per-record gradients, summed across layers in
    float64. The norm itself is taken in the gradients' dtype: the *same* entries are summed
    into the release, so an entry whose square underflows (|g| < 1e-19 in float32) is released
    as itself (at most √P·1e-19 beyond C), and one whose square overflows gives an infinite
    norm, i.e. c_i = 0 — unlike the ghost norm's separately formed factors (``_ghost_norms``)."""
    return torch.linalg.vector_norm(grads.reshape(n, -1), dim=1).double().pow(2)


def _own_trainable(module: nn.Module) -> set[nn.Parameter]:
    return {p for p in module.parameters(recurse=False) if p.requires_grad}


def _block_grads(call: LayerCall, backprops: Tensor, n: int, lo: int, hi: int,
                 functorch: bool) -> dict:
    """Per-record gradients ``{param: [hi − lo, *param.shape]}`` of records ``lo..hi−1``, for
    the layer's *own* trainable parameters only (``torch.func`` differentiates every parameter
    of the module, children included; a child layer is attributed at its own call, so keeping
    its gradient here too would count it twice, once outside the clipping norm's ghost part).
    Each row's gradient reads its own row only, so blocks change the peak memory, not the
    result."""
    m = rows_per_record(call, n)
    if (lo, hi) == (0, n):
        acts, b = call.activations, backprops
    else:
        acts = [a[lo * m:hi * m] for a in call.activations]
        b = backprops[lo * m:hi * m]
    sampler = None if functorch else GradSampleModule.GRAD_SAMPLERS.get(type(call.module))
    if sampler is None:
        grads = ft_compute_per_sample_gradient(call.module, acts, b)
    else:
        grads = sampler(call.module, acts, b)
    own = _own_trainable(call.module)
    grads = {p: g for p, g in grads.items() if p in own}
    if len(grads) != len(own):
        raise AttributionError(
            f"the per-sample sampler of {type(call.module).__name__} returned gradients for "
            f"{len(grads)} of its {len(own)} trainable parameters: a parameter without a "
            "per-record gradient cannot be clipped. Freeze it, or use backend='functorch'."
        )
    if m == 1:
        return grads
    return {p: g.reshape(hi - lo, m, *g.shape[1:]).sum(1) for p, g in grads.items()}


def per_sample_grads(call: LayerCall, backprops: Tensor, n: int, functorch: bool) -> dict:
    """Per-record gradients ``{param: [n, *param.shape]}`` of one layer call (in blocks)."""
    parts = [_block_grads(call, backprops, n, lo, hi, functorch)
             for lo, hi in _record_blocks(call, n)]
    if len(parts) == 1:
        return parts[0]
    return {p: torch.cat([part[p] for part in parts]) for p in parts[0]}


class _LayerwiseClipper:
    """The ``ghost`` and ``functorch`` backends: attribution from captured layer calls.

    ``clipped_sum(module, run, C, n)``: ``run()`` does the forward pass and returns
    ``(loss_to_attribute, aux)``; the result is ``({param name: Σ_i c_i g_i}, norms [n], aux)``.
    The autograd graph is kept, so the caller can differentiate other terms of the same forward.
    """

    def __init__(self, functorch: bool) -> None:
        self.functorch = functorch

    def clipped_sum(
        self, module: nn.Module, run: Callable[[], tuple[Tensor, Any]], max_norm: float, n: int
    ) -> tuple[dict[str, Tensor], Tensor, Any]:
        params = named_trainable(module)
        if n == 0:
            return _empty(params, run)
        with capture_layers(module) as cap:
            loss, aux = run()
        outputs = [c.output for c in cap.calls]
        backprops: Sequence[Tensor]
        backprops = torch.autograd.grad(loss, outputs, retain_graph=True, allow_unused=True)
        backprops = [
            torch.zeros_like(o) if b is None else b.detach() for o, b in zip(outputs, backprops)
        ]
        seen: dict[nn.Parameter, int] = {}
        for call in cap.calls:
            for p in call.module.parameters(recurse=False):
                seen[p] = seen.get(p, 0) + 1
        missing = [name for name, p in params.items() if p not in seen]
        if missing:
            raise AttributionError(
                f"parameters {missing} were not used by any layer call in loss_terms(); a "
                "trainable parameter outside a layer's forward cannot be attributed to records. "
                "Make it a buffer, freeze it, or move it into a standard layer."
            )

        # Per-record squared norms, and per-sample gradients where they had to be materialised.
        sq_norm = torch.zeros(n, device=loss.device, dtype=torch.float64)
        materialised: dict[nn.Parameter, Tensor] = {}
        ghost_calls = []
        blocked_calls = []
        for call, b in zip(cap.calls, backprops):
            own = list(call.module.parameters(recurse=False))
            single = all(seen[p] == 1 for p in own)
            if not self.functorch and single and _ghost_norm_is_exact(call, b, n):
                for ns in _ghost_norms(call, b, n).values():
                    sq_norm = sq_norm + ns
                ghost_calls.append((call, b))
                continue
            blocks = _record_blocks(call, n)
            if (
                single
                and len(blocks) > 1
                and n * rows_per_record(call, n) * _trainable_numel(call) > _MATERIALISE_LIMIT
            ):  # two passes over blocks of records: norms now, Σ c_i g_i once the c_i are known
                for lo, hi in blocks:
                    for p, g in _block_grads(call, b, n, lo, hi, self.functorch).items():
                        if p.requires_grad:
                            sq_norm[lo:hi] += _sq_norms(g, hi - lo)
                blocked_calls.append((call, b, blocks))
                continue
            for p, g in per_sample_grads(call, b, n, self.functorch).items():
                if p.requires_grad:
                    materialised[p] = materialised[p] + g if p in materialised else g
        for g in materialised.values():
            sq_norm = sq_norm + _sq_norms(g, n)
        norms = sq_norm.sqrt()
        factors = clip_factors(norms, max_norm)

        out = {name: torch.zeros_like(p) for name, p in params.items()}
        by_param = {p: name for name, p in params.items()}
        for call, b in ghost_calls:
            own = [p for p in call.module.parameters(recurse=False) if p.requires_grad]
            rows = factors.repeat_interleave(b.shape[0] // n)
            mask = (rows > 0).view(-1, *([1] * (b.dim() - 1)))
            scaled = torch.where(mask, b * rows.to(b.dtype).view_as(mask), torch.zeros_like(b))
            grads = torch.autograd.grad(call.output, own, grad_outputs=scaled, retain_graph=True)
            for p, g in zip(own, grads):
                out[by_param[p]] += g
        for p, g in materialised.items():
            out[by_param[p]] += weighted_sum(factors, g)
        for call, b, blocks in blocked_calls:  # the same per-record gradients, recomputed
            for lo, hi in blocks:
                for p, g in _block_grads(call, b, n, lo, hi, self.functorch).items():
                    if p.requires_grad:
                        out[by_param[p]] += weighted_sum(factors[lo:hi], g)
        check_finite(out)
        return out, norms, aux


class _OpacusHooksClipper:
    """The ``hooks`` backend: Opacus' GradSampleModule materialises ``p.grad_sample``."""

    def clipped_sum(
        self, module: nn.Module, run: Callable[[], tuple[Tensor, Any]], max_norm: float, n: int
    ) -> tuple[dict[str, Tensor], Tensor, Any]:
        params = named_trainable(module)
        if n == 0:
            return _empty(params, run)
        saved_grads = {name: p.grad for name, p in params.items()}
        gsm = GradSampleModule(module, batch_first=True, loss_reduction="sum", strict=False)
        try:
            for p in params.values():
                p.grad = None
                p.grad_sample = None  # type: ignore[attr-defined]  # Opacus per-sample attribute
            loss, aux = run()
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                loss.backward(retain_graph=True)
            grad_samples = {}
            for name, p in params.items():
                gs = getattr(p, "grad_sample", None)
                if gs is None:
                    raise AttributionError(
                        f"Opacus produced no per-sample gradient for {name!r}: it is not used by a "
                        "layer in loss_terms(). Freeze it or move it into a standard layer."
                    )
                if gs.shape[0] != n:
                    m = gs.shape[0] // n if n and gs.shape[0] % n == 0 else 0
                    if m == 0:
                        raise AttributionError(
                            f"{name!r} has {gs.shape[0]} per-sample rows for {n} records"
                        )
                    gs = gs.reshape(n, m, *gs.shape[1:]).sum(1)
                grad_samples[name] = gs.detach()
        finally:
            for p in params.values():
                p.grad_sample = None  # type: ignore[attr-defined]  # Opacus per-sample attribute
            gsm._close()
            for m in module.modules():  # a refused step must not leave activations behind
                for attr in ("activations", "max_batch_len"):
                    if attr in m.__dict__:
                        delattr(m, attr)
            for name, p in params.items():
                p.grad = saved_grads[name]
        norms = torch.stack([_sq_norms(g, n) for g in grad_samples.values()]).sum(0).sqrt()
        factors = clip_factors(norms, max_norm)
        out = {name: weighted_sum(factors, g) for name, g in grad_samples.items()}
        check_finite(out)
        return out, norms, aux


def _empty(params: dict[str, nn.Parameter], run: Callable[[], tuple[Tensor, Any]]) -> tuple:
    """An empty batch: run the forward (collectives inside it must happen), attribute nothing."""
    _, aux = run()
    zeros = {name: torch.zeros_like(p) for name, p in params.items()}
    return zeros, torch.zeros(0), aux


def check_finite(sums: dict[str, Tensor]) -> None:
    for name, value in sums.items():
        if not bool(torch.isfinite(value).all()):
            raise FloatingPointError(
                f"the clipped gradient sum of {name!r} is not finite: a record's activations "
                "overflowed float32. Check the data's scale (inputs should be normalised) and "
                "the learning rate; refusing to release a non-finite statistic."
            )


def make_clipper(backend: str) -> _LayerwiseClipper | _OpacusHooksClipper:
    """The per-record clipping backend by name: ``ghost`` (default), ``hooks``, ``functorch``."""
    if backend == "ghost":
        return _LayerwiseClipper(functorch=False)
    if backend == "functorch":
        return _LayerwiseClipper(functorch=True)
    if backend == "hooks":
        return _OpacusHooksClipper()
    raise ValueError(f"unknown per-sample gradient backend {backend!r}; choose one of {BACKENDS}")

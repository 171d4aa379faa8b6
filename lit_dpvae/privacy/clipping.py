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
  A plain Conv2d's per-sample gradients come from ``privacy.conv`` (grouped convolutions, no
  im2col). Every sampler call of a layer sees one fixed number of contiguous rows (the last block
  padded with zero rows), so a record's gradient does not depend on what else is in the batch.
  Every backend clips at ``max(‖g_i‖, κ·S_i)``, ``S_i`` the rounding scale of the record's Linear
  and conv gradients (``rounding_scale``): rounding upstream that differs between
  neighbouring batches is not amplified by clipping a gradient that cancels.
- ``"hooks"``: Opacus' ``GradSampleModule`` materialises ``p.grad_sample`` for every parameter.
- ``"functorch"``: as ``"ghost"``, but every layer's per-sample gradients come from
  ``torch.func`` (Opacus' ``ft_compute_per_sample_gradient``), never from a hand-written sampler.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.functorch import ft_compute_per_sample_gradient
from torch import Tensor, nn

from lit_dpvae.privacy.capture import (
    AttributionError,
    LayerCall,
    capture_layers,
    is_plain_linear,
    named_trainable,
    rows_per_record,
    trainable_layers,
)
from lit_dpvae.privacy.conv import SAMPLERS, covered, jacobian_rows

BACKENDS = ("ghost", "hooks", "functorch")
_EPS = 1e-6


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


# Elements of the per-row working set of one sampler call (a conv's unfolded input, the per-row
# gradients): blocks of records are sized so that rows × this stays ≤ _SAMPLER_BLOCK.
_SAMPLER_BLOCK = 1 << 24
#: At most this many records per sampler call (a fixed block size: ``_block_size``).
_BLOCK_RECORDS = 64

# Above this many elements (rows × the layer's trainable parameters) a layer's per-sample
# gradients are not kept for the whole batch: a first pass over blocks of records takes their
# norms, a second pass recomputes each block and adds Σ c_i g_i (twice the sampler work, memory
# of one block). Below it, one pass keeps them all.
_MATERIALISE_LIMIT = 1 << 26


def _trainable_numel(call: LayerCall) -> int:
    return sum(p.numel() for p in call.module.parameters(recurse=False) if p.requires_grad)


def _rows_first(call: LayerCall, n: int) -> bool:
    """Every input of the call has the batch's rows first (an EmbeddingBag's flat indices do
    not)."""
    rows = n * rows_per_record(call, n)
    acts = call.activations
    return bool(acts) and all(a.dim() > 0 and a.shape[0] == rows for a in acts)


def _block_size(call: LayerCall, n: int, directions: int = 1) -> int:
    """Records per sampler call: ``_SAMPLER_BLOCK // working set per record`` (a block's working
    set is ``rows × max(input per row × kernel size, parameters)``, times the output directions
    of a Jacobian), at most ``_BLOCK_RECORDS``. A function of the layer's configuration and the
    per-record shapes only, never of ``n``: every sampler call of the layer sees the same number
    of rows (the last block is padded with zero rows, ``_block_grads``), so one record's
    gradient is computed by the same kernel, with the same rounding, whatever else is in the
    batch (a kernel chosen per block size rounded a record whose gradient cancels differently
    once another record joined, and clipping rescales that rounding to norm C; docs/privacy.md
    §2)."""
    m = rows_per_record(call, n)
    acts = call.activations
    per_row = acts[0][0].numel()
    if isinstance(call.module, nn.modules.conv._ConvNd):
        per_row *= math.prod(call.module.kernel_size)  # the sampler's unfold
    per_row = max(per_row, _trainable_numel(call), 1)
    return max(1, min(_BLOCK_RECORDS, _SAMPLER_BLOCK // (per_row * m * directions)))


def _record_blocks(call: LayerCall, n: int, directions: int = 1) -> list[tuple[int, int]]:
    """Record ranges ``[lo, hi)`` for the sampler calls of one layer call, ``_block_size``
    records each (the last one shorter; it is padded to that size when sampled). Blocks only
    when every input of the call has the batch's rows first: otherwise one unpadded block."""
    if not _rows_first(call, n):
        return [(0, n)]
    records = _block_size(call, n, directions)
    return [(lo, min(n, lo + records)) for lo in range(0, n, records)]


def _padded(t: Tensor, rows: int) -> Tensor:
    """``t`` (contiguous) with zero rows appended up to ``rows`` rows."""
    t = t.contiguous()
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def _block_inputs(call: LayerCall, backprops: Tensor, n: int, lo: int, hi: int,
                  directions: int = 1) -> tuple[list[Tensor], Tensor, int]:
    """The activations and backprops (``[directions, rows, ...]`` when ``directions`` > 1) of
    records ``lo..hi−1``, contiguous, padded with zero rows to ``_block_size`` records, and
    that size. Contiguous: Opacus' unfold reads a conv input's pixels by assumed strides and
    mixed records for a channels-last or batch-innermost input (4.2C released)."""
    m = rows_per_record(call, n)
    if not _rows_first(call, n):
        return [a.contiguous() for a in call.activations], backprops.contiguous(), n
    size = _block_size(call, n, directions)
    acts = [_padded(a[lo * m:hi * m], size * m) for a in call.activations]
    if directions == 1:
        return acts, _padded(backprops[lo * m:hi * m], size * m), size
    b = _padded(backprops[:, lo * m:hi * m].transpose(0, 1), size * m).transpose(0, 1)
    return acts, b, size


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
    Each row's gradient reads its own row only, and every call sees a block of the same size
    (``_block_inputs``), so blocks change the peak memory, not the result."""
    m = rows_per_record(call, n)
    acts, b, _ = _block_inputs(call, backprops, n, lo, hi)
    sampler = None if functorch else (SAMPLERS.get(type(call.module))
                                      or GradSampleModule.GRAD_SAMPLERS.get(type(call.module)))
    if sampler is None:
        grads = ft_compute_per_sample_gradient(call.module, acts, b)
    else:
        grads = sampler(call.module, acts, b)
    own = _own_trainable(call.module)
    grads = {p: g[:(hi - lo) * m] for p, g in grads.items() if p in own}
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


def per_record_jacobian(call: LayerCall, backprops: Tensor, n: int,
                        own: Sequence[nn.Parameter]) -> dict[nn.Parameter, Tensor]:
    """Per-record Jacobian rows ``{param: [n, d, P_param]}`` of one layer call for ``d`` output
    gradients ``backprops [d, rows, ...]`` (the pairwise mechanism's latent directions), for the
    parameters ``own`` of the layer. A plain Conv2d (``conv.covered``) forms all ``d``
    directions in one grouped convolution per block of records; any other layer calls its
    per-sample sampler once per direction."""
    d = backprops.shape[0]
    m = rows_per_record(call, n)
    if covered(call.module) and len(call.activations) == 1:
        out = {p: backprops.new_empty(n, d, p.numel()) for p in own}
        for lo, hi in _record_blocks(call, n, directions=d):
            acts, b, _ = _block_inputs(call, backprops, n, lo, hi, directions=d)
            rows = jacobian_rows(call.module, acts[0], b)
            for p in own:  # [rows, d, *shape] (a permuted view) into its records' slice
                g = rows[p][:(hi - lo) * m]
                g = g.reshape(hi - lo, m, d, *g.shape[2:]).sum(1) if m > 1 else g
                out[p][lo:hi].view(hi - lo, d, *g.shape[2:]).copy_(g)
        return out
    per_k = [per_sample_grads(call, backprops[k], n, functorch=False) for k in range(d)]
    return {p: torch.stack([g[p].reshape(n, -1) for g in per_k], 1) for p in own}


def layer_backprops(cap: Any, loss: Tensor) -> list[Tensor]:
    """``∂loss/∂output`` of every captured layer call (zeros where the loss does not reach it);
    the graph is kept."""
    outputs = [c.output for c in cap.calls]
    backprops: Sequence[Tensor]
    backprops = torch.autograd.grad(loss, outputs, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(o) if b is None else b.detach() for o, b in zip(outputs, backprops)]


def layer_call_counts(calls: list[LayerCall], params: dict[str, nn.Parameter]
                      ) -> dict[nn.Parameter, int]:
    """How often each parameter's layer was called; refuses trainable parameters no layer call
    used (they cannot be attributed to records)."""
    seen: dict[nn.Parameter, int] = {}
    for call in calls:
        for p in call.module.parameters(recurse=False):
            seen[p] = seen.get(p, 0) + 1
    missing = [name for name, p in params.items() if p not in seen]
    if missing:
        raise AttributionError(
            f"parameters {missing} were not used by any layer call in loss_terms(); a "
            "trainable parameter outside a layer's forward cannot be attributed to records. "
            "Make it a buffer, freeze it, or move it into a standard layer."
        )
    return seen


def clipping_route(call: LayerCall, backprops: Tensor, n: int, single: bool,
                   functorch: bool) -> str:
    """How one layer call's per-record norms and clipped sum are formed: ``"ghost"`` (the exact
    ghost identity of a plain Linear, nothing materialised), ``"blocked"`` (per-record gradients
    in blocks of records, in two passes: norms, then ``Σ c_i g_i``), or ``"materialised"``
    (per-record gradients of the whole batch kept for both). ``single``: the layer's parameters
    are used by this call only."""
    if not functorch and single and _ghost_norm_is_exact(call, backprops, n):
        return "ghost"
    blocks = _record_blocks(call, n)
    if (single and len(blocks) > 1
            and n * rows_per_record(call, n) * _trainable_numel(call) > _MATERIALISE_LIMIT):
        return "blocked"
    return "materialised"


def ghost_clipped_sum(call: LayerCall, backprops: Tensor, factors: Tensor, n: int
                      ) -> dict[nn.Parameter, Tensor]:
    """``Σ_i c_i g_i`` of a ghost-route call: one vector-Jacobian product with the backprops
    rescaled by ``c_i`` (a record with ``c_i = 0`` contributes exactly zero)."""
    own = [p for p in call.module.parameters(recurse=False) if p.requires_grad]
    rows = factors.repeat_interleave(backprops.shape[0] // n)
    mask = (rows > 0).view(-1, *([1] * (backprops.dim() - 1)))
    scaled = torch.where(mask, backprops * rows.to(backprops.dtype).view_as(mask),
                         torch.zeros_like(backprops))
    grads = torch.autograd.grad(call.output, own, grad_outputs=scaled, retain_graph=True)
    return dict(zip(own, grads))


def blocked_sq_norms(call: LayerCall, backprops: Tensor, n: int, functorch: bool,
                     sq_norm: Tensor) -> None:
    """Add a blocked-route call's per-record squared norms into ``sq_norm`` (first pass)."""
    for lo, hi in _record_blocks(call, n):
        for p, g in _block_grads(call, backprops, n, lo, hi, functorch).items():
            if p.requires_grad:
                sq_norm[lo:hi] += _sq_norms(g, hi - lo)


def blocked_clipped_sum(call: LayerCall, backprops: Tensor, factors: Tensor, n: int,
                        functorch: bool) -> list[tuple[nn.Parameter, Tensor]]:
    """``Σ c_i g_i`` of a blocked-route call: the same per-record gradients, recomputed block by
    block (second pass), one partial sum per block and parameter."""
    out = []
    for lo, hi in _record_blocks(call, n):
        for p, g in _block_grads(call, backprops, n, lo, hi, functorch).items():
            if p.requires_grad:
                out.append((p, weighted_sum(factors[lo:hi], g)))
    return out


#: Clip with at least ``_SCALE_FLOOR`` times a record's rounding scale (``rounding_scale``).
_SCALE_FLOOR = 2.0 ** -7


def _record_norms(t: Tensor, n: int) -> Tensor:
    """``‖t_i‖`` ``[n]`` (float64) over all entries of each record's rows (record-major). Taken
    in float32 (one fast reduction) and redone in float64 for the records whose float32 norm
    is zero, non-finite or outside ``[1e-10, 1e15]`` (where squares may have under- or
    overflowed); inside it every square that underflowed weighs < 1e-20 of the total."""
    flat = t.reshape(n, -1)
    norms = torch.linalg.vector_norm(flat, dim=1).to(torch.float64)
    bad = ~(torch.isfinite(norms) & (norms > 1e-10) & (norms < 1e15))
    if bool(bad.any()):
        norms[bad] = torch.linalg.vector_norm(flat[bad].to(torch.float64), dim=1)
    return norms


def _patch_multiplicity(layer: nn.modules.conv._ConvNd) -> float:
    """How often one input value can appear in a conv call's patches: once per kernel offset
    (``Π k``), times the copies a non-zero padding mode makes of it (at most ``1 + 2p`` per
    dimension for reflect/replicate/circular padding of width p)."""
    copies = 1.0
    if layer.padding_mode != "zeros":
        pad = layer._reversed_padding_repeated_twice
        for j in range(0, len(pad), 2):
            copies *= 1 + 2 * max(pad[j], pad[j + 1])
    return math.prod(layer.kernel_size) * copies


def rounding_scale(call: LayerCall, backprops: Tensor, n: int
                   ) -> dict[nn.Parameter, Tensor] | None:
    """``{param: [n]}`` float64: an upper bound ``S̄_i`` of the *rounding scale*
    ``S_i = Σ_l ‖b_l‖‖u_l‖`` of record i's gradient of this call, summed over the positions
    ``l`` the gradient sums (a conv's output positions, a Linear's rows and tokens; ``u_l`` the
    input patch or row there), per trainable parameter of the layer; None for a layer of another
    kind. By Cauchy–Schwarz
    ``S_i ≤ ‖b_i‖·√(Σ_l ‖u_l‖²) ≤ ‖b_i‖·‖a_i‖·√M`` (M: ``_patch_multiplicity``, 1 for a
    Linear), and a bias's ``Σ_l ‖b_l‖ ≤ √L·‖b_i‖`` over its L positions. ``‖g_i‖ ≤ S_i``, and
    a relative perturbation δ of the activations or backprops (another kernel for another
    batch size upstream, float32 accumulation) moves the computed ``g_i`` by at most
    ``≈ δ S_i`` — far more than ``δ‖g_i‖`` when the sum cancels. Clipping at
    ``max(‖g_i‖, κ S̄_i)`` (``_SCALE_FLOOR``) keeps that perturbation at ``≈ 2δ/κ · C`` after
    clipping instead of up to 2C (docs/privacy.md §2). For a Linear called once on a 2-D input
    with one row per record ``S_i = ‖g_i‖`` exactly: its floor never binds."""
    module = call.module
    own = _own_trainable(module)
    if not own or len(call.activations) != 1:
        return None
    rows_per_record(call, n)  # refuses rows that are not the batch's (AttributionError)
    a = call.activations[0]
    if isinstance(module, nn.Linear) and a.dim() >= 2 and a.shape[:-1] == backprops.shape[:-1]:
        channel_dim = -1
        multiplicity = 1.0
    elif (isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and a.dim() == backprops.dim()
          and a.dim() in (3, 4, 5)):
        channel_dim = 1
        multiplicity = _patch_multiplicity(module)
    else:
        return None
    b_norm = _record_norms(backprops, n)
    out: dict[nn.Parameter, Tensor] = {}
    if module.weight in own:
        out[module.weight] = _record_norms(a, n) * b_norm * math.sqrt(multiplicity)
    bias = getattr(module, "bias", None)
    if bias is not None and bias in own:
        positions = backprops.numel() // (n * backprops.shape[channel_dim])
        out[bias] = b_norm * math.sqrt(positions)
    return out


def scale_floor_sq(calls: list[LayerCall], backprops: list[Tensor], n: int) -> Tensor:
    """``Σ_p S̄_{i,p}²`` ``[n]`` (float64) over the parameters of the Linear and conv calls
    (``rounding_scale``), each parameter's ``S̄`` summed over the calls that use it (a layer
    called twice: its gradient is the sum of both calls', so is its scale): every backend clips
    at least at ``κ·√`` of it. A larger norm only clips more, and never for a gradient whose sum
    over positions does not cancel by more than 1/κ."""
    per_param: dict[nn.Parameter, Tensor] = {}
    for call, b in zip(calls, backprops):
        for p, scale in (rounding_scale(call, b, n) or {}).items():
            per_param[p] = per_param[p] + scale if p in per_param else scale
    total = torch.zeros(n, dtype=torch.float64, device=backprops[0].device if backprops
                        else None)
    for scale in per_param.values():
        total = total + scale.pow(2)
    return total


class LayerwiseClipper:
    """The ``ghost`` and ``functorch`` backends: attribution from captured layer calls.

    ``clipped_sum(module, run, C, n, keep)``: ``run()`` does the forward pass and returns
    ``(loss_to_attribute, aux)``; the result is ``({param name: Σ_i c_i g_i}, norms [n], aux)``,
    the sum over the first ``keep`` records only when ``keep`` is given (``c_i = 0`` after).
    The autograd graph is kept, so the caller can differentiate other terms of the same forward.
    Each layer call takes one route (``clipping_route``).
    """

    def __init__(self, functorch: bool) -> None:
        self.functorch = functorch

    def clipped_sum(
        self, module: nn.Module, run: Callable[[], tuple[Tensor, Any]], max_norm: float, n: int,
        keep: int | None = None,
    ) -> tuple[dict[str, Tensor], Tensor, Any]:
        params = named_trainable(module)
        if n == 0:
            return empty_clipped_sum(params, run)
        with capture_layers(module) as cap:
            loss, aux = run()
        backprops = layer_backprops(cap, loss)
        seen = layer_call_counts(cap.calls, params)
        # Per-record squared norms (float64), layer call by layer call in forward order.
        sq_norm = torch.zeros(n, device=loss.device, dtype=torch.float64)
        materialised: dict[nn.Parameter, Tensor] = {}
        routes: dict[str, list[tuple[LayerCall, Tensor]]] = {"ghost": [], "blocked": []}
        for call, b in zip(cap.calls, backprops):
            single = all(seen[p] == 1 for p in call.module.parameters(recurse=False))
            route = clipping_route(call, b, n, single, self.functorch)
            if route == "ghost":
                for ns in _ghost_norms(call, b, n).values():
                    sq_norm = sq_norm + ns
            elif route == "blocked":
                blocked_sq_norms(call, b, n, self.functorch, sq_norm)
            else:
                for p, g in per_sample_grads(call, b, n, self.functorch).items():
                    if p.requires_grad:
                        materialised[p] = materialised[p] + g if p in materialised else g
            if route != "materialised":
                routes[route].append((call, b))
        for g in materialised.values():
            sq_norm = sq_norm + _sq_norms(g, n)
        norms = sq_norm.sqrt()
        norms = torch.maximum(norms, _SCALE_FLOOR * scale_floor_sq(cap.calls, backprops, n).sqrt())
        factors = _kept(clip_factors(norms, max_norm), keep)

        out = {name: torch.zeros_like(p) for name, p in params.items()}
        by_param = {p: name for name, p in params.items()}
        for call, b in routes["ghost"]:
            for p, g in ghost_clipped_sum(call, b, factors, n).items():
                out[by_param[p]] += g
        for p, g in materialised.items():
            out[by_param[p]] += weighted_sum(factors, g)
        for call, b in routes["blocked"]:
            for p, g in blocked_clipped_sum(call, b, factors, n, self.functorch):
                out[by_param[p]] += g
        check_finite(out)
        return out, norms, aux


def _kept(factors: Tensor, keep: int | None) -> Tensor:
    """Clip factors with records ``keep..n−1`` (a record block's padding copies) set to exactly
    0: whatever the model does with them, they are never released."""
    if keep is None or keep >= factors.shape[0]:
        return factors
    factors = factors.clone()
    factors[keep:] = 0
    return factors


def _contiguous_inputs(module: nn.Module, inputs: tuple) -> tuple:
    return tuple(t.contiguous() if isinstance(t, Tensor) else t for t in inputs)


class OpacusHooksClipper:
    """The ``hooks`` backend: Opacus' GradSampleModule materialises ``p.grad_sample``."""

    def clipped_sum(
        self, module: nn.Module, run: Callable[[], tuple[Tensor, Any]], max_norm: float, n: int,
        keep: int | None = None,
    ) -> tuple[dict[str, Tensor], Tensor, Any]:
        params = named_trainable(module)
        if n == 0:
            return empty_clipped_sum(params, run)
        saved_grads = {name: p.grad for name, p in params.items()}
        # Opacus' conv sampler reads pixels by assumed strides: a channels-last or
        # batch-innermost input mixed records (4.2C released). Every trainable layer gets its
        # inputs contiguous (same values; Opacus' capture hook runs after this pre-hook).
        contiguous = [m.register_forward_pre_hook(_contiguous_inputs)
                      for m in trainable_layers(module)]
        gsm = GradSampleModule(module, batch_first=True, loss_reduction="sum", strict=False)
        try:
            for p in params.values():
                p.grad = None
                p.grad_sample = None  # type: ignore[attr-defined]  # Opacus per-sample attribute
            with capture_layers(module) as cap:
                loss, aux = run()
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                loss.backward(retain_graph=True)
                gsm.disable_hooks()  # the layer backprops for the floor: no second capture
                scale_sq = scale_floor_sq(cap.calls, layer_backprops(cap, loss), n)
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
            for handle in contiguous:
                handle.remove()
            for m in module.modules():  # a refused step must not leave activations behind
                for attr in ("activations", "max_batch_len"):
                    if attr in m.__dict__:
                        delattr(m, attr)
            for name, p in params.items():
                p.grad = saved_grads[name]
        norms = torch.stack([_sq_norms(g, n) for g in grad_samples.values()]).sum(0).sqrt()
        norms = torch.maximum(norms, _SCALE_FLOOR * scale_sq.sqrt())
        factors = _kept(clip_factors(norms, max_norm), keep)
        out = {name: weighted_sum(factors, g) for name, g in grad_samples.items()}
        check_finite(out)
        return out, norms, aux


def empty_clipped_sum(params: dict[str, nn.Parameter],
                      run: Callable[[], tuple[Tensor, Any]]) -> tuple:
    """An empty batch: run the forward (collectives inside it must happen), attribute nothing."""
    _, aux = run()
    zeros = {name: torch.zeros_like(p) for name, p in params.items()}
    return zeros, torch.zeros(0), aux


def check_finite(sums: dict[str, Tensor]) -> None:
    """Refuse a non-finite entry in any of ``sums``. Fast path: one sum of per-tensor sums (a
    NaN or ±Inf anywhere makes it non-finite, so a finite total proves every entry finite);
    only a non-finite total — possibly an overflow of finite entries — checks tensor by tensor,
    so the refusal is exactly "some entry is not finite"."""
    if not sums:
        return
    device = next(iter(sums.values())).device  # statistics may lie on several devices
    if bool(torch.isfinite(torch.stack([v.sum().to(device) for v in sums.values()]).sum())):
        return
    for name, value in sums.items():
        if not bool(torch.isfinite(value).all()):
            raise FloatingPointError(
                f"the clipped gradient sum of {name!r} is not finite: a record's activations "
                "overflowed float32. Check the data's scale (inputs should be normalised) and "
                "the learning rate; refusing to release a non-finite statistic."
            )


def make_clipper(backend: str) -> LayerwiseClipper | OpacusHooksClipper:
    """The per-record clipping backend by name: ``ghost`` (default), ``hooks``, ``functorch``."""
    if backend == "ghost":
        return LayerwiseClipper(functorch=False)
    if backend == "functorch":
        return LayerwiseClipper(functorch=True)
    if backend == "hooks":
        return OpacusHooksClipper()
    raise ValueError(f"unknown per-sample gradient backend {backend!r}; choose one of {BACKENDS}")

"""Per-record gradients of ``nn.Conv2d`` without unfolding the input (docs/privacy.md §2).

Opacus' conv sampler forms the unfolded input ``[rows, C_in·k², L]`` (im2col, a k²-fold copy of
the activation) and multiplies it by the backprops. The same per-record weight gradients

    G_i[o, c, u, v] = Σ_{y,x} b_i[o, y, x] · a_i[c, s·y + d·u − p, s·x + d·v − p]

are a convolution too: two exact ways form them for a whole block of records at once, with the
records folded into the groups of one convolution, and a third unfolds after all:

- ``"grouped_backward"``: the weight gradient of a convolution with ``groups = rows`` (input
  ``[1, rows·C_in, H, W]``, output gradient ``[1, rows·C_out, H', W']``), the route
  ``torch.func.vmap`` takes; fast for 3×3 stride-1 layers with tens of channels;
- ``"grouped_forward"``: a forward convolution of the input, channels as the batch
  (``[C_in, rows, H, W]``), with the output gradient as ``rows·C_out`` one-channel kernels
  (stride and dilation swap roles; Opacus' ``convolution2d_backward_as_a_convolution``); fast
  when ``C_in`` or ``C_out`` is small (an image's first or last layer);
- ``"unfold"``: ``F.unfold`` (im2col) and one einsum, as Opacus' sampler does; fast for
  strided layers at low resolution.

All three return the per-record gradients themselves, materialised: the norm that sets each
``c_i`` and the clipped sum ``Σ c_i g_i`` are formed from the *same* tensor (§2, rule (i)), so
which method ran changes rounding (float32, IEEE kernels) and time, never the bound. Which one
is fastest depends on the layer and the machine, so the first call of a layer configuration
times each method once on random inputs of that block's shapes and keeps the fastest for the
process (``_chosen``, keyed by the layer's settings and the per-record shapes: never by the
data's values, and not by the number of records, so adding a record to a batch does not switch
the method). Every call of a layer sees blocks of one fixed number of rows
(``clipping._block_size``), contiguous: each record's gradient is then bit-identical whatever
else is in its block (``tests/privacy/test_conv_samplers.py``). Layers
outside the shape these methods cover (``groups > 1``, a non-zero ``padding_mode``, a string
padding, a subclass) keep Opacus' sampler.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from opacus.grad_sample.conv import compute_conv_grad_sample
from torch import Tensor, nn

Sampler = Callable[[nn.Module, list[Tensor], Tensor], dict[nn.Parameter, Tensor]]


def _grouped_forward(layer: nn.Conv2d, x: Tensor, g: Tensor) -> Tensor:
    rows, c_in = x.shape[:2]
    d, c_out = g.shape[0], g.shape[2]
    kh, kw = layer.kernel_size
    kernels = g.transpose(0, 1).reshape(rows * d * c_out, 1, *g.shape[3:])
    out = F.conv2d(x.transpose(0, 1), kernels, stride=layer.dilation, padding=layer.padding,
                   dilation=layer.stride, groups=rows)  # [C_in, rows·d·C_out, ≥kh, ≥kw]
    out = out[:, :, :kh, :kw]
    return out.reshape(c_in, rows, d, c_out, kh, kw).permute(1, 2, 3, 0, 4, 5)


def _grouped_backward(layer: nn.Conv2d, x: Tensor, g: Tensor) -> Tensor:
    rows, c_in = x.shape[:2]
    d, c_out = g.shape[0], g.shape[2]
    weight_shape = [rows * d * c_out, c_in, *layer.kernel_size]
    _, grad_w, _ = torch.ops.aten.convolution_backward(
        g.transpose(0, 1).reshape(1, rows * d * c_out, *g.shape[3:]),
        x.reshape(1, rows * c_in, *x.shape[2:]), x.new_empty(weight_shape), None,
        list(layer.stride), list(layer.padding), list(layer.dilation), False, [0, 0], rows,
        [False, True, False])
    return grad_w.reshape(rows, d, c_out, c_in, *layer.kernel_size)


def _unfold(layer: nn.Conv2d, x: Tensor, g: Tensor) -> Tensor:
    patches = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
                       stride=layer.stride)  # [rows, C_in·k², L]
    d, rows, c_out = g.shape[:3]
    out = torch.einsum("dnol,npl->ndop", g.reshape(d, rows, c_out, -1), patches)
    return out.reshape(rows, d, *layer.weight.shape)


#: The exact per-record weight-gradient methods, by name: ``f(layer, x [rows, C_in, H, W],
#: g [d, rows, C_out, H', W']) -> [rows, d, *weight.shape]``, the gradients of ``⟨out, g_k⟩``
#: for each row and each of ``d`` output directions (d = 1: the per-sample gradient; d > 1:
#: the rows of a per-record Jacobian, as the pairwise mechanism's latent Gram needs).
METHODS: dict[str, Callable[[nn.Conv2d, Tensor, Tensor], Tensor]] = {
    "grouped_backward": _grouped_backward,
    "grouped_forward": _grouped_forward,
    "unfold": _unfold,
}

#: layer configuration and per-record shapes -> the method chosen for it in this process
_chosen: dict[tuple, str] = {}


def covered(layer: nn.Module) -> bool:
    """A layer these methods compute: exactly ``nn.Conv2d``, one group, zero padding given as
    numbers."""
    return (type(layer) is nn.Conv2d and layer.groups == 1 and layer.padding_mode == "zeros"
            and not isinstance(layer.padding, str))


def _key(layer: nn.Conv2d, x: Tensor, g: Tensor) -> tuple:
    return (layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
            layer.padding, layer.dilation, tuple(x.shape[1:]), g.shape[0], tuple(g.shape[2:]),
            x.dtype, x.device.type, x.device.index)


def _timed(fn: Callable[[], Tensor], device: torch.device) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()  # warm-up (kernel selection, allocation)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def method_for(layer: nn.Conv2d, x: Tensor, g: Tensor) -> str:
    """The method for this layer configuration: chosen once by timing each on this block."""
    key = _key(layer, x, g)
    if key not in _chosen:  # timed on random values of the same shapes, never on the data's
        gen = torch.Generator(device=x.device).manual_seed(0)
        xs = torch.randn(x.shape, generator=gen, dtype=x.dtype, device=x.device)
        gs = torch.randn(g.shape, generator=gen, dtype=g.dtype, device=g.device)
        times = {name: _timed(lambda f=f: f(layer, xs, gs), x.device)
                 for name, f in METHODS.items()}
        _chosen[key] = min(times, key=times.__getitem__)
    return _chosen[key]


def jacobian_rows(layer: nn.Module, x: Tensor, g: Tensor) -> dict[nn.Parameter, Tensor]:
    """``{param: [rows, d, *param.shape]}``: for each row of the call and each of the ``d``
    output gradients ``g [d, rows, C_out, H', W']``, the gradient of that row's
    ``⟨output, g_k⟩`` w.r.t. the layer's own trainable parameters (a :func:`covered` layer);
    possibly permuted views (the caller copies them where it keeps them)."""
    assert isinstance(layer, nn.Conv2d) and covered(layer)
    x = x.to(g.dtype)
    out: dict[nn.Parameter, Tensor] = {}
    if layer.weight.requires_grad:
        out[layer.weight] = METHODS[method_for(layer, x, g)](layer, x, g)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = g.sum(dim=(3, 4)).transpose(0, 1)
    return out


def conv2d_grad_sample(layer: nn.Module, activations: list[Tensor], backprops: Tensor
                       ) -> dict[nn.Parameter, Tensor]:
    """Per-row gradients ``{param: [rows, *param.shape]}`` of a Conv2d call (the sampler
    interface of Opacus' ``GRAD_SAMPLERS``)."""
    if not covered(layer) or activations[0].shape[0] == 0:
        return compute_conv_grad_sample(layer, activations, backprops)
    return {p: rows[:, 0].contiguous() for p, rows in
            jacobian_rows(layer, activations[0], backprops[None]).items()}


#: The project's own samplers, consulted before Opacus' (``clipping._block_grads``).
SAMPLERS: dict[type, Sampler] = {nn.Conv2d: conv2d_grad_sample}

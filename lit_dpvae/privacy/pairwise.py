"""Per-record latent Gram matrices and the clipped pair decomposition of kernel divergences.

For codes ``z_i = f_θ(x_i) ∈ R^d`` let ``J_i = ∂z_i/∂θ`` (``d × P``). A pair term of a kernel
divergence is ``t = J_iᵀ u`` with a latent vector ``u ∈ R^d``; its norm is

    ‖J_iᵀ u‖² = uᵀ G_i u,      G_i = J_i J_iᵀ  (d × d, the per-record latent Gram),

so all ``n²`` pair norms cost one ``G_i`` per record plus ``n²·d²`` flops, and no per-pair (or
per-record) parameter gradient is ever materialised for Linear layers. ``G_i`` needs the
backprops of the ``d`` code coordinates at each captured layer output: a batched
vector-Jacobian product (``is_grads_batched``), or — when the codes read the network through
Linear heads — a short batched VJP to the heads, ``b·W`` on the heads' non-zero columns and a
product with the derivative of an element-wise activation (``_code_backprops``). Per Linear
layer called once on ``n`` rows, the ghost identity
``⟨b a_iᵀ, b' a_iᵀ⟩ + ⟨b, b'⟩ = (‖a_i‖² + 1)·⟨b, b'⟩`` gives its part of ``G_i``; any other layer
materialises its per-record Jacobian rows with the engine's per-sample samplers (``d`` of them).
Pair norms are clipped with rounding-safe upper bounds (``rounding_safe_quad``). The clipped sum
``Σ_i J_iᵀ ū_i`` is then one local VJP per layer with backprops ``Σ_k ū_ik · b_i^(k)``.
Proofs: docs/privacy.md §8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lit_dpvae.privacy.capture import AttributionError, LayerCall, is_plain_linear, rows_per_record
from lit_dpvae.privacy.clipping import clip_factors, per_record_jacobian
from lit_dpvae.privacy.precision import reduced_fp32_matmul
from lit_dpvae.privacy.terms import PairKernel


@dataclass
class LatentJacobian:
    """What the Gram pass keeps for the final clipped sum: the layer calls upstream of the
    codes (the batched backprops themselves are not kept: ``Σ_k ū_ik b_i^(k)`` is one plain
    backward of ``ū`` from the codes)."""

    calls: list[LayerCall]
    used: list[int]  # indices of the calls upstream of the codes
    codes: Tensor  # [n, d], with its graph (the final clipped sum backpropagates ū through it)
    gram: Tensor  # [n, d, d]
    #: Longest floating-point accumulation behind an entry of ``gram`` (its rounding error is
    #: at most ``γ_terms · Σ_h |B_kh||B_lh|``; ``rounding_safe_quad`` adds it to the margin).
    terms: int = 0
    #: The materialised per-record Jacobian rows ``[n, d, P_p]`` of every parameter of a layer
    #: without the closed form: the released sum through them is formed from these same rows
    #: (``Σ_i Σ_k ū_ik rows_ik``), never from a separate autograd pass that the sampler's rows
    #: might not match (an instance-level ``forward``, a parameter hook).
    rows: dict = field(default_factory=dict)
    #: The parameters ``J_i`` is taken with respect to (None: every trainable parameter of the
    #: calls): the Gram, hence the pair norms, and the clipped sum cover exactly these.
    params: set | None = None

    def covers(self, p: nn.Parameter) -> bool:
        return _covered(p, self.params)


def _covered(p: nn.Parameter, params: set | None) -> bool:
    """A trainable parameter in the subset ``params`` (None: every trainable parameter)."""
    return p.requires_grad and (params is None or p in params)


def _graph_nodes(t: Tensor, stop: frozenset = frozenset()) -> set:
    """The autograd nodes ``t`` depends on (the layers a code is computed from), not looking
    past the nodes in ``stop`` (which are included when reached)."""
    seen: set = set()
    stack = [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node not in stop:
            stack.extend(nxt for nxt, _ in node.next_functions)
    return seen


def _is_linear_on_rows(call: LayerCall) -> bool:
    """A plain Linear layer (``is_plain_linear``: no subclass, reparameterisation, instance
    ``forward`` or hook) applied to one 2-D input: its input backprops are ``b W`` and its part
    of ``G_i`` is the ghost identity. Anything else — a LoRA adapter's low-rank factors, a
    weight-normed weight — takes the per-sample route, since every special case here must hold
    for the layer as called."""
    return (is_plain_linear(call.module) and len(call.activations) == 1
            and call.activations[0].dim() == 2)


def _is_ghost_linear(call: LayerCall, n: int, seen: dict[nn.Parameter, int]) -> bool:
    """A Linear layer called once on ``n`` rows of 2-D input: its part of ``G_i`` is
    ``(‖a_i‖² + 1)·B_iB_iᵀ``."""
    return (
        _is_linear_on_rows(call)
        and all(seen.get(p, 0) <= 1 for p in call.module.parameters(recurse=False))
        and rows_per_record(call, n) == 1
    )


def _scratch(workspace: dict | None, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """An uninitialised contiguous ``shape`` tensor, reusing the workspace's buffer: a fresh
    multi-MB allocation costs more in page faults than the arithmetic done in it."""
    numel = math.prod(shape)
    buf = None if workspace is None else workspace.get("backprops")
    if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
        buf = like.new_empty(numel + numel // 8)  # headroom for Poisson batch sizes
        if workspace is not None:
            workspace["backprops"] = buf
    return buf[:numel].view(shape)


def _linear_input_backprops(call: LayerCall, b: Tensor, workspace: dict | None) -> Tensor:
    """``b [d, n, out] @ W`` for a Linear layer, reading only the output columns that are
    non-zero for some record. A code coordinate usually reads one or two of the head's
    outputs (μ_k and log σ²_k), so this is ``d·n·2·in`` instead of ``d·n·out·in`` flops. The
    sum is the dense one without its exact-zero summands (same value)."""
    weight = call.module.weight
    assert isinstance(weight, Tensor)
    w = weight.detach()
    nonzero = (b != 0).any(1)  # [d, out]; NaN counts as non-zero
    width = int(nonzero.sum(1).max()) if nonzero.numel() else 0
    out = _scratch(workspace, (b.shape[0], b.shape[1], w.shape[1]), b)
    if width == 0:
        return out.zero_()
    if 4 * width > w.shape[0]:
        return torch.matmul(b, w, out=out)
    cols = nonzero.to(torch.int8).topk(width, dim=1).indices  # [d, width]; padding reads zeros
    vals = b.gather(2, cols[:, None, :].expand(-1, b.shape[1], -1))  # [d, n, width]
    rows = w[cols]  # [d, width, in]
    torch.mul(vals[..., 0, None], rows[:, None, 0], out=out)  # beats a k=2 bmm
    for j in range(1, width):
        out.addcmul_(vals[..., j, None], rows[:, None, j])
    return out


#: Autograd nodes of element-wise unary activations: their Jacobian is diagonal, so a batched
#: backprop through one is a product with the derivative (one plain backward of ones).
_ELEMENTWISE = frozenset({
    "ReluBackward0", "LeakyReluBackward0", "EluBackward0", "SiluBackward0", "GeluBackward0",
    "TanhBackward0", "SigmoidBackward0", "SoftplusBackward0", "MishBackward0",
})


def _through_activation(a: Tensor, g: Tensor, calls: list[LayerCall], below: list[int]
                        ) -> tuple[int, Tensor] | None:
    """When ``a = act(output of call j)`` for an element-wise ``act`` and a ``j`` in ``below``:
    ``(j, g · act'(·))``, the batched backprops ``g [d, ...]`` carried to call j's output
    (autograd's values up to rounding; where ``g`` is not finite a product can be NaN where
    autograd's masked ReLU backward gives 0 — such a record then gets clip factor 0). Otherwise
    None."""
    node = a.grad_fn
    if node is None or type(node).__name__ not in _ELEMENTWISE or len(node.next_functions) != 1:
        return None
    nxt, nr = node.next_functions[0]
    for j in below:
        out = calls[j].output
        if out.grad_fn is nxt and out.output_nr == nr and out.shape == a.shape:
            deriv = torch.autograd.grad(a, out, torch.ones_like(a), retain_graph=True)[0]
            return j, g.mul_(deriv)
    return None


def _code_backprops(calls: list[LayerCall], used: list[int], codes: Tensor, n: int,
                    workspace: dict | None = None, allow_fast: bool = True
                    ) -> list[Tensor | None]:
    """The backprops ``b^(k)`` of the ``d`` code coordinates at every used layer output.

    Generic route: one batched VJP from the codes (``is_grads_batched``). Fast route, when the
    codes read the network only through Linear *heads* (layers whose outputs reach the codes
    with no other captured layer in between, and whose inputs do not depend on another head):
    the batched VJP stops at the heads' outputs (a few element-wise ops), the heads' input
    backprops are ``b W`` on the non-zero columns only, and one batched VJP carries them from
    the heads' inputs to the layers below. Both give the same backprops (the chain rule through
    a Linear layer is ``grad_input = grad_output · W``); the test suite compares them."""
    d = codes.shape[1]
    eye = torch.eye(d, dtype=codes.dtype, device=codes.device)[:, None, :].expand(d, n, d)
    backprops: list[Tensor | None] = [None] * len(calls)
    if not used:
        return backprops
    outputs = {calls[i].output.grad_fn: i for i in used}
    reached = _graph_nodes(codes, frozenset(outputs))
    heads = sorted(outputs[node] for node in reached if node in outputs)
    below = [i for i in used if i not in heads]
    # The heads' inputs, each with the heads reading it (in a fixed order: sums are
    # deterministic, which bit-exact resumption and identical replicas rely on).
    inputs: dict[int, tuple[Tensor, list[int]]] = {}
    for i in heads:
        a = calls[i].inputs[0] if calls[i].inputs else None
        if a is not None:
            inputs.setdefault(id(a), (a, []))[1].append(i)
    head_nodes = frozenset(calls[i].output.grad_fn for i in heads)
    fast = (
        allow_fast
        and bool(below)
        and all(_is_linear_on_rows(calls[i]) for i in heads)
        and not any(a.requires_grad and _graph_nodes(a, head_nodes) & head_nodes
                    for a, _ in inputs.values())  # no head feeds another head
    )
    targets = heads if fast else used
    raw = torch.autograd.grad(
        codes, [calls[i].output for i in targets], grad_outputs=eye, is_grads_batched=True,
        retain_graph=True, allow_unused=True,
    )
    for i, b in zip(targets, raw):
        backprops[i] = None if b is None else b.detach()
    if not fast:
        return backprops
    acts, grads_in = [], []
    for a, members in inputs.values():
        if not a.requires_grad:
            continue  # a head on the data: nothing below it
        scratch = workspace if len(inputs) == 1 and len(members) == 1 else None
        parts = [_linear_input_backprops(calls[i], bp, scratch) for i in members
                 if (bp := backprops[i]) is not None]
        if parts:
            acts.append(a)
            grads_in.append(parts[0] if len(parts) == 1 else torch.stack(parts).sum(0))
    if not acts:
        return backprops
    if len(acts) == 1 and (hop := _through_activation(acts[0], grads_in[0], calls, below)):
        j, backprops[j] = hop  # every route to the layers below passes through call j
        acts, grads_in = [calls[j].output], [hop[1]]
        below = [i for i in below if i != j]
        if not below:
            return backprops
    raw = torch.autograd.grad(
        acts, [calls[i].output for i in below], grad_outputs=grads_in, is_grads_batched=True,
        retain_graph=True, allow_unused=True,
    )
    for i, b in zip(below, raw):
        backprops[i] = None if b is None else b.detach()
    return backprops


def latent_jacobian(calls: list[LayerCall], codes: Tensor, n: int,
                    workspace: dict | None = None, params: set | None = None
                    ) -> LatentJacobian:
    """Per-record latent Gram ``G_i = J_i J_iᵀ`` of ``codes [n, d]`` w.r.t. the trainable
    parameters of the captured layer ``calls`` (the graph is kept), or only those of them in
    ``params`` (a mechanism's parameter subset: the pair norms are then norms in that
    subspace). ``workspace``: a dict the caller keeps between steps, for reusable scratch
    memory (its contents are overwritten)."""
    d = codes.shape[1]
    upstream = _graph_nodes(codes)
    used = [i for i, c in enumerate(calls) if c.output.grad_fn in upstream]
    seen: dict[nn.Parameter, int] = {}
    for i in used:
        for p in calls[i].module.parameters(recurse=False):
            seen[p] = seen.get(p, 0) + 1
    backprops = _code_backprops(calls, used, codes, n, workspace)
    dtype = gram_dtype(codes.dtype)
    # The Gram is accumulated in float64 (cast to ``dtype`` at the end): its ghost part is a
    # product of separately formed factors (‖a_i‖² + 1)·B_iB_iᵀ, and in float32 a factor can
    # underflow to 0 (inputs of 1e-23, backprops of 1e-30) while the released product
    # J_iᵀu through that layer does not — the pair norm would then be 0 and the pair unclipped.
    acc = torch.float64
    gram = codes.new_zeros(n, d, d, dtype=acc)
    terms = 0
    materialised: dict[nn.Parameter, Tensor] = {}
    for call, b in zip(calls, backprops):
        if b is None:
            continue
        own = [p for p in call.module.parameters(recurse=False) if _covered(p, params)]
        if not own:
            continue
        if _is_ghost_linear(call, n, seen) and all(
                _covered(p, params) for p in call.module.parameters(recurse=False)
                if p.requires_grad):
            acts = call.activations
            coef = torch.zeros(n, dtype=acc, device=gram.device)
            if call.module.weight.requires_grad:
                coef = coef + acts[0].to(acc).pow(2).sum(1)
            if call.module.bias is not None and call.module.bias.requires_grad:
                coef = coef + 1.0
            bb = b.reshape(d, n, -1).transpose(0, 1)  # [n, d, out]
            gram = gram + _scaled_gram(bb, coef)
            terms += bb.shape[-1] + acts[0].shape[1] + 4
            continue
        for p, rows in per_record_jacobian(call, b, n, own).items():  # [n, d, P_p]
            materialised[p] = materialised[p] + rows if p in materialised else rows
    for rows in materialised.values():
        gram = gram + _scaled_gram(rows, torch.ones(n, dtype=acc, device=rows.device))
        terms += rows.shape[-1] + 2
    used = [i for i, b in enumerate(backprops) if b is not None]
    # The float64 accumulation's rounding is far below the margin counted for ``dtype``.
    return LatentJacobian(calls, used, codes, gram.to(dtype), terms + len(materialised),
                          materialised, params)


def _scaled_gram(rows: Tensor, coef: Tensor) -> Tensor:
    """``coef_i · R_i R_iᵀ`` ``[n, d, d]`` in float64 for rows ``R [n, d, P]``, scaled back in
    float64 with ``coef`` (which may lie far outside float32's range, e.g. ``‖a_i‖²`` of inputs
    of 1e-23). The product is taken in the rows' dtype; a record whose diagonal ``Σ_h R_kh²``
    leaves ``[1e-20, 1e30]`` (squares that may have underflowed to 0 or overflowed) is
    recomputed on its rows divided by their largest entry, where no square under- or
    overflows, and scaled back in float64 too."""
    prod = torch.bmm(rows, rows.transpose(1, 2))
    diag = prod.diagonal(dim1=1, dim2=2)
    ok = (torch.isfinite(diag) & (diag > 1e-20) & (diag < 1e30)).all(1)
    out = coef.to(torch.float64)[:, None, None] * prod.to(torch.float64)
    if bool(ok.all()):
        return out
    bad = (~ok).nonzero()[:, 0]
    sub = rows.detach()[bad]
    low, high = torch.aminmax(sub.reshape(sub.shape[0], -1), dim=1)
    scale = torch.maximum(high, -low)  # max |entry| per record
    finite = torch.isfinite(scale)
    safe = torch.where((scale > 0) & finite, scale, torch.ones_like(scale))
    unit = rows[bad] / safe[:, None, None]
    redo = torch.bmm(unit, unit.transpose(1, 2)).to(torch.float64)
    factor = coef[bad].to(torch.float64) * safe.to(torch.float64) ** 2
    factor = torch.where(finite, factor, torch.full_like(factor, math.inf))
    out[bad] = factor[:, None, None] * redo
    return out


def owner_vectors(
    codes: Tensor,
    prior_samples: Tensor,
    kernel: PairKernel,
    weight: float,
    gram: Tensor,
    max_norm: float,
    partners: Tensor | None = None,
    offset: int = 0,
    gram_terms: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Clipped aggregated latent vectors ``ū_i`` of one kernel divergence (n ≥ 2).

    ``ū_i = (2/(n−1)) Σ_{j≠i} a_ij u_ij − 2 c_i v_i`` with ``u_ij = λ∇₁k(z_i, z_j)``,
    ``v_i = λ (1/M) Σ_m ∇₁k(z_i, w_m)``, ``a_ij``/``c_i`` the clip factors of ``J_iᵀu_ij`` and
    ``J_iᵀv_i`` to ``max_norm`` (0 on the diagonal and for non-finite norms; a zero factor
    contributes exactly zero). Returns ``(ū [n, d], pair norms [n, N], prior norms [n])`` in
    the Gram's dtype. ``gram_terms``: ``LatentJacobian.terms`` (the Gram's rounding).

    Multi-process: the owners are this rank's ``codes`` and the partners are the *global*
    codes ``partners [N, d]`` (all ranks, no gradient), in which this rank's rows start at
    ``offset``; ``n − 1`` above is then ``N − 1``. The sum over all ranks' owners is the
    single-process statistic of the global batch.
    """
    dtype = gram.dtype
    z = codes.detach().to(dtype)
    zz = z if partners is None else partners.detach().to(dtype)
    w = prior_samples.detach().to(dtype)
    self_pairs = _self_pair_mask(z.shape[0], zz.shape[0], offset, z.device)
    n, d = zz.shape
    trace = gram.diagonal(dim1=1, dim2=2).sum(-1)  # tr G_i, [n]
    if kernel.radial:
        phi, quad = radial_pair_quads(z, zz, w, kernel, weight, gram, trace, gram_terms)
        pair_norms = quad.sqrt_().mul_(phi.abs())
        a = clip_factors(pair_norms, max_norm).masked_fill_(self_pairs, 0.0)
        coef = torch.where(a > 0, a.mul_(phi), 0.0)  # [n, N]; exact zeros where a = 0
        finite = torch.isfinite(zz).all(1, keepdim=True)
        zz_safe = torch.where(finite, zz, torch.zeros_like(zz))  # coef is 0 where not finite
        z_safe = torch.where(torch.isfinite(z).all(1, keepdim=True), z, torch.zeros_like(z))
        partner = weighted_differences(coef, z_safe, zz_safe).to(dtype)
        phi_w = weight * kernel.pair_scale(torch.cdist(z, w).pow(2), d)  # [n, M]
        v = phi_w.mean(1, keepdim=True) * z - phi_w @ w / w.shape[0]  # λ (1/M) Σ_m ∇₁k(z_i, w_m)
    else:  # owners in row blocks: [rows, N, d] pair and [rows, M, d] prior vectors ≤ _PAIR_BLOCK
        rows = max(1, _PAIR_BLOCK // max(1, n * d))
        pair_norms = z.new_empty(z.shape[0], n)
        partner = torch.empty_like(z)
        for lo in range(0, z.shape[0], rows):
            hi = min(lo + rows, z.shape[0])
            u = weight * kernel.pair_grad(z[lo:hi, None, :], zz[None, :, :])  # [rows, N, d]
            quad = (torch.bmm(u, gram[lo:hi]) * u).sum(-1)  # uᵀ G_i u
            norms = rounding_safe_quad(quad, u.pow(2).sum(-1), trace[lo:hi, None],
                                       2 * d + 2 + gram_terms).sqrt()
            a = clip_factors(norms, max_norm).masked_fill(self_pairs[lo:hi], 0.0)
            partner[lo:hi] = torch.where((a > 0)[..., None], a[..., None].double() * u.double(),
                                         0.0).sum(1).to(dtype)  # float64 sum: see below
            pair_norms[lo:hi] = norms
        v = torch.empty_like(z)
        rows = max(1, _PAIR_BLOCK // max(1, w.shape[0] * d))
        for lo in range(0, z.shape[0], rows):  # λ (1/M) Σ_m ∇₁k(z_i, w_m), [rows, M, d] a block
            v[lo:lo + rows] = weight * kernel.pair_grad(z[lo:lo + rows, None, :],
                                                        w[None, :, :]).mean(1)
    prior_quad = (torch.bmm(gram, v[:, :, None])[..., 0] * v).sum(-1)
    prior_norms = rounding_safe_quad(prior_quad, v.pow(2).sum(-1), trace,
                                     2 * d + 2 + gram_terms).sqrt()
    c = clip_factors(prior_norms, max_norm)
    prior = torch.where((c > 0)[:, None], c[:, None] * v, torch.zeros_like(v))
    return 2.0 / (n - 1) * partner - 2.0 * prior, pair_norms, prior_norms


# Elements of one block of non-radial pair vectors ``[rows, N, d]`` (2^22: 32 MB in float64).
_PAIR_BLOCK = 1 << 22


def weighted_differences(coef: Tensor, z: Tensor, zz: Tensor) -> Tensor:
    """``Σ_j c_ij (z_i − z_j)`` ``[n, d]`` (float64) for ``coef [n, N]``, ``z [n, d]``,
    ``zz [N, d]``, formed from the differences themselves, a block of owners at a time.

    The released pair vector is ``c_ij·(z_i − z_j)``: its norm bound (the quadratic form of
    ``D_ij = z_i − z_j``) is the bound of *this* vector. The algebraically equal
    ``(Σ_j c_ij) z_i − Σ_j c_ij z_j`` cancels: its error scales with ``‖z‖·Σ_j|c_ij|``, not
    with ``‖D_ij‖``, and for float32-identical codes (duplicates, collapsed variances, large
    means) the residue is aligned across owners and grows with n. Here a pair of identical
    codes contributes exactly 0, each difference of two float32 values is exact or within one
    float64 rounding, and the sum over partners is accumulated in float64 (docs/privacy.md §8,
    *Floating point*)."""
    n, d = z.shape
    z64, zz64, c64 = z.double(), zz.double(), coef.double()
    out = z64.new_empty(n, d)
    rows = max(1, _PAIR_BLOCK // max(1, zz.shape[0] * d))
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        diff = z64[lo:hi, None, :] - zz64[None, :, :]  # [rows, N, d]
        out[lo:hi] = torch.bmm(c64[lo:hi, None, :], diff)[:, 0]
    return out


def radial_pair_quads(z: Tensor, zz: Tensor, w: Tensor, kernel: PairKernel, weight: float,
                       gram: Tensor, trace: Tensor, gram_terms: int) -> tuple[Tensor, Tensor]:
    """For a radial kernel, ``∇₁k(a, b) = φ(‖a−b‖²)·(a − b)`` (``kernel.pair_scale``):
    ``(λφ_ij [n, N], an upper bound of D_ijᵀG_iD_ij [n, N])`` with ``D_ij = z_i − z_j``.

    No ``[n, N, d]`` tensor is formed: ``D_ijᵀG_iD_ij = z_iᵀG_iz_i − 2(G_iz_i)·z_j +
    vec(G_i)·vec(z_jz_jᵀ)`` is three matrix products (the last ``[n, d²] @ [d², N]``). The
    expansion cancels — its error scales with ``(‖z_i‖ + ‖z_j‖)²``, not ``‖D_ij‖²`` — so it is
    evaluated in float64 from the exact float64 images of ``z`` and ``G`` and bounded by
    ``rounding_safe_quad``'s margin with that scale; the Gram's own rounding (in its dtype)
    is bounded with an upper bound of ``‖D_ij‖²`` (docs/privacy.md §8). ``[n, N]`` work is
    done in place: at large batches it is memory-bound."""
    n, d = z.shape
    z64, zz64, g64 = z.double(), zz.double(), gram.double()
    sq_z, sq_zz = z64.pow(2).sum(1, keepdim=True), zz64.pow(2).sum(1)[None, :]
    sq_dist = torch.addmm(sq_z + sq_zz, z64, zz64.T, alpha=-2.0).clamp_min_(0)  # ‖D_ij‖²
    # φ only needs r² (its rounding moves the gradient, never the clipping: the norms use
    # the bound below with this same φ). Non-finite codes get r² = ∞.
    finite = torch.isfinite(z).all(1)[:, None] & torch.isfinite(zz).all(1)[None, :]
    phi = weight * kernel.pair_scale(sq_dist.to(z.dtype).masked_fill_(~finite, math.inf), d)
    gz = torch.bmm(g64, z64[:, :, None])[:, :, 0]  # G_i z_i
    outer = (zz64[:, :, None] * zz64[:, None, :]).reshape(zz.shape[0], d * d)  # vec(z_j z_jᵀ)
    quad = torch.addmm((gz * z64).sum(1, keepdim=True), gz, zz64.T, alpha=-2.0)
    quad.addmm_(g64.reshape(n, d * d), outer.T).clamp_min_(0)
    # margin = tr G_i · (γ_form·scale + γ_gram·(‖D‖² + γ_dist·scale)), scale = (‖z_i‖+‖z_j‖)²
    g_form = _margin(d * d + 2 * d + 8, torch.float64)
    g_dist = _margin(d + 4, torch.float64)
    g_gram = _margin(gram_terms, gram.dtype)
    margin = (sq_z.sqrt() + sq_zz.sqrt()).square_().mul_(g_form + g_gram * g_dist)
    margin.add_(sq_dist, alpha=g_gram).mul_(trace.double()[:, None])
    return phi, quad.add_(margin).to(z.dtype)


def gram_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype for the Gram and quadratic-form products: float32 inputs go to float64 when
    float32 matmuls may round their inputs (``reduced_fp32_matmul``: TF32/bf16 — which
    Lightning recommends on tensor-core GPUs — would make the rounding margin below useless;
    float64 products of float32 values are not affected by that setting)."""
    if dtype == torch.float32 and reduced_fp32_matmul():
        return torch.float64
    return dtype


def rounding_safe_quad(quad: Tensor, scale: Tensor, trace: Tensor | float, terms: int) -> Tensor:
    """An upper bound of the exact quadratic form from its floating-point value ``quad``.

    For a PSD ``G`` the rounding error of a quadratic form evaluated with at most ``terms``
    rounded operations per summand chain is at most ``γ Σ_kl |u_k||G_kl||v_l|``, and
    ``Σ_kl |u_k||G_kl||v_l| ≤ (Σ_k |u_k| √G_kk)(Σ_l |v_l| √G_ll) ≤ ‖u‖‖v‖ tr G``
    (``|G_kl| ≤ √(G_kk G_ll)``, then Cauchy–Schwarz), with ``γ = mε/(1 − mε)``. ``scale``
    bounds the products of norms involved (``‖u‖²`` for ``uᵀGu``; ``(‖z_i‖ + ‖z_j‖)²`` for
    the expanded form of ``(z_i − z_j)ᵀG(z_i − z_j)``) and ``terms`` counts the Gram's own
    accumulation (``LatentJacobian.terms``) plus the form's. The margin is doubled for its own
    rounding and for the computed Gram being PSD only up to rounding. Adding it keeps a pair
    term whose direction is almost in the null space of ``G_i`` from being under-clipped by
    cancellation (docs/privacy.md §8).
    """
    return quad.clamp_min(0) + _margin(terms, quad.dtype) * scale * trace


def _margin(terms: int, dtype: torch.dtype) -> float:
    """``2γ`` with ``γ = mε/(1 − mε)``, ``m = terms`` (see ``rounding_safe_quad``)."""
    m = terms * torch.finfo(dtype).eps
    if m >= 0.5:
        raise ValueError(
            f"a rounding margin for {terms} accumulated {dtype} operations is not meaningful "
            "(mε ≥ 1/2): use float64 for this model"
        )
    return 2.0 * m / (1.0 - m)


def _self_pair_mask(n_owners: int, n_partners: int, offset: int, device) -> Tensor:
    """``[n, N]`` True where owner i meets itself (partner ``offset + i``)."""
    mask = torch.zeros(n_owners, n_partners, dtype=torch.bool, device=device)
    idx = torch.arange(n_owners, device=device)
    mask[idx, idx + offset] = True
    return mask


def clipped_owner_sum(
    jac: LatentJacobian, owner: Tensor, params: dict[str, nn.Parameter], n: int
) -> dict[str, Tensor]:
    """``Σ_i J_iᵀ ū_i`` per parameter: one backward of ``ū`` from the codes to the layer
    outputs (by linearity its row i is ``Σ_k ū_ik b_i^(k)``), then one local VJP per layer;
    records with ``ū_i = 0`` contribute exactly zero (their backprop rows are zeroed, even
    where a dropped record's rows are not finite)."""
    out = {name: torch.zeros_like(p) for name, p in params.items()}
    by_param = {p: name for name, p in params.items()}
    keep = (owner != 0).any(1)
    keep_all = bool(keep.all())
    for p, rows in jac.rows.items():  # Σ_i Σ_k ū_ik rows_ik, from the rows the Gram used
        if p not in by_param:
            raise AttributionError(f"parameter of shape {tuple(p.shape)} is not trainable")
        r = rows if keep_all else torch.where(keep[:, None, None], rows, torch.zeros_like(rows))
        u = owner.to(r.dtype)
        out[by_param[p]] += (u.reshape(1, -1) @ r.reshape(u.numel(), -1)).reshape(
            p.shape).to(p.dtype)
    calls = []
    for i in jac.used:
        call = jac.calls[i]
        own = [p for p in call.module.parameters(recurse=False)
               if jac.covers(p) and p not in jac.rows]
        if own:
            calls.append((call, own))
    if not calls:
        return out
    codes = jac.codes
    bps = torch.autograd.grad(
        codes, [call.output for call, _ in calls], grad_outputs=owner.to(codes.dtype),
        retain_graph=True, allow_unused=True,
    )
    for (call, own), bp in zip(calls, bps):
        if bp is None:
            continue
        m = bp.shape[0] // n
        if not keep_all:
            rows_keep = keep.repeat_interleave(m).view(-1, *([1] * (bp.dim() - 1)))
            bp = torch.where(rows_keep, bp, torch.zeros_like(bp))
        grads = torch.autograd.grad(call.output, own, grad_outputs=bp, retain_graph=True)
        for p, g in zip(own, grads):
            if p not in by_param:
                raise AttributionError(f"parameter of {type(call.module).__name__} not trainable")
            out[by_param[p]] += g
    return out

"""Per-record latent Gram matrices and the clipped pair decomposition of kernel divergences.

For codes ``z_i = f_θ(x_i) ∈ R^d`` let ``J_i = ∂z_i/∂θ`` (``d × P``). A pair term of a kernel
divergence is ``t = J_iᵀ u`` with a latent vector ``u ∈ R^d``; its norm is

    ‖J_iᵀ u‖² = uᵀ G_i u,      G_i = J_i J_iᵀ  (d × d, the per-record latent Gram),

so all ``n²`` pair norms cost one ``G_i`` per record plus ``n²·d²`` flops, and no per-pair (or
per-record) parameter gradient is ever materialised for Linear layers. ``G_i`` comes from ``d``
batched vector-Jacobian products to the captured layer outputs (``is_grads_batched``) and, per
Linear layer called once on ``n`` rows, the ghost identity
``⟨b a_iᵀ, b' a_iᵀ⟩ + ⟨b, b'⟩ = (‖a_i‖² + 1)·⟨b, b'⟩``; any other layer materialises its
per-record Jacobian rows with the engine's per-sample samplers (``d`` of them). The clipped sum
``Σ_i J_iᵀ ū_i`` is then one local VJP per layer with backprops ``Σ_k ū_ik · b_i^(k)``.
Proofs: docs/privacy.md §8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lit_dpvae.privacy.grad_sample import (
    AttributionError,
    _Call,
    _per_sample_grads,
    _rows_per_record,
    clip_factors,
)


@dataclass
class LatentJacobian:
    """What the Gram pass keeps for the final clipped sum: the layer calls upstream of the
    codes (the batched backprops themselves are not kept: ``Σ_k ū_ik b_i^(k)`` is one plain
    backward of ``ū`` from the codes)."""

    calls: list[_Call]
    used: list[int]  # indices of the calls upstream of the codes
    codes: Tensor  # [n, d], with its graph (the final clipped sum backpropagates ū through it)
    gram: Tensor  # [n, d, d]


def _graph_nodes(t: Tensor) -> set:
    """The autograd nodes ``t`` depends on (the layers a code is computed from)."""
    seen: set = set()
    stack = [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(nxt for nxt, _ in node.next_functions)
    return seen


def latent_jacobian(calls: list[_Call], codes: Tensor, n: int) -> LatentJacobian:
    """Per-record latent Gram ``G_i = J_i J_iᵀ`` of ``codes [n, d]`` w.r.t. the trainable
    parameters of the captured layer ``calls`` (the graph is kept)."""
    d = codes.shape[1]
    upstream = _graph_nodes(codes)
    used = [i for i, c in enumerate(calls) if c.output.grad_fn in upstream]
    grad_out = torch.eye(d, dtype=codes.dtype, device=codes.device)[:, None, :].expand(d, n, d)
    raw = torch.autograd.grad(
        codes, [calls[i].output for i in used], grad_outputs=grad_out, is_grads_batched=True,
        retain_graph=True, allow_unused=True,
    ) if used else []
    backprops: list[Tensor | None] = [None] * len(calls)
    b: Tensor | None
    for i, b in zip(used, raw):
        backprops[i] = None if b is None else b.detach()
    seen: dict[nn.Parameter, int] = {}
    for call, b in zip(calls, backprops):
        if b is not None:
            for p in call.module.parameters(recurse=False):
                seen[p] = seen.get(p, 0) + 1
    gram = codes.new_zeros(n, d, d)
    materialised: dict[nn.Parameter, Tensor] = {}
    for call, b in zip(calls, backprops):
        if b is None:
            continue
        own = [p for p in call.module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        acts = call.activations
        if (
            isinstance(call.module, nn.Linear)
            and all(seen[p] == 1 for p in own)
            and _rows_per_record(call, n) == 1
            and len(acts) == 1
            and acts[0].dim() == 2
        ):
            coef = torch.zeros(n, dtype=gram.dtype, device=gram.device)
            if call.module.weight.requires_grad:
                coef = coef + acts[0].pow(2).sum(1)
            if call.module.bias is not None and call.module.bias.requires_grad:
                coef = coef + 1.0
            bb = b.reshape(d, n, -1).transpose(0, 1)  # [n, d, out]
            gram = gram + coef[:, None, None] * torch.bmm(bb, bb.transpose(1, 2))
            continue
        per_k = [_per_sample_grads(call, b[k], n, functorch=False) for k in range(d)]
        for p in own:
            rows = torch.stack([g[p].reshape(n, -1) for g in per_k], 1)  # [n, d, P_p]
            materialised[p] = materialised[p] + rows if p in materialised else rows
    for rows in materialised.values():
        gram = gram + torch.bmm(rows, rows.transpose(1, 2))
    used = [i for i, b in enumerate(backprops) if b is not None]
    return LatentJacobian(calls, used, codes, gram)


def owner_vectors(
    codes: Tensor,
    prior_samples: Tensor,
    kernel,
    weight: float,
    gram: Tensor,
    max_norm: float,
    partners: Tensor | None = None,
    offset: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Clipped aggregated latent vectors ``ū_i`` of one kernel divergence (n ≥ 2).

    ``ū_i = (2/(n−1)) Σ_{j≠i} a_ij u_ij − 2 c_i v_i`` with ``u_ij = λ∇₁k(z_i, z_j)``,
    ``v_i = λ (1/M) Σ_m ∇₁k(z_i, w_m)``, ``a_ij``/``c_i`` the clip factors of ``J_iᵀu_ij`` and
    ``J_iᵀv_i`` to ``max_norm`` (0 on the diagonal and for non-finite norms; a zero factor
    contributes exactly zero). Returns ``(ū [n, d], pair norms [n, N], prior norms [n])``.

    Multi-process: the owners are this rank's ``codes`` and the partners are the *global*
    codes ``partners [N, d]`` (all ranks, no gradient), in which this rank's rows start at
    ``offset``; ``n − 1`` above is then ``N − 1``. The sum over all ranks' owners is the
    single-process statistic of the global batch.
    """
    z = codes.detach()
    zz = z if partners is None else partners.detach()
    self_pairs = _self_pair_mask(z.shape[0], zz.shape[0], offset, z.device)
    if getattr(kernel, "radial", False):
        return _radial_owner_vectors(z, zz, self_pairs, prior_samples.detach(), kernel, weight,
                                     gram, max_norm)
    n, d = zz.shape
    trace = gram.diagonal(dim1=1, dim2=2).sum(-1)  # tr G_i, [n]
    u = weight * kernel.pair_grad(z[:, None, :], zz[None, :, :])  # [n, N, d]
    quad = (torch.bmm(u, gram) * u).sum(-1)  # uᵀ G_i u
    pair_norms = rounding_safe_quad(quad, u.pow(2).sum(-1), trace[:, None], d).sqrt()
    a = clip_factors(pair_norms, max_norm)
    a = a.masked_fill(self_pairs, 0.0)
    partner = torch.where((a > 0)[..., None], a[..., None] * u, torch.zeros_like(u)).sum(1)
    v = weight * kernel.pair_grad(z[:, None, :], prior_samples.detach()[None, :, :]).mean(1)
    prior_quad = (torch.bmm(gram, v[:, :, None])[..., 0] * v).sum(-1)
    prior_norms = rounding_safe_quad(prior_quad, v.pow(2).sum(-1), trace, d).sqrt()
    c = clip_factors(prior_norms, max_norm)
    prior = torch.where((c > 0)[:, None], c[:, None] * v, torch.zeros_like(v))
    return 2.0 / (n - 1) * partner - 2.0 * prior, pair_norms, prior_norms


def rounding_safe_quad(quad: Tensor, sq_len: Tensor, trace: Tensor, d: int) -> Tensor:
    """An upper bound of the exact ``uᵀGu`` from its floating-point value.

    For PSD ``G`` the rounding error of ``Σ_kl u_k G_kl u_l`` is at most
    ``γ Σ_kl |u_k||G_kl||u_l| ≤ γ (Σ_k |u_k| √G_kk)² ≤ γ ‖u‖² tr G`` with
    ``γ = (2d+1)ε/(1−(2d+1)ε)`` (``|G_kl| ≤ √(G_kk G_ll)``, then Cauchy–Schwarz). Adding that
    much keeps a pair term whose direction is almost in the null space of ``G_i`` from being
    under-clipped by cancellation (docs/privacy.md §8).
    """
    eps = torch.finfo(quad.dtype).eps
    gamma = (2 * d + 2) * eps
    return quad.clamp_min(0) + gamma * sq_len * trace


#: Owner rows per block of the ``[rows, N, d]`` pair differences (keeps them in cache).
_CHUNK = 64


def _self_pair_mask(n_owners: int, n_partners: int, offset: int, device) -> Tensor:
    """``[n, N]`` True where owner i meets itself (partner ``offset + i``)."""
    mask = torch.zeros(n_owners, n_partners, dtype=torch.bool, device=device)
    idx = torch.arange(n_owners, device=device)
    mask[idx, idx + offset] = True
    return mask


def _radial_owner_vectors(
    z: Tensor, zz: Tensor, self_pairs: Tensor, w: Tensor, kernel, weight: float, gram: Tensor,
    max_norm: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """``owner_vectors`` for a radial kernel, ``∇₁k(a, b) = φ(‖a−b‖²)·(a − b)``
    (``kernel.pair_scale``): no ``[n, n, d]`` pair-gradient tensor, sums as ``[n, n] @ [n, d]``.

    Pair norms use the exact differences ``D_ij = z_i − z_j`` (no ``‖z‖²`` expansion, whose
    cancellation could under-estimate a norm and break the clipping bound)."""
    d = z.shape[1]
    n = zz.shape[0]
    finite = torch.isfinite(z).all(1, keepdim=True)
    finite_p = torch.isfinite(zz).all(1, keepdim=True)
    z_safe = torch.where(finite, z, torch.zeros_like(z))  # coef is 0 wherever z is not finite
    zz_safe = torch.where(finite_p, zz, torch.zeros_like(zz))
    # φ only needs r² (its rounding moves the gradient, never the clipping: norms use diff).
    r2 = torch.cdist(z_safe, zz_safe).pow(2).masked_fill(~finite_p[:, 0][None, :], math.inf)
    phi = weight * kernel.pair_scale(r2.masked_fill(~finite, math.inf), d)  # [n, N]
    trace = gram.diagonal(dim1=1, dim2=2).sum(-1)  # tr G_i, [n]
    quad = z.new_empty(z.shape[0], n)  # D_ijᵀ G_i D_ij, D_ij = z_i − z_j, in cache-sized blocks
    for s in range(0, z.shape[0], _CHUNK):
        diff = z[s:s + _CHUNK, None, :] - zz[None, :, :]  # [chunk, N, d]
        block = (torch.bmm(diff, gram[s:s + _CHUNK]) * diff).sum(-1)
        quad[s:s + _CHUNK] = rounding_safe_quad(block, diff.pow(2).sum(-1),
                                                trace[s:s + _CHUNK, None], d)
    pair_norms = phi.abs() * quad.sqrt()
    a = clip_factors(pair_norms, max_norm)
    a = a.masked_fill(self_pairs, 0.0)
    coef = torch.where(a > 0, a * phi, torch.zeros_like(a))  # [n, N]
    partner = coef.sum(1, keepdim=True) * z_safe - coef @ zz_safe
    phi_w = weight * kernel.pair_scale(torch.cdist(z, w).pow(2), d)  # [n, M]
    v = phi_w.mean(1, keepdim=True) * z - phi_w @ w / w.shape[0]  # λ (1/M) Σ_m ∇₁k(z_i, w_m)
    prior_quad = (torch.bmm(gram, v[:, :, None])[..., 0] * v).sum(-1)
    prior_norms = rounding_safe_quad(prior_quad, v.pow(2).sum(-1), trace, d).sqrt()
    c = clip_factors(prior_norms, max_norm)
    prior = torch.where((c > 0)[:, None], c[:, None] * v, torch.zeros_like(v))
    return 2.0 / (n - 1) * partner - 2.0 * prior, pair_norms, prior_norms


def clipped_owner_sum(
    jac: LatentJacobian, owner: Tensor, params: dict[str, nn.Parameter], n: int
) -> dict[str, Tensor]:
    """``Σ_i J_iᵀ ū_i`` per parameter: one backward of ``ū`` from the codes to the layer
    outputs (by linearity its row i is ``Σ_k ū_ik b_i^(k)``), then one local VJP per layer;
    records with ``ū_i = 0`` contribute exactly zero (their backprop rows are zeroed, even
    where a dropped record's rows are not finite)."""
    out = {name: torch.zeros_like(p) for name, p in params.items()}
    by_param = {p: name for name, p in params.items()}
    calls = []
    for i in jac.used:
        call = jac.calls[i]
        own = [p for p in call.module.parameters(recurse=False) if p.requires_grad]
        if own:
            calls.append((call, own))
    if not calls:
        return out
    keep = (owner != 0).any(1)
    keep_all = bool(keep.all())
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

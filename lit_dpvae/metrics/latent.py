"""Latent-space quality metrics: sparsity (SparseVAE) and clustering (ClusterVAE).

These are evaluation metrics on released models; they read whatever data they are given and are
not part of any private computation.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.metrics import normalized_mutual_info_score
from torch import Tensor


def hoyer_sparsity(z: Tensor, standardise: bool = False, eps: float = 1e-12) -> float:
    """Mean Hoyer sparsity of codes ``z [n, d]``: (√d − ‖z_i‖₁/‖z_i‖₂) / (√d − 1), averaged.

    1 for a one-hot code, 0 for a constant-magnitude code. ``standardise=True`` first divides each
    dimension by its standard deviation over the codes (Mathieu et al. 2019), so that collapsed
    dimensions do not count as sparsity. Codes that are exactly 0 are skipped. Needs d ≥ 2.
    Reference: Hoyer, JMLR 2004; Mathieu et al., arXiv 1812.02833.
    """
    z = z.detach().double().flatten(1)
    d = z.shape[1]
    if d < 2:
        raise ValueError("Hoyer sparsity needs at least 2 latent dimensions")
    if standardise:
        z = z / z.std(0, unbiased=False).clamp_min(eps)
    l1, l2 = z.abs().sum(1), z.norm(dim=1)
    keep = l2 > eps
    if not bool(keep.any()):
        return float("nan")
    sqrt_d = math.sqrt(d)
    return float(((sqrt_d - l1[keep] / l2[keep]) / (sqrt_d - 1)).mean())


def _np(a: Tensor | np.ndarray) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, Tensor) else np.asarray(a)


def cluster_purity(labels: Tensor | np.ndarray, clusters: Tensor | np.ndarray) -> float:
    """Purity: Σ_c max_y |{i : cluster_i = c, label_i = y}| / n (1 = every cluster pure)."""
    lab, clu = _np(labels).ravel(), _np(clusters).ravel()
    if lab.shape != clu.shape:
        raise ValueError("labels and clusters must have the same length")
    if lab.size == 0:
        return float("nan")
    total = 0
    for c in np.unique(clu):
        total += np.bincount(lab[clu == c]).max()
    return float(total / lab.size)


def nmi(labels: Tensor | np.ndarray, clusters: Tensor | np.ndarray) -> float:
    """Normalised mutual information between labels and cluster ids (scikit-learn, arithmetic)."""
    return float(normalized_mutual_info_score(_np(labels).ravel(), _np(clusters).ravel()))


def assign_clusters(z: Tensor, prior: torch.nn.Module) -> Tensor:
    """Cluster of each code: the mixture component of highest responsibility, ``[n, d] -> [n]``."""
    assign = getattr(prior, "assign", None)
    if not callable(assign):
        raise TypeError(f"{type(prior).__name__} has no mixture components to assign codes to")
    return assign(z.detach())

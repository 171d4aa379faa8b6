"""Evaluation metrics."""

from lit_dpvae.metrics.latent import assign_clusters, cluster_purity, hoyer_sparsity, nmi

__all__ = ["assign_clusters", "cluster_purity", "hoyer_sparsity", "nmi"]

"""Evaluation metrics."""

from lit_dpvae.metrics.generative import (
    CLASSIFIER_HPARAMS,
    FeatureExtractor,
    FeatureNet,
    balanced_samples,
    downstream_accuracy,
    elbo_metrics,
    extract_features,
    feature_extractor,
    fid_kid,
    latent_dim_mmd,
    latent_mmd,
    posterior_means,
    prdc,
)
from lit_dpvae.metrics.latent import assign_clusters, cluster_purity, hoyer_sparsity, nmi

__all__ = [
    "CLASSIFIER_HPARAMS",
    "FeatureExtractor",
    "FeatureNet",
    "assign_clusters",
    "balanced_samples",
    "cluster_purity",
    "downstream_accuracy",
    "feature_extractor",
    "fid_kid",
    "hoyer_sparsity",
    "latent_dim_mmd",
    "latent_mmd",
    "nmi",
    "posterior_means",
    "prdc",
    "elbo_metrics",
    "extract_features",
]

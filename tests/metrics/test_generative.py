"""Metrics on known cases: identical sets, disjoint sets, one-hot codes, perfect clusterings."""

from __future__ import annotations

import math

import pytest
import torch

from lit_dpvae.metrics import (
    FeatureExtractor,
    FeatureNet,
    balanced_samples,
    downstream_accuracy,
    elbo_metrics,
    feature_extractor,
    fid_kid,
    hoyer_sparsity,
    latent_mmd,
    nmi,
    posterior_means,
    prdc,
)
from lit_dpvae.priors import StandardNormal

FAST = {"steps": 150}


class Identity(torch.nn.Module):
    """Feature 'network' that flattens images, so feature sets are known exactly."""

    num_features = 4

    def forward(self, x):
        return x.flatten(1).double()


def _blobs(n, offset, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64) + offset


def test_prdc_identical_sets_are_one_and_disjoint_sets_zero():
    a = _blobs(300, 0.0, 0)
    same = prdc(a, a.clone(), k=5)
    for key in ("precision", "recall", "coverage"):
        assert same[key] == pytest.approx(1.0, abs=1e-9), key
    # each point lies in its own ball and, on average, in k others: (k + 1) / k on a copy; ~1 on
    # an independent sample of the same distribution (next test)
    assert same["density"] == pytest.approx(6 / 5)
    far = prdc(a, _blobs(300, 100.0, 1), k=5)
    for key in ("precision", "recall", "density", "coverage"):
        assert far[key] == 0.0, key


def test_prdc_two_samples_of_one_distribution_are_close_to_one():
    out = prdc(_blobs(500, 0.0, 0), _blobs(500, 0.0, 1), k=5)
    assert out["precision"] > 0.8 and out["recall"] > 0.8
    assert 0.7 < out["density"] < 1.3 and out["coverage"] > 0.8


def test_fid_kid_identical_is_zero_and_disjoint_is_large():
    g = torch.Generator().manual_seed(0)
    real = torch.rand(200, 1, 2, 2, generator=g)
    same = fid_kid(real, real.clone(), Identity(), kid_subset_size=100, kid_subsets=5)
    # KID draws real and fake subsets independently: unbiased, ~0 up to subset noise
    assert abs(same["fid"]) < 1e-6 and abs(same["kid"]) < 0.02
    far = fid_kid(real, real + 5.0, Identity(), kid_subset_size=100, kid_subsets=5)
    assert far["fid"] == pytest.approx(4 * 25.0, rel=1e-6)  # mean shift 5 in 4 dims, same cov
    assert far["kid"] > 1.0


def test_feature_net_is_a_torchmetrics_feature_and_is_cached(tmp_path):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 2
    x = torch.rand(200, 1, 8, 8, generator=g) * 0.2
    x[y == 1, :, :4] += 0.8  # class 1: bright top half
    cache = tmp_path / "feat.pt"
    ext, info = feature_extractor(x, y, cache, num_classes=2, hparams=FAST)
    assert isinstance(ext, FeatureExtractor) and cache.exists()
    assert info["train_accuracy"] > 0.95
    # second call: loaded from the cache, not retrained
    ext2, info2 = feature_extractor(x, y, cache, num_classes=2, hparams=FAST)
    assert info2 == info
    assert torch.equal(ext(x[:5]), ext2(x[:5]))
    out = fid_kid(x, x.clone(), ext, kid_subset_size=100, kid_subsets=3)
    assert abs(out["fid"]) < 1e-3


def test_downstream_accuracy_learns_a_separable_task():
    g = torch.Generator().manual_seed(1)
    def make(n):
        y = torch.arange(n) % 2
        x = torch.rand(n, 1, 8, 8, generator=g) * 0.2
        x[y == 1, :, :4] += 0.8
        return x, y
    (xs, ys), (xt, yt) = make(200), make(100)
    assert downstream_accuracy(xs, ys, xt, yt, num_classes=2, hparams=FAST) > 0.95
    assert isinstance(FeatureNet().num_features, int)


def test_latent_mmd_of_prior_draws_is_about_zero_and_shifted_codes_positive():
    prior = StandardNormal(3)
    torch.manual_seed(0)
    assert abs(latent_mmd(prior.sample(1000), prior)) < 0.01
    assert latent_mmd(prior.sample(1000) + 3.0, prior) > 0.5


def test_hoyer_one_hot_is_one_and_nmi_of_perfect_clustering_is_one():
    assert hoyer_sparsity(torch.eye(5)) == pytest.approx(1.0)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    assert nmi(labels, torch.tensor([5, 5, 3, 3, 9, 9])) == pytest.approx(1.0)


def test_elbo_metrics_and_samples_of_a_small_conditional_vae():
    from lit_dpvae.models import VanillaVAE

    torch.manual_seed(0)
    model = VanillaVAE(data_shape=(1, 8, 8), latent_dim=2, hidden=(16,), conditional=True,
                       num_classes=3, beta=0.5)
    x, y = torch.rand(40, 1, 8, 8), torch.arange(40) % 3
    loader = [(x[:20], y[:20]), (x[20:], y[20:])]
    out = elbo_metrics(model, loader)
    assert math.isclose(out["neg_elbo"], out["recon"] + out["kl"])
    assert out["recon"] > 0 and out["kl"] >= 0 and out["mse"] > 0
    mu, labels = posterior_means(model, loader)
    assert mu.shape == (40, 2) and torch.equal(labels, y)
    xs, ys = balanced_samples(model, 30, 3)
    assert xs.shape == (30, 1, 8, 8) and torch.equal(torch.bincount(ys), torch.tensor([10] * 3))


def test_latent_dim_mmd_is_small_for_prior_marginals_and_large_for_shifted_codes():
    from lit_dpvae.metrics import latent_dim_mmd
    from lit_dpvae.priors import SpikeAndSlab

    prior = SpikeAndSlab(4)
    torch.manual_seed(1)
    same = latent_dim_mmd(prior.sample_dims(1000), prior)
    shifted = latent_dim_mmd(prior.sample_dims(1000) + 1.0, prior)
    assert abs(same) < 0.05 < shifted


def test_downstream_recipe_is_separate_from_the_feature_net_recipe():
    from lit_dpvae.metrics.generative import (
        CLASSIFIER_HPARAMS,
        DOWNSTREAM_HPARAMS,
        train_classifier,
    )

    # the FID feature net keeps its recipe (and its cache fingerprint): no new keys
    assert set(CLASSIFIER_HPARAMS) == {"channels", "features", "steps", "batch_size", "lr",
                                       "weight_decay", "seed"}
    assert DOWNSTREAM_HPARAMS["schedule"] == "cosine" and DOWNSTREAM_HPARAMS["pool"] == 4
    x, y = torch.rand(40, 1, 8, 8), torch.arange(40) % 2
    net = train_classifier(x, y, 2, dict(DOWNSTREAM_HPARAMS, steps=3, dropout=0.5, hflip=True))
    assert net.body[-2].in_features == 4 * 4 * 64 and not net.training
    # deterministic given the seed, and the caller's RNG state is untouched
    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    again = train_classifier(x, y, 2, dict(DOWNSTREAM_HPARAMS, steps=3, dropout=0.5, hflip=True))
    assert torch.equal(torch.random.get_rng_state(), before)
    for a, b in zip(net.parameters(), again.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="schedule"):
        train_classifier(x, y, 2, {"steps": 1, "schedule": "linear"})

"""Priors, divergences, likelihoods and latent metrics against slow or library references."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.distributions as D

from lit_dpvae.divergences import (
    COMPOSITIONS,
    MMD,
    MMD_BANDWIDTHS,
    SPIKE_BANDWIDTHS,
    AggregateKL,
    DimensionWiseMMD,
    Divergence,
    PairwiseDivergence,
)
from lit_dpvae.likelihoods import Bernoulli, Gaussian, Laplace, make_likelihood
from lit_dpvae.metrics import assign_clusters, cluster_purity, hoyer_sparsity, nmi
from lit_dpvae.priors import MixtureOfGaussians, SpikeAndSlab, StandardNormal


# ---- priors -------------------------------------------------------------------------------------
def _reference(prior) -> D.Distribution:
    d = prior.latent_dim
    if isinstance(prior, StandardNormal):
        return D.Independent(D.Normal(torch.zeros(d), torch.ones(d)), 1)
    if isinstance(prior, SpikeAndSlab):
        mix = D.Categorical(prior.log_weights.exp().expand(d, 2))
        comp = D.Normal(torch.zeros(d, 2), prior.scales.expand(d, 2))
        return D.Independent(D.MixtureSameFamily(mix, comp), 1)
    scale = (0.5 * prior.log_var).exp().expand_as(prior.means)
    comp = D.Independent(D.Normal(prior.means, scale), 1)
    return D.MixtureSameFamily(D.Categorical(prior.log_weights.exp()), comp)


PRIORS = [
    StandardNormal(3),
    SpikeAndSlab(3, gamma=0.7, spike_scale=0.1),
    MixtureOfGaussians(3, n_components=4, layout="circle"),
    MixtureOfGaussians(3, n_components=4, layout="random", seed=3),
]


@pytest.mark.parametrize("prior", PRIORS, ids=lambda p: type(p).__name__)
def test_prior_log_prob_matches_torch_distributions(prior):
    ref = _reference(prior)
    z = torch.randn(50, 3) * 2
    torch.testing.assert_close(prior.log_prob(z), ref.log_prob(z))
    assert prior.log_prob(z.view(10, 5, 3)).shape == (10, 5)
    assert list(prior.parameters()) == []  # buffers only: nothing trainable
    torch.manual_seed(0)
    w = prior.sample(20000)
    assert w.shape == (20000, 3) and prior.sample_dims(7).shape == (7, 3)
    torch.testing.assert_close(w.mean(0), ref.mean, atol=0.06, rtol=0)
    torch.testing.assert_close(w.var(0), ref.variance, atol=0.15, rtol=0.05)
    torch.manual_seed(5)
    a = prior.sample(4)
    torch.manual_seed(5)
    torch.testing.assert_close(prior.sample(4), a)  # global RNG


def test_standard_normal_kl_is_the_closed_form():
    mu, log_var = torch.randn(6, 3), torch.randn(6, 3)
    q = D.Independent(D.Normal(mu, (0.5 * log_var).exp()), 1)
    p = D.Independent(D.Normal(torch.zeros(3), torch.ones(3)), 1)
    torch.testing.assert_close(StandardNormal.kl(mu, log_var), D.kl_divergence(q, p))


def test_mixture_assignment_and_configuration_errors():
    prior = MixtureOfGaussians(2, n_components=5, radius=3.0)
    torch.testing.assert_close(prior.means.norm(dim=1), torch.full((5,), 3.0))
    z = prior.means + 0.01
    assert prior.assign(z).tolist() == list(range(5))
    torch.testing.assert_close(prior.responsibilities(z).sum(1), torch.ones(5))
    assert assign_clusters(z, prior).tolist() == list(range(5))
    with pytest.raises(ValueError, match="circle"):
        MixtureOfGaussians(1)
    with pytest.raises(ValueError, match="gamma"):
        SpikeAndSlab(2, gamma=1.5)
    with pytest.raises(TypeError, match="mixture"):
        assign_clusters(z, StandardNormal(2))


# ---- divergences --------------------------------------------------------------------------------
def _mmd_loop(div, z, w):
    n, m = len(z), len(w)
    zz = sum(div.kernel(z[i], z[j]) for i, j in itertools.permutations(range(n), 2))
    ww = sum(div.kernel(w[i], w[j]) for i, j in itertools.permutations(range(m), 2))
    zw = sum(div.kernel(z[i], w[j]) for i in range(n) for j in range(m))
    return zz / (n * (n - 1)), ww / (m * (m - 1)), zw / (n * m)


@pytest.mark.parametrize("kernel", ["imq", "rbf"])
def test_mmd_pieces_match_a_pair_loop(kernel):
    div = MMD(kernel=kernel, bandwidths=(0.5, 2.0), n_prior_samples=6)
    z, w = torch.randn(5, 3), torch.randn(6, 3)
    pieces = div.pieces(z, w)
    for got, want in zip(pieces, _mmd_loop(div, z, w), strict=True):
        torch.testing.assert_close(got, want)
    r2 = ((z[0] - w[0]) ** 2).sum()
    c = 2.0 * 3
    want = (
        sum(c * s / (c * s + r2) for s in (0.5, 2.0))
        if kernel == "imq"
        else sum(torch.exp(-r2 / (c * s)) for s in (0.5, 2.0))
    )
    torch.testing.assert_close(div.kernel(z[0], w[0]), want)
    assert div.kernel(z[:, None], w[None]).shape == (5, 6)  # broadcasting
    torch.manual_seed(0)
    value = div(z, StandardNormal(3))
    torch.manual_seed(0)
    p = div.pieces(z, StandardNormal(3).sample(6))
    torch.testing.assert_close(value, p.zz + p.ww - 2 * p.zw)


@pytest.mark.parametrize("kernel", ["imq", "rbf"])
@pytest.mark.parametrize("d", [1, 4])
def test_fast_gram_matches_the_explicit_kernel_values_and_gradients(kernel, d):
    """``gram`` (matmul distances, fused bandwidth sum) against the explicit broadcast formula,
    values and gradients (float64 gradcheck), including identical points (r² clamped at 0)."""
    div = MMD(kernel=kernel, bandwidths=(0.01, 0.5, 2.0))
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(7, d, dtype=torch.float64, generator=gen) * 3
    b = torch.cat([a[:2], torch.randn(5, d, dtype=torch.float64, generator=gen)])
    r2 = ((a[:, None] - b[None]) ** 2).sum(-1)
    c = 2.0 * d
    want = (sum(c * s / (c * s + r2) for s in div.bandwidths) if kernel == "imq"
            else sum(torch.exp(-r2 / (c * s)) for s in div.bandwidths))
    torch.testing.assert_close(div.gram(a, b), want)
    torch.testing.assert_close(div.gram(a, a).diagonal(), torch.full((7,), 3.0,
                               dtype=torch.float64))  # k(a, a) = number of bandwidths
    a.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: div.gram(t, b[2:]), (a,))
    assert torch.autograd.gradcheck(lambda t: div.value(t, b.detach()), (a,))
    if d > 1:  # dimension-wise MMD: the d = 1 route, per dimension
        dim = DimensionWiseMMD(kernel=kernel, bandwidths=(0.01, 0.5))
        assert torch.autograd.gradcheck(lambda t: dim.value(t, b.detach()), (a,))


def test_mmd_detects_a_shift_and_is_near_zero_without_one():
    torch.manual_seed(0)
    div, prior = MMD(n_prior_samples=400), StandardNormal(4)
    same = torch.stack([div(torch.randn(400, 4), prior) for _ in range(5)]).mean()
    shifted = div(torch.randn(400, 4) + 1.0, prior)
    assert abs(float(same)) < 0.01 and float(shifted) > 0.1


def test_mmd_of_fewer_than_two_codes_is_zero_and_connected():
    for div in (MMD(), DimensionWiseMMD()):
        for n in (0, 1):
            z = torch.randn(n, 3, requires_grad=True)
            out = div(z, StandardNormal(3))
            assert out.shape == () and float(out.detach()) == 0.0 and out.requires_grad


def test_dimension_wise_mmd_is_a_sum_of_one_dimensional_mmds():
    div = DimensionWiseMMD(bandwidths=(0.01, 1.0), n_prior_samples=7)
    prior = SpikeAndSlab(3)
    z = torch.randn(5, 3)
    torch.manual_seed(1)
    value = div(z, prior)
    torch.manual_seed(1)
    w = prior.sample_dims(7)
    want = 0.0
    for j in range(3):
        zz, ww, zw = _mmd_loop(div, z[:, j : j + 1], w[:, j : j + 1])
        want = want + zz + ww - 2 * zw
    torch.testing.assert_close(value, want)


def test_aggregate_kl_matches_a_loop_and_penalises_uncovered_components():
    torch.manual_seed(0)
    prior = MixtureOfGaussians(2, n_components=4, radius=3.0, scale=0.5)
    mu, log_var = torch.randn(6, 2), torch.randn(6, 2) * 0.1
    div = AggregateKL(n_prior_samples=9)
    torch.manual_seed(2)
    value = div(torch.cat([mu, log_var], -1), prior)
    torch.manual_seed(2)
    w = prior.sample(9)
    q = D.Independent(D.Normal(mu, (0.5 * log_var).exp()), 1)
    terms = []
    for m in range(9):
        log_q_agg = torch.logsumexp(q.log_prob(w[m].expand(6, 2)), 0) - math.log(6)
        terms.append(prior.log_prob(w[m]) - log_q_agg)
    torch.testing.assert_close(value, torch.stack(terms).mean())

    torch.manual_seed(3)
    div = AggregateKL(n_prior_samples=2000)
    covering = prior.means.repeat(3, 1)
    one_component = prior.means[:1].repeat(12, 1)
    lv = torch.full((12, 2), 2 * math.log(0.5))
    assert float(div(torch.cat([covering, lv], -1), prior)) < 0.05
    assert float(div(torch.cat([one_component, lv], -1), prior)) > 1.0
    empty = div(torch.zeros(0, 4, requires_grad=True), prior)
    assert float(empty.detach()) == 0.0 and empty.requires_grad


def test_every_divergence_declares_composition_and_dp_line():
    for cls in (MMD, DimensionWiseMMD, AggregateKL):
        assert cls.composition in COMPOSITIONS
        assert "DP:" in (cls.__doc__ or "")
    for cls in (StandardNormal, SpikeAndSlab, MixtureOfGaussians):
        assert "DP:" in (cls.__doc__ or "") and "arXiv" in (cls.__doc__ or "")
    assert MMD.composition == DimensionWiseMMD.composition == "pairwise"
    assert AggregateKL.composition == "batch-wise"


def test_the_divergence_classes_declare_the_interface_explicitly():
    assert issubclass(MMD, PairwiseDivergence) and issubclass(DimensionWiseMMD, PairwiseDivergence)
    assert issubclass(AggregateKL, Divergence) and not issubclass(AggregateKL, PairwiseDivergence)
    assert PairwiseDivergence.composition == "pairwise" and Divergence.composition == "batch-wise"
    assert MMD.radial is True and DimensionWiseMMD.radial is False
    assert MMD().bandwidths == MMD_BANDWIDTHS == DimensionWiseMMD().bandwidths
    assert SPIKE_BANDWIDTHS != MMD_BANDWIDTHS
    z, mu, log_var = torch.randn(4, 3, 2), torch.randn(4, 2), torch.randn(4, 2)
    assert torch.equal(MMD().codes(z, mu, log_var), z[:, 0])  # one sample per record
    assert torch.equal(AggregateKL().codes(z, mu, log_var), torch.cat([mu, log_var], -1))
    # the pairwise interface reaches what PairwiseDPSGD reads (radial pair_scale included)
    div, a, b = MMD(bandwidths=(0.5, 2.0)), torch.randn(5, 3), torch.randn(5, 3)
    r2 = ((a - b) ** 2).sum(-1, keepdim=True)
    torch.testing.assert_close(div.pair_scale(r2, 3) * (a - b), div.pair_grad(a, b))
    ag = a.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(div.kernel(ag, b).sum(), ag)
    torch.testing.assert_close(div.pair_grad(a, b), want)


def test_a_divergence_without_what_the_pairwise_mechanism_needs_is_refused():
    with pytest.raises(TypeError, match="not a lit_dpvae.divergences.PairwiseDivergence"):

        class PairwiseByName(Divergence):  # declares pairwise but gives no pair decomposition
            composition = "pairwise"

    with pytest.raises(TypeError, match="must be one of"):

        class Unknown(Divergence):
            composition = "joint"

    class NoPairGrad(PairwiseDivergence):
        def draw(self, prior):
            return prior.sample(4)

        def value(self, codes, w):
            return codes.sum() * 0.0

    with pytest.raises(TypeError, match=r"does not implement pair_grad.*PairwiseDPSGD"):
        NoPairGrad()

    class RadialWithoutScale(NoPairGrad):
        radial = True

        def pair_grad(self, a, b):
            return a - b

    with pytest.raises(TypeError, match=r"does not implement pair_scale.*radial = True"):
        RadialWithoutScale()
    RadialWithoutScale.radial = False
    assert isinstance(RadialWithoutScale(), PairwiseDivergence)  # complete when not radial


# ---- likelihoods --------------------------------------------------------------------------------
def test_likelihoods_match_torch_distributions():
    x = torch.rand(4, 1, 2, 3)
    params = torch.randn(4, 1, 2, 3)
    xb = (x > 0.5).float()
    want = D.Bernoulli(logits=params).log_prob(xb).flatten(1).sum(1)
    torch.testing.assert_close(Bernoulli().log_prob(xb, params), want)
    want = D.Normal(params, 0.3).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(Gaussian(0.3).log_prob(x, params), want)
    want = D.Laplace(params, 0.2).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(Laplace(0.2).log_prob(x, params), want)
    torch.testing.assert_close(Bernoulli().mean(params), torch.sigmoid(params))
    assert isinstance(make_likelihood("laplace", 0.5), Laplace)


def test_likelihood_support_errors():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Bernoulli().log_prob(torch.tensor([[1.5]]), torch.zeros(1, 1))
    with pytest.raises(ValueError, match="NaN"):
        Gaussian().log_prob(torch.tensor([[float("nan")]]), torch.zeros(1, 1))
    with pytest.raises(ValueError, match="positive"):
        Laplace(0.0)
    with pytest.raises(ValueError, match="unknown likelihood"):
        make_likelihood("poisson")


# ---- metrics ------------------------------------------------------------------------------------
def test_latent_metrics():
    assert hoyer_sparsity(torch.eye(5)) == pytest.approx(1.0)
    assert hoyer_sparsity(torch.ones(3, 5)) == pytest.approx(0.0)
    assert 0.0 < hoyer_sparsity(torch.randn(100, 5)) < 1.0
    assert hoyer_sparsity(torch.randn(50, 4), standardise=True) > 0.0
    labels, clusters = torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([5, 5, 7, 7, 7, 7])
    assert cluster_purity(labels, clusters) == pytest.approx(4 / 6)
    assert cluster_purity(labels, labels + 3) == 1.0
    assert nmi(labels, labels + 3) == pytest.approx(1.0)
    assert 0.0 < nmi(labels, clusters) < 1.0

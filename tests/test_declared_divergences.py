"""The explicit divergence interface seen from the model code: a pairing only declares its
divergence (``lit_dpvae.divergences.Divergence`` / ``PairwiseDivergence``) and BaseVAE does the
rest; a user-defined pairwise divergence is privatised pair by pair like the shipped MMDs; the
class-conditional prior is a ``LabelShiftPrior`` whose layers keep their state_dict keys."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lit_dpvae.divergences import Divergence, PairwiseDivergence
from lit_dpvae.models import BaseVAE, ClusterVAE, InfoVAE, SparseVAE, VanillaVAE
from lit_dpvae.priors import LabelShiftPrior, Prior, StandardNormal
from lit_dpvae.privacy import PairwiseDPSGD, TermwiseDPSGD


class GaussianKernelMMD(PairwiseDivergence):
    """U-statistic MMD² with k(a, b) = exp(−‖a − b‖²/2), written from the interface alone.

    DP: pairwise-decomposable (docs/privacy.md §8)."""

    radial = True

    def __init__(self, n_prior_samples: int = 8) -> None:
        super().__init__()
        self.n_prior_samples = n_prior_samples

    @staticmethod
    def k(a: Tensor, b: Tensor) -> Tensor:
        return torch.exp(-0.5 * ((a - b) ** 2).sum(-1))

    def draw(self, prior: Prior) -> Tensor:
        return prior.sample(self.n_prior_samples)

    def value(self, codes: Tensor, w: Tensor) -> Tensor:
        n, m = codes.shape[0], w.shape[0]
        kzz = self.k(codes[:, None], codes[None])
        kww = self.k(w[:, None], w[None])
        zz = (kzz.sum() - kzz.diagonal().sum()) / (n * (n - 1))
        ww = (kww.sum() - kww.diagonal().sum()) / (m * (m - 1))
        return zz + ww - 2 * self.k(codes[:, None], w[None]).mean()

    def pair_scale(self, r2: Tensor, d: int) -> Tensor:
        return -torch.exp(-0.5 * r2)

    def pair_grad(self, a: Tensor, b: Tensor) -> Tensor:
        diff = a - b
        return self.pair_scale((diff**2).sum(-1, keepdim=True), a.shape[-1]) * diff


class NonRadialGaussianKernelMMD(GaussianKernelMMD):
    """The same kernel declared non-radial: the mechanism then uses ``pair_grad`` only.

    DP: pairwise-decomposable (docs/privacy.md §8)."""

    radial = False


class MeanMatch(Divergence):
    """‖mean of the posterior means‖²: batch-wise (not a sum of pairs).

    DP: batch-wise (docs/privacy.md §3.3)."""

    def codes(self, z: Tensor, mu: Tensor, log_var: Tensor) -> Tensor:
        return mu

    def forward(self, codes: Tensor, prior: Prior) -> Tensor:
        return codes.mean(0).pow(2).sum() if codes.shape[0] else codes.sum() * 0.0


class UserVAE(BaseVAE):
    """A pairing that only declares its divergence. DP: recon, kl sample-wise; ``user`` as
    its divergence declares."""

    analytic_kl = True
    divergence_key = "user"

    def __init__(self, divergence: str = "gaussian", lam: float = 4.0, **kwargs) -> None:
        super().__init__(lam=lam, **kwargs)
        self.divergence = {"gaussian": GaussianKernelMMD, "nonradial": NonRadialGaussianKernelMMD,
                           "mean": MeanMatch}[divergence]()


def _user(divergence: str = "gaussian", **kw) -> UserVAE:
    torch.manual_seed(0)
    return UserVAE(divergence, data_shape=(6,), latent_dim=3, hidden=(8,),
                   likelihood="gaussian", **kw)


def _grad(model, scalar):
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(scalar, list(params.values()), allow_unused=True)
    return {k: torch.zeros_like(p) if g is None else g for (k, p), g in zip(params.items(), grads)}


def test_shipped_pairings_only_declare_their_divergence():
    for cls in (InfoVAE, SparseVAE, ClusterVAE, VanillaVAE):
        for hook in ("divergence_value", "pairwise_divergence", "divergence_codes"):
            assert getattr(cls, hook) is getattr(BaseVAE, hook), (cls.__name__, hook)
    info = InfoVAE(data_shape=(6,), latent_dim=3, hidden=(8,), likelihood="gaussian")
    cluster = ClusterVAE(data_shape=(6,), latent_dim=3, hidden=(8,), likelihood="gaussian")
    kl = ClusterVAE(data_shape=(6,), latent_dim=3, hidden=(8,), likelihood="gaussian",
                    divergence="aggregate_kl")
    assert isinstance(info.divergence, PairwiseDivergence)
    assert isinstance(cluster.divergence, PairwiseDivergence) and cluster.lam == 10.0  # MMD
    assert isinstance(kl.divergence, Divergence) and kl.lam == 1.0
    assert not isinstance(kl.divergence, PairwiseDivergence)
    assert cluster.batch_term_compositions() == {"kl_agg": "pairwise"}
    assert kl.batch_term_compositions() == {"kl_agg": "batch-wise"}
    with pytest.raises(ValueError, match="divergence must be one of"):
        ClusterVAE(data_shape=(6,), latent_dim=3, divergence="kl")
    assert VanillaVAE(data_shape=(6,), hidden=(8,), likelihood="gaussian").divergence is None
    # SparseVAE: its default sparsity term is sample-wise (no batch-wise term); the
    # dimension-wise MMD is pairwise
    sparse = SparseVAE(data_shape=(6,), latent_dim=3, hidden=(8,), likelihood="gaussian")
    assert sparse.lam == 10.0 and sparse.batch_term_compositions() == {}  # Gaussian: λ = 10
    mmd = SparseVAE(data_shape=(6,), latent_dim=3, hidden=(8,), likelihood="gaussian",
                    divergence="dim_mmd")
    assert isinstance(mmd.divergence, PairwiseDivergence) and mmd.lam == 10.0
    assert mmd.batch_term_compositions() == {"dim_mmd": "pairwise"}


@pytest.mark.parametrize("divergence", ["gaussian", "nonradial"])
def test_a_user_defined_pairwise_divergence_is_privatised_pair_by_pair(divergence):
    model = _user(divergence)
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(1)
    terms = model.loss_terms((x,))
    assert set(terms.pairwise) == {"user"} and terms.pairwise["user"].kernel is model.divergence
    pair = terms.pairwise["user"]
    assert pair.prior_samples.shape == (8, 3) and pair.weight == 4.0
    torch.testing.assert_close(terms.batch["user"],
                               4.0 * model.divergence.value(pair.codes, pair.prior_samples))

    mech = PairwiseDPSGD(max_grad_norm=0.7, pair_max_grad_norm=1e9, noise_multiplier=1.0)
    torch.manual_seed(1)
    stats = mech.aggregate(model, (x,))
    torch.manual_seed(1)  # same reparameterisation noise and prior samples
    want = _grad(model, model.loss_terms((x,)).batch["user"])
    for name in want:  # unclipped, the pairwise part is n·∇(λD)
        torch.testing.assert_close(stats["pairwise"][name], 7 * want[name], rtol=1e-4, atol=1e-6)


def test_estimate_is_forward_with_its_prior_samples():
    div, prior = GaussianKernelMMD(5), StandardNormal(3)
    codes = torch.randn(4, 3)
    torch.manual_seed(2)
    value, w = div.estimate(codes, prior)
    torch.manual_seed(2)
    torch.testing.assert_close(div(codes, prior), value)
    torch.testing.assert_close(div.value(codes, w), value)
    one = torch.randn(1, 3, requires_grad=True)
    value, w = div.estimate(one, prior)
    assert float(value.detach()) == 0.0 and value.requires_grad and w.shape == (0, 3)


def test_a_batch_wise_user_divergence_is_a_batch_term_and_the_pairwise_mechanism_refuses_it():
    model = _user("mean")
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(4))
    terms = model.loss_terms((x,))
    assert terms.pairwise == {} and set(terms.batch) == {"user"}
    mu, _ = model.encode(x, None)
    torch.testing.assert_close(terms.batch["user"], 4.0 * mu.mean(0).pow(2).sum())
    TermwiseDPSGD(max_grad_norm=0.7, batch_max_grad_norm=0.1).aggregate(model, (x,))
    with pytest.raises(ValueError, match="no pairwise-decomposable divergence"):
        PairwiseDPSGD(max_grad_norm=0.7, pair_max_grad_norm=0.1).aggregate(model, (x,))


def test_a_divergence_that_is_not_a_divergence_is_refused_with_a_clear_error():
    model = _user("mean")
    model.divergence = torch.nn.Identity()  # type: ignore[assignment]
    with pytest.raises(TypeError, match=r"lit_dpvae\.divergences\.Divergence"):
        model.loss_terms((torch.randn(3, 6),))


def test_a_user_pairwise_divergence_trains_through_the_strategy(tmp_path):
    import lightning.pytorch as pl

    from lit_dpvae.strategy import TermwiseDPStrategy
    from tests.lightning_toys import ToyData

    model = _user("gaussian")
    start = {k: v.clone() for k, v in model.state_dict().items()}
    strategy = TermwiseDPStrategy(mechanism="pairwise", noise_multiplier=1.0, max_grad_norm=0.5,
                                  pair_max_grad_norm=0.1, noise_seed=3)
    trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=2,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, ToyData(n=60, sample_rate=0.2))
    assert isinstance(strategy.mechanism, PairwiseDPSGD) and strategy.epsilon() > 0
    assert any(not torch.equal(start[k], v) for k, v in model.state_dict().items())


# ---- the class-conditional prior ----------------------------------------------------------------
def test_label_shift_prior_maps_to_and_from_the_base_prior():
    torch.manual_seed(0)
    prior = LabelShiftPrior(3, 2, learn_scale=True)
    with torch.no_grad():
        prior.log_scales.weight.normal_(0.0, 0.5)  # type: ignore[union-attr]
    onehot = torch.eye(3)[[0, 2, 1, 2]]
    mu, log_var, z = torch.randn(4, 2), torch.randn(4, 2), torch.randn(4, 5, 2)
    m, s = prior.means.weight.T[[0, 2, 1, 2]], prior.log_scales.weight.T[[0, 2, 1, 2]].exp()
    mu_b, log_var_b, z_b = prior.to_base(onehot, mu, log_var, z)
    torch.testing.assert_close(mu_b, (mu - m) / s)
    torch.testing.assert_close(log_var_b, log_var - 2 * s.log())
    torch.testing.assert_close(z_b, (z - m[:, None]) / s[:, None])
    torch.testing.assert_close(prior.from_base(z_b[:, 0], onehot), z[:, 0])
    plain = LabelShiftPrior(3, 2)
    assert plain.log_scales is None and [n for n, _ in plain.named_parameters()] == ["means.weight"]


@pytest.mark.parametrize("scale", [False, True])
def test_the_label_prior_keeps_its_state_dict_keys_and_parameter_names(scale):
    kw = dict(data_shape=(6,), latent_dim=2, hidden=(8,), likelihood="gaussian", num_classes=3,
              conditional=True, label_prior=True, label_prior_scale=scale)
    model = VanillaVAE(**kw)
    assert isinstance(model.label_shift, LabelShiftPrior)
    assert model.label_shift.means is model.label_means
    assert model.label_shift.log_scales is model.label_log_scales
    keys = ["label_means.weight"] + (["label_log_scales.weight"] if scale else [])
    assert [k for k in model.state_dict() if k.startswith("label")] == keys
    assert [n for n, _ in model.named_parameters() if n.startswith("label")] == keys
    assert not any(n.startswith("label_shift") for n, _ in model.named_modules())
    other = VanillaVAE(**kw)
    other.load_state_dict(model.state_dict())  # strict: the historical keys load
    torch.testing.assert_close(other.label_shift.means.weight, model.label_means.weight)
    assert VanillaVAE(data_shape=(6,), hidden=(8,), likelihood="gaussian").label_shift is None

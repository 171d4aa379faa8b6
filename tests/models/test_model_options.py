"""BaseVAE options for the optimizer (``optimizer``, ``momentum``, ``adam_eps``,
``adam_bc_floor``, ``lr_schedule``, ``lr_schedule_steps``) and the sampling temperature
(``sample_temperature``): the defaults keep the behaviour from before the options existed."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch

from lit_dpvae.models import ClusterVAE, VanillaVAE
from lit_dpvae.optim import DPAdamBC

from .conftest import PAIRINGS, model_class

SMALL = dict(data_shape=(1, 8, 8), latent_dim=2, hidden=(8,))


@pytest.mark.parametrize("name", PAIRINGS)
def test_default_optimizer_is_the_old_adam(name):
    if name == "ClusterVAE":  # "auto": DPAdamBC under a DPStrategy (issue 15), else Adam
        assert model_class(name)(**SMALL).optimizer_name == "auto"
    for kwargs in ({}, {"lr": 0.02}):
        model = model_class(name)(**SMALL, **kwargs)
        opt = model.configure_optimizers()
        # before the options: torch.optim.Adam(self.parameters(), lr=self.lr)
        old = torch.optim.Adam(model.parameters(), lr=model.lr)
        assert type(opt) is torch.optim.Adam and opt.defaults == old.defaults
        assert opt.param_groups[0]["lr"] == kwargs.get("lr", 1e-3)
        assert [p for g in opt.param_groups for p in g["params"]] == list(model.parameters())


def test_default_optimizer_trains_bit_for_bit_like_the_old_one():
    def run(make_opt):
        torch.manual_seed(0)
        model = VanillaVAE(**SMALL)
        opt = make_opt(model)
        for step in range(3):
            torch.manual_seed(100 + step)
            x = torch.rand(16, 1, 8, 8)
            opt.zero_grad()
            model.loss_terms(x).mean_loss().backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    new = run(lambda m: m.configure_optimizers())
    old = run(lambda m: torch.optim.Adam(m.parameters(), lr=m.lr))
    assert all(torch.equal(a, b) for a, b in zip(new, old))


def test_optimizer_options():
    sgd = VanillaVAE(**SMALL, optimizer="sgd", lr=0.1, momentum=0.9).configure_optimizers()
    assert type(sgd) is torch.optim.SGD
    assert sgd.param_groups[0]["lr"] == 0.1 and sgd.param_groups[0]["momentum"] == 0.9
    adam = VanillaVAE(**SMALL, adam_eps=0.5).configure_optimizers()
    assert adam.param_groups[0]["eps"] == 0.5
    bc = VanillaVAE(**SMALL, optimizer="adam_bc", adam_bc_floor=0.2,
                    adam_eps=1e-6).configure_optimizers()
    assert isinstance(bc, DPAdamBC)
    assert bc.param_groups[0]["floor"] == 0.2 and bc.param_groups[0]["eps"] == 1e-6
    model = VanillaVAE(**SMALL, optimizer="sgd", momentum=0.9, lr_schedule="cosine")
    assert model.hparams["optimizer"] == "sgd" and model.hparams["lr_schedule"] == "cosine"


def _lrs(conf, n):
    lrs = []
    for _ in range(n):
        lrs.append(conf["optimizer"].param_groups[0]["lr"])
        conf["optimizer"].step()
        conf["lr_scheduler"]["scheduler"].step()
    return lrs


def test_cosine_schedule_over_the_given_or_the_trainers_steps():
    conf = VanillaVAE(**SMALL, optimizer="sgd", lr=0.1, lr_schedule="cosine",
                      lr_schedule_steps=10).configure_optimizers()
    assert conf["lr_scheduler"]["interval"] == "step"
    lrs = _lrs(conf, 10)
    assert lrs[0] == pytest.approx(0.1) and lrs[5] == pytest.approx(0.05)
    assert conf["optimizer"].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    want = [0.1 * 0.5 * (1 + math.cos(math.pi * t / 10)) for t in range(10)]
    assert lrs == pytest.approx(want)

    model = VanillaVAE(**SMALL, optimizer="sgd", lr=0.1, lr_schedule="cosine")
    model.trainer = pl.Trainer(max_steps=20, logger=False, enable_checkpointing=False,
                               enable_progress_bar=False, enable_model_summary=False)
    assert _lrs(model.configure_optimizers(), 11)[10] == pytest.approx(0.05)


def test_sample_temperature():
    torch.manual_seed(0)
    model = VanillaVAE(**SMALL, num_classes=3, conditional=True, label_prior=True,
                       label_prior_scale=True).eval()
    with torch.no_grad():
        model.label_log_scales.weight.normal_()
    labels = torch.tensor([0, 0, 1, 2])
    onehot = torch.nn.functional.one_hot(labels, 3).float()

    def at(tau):
        torch.manual_seed(1)
        model.sample_temperature = None if tau == "off" else tau
        try:
            return model.sample(4, labels, mean=True)
        finally:
            model.sample_temperature = None

    # default (None) is the old sampler: the likelihood mean at μ_y + s_y ⊙ ε
    torch.manual_seed(1)
    eps = model.prior.sample(4)
    with torch.no_grad():
        old = model.likelihood.mean(model.decode(model.prior_shift(eps, onehot), onehot))
    assert torch.equal(at("off"), old) and torch.equal(at(1.0), old)
    with torch.no_grad():
        z = model.label_means(onehot) + model.label_log_scales(onehot).exp() * 0.5 * eps
        torch.testing.assert_close(at(0.5), model.likelihood.mean(model.decode(z, onehot)))
    x0 = at(0.0)  # τ = 0: one image per label
    torch.testing.assert_close(x0[0], x0[1])
    assert not torch.allclose(x0[0], x0[2])
    # a constructor option too, saved in hparams
    warm = VanillaVAE(**SMALL, sample_temperature=0.7)
    assert warm.sample_temperature == 0.7 and warm.hparams["sample_temperature"] == 0.7


def test_refusals():
    with pytest.raises(ValueError, match="optimizer"):
        VanillaVAE(**SMALL, optimizer="rmsprop")
    with pytest.raises(ValueError, match="lr_schedule"):
        VanillaVAE(**SMALL, lr_schedule="step")
    with pytest.raises(ValueError, match="lr_schedule_steps"):
        VanillaVAE(**SMALL, lr_schedule="cosine", lr_schedule_steps=0)
    with pytest.raises(ValueError, match="momentum"):
        VanillaVAE(**SMALL, momentum=-0.1)
    with pytest.raises(ValueError, match="sample_temperature"):
        VanillaVAE(**SMALL, sample_temperature=-1.0)
    cluster = ClusterVAE(**SMALL, n_components=3)
    cluster.sample(2)  # no temperature: the mixture prior's own sampler
    cluster.sample_temperature = 0.5
    with pytest.raises(ValueError, match="standard-normal prior"):
        cluster.sample(2)


def test_auto_optimizer_is_dp_adam_bc_under_a_dp_strategy_and_adam_otherwise():
    from types import SimpleNamespace

    import lightning.pytorch as pl

    from lit_dpvae.optim import DPAdamBC
    from lit_dpvae.strategy import DPStrategy

    model = model_class("ClusterVAE")(**SMALL)  # optimizer="auto" by default
    assert type(model.configure_optimizers()) is torch.optim.Adam  # no trainer
    model._trainer = SimpleNamespace(strategy=pl.strategies.SingleDeviceStrategy("cpu"))
    assert type(model.configure_optimizers()) is torch.optim.Adam
    model._trainer = SimpleNamespace(strategy=DPStrategy(target_epsilon=10.0, target_delta=1e-5))
    opt = model.configure_optimizers()
    assert type(opt) is DPAdamBC and opt.defaults["lr"] == model.lr
    with pytest.raises(ValueError, match='"auto"'):
        model_class("VanillaVAE")(**SMALL, optimizer="adamw")


def test_sparse_hoyer_term_is_sample_wise_bounded_and_row_independent():
    from lit_dpvae.metrics.latent import hoyer_sparsity
    from lit_dpvae.models import SparseVAE

    from .helpers import make_batch, record_noise

    lam = 3.0
    model = SparseVAE(data_shape=(1, 8, 8), latent_dim=4, hidden=(8,), lam=lam,
                      divergence="hoyer", likelihood="gaussian")
    model.draw_noise = record_noise  # reparameterisation noise from the record itself
    assert model.batch_term_compositions() == {}
    x, _ = make_batch(12, (1, 8, 8))
    x[3] = 0.0  # an extreme record next to ordinary ones
    x[7] = 1e6
    terms = model.loss_terms(x)
    assert set(terms.sample) == {"recon", "kl", "hoyer"} and not terms.batch
    h = terms.sample["hoyer"]
    assert h.shape == (12,) and bool(torch.isfinite(h).all())
    assert float(h.min()) >= 0.0 and float(h.max()) <= lam + 1e-6
    # the value is λ·(1 − Hoyer sparsity) of the record's own posterior mean
    mu = model.encode(x, None)[0].detach()
    for i in (0, 3, 7):
        assert float(h[i]) == pytest.approx(lam * (1 - hoyer_sparsity(mu[i:i + 1])), rel=1e-5)
    # row i depends on record i only: replacing another record changes nothing in row i
    x2 = x.clone()
    x2[5] = torch.rand(1, 8, 8) * 1e3
    h2 = model.loss_terms(x2).sample["hoyer"]
    keep = torch.arange(12) != 5
    assert torch.equal(h[keep], h2[keep]) and not torch.equal(h[5], h2[5])
    # λ = 0 removes it; a code of zeros is finite; bad settings are refused with the fix
    off = SparseVAE(data_shape=(1, 8, 8), latent_dim=4, hidden=(8,), lam=0.0,
                    divergence="hoyer", likelihood="gaussian")
    assert "hoyer" not in off.loss_terms(x).sample
    # float edge cases stay in [0, λ]: zeros, one-hot, huge and subnormal codes
    edge = torch.tensor([[0.0] * 4, [0.0, 2.0, 0.0, 0.0], [1e30, -1e30, 3e29, 1e30],
                         [1e-44, 0.0, -1e-44, 0.0], [1.0, 1.0, 1.0, 1.0]])
    e = model.extra_sample_terms(edge, torch.zeros_like(edge), edge[:, None])["hoyer"]
    assert e.dtype == edge.dtype and bool(torch.isfinite(e).all())
    assert float(e.min()) >= 0.0 and float(e.max()) <= lam
    assert float(e[1]) == 0.0 and float(e[4]) == pytest.approx(lam)
    # its gradient stays finite in float32 however small the code (no silently dropped record)
    for scale in (1e-3, 1e-7, 1e-20, 1e-38, 1e-44):
        tiny = (torch.tensor([[1.0, -0.5, 0.25, 0.0]]) * scale).requires_grad_(True)
        (g,) = torch.autograd.grad(model.extra_sample_terms(tiny, tiny, tiny[:, None])["hoyer"]
                                   .sum(), tiny)
        assert g.dtype == torch.float32 and bool(torch.isfinite(g).all()), scale
    with pytest.raises(ValueError, match="dim_mmd"):
        SparseVAE(data_shape=(1, 8, 8), latent_dim=4, hidden=(8,), divergence="l1")
    with pytest.raises(ValueError, match="kernel, reads only apply to divergence='dim_mmd'"):
        SparseVAE(data_shape=(1, 8, 8), latent_dim=4, hidden=(8,), kernel="rbf", reads="sample")
    with pytest.raises(ValueError, match="latent_dim >= 2"):
        SparseVAE(data_shape=(1, 8, 8), latent_dim=1, hidden=(8,), divergence="hoyer")
    # with no batch-wise term, the class-conditional prior is allowed
    SparseVAE(data_shape=(1, 8, 8), latent_dim=4, hidden=(8,), conditional=True,
              num_classes=3, label_prior=True)
    with pytest.raises(ValueError, match="label_prior"):
        SparseVAE(data_shape=(1, 8, 8), latent_dim=4, hidden=(8,), conditional=True,
                  num_classes=3, label_prior=True, divergence="dim_mmd")
    # a checkpoint from before the Hoyer term (no "divergence" hyper-parameter) is refused
    # unless loaded with the dimension-wise MMD it was trained with
    old = {"hyper_parameters": {"lam": 10.0}, "state_dict": {}}
    with pytest.raises(ValueError, match="divergence='dim_mmd'"):
        default_model = SparseVAE(data_shape=(1, 8, 8), latent_dim=4, hidden=(8,))
        default_model.on_load_checkpoint(old)
    SparseVAE(data_shape=(1, 8, 8), latent_dim=4, hidden=(8,),
              divergence="dim_mmd").on_load_checkpoint(old)
    # the default is this term; the dimension-wise MMD is batch-wise (pairwise)
    default = SparseVAE(data_shape=(1, 8, 8), latent_dim=4, hidden=(8,))
    assert default.sparsity_term == "hoyer" and default.lam == 3.0  # Bernoulli
    for likelihood, lam in (("gaussian", 10.0), ("laplace", 3.0), ("bernoulli", 3.0)):
        assert SparseVAE(data_shape=(1, 8, 8), latent_dim=4, hidden=(8,),
                         likelihood=likelihood).lam == lam
    assert SparseVAE(data_shape=(1, 8, 8), latent_dim=4, hidden=(8,),
                     divergence="dim_mmd").batch_term_compositions() == {"dim_mmd": "pairwise"}


@pytest.mark.parametrize(("arch", "k"), [("mlp", 1), ("conv", 2)])
def test_hoyer_default_released_sum_moves_by_at_most_c_on_adversarial_neighbours(arch, k):
    """The clipped sum ``auto`` releases for SparseVAE's default (DP-SGD on recon + kl + hoyer)
    moves by ≤ C when one record is added: a zero image into a zero-bias encoder (μ = 0, the
    term's floor), a one-hot code, a saturated image, large values (Gaussian likelihood), a
    duplicate."""
    from lit_dpvae.models import SparseVAE
    from lit_dpvae.privacy.mechanisms import AutoMechanism

    from .helpers import record_noise
    from .test_tabular_models import coupled_diff

    torch.manual_seed(0)
    model = SparseVAE(data_shape=(1, 8, 8), latent_dim=4, arch=arch, hidden=(16,),
                      channels=(4, 8), likelihood="gaussian", n_samples=k)
    model.draw_noise = record_noise
    with torch.no_grad():
        for name, p in model.encoder.named_parameters():
            if name.endswith("bias"):
                p.zero_()  # a zero record then has μ = 0 exactly
    mech = AutoMechanism().resolve(model)[0]
    assert mech.name == "termwise" and mech.parts == ("sample",)
    mech.noise_multiplier, c = 1.0, mech.max_grad_norm
    mech.set_sampling(8.0)
    s = torch.rand(7, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    extras = [torch.zeros(1, 1, 8, 8), torch.ones(1, 1, 8, 8), torch.full((1, 1, 8, 8), 30.0),
              s[:1].clone(), torch.rand(1, 1, 8, 8) * 0.01]
    worst = 0.0
    for x in extras:
        d = coupled_diff(mech, model, s, torch.cat([s[:3], x, s[3:]]))["sample"]
        assert math.isfinite(d) and d <= c * (1 + 1e-5), (float(x.max()), d)
        worst = max(worst, d)
    assert worst > 0.5 * c  # not vacuous: a record's clipped gradient is released

"""The loss-term contract for every pairing in ``lit_dpvae.models.__all__``.

Sample-wise terms must be truly per record: with reparameterisation noise made a deterministic
function of the record itself, changing or adding record j must leave record i's terms (and their
input gradients) untouched. Batch-wise terms go through ``gather_for_batch_terms``.
"""

from __future__ import annotations

import pytest
import torch

from lit_dpvae.divergences import COMPOSITIONS, Divergence
from lit_dpvae.privacy.terms import LossTerms
from tests.models.conftest import PAIRINGS, model_class
from tests.models.helpers import make_batch, record_noise

SHAPES = {"mlp": (1, 8, 8), "conv": (1, 8, 8), "mlp2d": (2,)}


def _make(name, arch="mlp", conditional=False, group_norm=0, k=1, **kw):
    shape = SHAPES[arch]
    return model_class(name)(
        data_shape=shape,
        latent_dim=3,
        arch="conv" if arch == "conv" else "mlp",
        hidden=(16,),
        channels=(4, 8),
        group_norm=group_norm,
        num_classes=3 if conditional else 0,
        conditional=conditional,
        likelihood="bernoulli" if arch != "mlp2d" else "gaussian",
        n_samples=k,
        **kw,
    )


CASES = [
    ("mlp", False, 0, 1),
    ("conv", True, 2, 3),
    ("mlp2d", True, 2, 2),
]


@pytest.mark.parametrize("name", PAIRINGS)
@pytest.mark.parametrize(("arch", "conditional", "group_norm", "k"), CASES)
def test_sample_terms_are_per_record(name, arch, conditional, group_norm, k, monkeypatch):
    torch.manual_seed(0)
    model = _make(name, arch, conditional, group_norm, k)
    monkeypatch.setattr(model, "draw_noise", record_noise)
    x, y = make_batch(6, SHAPES[arch])
    terms = model.loss_terms((x, y))
    assert terms.validate() == 6
    # SparseVAE's default sparsity term is sample-wise too (lam = 0 in the other pairings' case)
    assert set(terms.sample) == ({"recon", "kl", "hoyer"} if name == "SparseVAE"
                                 else {"recon", "kl"})

    x2, y2 = x.clone(), y.clone()
    x2[2], y2[2] = torch.rand(SHAPES[arch]), (y[2] + 1) % 3  # change record 2
    changed = model.loss_terms((x2, y2))
    x3, y3 = torch.cat([x, make_batch(1, SHAPES[arch], 9)[0]]), torch.cat([y, y[:1]])  # add one
    added = model.loss_terms((x3, y3))
    others = [0, 1, 3, 4, 5]
    for key in terms.sample:
        torch.testing.assert_close(changed.sample[key][others], terms.sample[key][others])
        torch.testing.assert_close(added.sample[key][:6], terms.sample[key])
        assert not torch.allclose(changed.sample[key][2], terms.sample[key][2])

    # gradient view: record 0's sample-wise loss reads x_0 only
    xg = x.clone().requires_grad_(True)
    per_record = model.loss_terms((xg, y)).per_record()
    (grad,) = torch.autograd.grad(per_record[0], xg)
    assert grad[0].abs().sum() > 0
    assert grad[1:].abs().sum() == 0


@pytest.mark.parametrize("name", PAIRINGS)
def test_batch_terms_go_through_gather_and_declare_composition(name, monkeypatch):
    model = _make(name)
    seen: list[tuple[int, ...]] = []

    def spy(t):
        seen.append(tuple(t.shape))
        return t

    monkeypatch.setattr(model, "gather_for_batch_terms", spy)
    terms = model.loss_terms(make_batch(5, SHAPES["mlp"]))
    if model.divergence_key is None:
        assert terms.batch == {} and seen == []
        return
    assert set(terms.batch) == {model.divergence_key}
    assert seen and all(s[0] == 5 for s in seen)
    assert isinstance(model.divergence, Divergence)
    assert model.divergence.composition in COMPOSITIONS
    assert "DP:" in (type(model.divergence).__doc__ or "")
    assert "DP:" in (type(model).__doc__ or "")
    # λ weights the divergence, and λ = 0 declares no batch-wise term (then γ = 1 is possible)
    torch.manual_seed(1)
    base = model.loss_terms(make_batch(5, SHAPES["mlp"])).batch[model.divergence_key]
    model.lam *= 2
    torch.manual_seed(1)
    doubled = model.loss_terms(make_batch(5, SHAPES["mlp"])).batch[model.divergence_key]
    torch.testing.assert_close(doubled, 2 * base)
    model.lam = 0.0
    assert model.loss_terms(make_batch(5, SHAPES["mlp"])).batch == {}


@pytest.mark.parametrize("name", PAIRINGS)
@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize("n", [0, 1])
def test_tiny_and_empty_batches(name, arch, n):
    model = _make(name, arch, conditional=True, k=2)
    x, y = make_batch(n, SHAPES[arch])
    terms = model.loss_terms((x, y))
    assert isinstance(terms, LossTerms) and terms.validate() == n
    for value in terms.sample.values():
        assert value.shape == (n,)
    for value in terms.batch.values():
        assert value.shape == ()
        if n == 0:
            assert float(value) == 0.0
    loss = terms.mean_loss()
    assert torch.isfinite(loss)
    if loss.requires_grad:
        loss.backward()


@pytest.mark.parametrize("name", PAIRINGS)
@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize("conditional", [False, True])
def test_sample_and_reconstruct(name, arch, conditional):
    model = _make(name, arch, conditional)
    x, y = make_batch(4, SHAPES[arch])
    labels = y if conditional else None
    s = model.sample(4, labels=labels)
    r = model.reconstruct(x, labels)
    assert s.shape == r.shape == x.shape
    assert float(s.min()) >= 0 and float(s.max()) <= 1  # Bernoulli means
    if conditional:
        with pytest.raises(ValueError, match="labels are required"):
            model.sample(4)
        with pytest.raises(ValueError, match="labels"):
            model.sample(4, labels=[0, 1, 2, 7])
    else:
        with pytest.raises(ValueError, match="unconditional"):
            model.sample(4, labels=y)


@pytest.mark.parametrize("name", PAIRINGS)
def test_hyperparameters_rebuild_the_model(name):
    model = _make(name, conditional=True, k=2)
    assert model.hparams["n_samples"] == 2 and "lam" in model.hparams
    clone = type(model)(**model.hparams)
    clone.load_state_dict(model.state_dict())
    assert type(clone.prior) is type(model.prior)


def test_data_outside_the_likelihood_support_is_refused():
    model = _make("VanillaVAE")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.loss_terms((torch.full((2, 1, 8, 8), 255.0), None))


def test_conditional_needs_labels():
    with pytest.raises(ValueError, match="num_classes"):
        model_class("VanillaVAE")(data_shape=(2,), conditional=True)
    model = _make("VanillaVAE", conditional=True)
    with pytest.raises(ValueError, match="labels are required"):
        model.loss_terms(torch.rand(2, 1, 8, 8))


@pytest.mark.parametrize(("arch", "k"), [("mlp", 1), ("conv", 3)])
def test_label_prior_is_per_record_and_shifts_kl_and_samples(arch, k, monkeypatch):
    """``label_prior``: KL to N(μ_y, I) in closed form, per record (the label means are a layer
    read by record i's own label only), samples drawn around the label's mean."""
    from lit_dpvae.priors import StandardNormal

    torch.manual_seed(0)
    model = _make("VanillaVAE", arch, conditional=True, k=k, label_prior=True)
    monkeypatch.setattr(model, "draw_noise", record_noise)
    x, y = make_batch(6, SHAPES[arch])
    terms = model.loss_terms((x, y))
    onehot = torch.nn.functional.one_hot(y, 3).float()
    mu, log_var = model.encode(x, onehot)
    shift = model.label_means.weight.T[y]
    want = StandardNormal.kl(mu - shift, log_var) * model.beta
    torch.testing.assert_close(terms.sample["kl"], want)
    assert not torch.allclose(terms.sample["kl"], StandardNormal.kl(mu, log_var) * model.beta)
    y2 = y.clone()
    y2[2] = (y[2] + 1) % 3  # another label for record 2 only
    changed = model.loss_terms((x, y2))
    others = [0, 1, 3, 4, 5]
    torch.testing.assert_close(changed.sample["kl"][others], terms.sample["kl"][others])
    assert not torch.allclose(changed.sample["kl"][2], terms.sample["kl"][2])
    # Record 0's terms give gradient to the mean of its own label only.
    model.zero_grad()
    terms.per_record()[0].backward()
    grad = model.label_means.weight.grad
    assert grad[:, y[0]].abs().sum() > 0
    assert grad[:, [c for c in range(3) if c != int(y[0])]].abs().sum() == 0
    # Samples: z = μ_y + ε (decoded), so equal seeds and labels give equal images.
    torch.manual_seed(3)
    z_noise = model.prior.sample(4)
    labels = torch.tensor([0, 1, 2, 0])
    torch.manual_seed(3)
    got = model.sample(4, labels, mean=True)
    with torch.no_grad():
        want_img = model.likelihood.mean(model.decode(
            z_noise + model.label_means.weight.T[labels],
            torch.nn.functional.one_hot(labels, 3).float()))
    torch.testing.assert_close(got, want_img)


@pytest.mark.parametrize(("arch", "k", "analytic"), [("mlp", 1, True), ("conv", 3, False)])
def test_label_prior_scale_kl_and_samples(arch, k, analytic, monkeypatch):
    """``label_prior_scale``: the KL to N(μ_y, diag(s_y²)) — closed form, or the Monte Carlo
    estimate at the same draws — equals torch.distributions' value; record i's KL reads its own
    label's scale only; samples are μ_y + s_y ⊙ ε."""
    from torch.distributions import Normal, kl_divergence

    torch.manual_seed(0)
    model = _make("VanillaVAE", arch, conditional=True, k=k, label_prior=True,
                  label_prior_scale=True)
    monkeypatch.setattr(model, "analytic_kl", analytic)
    monkeypatch.setattr(model, "draw_noise", record_noise)
    with torch.no_grad():  # s_y ≠ 1 (the initial value would hide a missing scale)
        model.label_log_scales.weight.normal_(0.0, 0.5)
    x, y = make_batch(6, SHAPES[arch])
    terms = model.loss_terms((x, y))
    onehot = torch.nn.functional.one_hot(y, 3).float()
    with torch.no_grad():
        mu, log_var = model.encode(x, onehot)
        m, s = model.label_means.weight.T[y], model.label_log_scales.weight.T[y].exp()
        q, p = Normal(mu, (0.5 * log_var).exp()), Normal(m, s)
        if analytic:
            want = kl_divergence(q, p).sum(-1)
        else:
            z = mu[:, None] + (0.5 * log_var).exp()[:, None] * record_noise(mu, k)
            want = (Normal(mu[:, None], (0.5 * log_var).exp()[:, None]).log_prob(z)
                    - Normal(m[:, None], s[:, None]).log_prob(z)).sum(-1).mean(1)
    torch.testing.assert_close(terms.sample["kl"], want * model.beta, rtol=1e-4, atol=1e-4)
    model.zero_grad()
    terms.per_record()[0].backward()
    grad = model.label_log_scales.weight.grad
    assert grad[:, y[0]].abs().sum() > 0
    assert grad[:, [c for c in range(3) if c != int(y[0])]].abs().sum() == 0
    torch.manual_seed(3)
    eps = model.prior.sample(4)
    labels = torch.tensor([0, 1, 2, 0])
    torch.manual_seed(3)
    got = model.sample(4, labels, mean=True)
    with torch.no_grad():
        w = model.label_means.weight.T[labels], model.label_log_scales.weight.T[labels].exp()
        want_img = model.likelihood.mean(model.decode(
            w[0] + w[1] * eps, torch.nn.functional.one_hot(labels, 3).float()))
    torch.testing.assert_close(got, want_img)


def test_label_prior_refusals():
    with pytest.raises(ValueError, match="conditional=True"):
        _make("VanillaVAE", label_prior=True)
    with pytest.raises(ValueError, match="label_prior_scale=True needs label_prior=True"):
        _make("VanillaVAE", conditional=True, label_prior_scale=True)
    with pytest.raises(ValueError, match="without a batch-wise divergence"):
        _make("InfoVAE", conditional=True, label_prior=True, lam=1.0)

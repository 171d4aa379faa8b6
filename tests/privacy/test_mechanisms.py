"""Mechanisms: sensitivity on neighbouring batches, oracle sums, noise, and refusals."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lit_dpvae.privacy import (
    BACKENDS,
    AttributionError,
    LossTerms,
    LossTermsError,
    NaiveDPSGD,
    NonPrivate,
    TermwiseDPSGD,
    global_norm,
)
from lit_dpvae.privacy.capture import UnsupportedModuleError
from tests.privacy.toys import (
    MeanCoupled,
    ToyVAE,
    diff_norms,
    make_toy,
    neighbours,
    per_record_oracle,
)

KINDS = ("mlp", "mlp-k3", "conv")
# Float32 rounding: a clipped vector may exceed its bound by a few ulps.
REL_TOL = 1e-5


MECHANISMS = {
    "termwise": lambda be: TermwiseDPSGD(
        max_grad_norm=0.7, batch_max_grad_norm=0.3, noise_multiplier=1.0, backend=be
    ),
    "termwise-tiny-C": lambda be: TermwiseDPSGD(
        max_grad_norm=1e-3, batch_max_grad_norm=1e-3, noise_multiplier=1.0, backend=be
    ),
    "naive": lambda be: NaiveDPSGD(
        max_grad_norm=0.5, max_batch_size=5, noise_multiplier=1.0, expected_batch_size=5,
        backend=be,
    ),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mech_name", sorted(MECHANISMS))
def test_sensitivity_holds_on_neighbouring_batches(kind, backend, mech_name):
    model, shape = make_toy(kind)
    mech = MECHANISMS[mech_name](backend)
    rng = torch.Generator().manual_seed(hash((kind, backend, mech_name)) % 2**31)
    worst = {part: 0.0 for part in mech.parts}
    for s, s_plus in neighbours(shape, rng):
        for part, d in diff_norms(mech, model, s, s_plus).items():
            assert math.isfinite(d)
            worst[part] = max(worst[part], d)
            assert d <= mech.sensitivity[part] * (1 + REL_TOL), (part, d, mech.sensitivity)
    # The check is not vacuous: adding a record moves every part.
    assert all(w > 0 for w in worst.values()), worst


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_norm", [1e-3, 0.5, 1e6])
def test_sample_part_equals_one_record_at_a_time(kind, backend, max_norm):
    model, shape = make_toy(kind)
    x = torch.randn(7, *shape, generator=torch.Generator().manual_seed(1))
    mech = TermwiseDPSGD(
        batch_max_grad_norm=1.0, max_grad_norm=max_norm, noise_multiplier=1.0, backend=backend)
    got = mech.aggregate(model, (x,))["sample"]
    want = per_record_oracle(model, x, max_norm)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-7 * max(1, max_norm))


@pytest.mark.parametrize("mech_name", ["termwise", "termwise-tiny-C"])
def test_sensitivity_holds_with_blocked_two_pass_conv_gradients(mech_name, monkeypatch):
    """The same adversarial neighbours with the conv's per-record gradients taken in blocks of
    one record and in two passes (norms, then the clipped sum): the bound still holds."""
    import lit_dpvae.privacy.clipping as gs

    monkeypatch.setattr(gs, "_SAMPLER_BLOCK", 1)
    monkeypatch.setattr(gs, "_MATERIALISE_LIMIT", 0)
    model, shape = make_toy("conv")
    mech = MECHANISMS[mech_name]("ghost")
    rng = torch.Generator().manual_seed(17)
    worst = 0.0
    for s, s_plus in neighbours(shape, rng):
        d = diff_norms(mech, model, s, s_plus)["sample"]
        assert math.isfinite(d) and d <= mech.sensitivity["sample"] * (1 + REL_TOL)
        worst = max(worst, d)
    assert worst > 0


@pytest.mark.parametrize("kind", KINDS)
def test_backends_agree_on_every_part(kind):
    model, shape = make_toy(kind)
    x = torch.randn(6, *shape, generator=torch.Generator().manual_seed(2))
    for factory in MECHANISMS.values():
        results = [factory(be).aggregate(model, (x,)) for be in BACKENDS]
        for other in results[1:]:
            for part in results[0]:
                for name in results[0][part]:
                    torch.testing.assert_close(other[part][name], results[0][part][name],
                                               rtol=1e-4, atol=1e-7)


def test_batch_part_is_the_clipped_divergence_gradient():
    model, shape = make_toy("mlp")
    x = torch.randn(5, *shape, generator=torch.Generator().manual_seed(3))
    c_b = 1e-3
    stats = TermwiseDPSGD(max_grad_norm=1.0, batch_max_grad_norm=c_b).aggregate(model, (x,))
    params = dict(model.named_parameters())
    h = torch.autograd.grad(model.loss_terms((x,)).batch_total(), list(params.values()),
                            allow_unused=True)
    h = {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), h)}
    norm = float(global_norm(h))
    assert norm > c_b  # clipping is active
    for name in h:
        torch.testing.assert_close(stats["batch"][name], h[name] * c_b / (norm + 1e-6))


def test_naive_bound_grows_with_batch_size_and_termwise_does_not():
    c = 1e-2
    sizes = (4, 32)
    # The stated bounds.
    naive = {n: NaiveDPSGD(max_grad_norm=c, max_batch_size=n).sensitivity["total"] for n in sizes}
    assert naive[32] == 8 * naive[4] == 2 * 32 * c
    termwise = {n: TermwiseDPSGD(max_grad_norm=c, batch_max_grad_norm=c).sensitivity
                for n in sizes}
    assert termwise[4] == termwise[32] == {"sample": c, "batch": 2 * c}

    # What actually happens on neighbouring batches: when the divergence is attributed per
    # record, one adversarial record moves every other record's clipped gradient, so the sum
    # moves far beyond C, and more in bigger batches; the term-wise parts stay within O(1).
    model = MeanCoupled()
    rng = torch.Generator().manual_seed(4)
    observed = {}
    for n in sizes:
        nv = NaiveDPSGD(max_grad_norm=c, max_batch_size=n + 1, expected_batch_size=n)
        tw = TermwiseDPSGD(max_grad_norm=c, batch_max_grad_norm=c)
        s = torch.randn(n, 6, generator=rng)
        direction = model.enc.weight.detach().sum(0)  # moves ⟨μ, 1⟩ fastest
        mean_proj = float(model.enc(s).detach().mean(0).sum())
        x = -torch.sign(torch.tensor(mean_proj)) * 1e3 * n * direction[None, :]
        s_plus = torch.cat([s, x])
        observed[n] = diff_norms(nv, model, s, s_plus)["total"]
        assert observed[n] <= nv.sensitivity["total"] * (1 + REL_TOL)
        d = diff_norms(tw, model, s, s_plus)
        assert d["sample"] <= c * (1 + REL_TOL) and d["batch"] <= 2 * c * (1 + REL_TOL)
    assert observed[4] > 2 * c  # already beyond what "clip each record to C" would claim
    assert observed[32] > 4 * observed[4]  # and it grows with the batch size
    # Measured 0.060 (n=4) and 0.31 (n=32): about half the stated bound 2·n_max·C, so the bound
    # is of the right order and an O(1) bound would be false.
    assert observed[32] > 0.4 * 2 * 32 * c


def test_empty_batch_gives_zero_statistics():
    model, shape = make_toy("mlp")
    empty = torch.zeros(0, *shape)
    for factory in MECHANISMS.values():
        stats = factory("ghost").aggregate(model, (empty,))
        assert all(float(global_norm(v)) == 0.0 for v in stats.values())
    stats = NonPrivate().aggregate(model, (empty,))
    assert all(float(global_norm(v)) == 0.0 for v in stats.values())


def test_non_private_update_is_the_plain_gradient():
    model, shape = make_toy("mlp")
    x = torch.randn(8, *shape, generator=torch.Generator().manual_seed(5))
    mech = NonPrivate()
    with pytest.raises(RuntimeError, match="set_sampling"):
        mech.aggregate(model, (x,))
    mech.set_sampling(10.0)  # the expected batch size, not the realised one (8)
    update = mech.privatize(mech.aggregate(model, (x,)), expected_batch_size=10)
    model.loss_terms((x,)).mean_loss(expected_batch_size=10.0).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(update[name], p.grad)


@pytest.mark.parametrize("mech_name", sorted(MECHANISMS))
def test_noise_std_equals_sigma_times_sensitivity(mech_name):
    """Each part's noise is N(0, (σ_k Δ_k)²): checked on ~10⁵ coordinates with a fixed seed.

    The relative standard error of a std estimated from P = 100,400 values is 1/sqrt(2P) ≈ 0.22%;
    the tolerance of 1.5% is ~7 standard errors. The mean is checked to 5 standard errors.
    """
    model = nn.Sequential(nn.Linear(400, 250), nn.Linear(250, 1))
    mech = MECHANISMS[mech_name]("ghost")
    mech.noise_multiplier = 1.7
    zeros = mech.zeros(model)
    noisy = mech.add_noise(zeros, torch.Generator().manual_seed(6))
    for part in mech.parts:
        values = torch.cat([v.flatten() for v in noisy[part].values()])
        want = mech.noise_multipliers[part] * mech.sensitivity[part]
        assert abs(float(values.std()) / want - 1) < 0.015
        assert abs(float(values.mean())) < 5 * want / math.sqrt(values.numel())
    if mech_name.startswith("termwise"):
        sigma_s, sigma_b = mech.noise_multipliers["sample"], mech.noise_multipliers["batch"]
        assert math.isclose((sigma_s**-2 + sigma_b**-2) ** -0.5, 1.7)
        # The two parts' noises are independent draws.
        s = torch.cat([v.flatten() for v in noisy["sample"].values()])
        b = torch.cat([v.flatten() for v in noisy["batch"].values()])
        assert abs(float(torch.corrcoef(torch.stack([s, b]))[0, 1])) < 0.02
        # And the update combines them as G_s / B + G_b.
        update = mech.privatize(zeros, 50.0, torch.Generator().manual_seed(7))
        values = torch.cat([v.flatten() for v in update.values()])
        want = math.hypot(mech.noise_std()["sample"] / 50.0, mech.noise_std()["batch"])
        assert abs(float(values.std()) / want - 1) < 0.015


def test_termwise_without_batch_terms_equals_opacus_dpsgd_step_for_step():
    from opacus.grad_sample import GradSampleModule
    from opacus.optimizers import DPOptimizer

    sigma, c, b, lr = 0.9, 0.3, 8.0, 0.5
    torch.manual_seed(0)
    ours = ToyVAE(batch_term=False)
    theirs = ToyVAE(batch_term=False)
    theirs.load_state_dict(ours.state_dict())
    gsm = GradSampleModule(theirs, loss_reduction="sum")
    opt_theirs = DPOptimizer(torch.optim.SGD(theirs.parameters(), lr=lr), noise_multiplier=sigma,
                             max_grad_norm=c, expected_batch_size=int(b),
                             generator=torch.Generator().manual_seed(8))
    opt_ours = torch.optim.SGD(ours.parameters(), lr=lr)
    mech = TermwiseDPSGD(max_grad_norm=c, noise_multiplier=sigma, sample_share=1.0)
    gen = torch.Generator().manual_seed(8)
    data = torch.Generator().manual_seed(9)
    for _ in range(4):
        n = int(torch.randint(0, 12, (1,), generator=data))
        x = torch.randn(n, 6, generator=data)
        update = mech.privatize(mech.aggregate(ours, (x,)), expected_batch_size=b, generator=gen)
        for name, p in ours.named_parameters():
            p.grad = update[name]
        opt_ours.step()
        opt_theirs.zero_grad()
        if n:
            gsm._module.loss_terms((x,)).per_record().sum().backward()
        else:  # Opacus' empty-batch path: zero per-sample gradients
            for p in theirs.parameters():
                p.grad_sample = torch.zeros(0, *p.shape)
        opt_theirs.step()
        for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------
# Refusals: bad input gets a clear error naming the problem and the fix.


class _Terms(nn.Module):
    def __init__(self, make):
        super().__init__()
        self.lin = nn.Linear(3, 1)
        self.make = make

    def loss_terms(self, batch):
        return self.make(self.lin(batch[0]).squeeze(-1))


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda y: LossTerms(sample={"recon": y[:, None]}), LossTermsError, r"shape \[n\]"),
        (lambda y: LossTerms(sample={"recon": y.sum()}), LossTermsError, r"shape \[n\]"),
        (lambda y: LossTerms(sample={"a": y, "b": y[:-1]}), LossTermsError, "one value per"),
        (lambda y: LossTerms(sample={"r": y}, batch={"mmd": y}), LossTermsError, "scalar"),
        (lambda y: LossTerms(sample={"r": y * float("nan")}), LossTermsError, "NaN"),
        (lambda y: LossTerms(sample={"r": y}, batch={"d": y.sum() * math.inf}), LossTermsError,
         "NaN or Inf"),
        (lambda y: LossTerms(), LossTermsError, "empty"),
        (lambda y: y, TypeError, "must return"),
    ],
)
def test_bad_loss_terms_are_refused(make, error, match):
    mech = TermwiseDPSGD(max_grad_norm=1.0, noise_multiplier=1.0, sample_share=1.0)
    with pytest.raises(error, match=match):
        mech.aggregate(_Terms(make), (torch.randn(4, 3),))


def test_module_without_loss_terms_is_refused():
    with pytest.raises(TypeError, match="loss_terms"):
        TermwiseDPSGD(
            batch_max_grad_norm=1.0, max_grad_norm=1.0).aggregate(
            nn.Linear(3, 1), (torch.randn(2, 3),))


def test_batchnorm_is_refused_with_a_replacement():
    model = ToyVAE()
    model.enc[1] = nn.BatchNorm1d(8)
    with pytest.raises(UnsupportedModuleError, match="GroupNorm"):
        TermwiseDPSGD(batch_max_grad_norm=1.0, max_grad_norm=1.0, noise_multiplier=1.0).aggregate(
            model, (torch.randn(4, 6),)
        )


def test_parameter_outside_a_layer_is_refused():
    class Loose(ToyVAE):
        def __init__(self):
            super().__init__(batch_term=False)
            self.scale = nn.Parameter(torch.ones(()))

        def loss_terms(self, batch):
            terms = super().loss_terms(batch)
            terms.sample["recon"] = terms.sample["recon"] * self.scale
            return terms

    mech = TermwiseDPSGD(max_grad_norm=1.0, noise_multiplier=1.0, sample_share=1.0)
    with pytest.raises(AttributionError, match="scale"):
        mech.aggregate(Loose(), (torch.randn(3, 6),))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"max_grad_norm": -1.0}, "max_grad_norm"),
        ({"max_grad_norm": math.nan}, "max_grad_norm"),
        ({"max_grad_norm": 1.0, "batch_max_grad_norm": 0.0}, "batch_max_grad_norm"),
        ({"max_grad_norm": 1.0, "sample_share": 0.0}, "sample_share"),
        ({"max_grad_norm": 1.0, "sample_share": 1.5}, "sample_share"),
        ({"max_grad_norm": 1.0, "noise_multiplier": -1.0}, "noise_multiplier"),
        ({"max_grad_norm": 1.0, "backend": "magic"}, "backend"),
    ],
)
def test_bad_mechanism_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TermwiseDPSGD(**{"batch_max_grad_norm": 1.0, **kwargs})


def test_naive_settings_are_checked():
    with pytest.raises(ValueError, match="max_batch_size"):
        NaiveDPSGD(max_grad_norm=1.0, max_batch_size=0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        NaiveDPSGD(max_grad_norm=0.0, max_batch_size=4)


def test_budget_share_must_match_the_model():
    x = (torch.randn(3, 6),)
    with pytest.raises(ValueError, match="sample_share < 1"):
        TermwiseDPSGD(max_grad_norm=1.0, sample_share=1.0).aggregate(ToyVAE(), x)
    with pytest.raises(ValueError, match="sample_share=1"):
        TermwiseDPSGD(
            batch_max_grad_norm=1.0, max_grad_norm=1.0, sample_share=0.5).aggregate(
            ToyVAE(batch_term=False), x)


def test_a_record_with_non_finite_gradient_contributes_exactly_zero():
    from lit_dpvae.privacy import clip_vector
    from lit_dpvae.privacy.clipping import clip_factors, weighted_sum

    grads = torch.tensor([[3.0, 4.0], [math.inf, 1.0], [math.nan, 0.0]])
    factors = clip_factors(grads.norm(dim=1), 1.0)
    assert factors[1] == 0 and factors[2] == 0
    torch.testing.assert_close(weighted_sum(factors, grads), torch.tensor([0.6, 0.8]), atol=1e-6,
                               rtol=0)
    clipped = clip_vector({"a": torch.tensor([math.inf, 1.0])}, 1.0)
    assert torch.equal(clipped["a"], torch.zeros(2))


def test_a_sample_term_that_reads_other_records_is_refused():
    class Leaky(ToyVAE):
        def loss_terms(self, batch):
            terms = super().loss_terms(batch)
            # "per-record" KL against the batch mean: secretly batch-wise
            mu, _ = self.encode(batch[0])
            terms.sample["kl"] = (mu - mu.mean(0)).pow(2).sum(-1)
            return terms

    mech = TermwiseDPSGD(batch_max_grad_norm=1.0, max_grad_norm=1.0, noise_multiplier=1.0)
    with pytest.raises(LossTermsError, match="'kl' of record 0 depends on record"):
        mech.aggregate(Leaky(), (torch.randn(5, 6),))
    # The honest model passes the same probe, and the probe leaves the RNG stream untouched.
    honest, probe = ToyVAE(), TermwiseDPSGD(
        batch_max_grad_norm=1.0, max_grad_norm=1.0, noise_multiplier=1.0)
    before = torch.get_rng_state()
    probe.probe_sample_terms(honest, (torch.ones(5, 6),), 5)
    assert torch.equal(before, torch.get_rng_state())
    assert probe._probed is honest


@pytest.mark.parametrize(("backend", "keep"), [("ghost", True), ("ghost", False),
                                               ("functorch", True)])
@pytest.mark.parametrize("block", [144, 288, 144 * 5])
def test_conv_per_sample_grads_in_row_blocks_equal_the_oracle(backend, keep, block, monkeypatch):
    """Conv layers' per-sample gradients are sampled a block of rows at a time (their unfolded
    input is k² times the activation); 1, 2 or 5 rows per block (7 records: uneven blocks) give
    the one-record-at-a-time result, whether the per-sample gradients are kept and summed with
    the clip factors or (above ``_MATERIALISE_LIMIT``; forced here) only their norms are taken
    and the clipped sum is a VJP with rescaled backprops."""
    import lit_dpvae.privacy.clipping as gs

    monkeypatch.setattr(gs, "_SAMPLER_BLOCK", block)  # the toy's conv: 16 · 9 = 144 per row
    if not keep:
        monkeypatch.setattr(gs, "_MATERIALISE_LIMIT", 0)
    model, shape = make_toy("conv")
    x = torch.randn(7, *shape, generator=torch.Generator().manual_seed(1))
    got = TermwiseDPSGD(batch_max_grad_norm=1.0, max_grad_norm=0.5, noise_multiplier=1.0,
                        backend=backend).aggregate(model, (x,))["sample"]
    want = per_record_oracle(model, x, 0.5)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-7)


class _SharedConv(nn.Module):
    """One Conv2d called twice per record (its per-record gradient is the sum of two calls)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.head = nn.Linear(16, 1)

    def loss_terms(self, batch):
        from lit_dpvae.privacy import LossTerms

        h = self.conv(torch.tanh(self.conv(batch[0])))
        return LossTerms(sample={"recon": self.head(h.flatten(1)).pow(2).sum(-1)}, batch={})


class _Bag(nn.Module):
    """EmbeddingBag on flat indices with offsets: its inputs do not have the batch's rows first."""

    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(12, 4, mode="sum")
        self.head = nn.Linear(4, 2)

    def loss_terms(self, batch):
        from lit_dpvae.privacy import LossTerms

        idx = batch[0]
        n, length = idx.shape
        h = self.bag(idx.reshape(-1), torch.arange(0, n * length, length))
        return LossTerms(sample={"recon": (self.head(h) - 1).pow(2).sum(-1)}, batch={})


@pytest.mark.parametrize("make", [_SharedConv, _Bag])
def test_layers_that_cannot_be_cut_by_rows_keep_the_oracle(make, monkeypatch):
    """A layer called twice (its norm needs both calls) and an EmbeddingBag (flat indices, not
    rows) with the smallest blocks and the two-pass route forced: still the per-record oracle."""
    import lit_dpvae.privacy.clipping as gs

    monkeypatch.setattr(gs, "_SAMPLER_BLOCK", 1)
    monkeypatch.setattr(gs, "_MATERIALISE_LIMIT", 0)
    torch.manual_seed(0)
    model = make()
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(5, 1, 4, 4, generator=g) if make is _SharedConv
         else torch.stack([torch.randperm(12, generator=g)[:3] for _ in range(5)]))
    got = TermwiseDPSGD(max_grad_norm=0.5, noise_multiplier=1.0,
                        sample_share=1.0).aggregate(model, (x,))["sample"]
    want = per_record_oracle(model, x, 0.5)
    assert any(float(w.norm()) > 0 for w in want.values())
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("limit", [1 << 40, 0])
def test_conv_sampler_calls_are_blocked(limit, monkeypatch):
    """The conv sampler really sees blocks of the bound's size (kept route: one pass; two-pass
    route: each block twice), not the whole batch, and always the same number of rows."""
    import lit_dpvae.privacy.clipping as gs
    from lit_dpvae.privacy.conv import SAMPLERS

    conv_sampler = SAMPLERS[nn.Conv2d]
    rows_seen = []

    def spy(module, activations, backprops):
        rows_seen.append(backprops.shape[0])
        return conv_sampler(module, activations, backprops)

    monkeypatch.setitem(SAMPLERS, nn.Conv2d, spy)
    monkeypatch.setattr(gs, "_SAMPLER_BLOCK", 2 * 144)  # the toy's conv: 16 · 9 per row
    monkeypatch.setattr(gs, "_MATERIALISE_LIMIT", limit)
    model, shape = make_toy("conv")
    x = torch.randn(7, *shape, generator=torch.Generator().manual_seed(1))
    TermwiseDPSGD(
        batch_max_grad_norm=1.0, max_grad_norm=0.5, noise_multiplier=1.0).aggregate(model, (x,))
    # 7 records, padded to one forward block of 64 (record_block), sampled 2 rows at a time:
    # every call sees 2 rows
    assert rows_seen == [2] * (32 if limit else 64)


def test_the_record_block_follows_one_processs_share_of_the_public_batch_size():
    """Blocks cover B/W + 2·√(B/W) records in multiples of 32 (one block in almost every step,
    and W processes do not each pad up to the global batch)."""
    mech = TermwiseDPSGD(max_grad_norm=1.0, noise_multiplier=1.0, sample_share=1.0)
    assert mech.record_block() == 64  # before the sampling is known
    mech.set_sampling(256.0)
    assert mech.record_block() == 288
    mech.set_sampling(4096.0)
    assert mech.record_block(world_size=8) == 576 and mech.record_block() == 4224

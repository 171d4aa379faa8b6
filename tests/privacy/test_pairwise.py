"""PairwiseDPSGD: pair-decomposed kernel divergences (docs/privacy.md §8).

Sensitivity on random and adversarial neighbours, independence of the batch size, exactness
against ``n·∇(λ MMD²)`` when clipping is inactive, a brute-force per-pair clipping oracle, noise
and the joint σ_eff with three parts, refusals.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lit_dpvae.divergences import MMD, DimensionWiseMMD
from lit_dpvae.privacy import (
    BACKENDS,
    LossTerms,
    PairwiseDPSGD,
    PairwiseTerm,
    TermwiseDPSGD,
    global_norm,
    joint_noise_multiplier,
)
from tests.privacy.test_mechanisms import REL_TOL
from tests.privacy.toys import (
    DIVS,
    PairToy,
    diff_norms,
    neighbours,
    pairwise_mechanism,
)

KINDS = ("mlp", "mlp-k3", "conv")
def _grad(model, scalar):
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(scalar, list(params.values()), allow_unused=True)
    return {k: torch.zeros_like(p) if g is None else g for (k, p), g in zip(params.items(), grads)}


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("div", sorted(DIVS))
@pytest.mark.parametrize("c_p", [1e-3, 0.2])
def test_sensitivity_holds_on_neighbouring_batches(kind, div, c_p):
    model = PairToy(kind, div, opaque=(div == "mmd"))
    mech = pairwise_mechanism(c_p, opaque=(div == "mmd"))
    rng = torch.Generator().manual_seed(hash((kind, div, c_p)) % 2**31)
    worst = {part: 0.0 for part in mech.parts}
    for s, s_plus in neighbours(model.shape, rng):
        for part, d in diff_norms(mech, model, s, s_plus).items():
            assert math.isfinite(d)
            worst[part] = max(worst[part], d)
            assert d <= mech.sensitivity[part] * (1 + REL_TOL), (part, d, mech.sensitivity)
    assert all(w > 0 for w in worst.values()), worst
    assert mech.sensitivity["pairwise"] == 8 * c_p


@pytest.mark.parametrize("backend", BACKENDS)
def test_sensitivity_with_every_sample_backend(backend):
    model = PairToy("mlp", "mmd", opaque=True)
    mech = pairwise_mechanism(0.05, opaque=True, backend=backend)
    rng = torch.Generator().manual_seed(11)
    for s, s_plus in neighbours(model.shape, rng)[:7]:
        for part, d in diff_norms(mech, model, s, s_plus).items():
            assert d <= mech.sensitivity[part] * (1 + REL_TOL)


def test_bound_does_not_grow_with_batch_size():
    """Adversarial neighbours at n = 4, 32, 128: one far record, a duplicate, a record next to
    the cluster. The pairwise part stays below 8·C_p at every size (and the bound is fixed)."""
    c_p = 1e-2
    model = PairToy("mlp", "mmd", lam=10.0)
    mech = pairwise_mechanism(c_p)
    rng = torch.Generator().manual_seed(5)
    observed = {}
    for n in (4, 32, 128):
        s = torch.randn(n, 6, generator=rng)
        worst = 0.0
        for x in (1e3 * torch.randn(1, 6, generator=rng), s[:1].clone(), s[:1] + 1e-3,
                  -s.mean(0, keepdim=True) * 50):
            d = diff_norms(mech, model, s, torch.cat([s, x]))["pairwise"]
            assert d <= 8 * c_p * (1 + REL_TOL), (n, d)
            worst = max(worst, d)
        observed[n] = worst
    assert mech.sensitivity["pairwise"] == 8 * c_p  # no n anywhere
    assert all(v > 0.5 * c_p for v in observed.values()), observed  # not vacuous
    assert observed[128] <= 8 * c_p and observed[128] < 4 * observed[4] + 4 * c_p


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("div", sorted(DIVS))
def test_unclipped_pairwise_part_is_n_times_the_divergence_gradient(kind, div):
    model = PairToy(kind, div)
    x = torch.randn(9, *model.shape, generator=torch.Generator().manual_seed(2))
    stats = pairwise_mechanism(1e9).aggregate(model, (x,))
    want = _grad(model, model.loss_terms((x,)).batch["mmd"])
    for name in want:
        torch.testing.assert_close(stats["pairwise"][name], 9 * want[name], rtol=1e-4, atol=1e-6)
    # The sample part is the term-wise sample part.
    tw = TermwiseDPSGD(
        batch_max_grad_norm=1.0, max_grad_norm=0.7, sample_share=0.5).aggregate(
        model, (x,))["sample"]
    for name in tw:
        torch.testing.assert_close(stats["sample"][name], tw[name])


@pytest.mark.parametrize("cls_name", ["InfoVAE", "SparseVAE", "SparseVAE-samples"])
def test_shipped_models_declare_exact_pairs(cls_name):
    """The pairwise statistic (unclipped) is n × the autograd gradient of λ·D, whether the
    divergence reads one sample per record (InfoVAE; ``reads="sample"``) or the posterior
    means (SparseVAE's dimension-wise MMD)."""
    from lit_dpvae.models import info, sparse

    cls = {"InfoVAE": info.InfoVAE, "SparseVAE": sparse.SparseVAE,
           "SparseVAE-samples": sparse.SparseVAE}[cls_name]
    extra = {"reads": "sample"} if cls_name.endswith("samples") else {}
    if cls_name.startswith("SparseVAE"):
        extra["divergence"] = "dim_mmd"
    torch.manual_seed(0)
    model = cls(data_shape=(6,), latent_dim=3, hidden=(8,), likelihood="gaussian", lam=5.0,
                **extra)
    assert model.divergence.reads == extra.get(
        "reads", "mean" if cls_name == "SparseVAE" else "sample")
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(1)
    stats = pairwise_mechanism(1e9).aggregate(model, (x,))
    torch.manual_seed(1)  # same reparameterisation noise and prior samples
    terms = model.loss_terms((x,))
    assert set(terms.pairwise) == {model.divergence_key}
    want = _grad(model, terms.batch[model.divergence_key])
    for name in want:
        torch.testing.assert_close(stats["pairwise"][name], 7 * want[name], rtol=1e-4, atol=1e-6)


def _pair_oracle(model: PairToy, x, c_p, prefixes=None):
    """Σ_i J_iᵀ ū_i with every pair term J_iᵀu materialised from the full Jacobian of z_i (or
    from its columns of the parameters named with ``prefixes``: the pairs clipped there)."""
    params = {k: p for k, p in model.named_parameters()
              if prefixes is None or k.startswith(prefixes)}
    n, d = x.shape[0], model.d_z
    codes = model.codes(x)[2][:, 0]
    z = codes.detach()
    total = {k: torch.zeros_like(p) for k, p in params.items()}
    lam = model.lam

    def clip(v):
        norm = float(torch.sqrt(sum(t.pow(2).sum() for t in v)))
        f = min(1.0, c_p / (norm + 1e-6))
        return [f * t for t in v]

    for i in range(n):
        rows = []
        for k in range(d):
            g = torch.autograd.grad(codes[i, k], list(params.values()), retain_graph=True,
                                    allow_unused=True)
            rows.append([torch.zeros_like(p) if t is None else t
                         for p, t in zip(params.values(), g)])

        def pull(u, rows=rows):  # J_iᵀ u
            return [sum(u[k] * rows[k][j] for k in range(d)) for j in range(len(params))]

        contrib = [torch.zeros_like(p) for p in params.values()]
        for j in range(n):
            if j != i:
                t = clip(pull(lam * model.div.pair_grad(z[i], z[j])))
                contrib = [c + 2.0 / (n - 1) * v for c, v in zip(contrib, t)]
        v = lam * model.div.pair_grad(z[i][None], model.w).mean(0)
        contrib = [c - 2.0 * t for c, t in zip(contrib, clip(pull(v)))]
        for name, c in zip(params, contrib):
            total[name] += c
    return total


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("c_p", [1e-3, 0.05])
def test_clipped_pairs_equal_a_brute_force_oracle(kind, c_p):
    model = PairToy(kind, "dim_mmd" if kind == "conv" else "mmd", lam=5.0)
    x = torch.randn(6, *model.shape, generator=torch.Generator().manual_seed(4))
    got = pairwise_mechanism(c_p).aggregate(model, (x,))["pairwise"]
    want = _pair_oracle(model, x, c_p)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-7)


#: Parameter subsets of the pairwise part (``batch_params``): the whole encoder, its first layer
#: only (the codes' head excluded: backprops pass through it, its parameters are not clipped or
#: released), and a layer's weight without its bias (no ghost identity for half a layer).
SUBSETS = {"mlp": [("enc.",), ("enc.0.",), ("enc.2.weight", "enc.0.bias")],
           "mlp-k3": [("enc.0.",)],
           "conv": [("enc.1.", "enc.4.bias"), ("enc.0.weight",)]}


@pytest.mark.parametrize("kind, prefixes", [(k, s) for k, ss in SUBSETS.items() for s in ss])
def test_pairs_clipped_on_a_parameter_subset_equal_the_oracle(kind, prefixes):
    """With ``batch_params`` the pair terms are clipped as vectors of the subset's coordinates
    only, and nothing outside the subset is released (no entry, so ``privatize`` adds no noise
    there)."""
    model = PairToy(kind, "dim_mmd" if kind == "conv" else "mmd", lam=5.0)
    x = torch.randn(6, *model.shape, generator=torch.Generator().manual_seed(4))
    mech = pairwise_mechanism(0.01, batch_params=list(prefixes))
    got = mech.aggregate(model, (x,))["pairwise"]
    want = _pair_oracle(model, x, 0.01, prefixes)
    assert set(got) == set(want) and want
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-7)
    # on the pairs' own coordinates, clipping bites: the subset changes the statistic
    full = pairwise_mechanism(0.01).aggregate(model, (x,))["pairwise"]
    if prefixes != ("enc.",):
        assert any(not torch.allclose(got[k], full[k]) for k in got)
    else:
        for k in got:  # the whole encoder: the decoder's columns of J_i are zero anyway
            torch.testing.assert_close(got[k], full[k])
    update = mech.privatize({"sample": mech.zeros(model)["sample"], "pairwise": got}, 10.0)
    assert set(update) == {k for k, _ in model.named_parameters()}
    for k in update:
        want_std = mech.noise_std()["sample"] / 10.0
        if k.startswith(prefixes):
            want_std = math.hypot(want_std, mech.noise_std()["pairwise"] / 10.0)
        assert mech.update_noise_std(10.0, k) == pytest.approx(want_std)


@pytest.mark.parametrize("kind", KINDS)
def test_sensitivity_on_a_parameter_subset_holds_on_neighbouring_batches(kind):
    prefixes = SUBSETS[kind][0]
    div = "dim_mmd" if kind == "conv" else "mmd"
    model = PairToy(kind, div, opaque=(div == "mmd"))
    mech = pairwise_mechanism(0.05, opaque=(div == "mmd"), batch_params=list(prefixes))
    rng = torch.Generator().manual_seed(17)
    worst = {part: 0.0 for part in mech.parts}
    for s, s_plus in neighbours(model.shape, rng):
        a, b = mech.aggregate(model, (s,)), mech.aggregate(model, (s_plus,))
        for part in mech.parts:
            if part != "sample":
                assert all(k.startswith(prefixes) for k in a[part]), (part, list(a[part]))
            d = float(global_norm({k: a[part][k] - b[part][k] for k in a[part]}))
            assert math.isfinite(d)
            worst[part] = max(worst[part], d)
            assert d <= mech.sensitivity[part] * (1 + REL_TOL), (part, d, mech.sensitivity)
    assert all(w > 0 for w in worst.values()), worst


def test_small_batches_give_zero_pairwise_statistics():
    model = PairToy("mlp")
    for n in (0, 1):
        stats = pairwise_mechanism(1.0).aggregate(model, (torch.randn(n, 6),))
        assert float(global_norm(stats["pairwise"])) == 0.0
    stats = pairwise_mechanism(1.0).aggregate(model, (torch.zeros(0, 6),))
    assert all(float(global_norm(v)) == 0.0 for v in stats.values())


# ---------------------------------------------------------------------------------------------
def test_noise_std_and_joint_sigma_with_three_parts():
    model = nn.Sequential(nn.Linear(400, 250), nn.Linear(250, 1))
    mech = PairwiseDPSGD(max_grad_norm=0.7, pair_max_grad_norm=0.1, batch_max_grad_norm=0.3,
                         noise_multiplier=1.7, sample_share=0.5, pairwise_share=0.3)
    assert mech.parts == ("sample", "pairwise", "batch")
    sig = mech.noise_multipliers
    assert math.isclose(sig["sample"], 1.7 / math.sqrt(0.5))
    assert math.isclose(sig["pairwise"], 1.7 / math.sqrt(0.3))
    assert math.isclose(sig["batch"], 1.7 / math.sqrt(0.2))
    assert math.isclose(joint_noise_multiplier(list(sig.values())), 1.7)
    assert mech.sensitivity == {"sample": 0.7, "pairwise": 0.8, "batch": 0.6}
    zeros = mech.zeros(model)
    noisy = mech.add_noise(zeros, torch.Generator().manual_seed(6))
    for part in mech.parts:
        values = torch.cat([v.flatten() for v in noisy[part].values()])
        want = sig[part] * mech.sensitivity[part]
        assert abs(float(values.std()) / want - 1) < 0.015
        assert abs(float(values.mean())) < 5 * want / math.sqrt(values.numel())
    update = mech.privatize(zeros, 50.0, torch.Generator().manual_seed(7))
    values = torch.cat([v.flatten() for v in update.values()])
    std = mech.noise_std()
    want = math.sqrt((std["sample"] / 50) ** 2 + (std["pairwise"] / 50) ** 2 + std["batch"] ** 2)
    assert abs(float(values.std()) / want - 1) < 0.015
    # Two parts (all batch terms pairwise): σ_eff from sample + pairwise.
    two = PairwiseDPSGD(max_grad_norm=1.0, noise_multiplier=2.0, sample_share=0.6)
    assert two.parts == ("sample", "pairwise")
    assert math.isclose(joint_noise_multiplier(list(two.noise_multipliers.values())), 2.0)


def test_update_is_sample_and_pairwise_over_b():
    model = PairToy("mlp")
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(8))
    mech = PairwiseDPSGD(max_grad_norm=1e9, pair_max_grad_norm=1e9, noise_multiplier=0.0)
    update = mech.privatize(mech.aggregate(model, (x,)), expected_batch_size=8.0)
    want = _grad(model, model.loss_terms((x,)).mean_loss())
    for name in want:
        torch.testing.assert_close(update[name], want[name], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
def test_refusals():
    x = (torch.randn(4, 6),)
    with pytest.raises(ValueError, match="opaque"):
        pairwise_mechanism(1.0).aggregate(PairToy("mlp", opaque=True), x)
    with pytest.raises(ValueError, match="only burn"):
        pairwise_mechanism(1.0, opaque=True).aggregate(PairToy("mlp"), x)
    from tests.privacy.toys import ToyVAE

    with pytest.raises(ValueError, match="TermwiseDPSGD"):
        pairwise_mechanism(1.0).aggregate(ToyVAE(), x)
    for kwargs in ({"sample_share": 1.0}, {"sample_share": 0.5, "pairwise_share": 0.6},
                   {"pair_max_grad_norm": 0.0}):
        with pytest.raises(ValueError):
            PairwiseDPSGD(max_grad_norm=1.0, **kwargs)
    bad = PairToy("mlp")
    bad.loss_terms = lambda batch: LossTerms(  # type: ignore[method-assign]
        sample={"r": bad.enc(batch[0]).sum(1)},
        pairwise={"m": PairwiseTerm(bad.enc(batch[0]), bad.w, bad.div, 1.0)})
    with pytest.raises(ValueError, match="no value in LossTerms.batch"):
        pairwise_mechanism(1.0).aggregate(bad, x)


def test_strategy_trains_infovae_with_the_pairwise_mechanism(tmp_path):
    import lightning.pytorch as pl

    from lit_dpvae.models.info import InfoVAE
    from lit_dpvae.strategy import TermwiseDPStrategy
    from tests.lightning_toys import ToyData

    torch.manual_seed(0)
    model = InfoVAE(data_shape=(6,), latent_dim=2, hidden=(8,), likelihood="gaussian", lam=5.0,
                    n_prior_samples=32)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    strategy = TermwiseDPStrategy(mechanism="pairwise", noise_multiplier=1.0, max_grad_norm=0.5,
                                  pair_max_grad_norm=0.1, noise_seed=3)
    trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=4,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, ToyData(n=60, sample_rate=0.2))
    assert isinstance(strategy.mechanism, PairwiseDPSGD)
    assert strategy.accountant.steps == 4 and strategy.epsilon() > 0
    assert strategy.mechanism.sensitivity["pairwise"] == pytest.approx(0.8)
    assert any(not torch.equal(start[k], v) for k, v in model.state_dict().items())
    # Multi-process pairwise training: tests/test_strategy.py::
    # test_two_processes_match_one_device_and_stay_identical[pairwise]



def test_rounding_safe_quad_upper_bounds_the_exact_quadratic_form():
    """Directions almost in the null space of a large PSD Gram: the float32 uᵀGu can cancel
    below the exact value; with the margin it never does (exact value in float64)."""
    from lit_dpvae.privacy.pairwise import rounding_safe_quad

    gen = torch.Generator().manual_seed(0)
    d = 20
    worst = math.inf
    for _ in range(200):
        basis = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0]
        spectrum = torch.cat([torch.full((d - 1,), 1e6, dtype=torch.float64),
                              torch.tensor([1e-6], dtype=torch.float64)])
        gram64 = basis @ torch.diag(spectrum) @ basis.T
        u64 = basis[:, -1] + 1e-7 * torch.randn(d, generator=gen, dtype=torch.float64)
        exact = float(u64 @ gram64 @ u64)
        gram32, u32 = gram64.float(), u64.float()
        quad = (u32 @ gram32 @ u32).reshape(1)
        bound = rounding_safe_quad(quad, u32.pow(2).sum().reshape(1),
                                   gram32.diagonal().sum().reshape(1), 2 * d + 3)
        assert float(bound) >= exact
        worst = min(worst, float(quad) - exact)
    assert worst < 0  # the plain float32 value does under-estimate: the margin is needed


# --------------------------------------------------------------------------------------------
# The fast route of the latent-Gram pass (Linear heads, element-wise activations) gives the
# backprops of the generic batched VJP, for every encoder shape it accepts or must decline.
class _Encoder(nn.Module):
    def __init__(self, shape: str, d: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.shape, self.d = shape, d
        if shape == "conv":
            self.body = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten())
            width = 2 * 16
        elif shape == "groupnorm":
            self.body = nn.Sequential(nn.Linear(6, 8), nn.GroupNorm(2, 8), nn.SiLU())
            width = 8
        elif shape == "deep":
            self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 7), nn.ReLU())
            width = 7
        elif shape == "linear-linear":
            self.body = nn.Sequential(nn.Linear(6, 8))
            width = 8
        else:
            self.body = nn.Sequential(nn.Linear(6, 8), nn.ReLU())
            width = 8
        self.head = nn.Linear(width, 2 * d)
        self.mu = nn.Linear(width, d)  # "two-heads": separate μ and log σ² layers
        self.lv = nn.Linear(width, d)
        self.skip = nn.Linear(6, d)  # "skip": a second head reading the input
        self.post = nn.Linear(2 * d, 2 * d)  # "head-feeds-head"

    def forward(self, x):
        h = self.body(x)
        if self.shape == "two-heads":
            mu, lv = self.mu(h), self.lv(h)
        elif self.shape == "head-feeds-head":
            o = self.head(h)
            mu, lv = (self.post(o) + o).chunk(2, -1)
        else:
            mu, lv = self.head(h).chunk(2, -1)
        if self.shape == "skip":
            mu = mu + self.skip(x)
        eps = torch.linspace(-1, 1, x.shape[0] * self.d).view(x.shape[0], self.d)
        return mu + torch.exp(0.5 * lv) * eps


SHAPES = ("relu-chunk", "two-heads", "groupnorm", "deep", "linear-linear", "skip",
          "head-feeds-head", "conv")


@pytest.mark.parametrize("shape", SHAPES)
def test_fast_latent_backprops_equal_the_batched_vjp(shape, monkeypatch):
    from lit_dpvae.privacy import pairwise as pw
    from lit_dpvae.privacy.capture import capture_layers

    enc = _Encoder(shape)
    n = 5
    x = torch.randn(n, *((1, 4, 4) if shape == "conv" else (6,)),
                    generator=torch.Generator().manual_seed(1))
    with capture_layers(enc) as cap:
        codes = enc(x)
    upstream = pw._graph_nodes(codes)
    used = [i for i, c in enumerate(cap.calls) if c.output.grad_fn in upstream]
    calls_fast = []
    real = pw._linear_input_backprops
    monkeypatch.setattr(pw, "_linear_input_backprops",
                        lambda *a: calls_fast.append(1) or real(*a))
    fast = pw._code_backprops(cap.calls, used, codes, n, {})
    slow = pw._code_backprops(cap.calls, used, codes, n, None, allow_fast=False)
    assert [b is None for b in fast] == [b is None for b in slow]
    for f, s in zip(fast, slow):
        if s is not None:
            torch.testing.assert_close(f, s, rtol=1e-5, atol=1e-7)
    # The shapes with Linear heads over a deeper network take the fast route; a head that
    # feeds another head (two routes to one layer) must not.
    assert bool(calls_fast) == (shape != "head-feeds-head")
    jac = pw.latent_jacobian(cap.calls, codes, n, {})
    params = [p for p in enc.parameters()]
    for i in range(n):  # G_i = J_i J_iᵀ against the full Jacobian of record i
        rows = [torch.cat([g.reshape(-1) if g is not None else torch.zeros(p.numel())
                           for g, p in zip(torch.autograd.grad(codes[i, k], params,
                                                               retain_graph=True,
                                                               allow_unused=True), params)])
                for k in range(enc.d)]
        jac_i = torch.stack(rows)
        torch.testing.assert_close(jac.gram[i], jac_i @ jac_i.T, rtol=1e-4, atol=1e-6)


def test_radial_pair_norm_bound_survives_cancellation():
    """Codes of norm 1e3 differing by 1e-3 along the near-null direction of an
    ill-conditioned float32 Gram: the bound of D_ijᵀG_iD_ij is never below the exact value
    (float64 from the same backprops), while the same form from the float32 Gram without the
    Gram margin does fall below it — so both margins are needed and sufficient here."""
    from lit_dpvae.privacy.pairwise import radial_pair_quads

    gen = torch.Generator().manual_seed(0)
    d, p, n = 4, 50, 8
    kernel = MMD("imq", bandwidths=(1.0,), n_prior_samples=4)
    below_without_margin = 0
    for _ in range(30):
        basis = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0]
        right = torch.linalg.qr(torch.randn(p, d, generator=gen, dtype=torch.float64))[0].T
        sing = torch.tensor([1e3, 1e3, 1e3, 1e-3], dtype=torch.float64)
        b32 = (basis @ torch.diag(sing) @ right).float()  # [d, P], one record's backprops
        b64 = b32.double()
        gram32 = (b32 @ b32.T)[None].expand(n, d, d).contiguous()
        gram64 = b64 @ b64.T
        null = basis[:, -1]
        centre = 1e3 * torch.randn(d, generator=gen, dtype=torch.float64)
        steps = 1e-3 * (null[None] + 1e-2 * torch.randn(n, d, generator=gen,
                                                          dtype=torch.float64))
        z = (centre[None] + steps).float()
        z64 = z.double()
        diff = z64[:, None, :] - z64[None, :, :]  # exact in float64
        exact = torch.einsum("ijk,kl,ijl->ij", diff, gram64, diff)
        trace = gram32.diagonal(dim1=1, dim2=2).sum(-1)
        _, bound = radial_pair_quads(z, z, z[:2], kernel, 1.0, gram32, trace, p + 2)
        off = ~torch.eye(n, dtype=torch.bool)
        assert bool((bound.double()[off] >= exact[off]).all())
        plain = torch.einsum("ijk,kl,ijl->ij", diff, gram32[0].double(), diff)
        below_without_margin += int((plain[off] < exact[off]).sum())
    assert below_without_margin > 0


def test_reduced_float32_matmul_precision_computes_pair_norms_in_float64():
    """Under TF32/bf16 matmuls (``set_float32_matmul_precision("high")``, which Lightning
    suggests on tensor-core GPUs) the rounding margin would not bound the error: ``gram_dtype``
    then asks for float64. Inside ``aggregate`` the kernels are IEEE float32 anyway
    (precision.py), so there the Gram stays float32 and the statistic matches the full-precision
    one."""
    from lit_dpvae.privacy.pairwise import gram_dtype

    model = PairToy("mlp", "mmd", lam=5.0)
    x = torch.randn(6, *model.shape, generator=torch.Generator().manual_seed(4))
    want = pairwise_mechanism(0.05).aggregate(model, (x,))["pairwise"]
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert gram_dtype(torch.float32) == torch.float64
        got = pairwise_mechanism(0.05).aggregate(model, (x,))["pairwise"]
    finally:
        torch.set_float32_matmul_precision(before)
    assert gram_dtype(torch.float32) == torch.float32
    for name in want:
        assert got[name].dtype == torch.float32
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-7)


def test_a_meaningless_rounding_margin_is_refused():
    from lit_dpvae.privacy.pairwise import rounding_safe_quad

    one = torch.ones(1, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="not meaningful"):
        rounding_safe_quad(one, one, one, 1000)  # 1000 · 2⁻⁷ ≥ ½
    assert float(rounding_safe_quad(one.float(), one.float(), one.float(), 1000)) > 1.0


@pytest.mark.parametrize("block", [1, 7 * 3, 1 << 22])
def test_non_radial_pairs_in_owner_blocks_equal_the_oracle(block, monkeypatch):
    """The dimension-wise kernel's [rows, N, d] pair vectors are formed one owner block at a
    time (memory O(rows·N·d), not O(n·N·d)); any block size gives the brute-force statistic."""
    import lit_dpvae.privacy.pairwise as pw

    monkeypatch.setattr(pw, "_PAIR_BLOCK", block)
    model = PairToy("mlp", "dim_mmd", lam=5.0)
    x = torch.randn(6, *model.shape, generator=torch.Generator().manual_seed(4))
    got = pairwise_mechanism(0.05).aggregate(model, (x,))["pairwise"]
    want = _pair_oracle(model, x, 0.05)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-7)


def test_owner_blocks_keep_the_global_partner_offsets(monkeypatch):
    """Multi-process form (owners = this rank's rows of the global partners, from ``offset``):
    blocks of 1, 2 or all owners give identical ū, pair norms and prior norms."""
    import lit_dpvae.privacy.pairwise as pw

    g = torch.Generator().manual_seed(5)
    partners, w = torch.randn(7, 3, generator=g), torch.randn(5, 3, generator=g)
    a = torch.randn(4, 3, 3, generator=g)
    gram = a @ a.transpose(1, 2)  # 4 owners' Grams (PSD)
    kernel = DimensionWiseMMD("imq", bandwidths=(0.05, 0.5), n_prior_samples=5)
    outs = []
    for block in (21, 42, 1 << 22):  # rows = 1, 2, 4 (N·d = 21 elements a row)
        monkeypatch.setattr(pw, "_PAIR_BLOCK", block)
        outs.append(pw.owner_vectors(partners[2:6], w, kernel, 5.0, gram, 0.05,
                                     partners=partners, offset=2))
    for out in outs[1:]:
        for got, want in zip(out, outs[0]):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    shifted = pw.owner_vectors(partners[2:6], w, kernel, 5.0, gram, 0.05, partners=partners,
                               offset=0)  # the wrong self pairs masked: a different statistic
    assert not torch.allclose(shifted[0], outs[0][0])


def test_the_report_leaves_out_the_batch_parts_clip_norm_when_it_has_no_share():
    """New-user trial (2026-12-04): the report showed ``batch_max_grad_norm 1`` for a pairwise
    mechanism whose opaque batch part has no budget share (it plays no role in the release)."""
    from lit_dpvae.privacy import PairwiseDPSGD

    assert "batch_max_grad_norm" not in PairwiseDPSGD().settings()
    with_batch = PairwiseDPSGD(sample_share=0.5, pairwise_share=0.3)
    assert "batch" in with_batch.parts
    assert with_batch.settings()["batch_max_grad_norm"] == 1.0

"""Issue 13's failure classes, each on every mechanism and backend it concerns: the released
statistic moves by at most its stated sensitivity on crafted neighbouring batches."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from lit_dpvae.privacy import (
    BACKENDS,
    AttributionError,
    LossTerms,
    LossTermsError,
    NaiveDPSGD,
    PairwiseDPSGD,
    TermwiseDPSGD,
    global_norm,
)
from lit_dpvae.privacy.capture import UnsupportedModuleError
from tests.privacy.adversarial_toys import (
    CentredCodesVAE,
    GridLinear,
    LoRAEncoderVAE,
    ParentVAE,
    SeqLinear,
    VampToy,
    cancelling_records,
)
from tests.privacy.test_mechanisms import REL_TOL
from tests.privacy.toys import ToyVAE, diff_norms, neighbours, per_record_oracle


def _worst_change(mech, model, cases) -> dict[str, float]:
    worst = {part: 0.0 for part in mech.parts}
    for s, s_plus in cases:
        for part, d in diff_norms(mech, model, s, s_plus).items():
            assert math.isfinite(d)
            worst[part] = max(worst[part], d)
    return worst


# ---- class 1: a layer takes the ghost route only where its norm is exact ----------------------
ODD_SHAPES = {"grid": (GridLinear, (12,)), "seq": (SeqLinear, (6,)), "parent": (ParentVAE, (6,))}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", sorted(ODD_SHAPES))
def test_odd_input_shapes_and_parent_layers_are_clipped_per_record(kind, backend):
    make, shape = ODD_SHAPES[kind]
    model = make()
    x = torch.randn(5, *shape, generator=torch.Generator().manual_seed(0))
    for c in (1e-3, 0.5):
        mech = TermwiseDPSGD(max_grad_norm=c, noise_multiplier=1.0, sample_share=1.0,
                             backend=backend)
        got = mech.aggregate(model, (x,))["sample"]
        want = per_record_oracle(model, x, c)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-7)
    c = 1.0
    for mech in (TermwiseDPSGD(max_grad_norm=c, noise_multiplier=1.0, sample_share=1.0,
                               backend=backend),
                 NaiveDPSGD(max_grad_norm=c, max_batch_size=3, expected_batch_size=3,
                            noise_multiplier=1.0, backend=backend)):
        rng = torch.Generator().manual_seed(1)
        worst = _worst_change(mech, model, neighbours(shape, rng))
        part = mech.parts[0]
        assert 0 < worst[part] <= mech.sensitivity[part] * (1 + REL_TOL), worst


@pytest.mark.parametrize("backend", BACKENDS)
def test_cancelling_sequence_rows_are_still_clipped(backend):
    """[n, T, d] inputs whose rows nearly cancel: the ghost identity's float32 norm is ~0 (or
    noise), the exact per-record norm is 100·‖v‖; the released change must stay ≤ C."""
    model = SeqLinear(scale=1e4)
    s = cancelling_records(4)
    x = cancelling_records(1, big=3e4) * 1.5
    c = 1.0
    mech = TermwiseDPSGD(max_grad_norm=c, noise_multiplier=1.0, sample_share=1.0,
                         backend=backend)
    d = diff_norms(mech, model, s, torch.cat([s, x]))["sample"]
    # Its rows cancel 4·10⁶-fold (‖g‖ ≈ 2.5·10⁻⁷ of its rounding scale S): it is clipped at
    # κS (the rounding-scale floor), so it contributes far less than C, never more.
    assert 0 < d <= c * (1 + REL_TOL), d
    # naive DP-SGD clips the same attributions: with n_max = 1 its bound is 2C
    naive = NaiveDPSGD(max_grad_norm=c, max_batch_size=1, expected_batch_size=1,
                       noise_multiplier=1.0, backend=backend)
    d = diff_norms(naive, model, x[:0], x)["total"]
    assert 0 < d <= c * (1 + REL_TOL), d


# ---- class 3: a Linear subclass is never treated as nn.Linear --------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_subclass_parameters_are_clipped_in_both_parts(backend):
    model = LoRAEncoderVAE(lam=50.0)
    c_p = 1e-2
    mech = PairwiseDPSGD(max_grad_norm=0.5, pair_max_grad_norm=c_p, noise_multiplier=1.0,
                         sample_share=0.5, backend=backend)
    rng = torch.Generator().manual_seed(3)
    worst = _worst_change(mech, model, neighbours((6,), rng))
    assert worst["pairwise"] > 0 and worst["sample"] > 0, worst
    assert worst["pairwise"] <= mech.sensitivity["pairwise"] * (1 + REL_TOL), worst
    assert worst["sample"] <= mech.sensitivity["sample"] * (1 + REL_TOL), worst
    # ... and the adapter's factors really are in the pairwise statistic
    x = torch.randn(6, 6, generator=torch.Generator().manual_seed(4))
    stats = mech.aggregate(model, (x,))["pairwise"]
    assert float(global_norm({"a": stats["head.lora_a"], "b": stats["head.lora_b"]})) > 0


# ---- class 4: the released pair vector is the one whose norm was bounded ----------------------
@pytest.mark.parametrize("d_z", [1, 4])
@pytest.mark.parametrize("div", ["mmd", "dim_mmd"])
def test_duplicate_codes_with_large_means_stay_within_the_pairwise_bound(d_z, div):
    """Float32-identical codes far from the origin (duplicate records, a large mean): the pair
    vectors z_i − z_j are exactly 0, but (Σ_j c_ij) z_i − Σ_j c_ij z_j leaves an aligned residue
    of order ε‖z‖ per pair that grows with n."""
    from tests.privacy.toys import PairToy, pairwise_mechanism

    model = PairToy("mlp", div, lam=30.0, d_z=d_z)
    with torch.no_grad():
        model.enc[-1].bias[:d_z] = 3e3
        model.enc[-1].bias[d_z:] = -20.0  # collapsed variances
    c_p = 1e-2
    mech = pairwise_mechanism(c_p)
    rng = torch.Generator().manual_seed(7)
    record = torch.randn(1, 6, generator=rng)
    worst = 0.0
    for n in (8, 79, 160):
        s = record.repeat(n, 1)
        for x in (record, record + 1e-3, torch.randn(1, 6, generator=rng)):
            d = diff_norms(mech, model, s, torch.cat([s, x]))["pairwise"]
            worst = max(worst, d)
            assert d <= mech.sensitivity["pairwise"] * (1 + REL_TOL), (n, d)
    assert worst > 0


# ---- class 5: the contract probe sees coupled codes and shared rows ---------------------------
def _pairwise(backend: str = "ghost") -> PairwiseDPSGD:
    return PairwiseDPSGD(max_grad_norm=1.0, pair_max_grad_norm=1.0, noise_multiplier=1.0,
                         sample_share=0.5, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_codes_that_read_other_records_are_refused(backend):
    x = torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    with pytest.raises(LossTermsError, match="codes of pairwise term 'mmd' of record 0 depends"):
        _pairwise(backend).aggregate(CentredCodesVAE(), (x,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("concat", [False, True])
@pytest.mark.parametrize("n", [2, 4, 3])
def test_shared_rows_through_a_trainable_layer_are_refused(backend, concat, n):
    """M = 4 pseudo-inputs: for n | M (or n | n + M) the shared rows would be attributed to
    records by position; otherwise the row count does not fit the batch. Refused either way."""
    x = torch.randn(n, 6, generator=torch.Generator().manual_seed(0))
    mech = TermwiseDPSGD(max_grad_norm=1.0, noise_multiplier=1.0, sample_share=1.0,
                         backend=backend)
    with pytest.raises(AttributionError, match="row|rows"):
        mech.aggregate(VampToy(m=4, concat=concat), (x,))


def test_the_contract_probe_passes_the_shipped_models_and_leaves_the_rng_alone():
    from lit_dpvae.models import InfoVAE

    model = InfoVAE(data_shape=(1, 8, 8), latent_dim=4, hidden=(16,), lam=10.0)
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    batch = (x, torch.zeros(5, dtype=torch.long))
    mech = _pairwise()
    before = torch.get_rng_state()
    mech.probe_sample_terms(model, batch, 5)
    assert torch.equal(before, torch.get_rng_state())
    assert mech._probed is model


# ---- found by the adversarial review of the fixes above ---------------------------------------
class _WeightNormVAE(nn.Module):
    """A Linear layer reparameterised by ``torch.nn.utils.weight_norm`` (type stays nn.Linear,
    ``weight`` becomes a derived tensor of weight_g/weight_v)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.enc = nn.utils.weight_norm(nn.Linear(6, 4))
        self.dec = nn.Linear(4, 6)

    def loss_terms(self, batch) -> LossTerms:
        x = batch[0]
        return LossTerms(sample={"recon": (self.dec(self.enc(x)) - x).pow(2).sum(-1)})


class _HookedVAE(ParentVAE):
    """A Linear layer whose forward hook rescales its output by 1000."""

    def __init__(self) -> None:
        super().__init__()
        self.dec.register_forward_hook(lambda m, i, o: 1000 * o)


class _TinyInputs(nn.Module):
    """Inputs of 2.5e-23 (their float32 squares underflow to 0), a large output weight."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(64, 8, bias=False)

    def loss_terms(self, batch) -> LossTerms:
        return LossTerms(sample={"l": 2e18 * self.lin(batch[0]).sum(-1)})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["weight_norm", "hooked", "tiny"])
def test_layers_that_only_look_like_nn_linear_are_clipped_or_refused(kind, backend):
    c = 1e-3
    mech = TermwiseDPSGD(max_grad_norm=c, noise_multiplier=1.0, sample_share=1.0,
                         backend=backend)
    if kind == "tiny":
        model, s = _TinyInputs(), 1e-3 * torch.randn(3, 64, generator=torch.Generator())
        cases = [(s, torch.cat([s, torch.full((1, 64), 2.5e-23)]))]
    else:
        model = _WeightNormVAE() if kind == "weight_norm" else _HookedVAE()
        cases = neighbours((6,), torch.Generator().manual_seed(2))
    try:
        worst = _worst_change(mech, model, cases)["sample"]
    except (AttributionError, RuntimeError, AttributeError):
        assert kind == "weight_norm"  # refused (no per-record gradient of weight_g/weight_v)
        return
    assert 0 < worst <= c * (1 + REL_TOL), worst


class _Coupled(nn.Module):
    """Sample terms that read other records in ways a first-input gradient probe misses."""

    def __init__(self, how: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc, self.dec, self.how = nn.Linear(6, 2), nn.Linear(2, 6), how

    def loss_terms(self, batch) -> LossTerms:
        if self.how in ("dict", "userdict"):
            x = batch["x"]
            xin = x - x.mean(0)
        elif self.how == "second_float":
            _, x = batch
            xin = x - x.mean(0)
        elif self.how == "labels":
            x, y = batch
            xin = x * (2.0 * (y == y.max()).float().mean() - 1.0)
        elif self.how == "detached":
            x = batch[0]
            xin = x - x.mean(0).detach()
        elif self.how == "detached_max":  # moves only when the record attaining it changes
            x = batch[0]
            xin = x * (1.0 + x.abs().max().detach())
        elif self.how == "gated_max":  # a max that only records with label 1 read
            x, y = batch
            xin = x * (1.0 + (y == 1).float()[:, None] * x.abs().max().detach())
        elif self.how == "ragged":  # a per-record sequence column, scaled by the max length
            x, seqs = batch
            xin = x * (1.0 + max(len(q) for q in seqs) / 10.0)
        elif self.how in ("numpy_labels", "tensor_labels"):  # a label count, as a list column
            x, labels = batch
            share = sum(int(v) == 1 for v in labels) / len(labels)
            xin = x * (1.0 + share)
        else:  # "middle": records 0 and n-1 are clean, the others read their neighbours
            x = batch[0]
            xin = torch.cat([x[:1], x[1:-1] - x[1:-1].mean(0), x[-1:]]) if len(x) > 2 else x
        return LossTerms(sample={"r": (self.dec(self.enc(xin)) - x).pow(2).sum(-1)})


@pytest.mark.parametrize("how", ["dict", "second_float", "labels", "detached", "middle",
                                 "detached_max", "gated_max", "userdict", "numpy_labels",
                                 "tensor_labels", "ragged"])
def test_the_probe_sees_coupling_through_any_input(how):
    import collections

    x = torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    # the batch max sits in record 2, which no single replacement (records 3, 0, 5) touches:
    # only replacing every other record at once (by copies of a probed record) moves it; with
    # gated_max only records 1 and 4 (label 1) read it, neither the first nor the last probed
    x[2] *= 10.0
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    listed = [np.int64(v) for v in y] if how == "numpy_labels" else list(y.unbind())
    batch = {"dict": {"x": x}, "second_float": (torch.rand(6, 6), x), "labels": (x, y),
             "userdict": collections.UserDict(x=x), "numpy_labels": (x, listed),
             "tensor_labels": (x, listed),
             # ragged, record 1's sequence as long as the batch (n = 6) by chance
             "ragged": (x, [torch.randn(n, 3) for n in (2, 6, 7, 2, 2, 2)])}.get(how, (x, y))
    mech = TermwiseDPSGD(max_grad_norm=1.0, noise_multiplier=1.0, sample_share=1.0)
    with pytest.raises(LossTermsError, match="record"):
        mech.aggregate(_Coupled(how), batch)


def test_a_custom_mapping_batch_is_never_written_into():
    from collections.abc import MutableMapping

    class Batch(MutableMapping):  # its storage would be shared by a shallow copy
        def __init__(self):
            self._d = {}

        def __getitem__(self, key):
            return self._d[key]

        def __setitem__(self, key, value):
            self._d[key] = value

        def __delitem__(self, key):
            del self._d[key]

        def __iter__(self):
            return iter(self._d)

        def __len__(self):
            return len(self._d)

    batch = Batch()
    batch["x"] = torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    before = batch["x"].clone()
    mech = TermwiseDPSGD(max_grad_norm=1.0, noise_multiplier=1.0, sample_share=1.0)
    with pytest.raises(LossTermsError, match="cannot build a batch mapping of type Batch"):
        mech.aggregate(_Coupled("userdict"), batch)
    assert torch.equal(batch["x"], before)


def test_a_batch_item_the_probe_cannot_open_is_named():
    class Opaque:  # a container the probe does not open, holding the batch's records
        def __init__(self, x):
            self.x = x

    class Reads(_Coupled):
        def loss_terms(self, batch):
            x = batch[1].x
            return LossTerms(sample={"r": (self.dec(self.enc(x)) - x).pow(2).sum(-1)})

    mech = TermwiseDPSGD(max_grad_norm=1.0, noise_multiplier=1.0, sample_share=1.0)
    # the records sit in an object the probe does not open: it says so
    with pytest.warns(UserWarning, match="cannot look inside batch items of type Opaque"):
        mech.aggregate(Reads("plain"), (torch.zeros(6, 0), Opaque(torch.randn(6, 6))))



def test_shared_rows_are_refused_with_a_dict_batch():
    class DictVamp(VampToy):
        def loss_terms(self, batch):
            return super().loss_terms((batch["x"],))

    mech = TermwiseDPSGD(max_grad_norm=1.0, noise_multiplier=1.0, sample_share=1.0)
    with pytest.raises(AttributionError, match="row"):
        mech.aggregate(DictVamp(m=4), {"x": torch.randn(2, 6)})


class _Stateful(ParentVAE):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.register_buffer("running", torch.zeros(6))
        self.emb = nn.Embedding(10, 6, max_norm=1.0)

    def loss_terms(self, batch) -> LossTerms:
        x = batch[0]
        if self.how == "buffer":
            self.running.mul_(0.9).add_(0.1 * x.detach().mean(0))
            return super().loss_terms((x,))
        ids = (x[:, 0].abs() * 3).long().clamp(0, 9)
        terms = super().loss_terms((x,))
        terms.sample["recon"] = terms.sample["recon"] + self.emb(ids).pow(2).sum(-1)
        return terms


@pytest.mark.parametrize("how", ["buffer", "embedding_max_norm"])
def test_a_forward_that_writes_the_module_state_is_refused(how):
    mech = TermwiseDPSGD(max_grad_norm=1.0, noise_multiplier=1.0, sample_share=1.0)
    x = 3 * torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    with pytest.raises((AttributionError, LossTermsError)):
        mech.aggregate(_Stateful(how), (x,))


def test_the_hooks_backend_leaves_no_activations_behind_a_refused_step():
    model = ToyVAE(samples=3, batch_term=False)
    mech = TermwiseDPSGD(max_grad_norm=1.0, noise_multiplier=1.0, sample_share=1.0,
                         backend="hooks")
    bad = torch.full((4, 6), float("nan"))
    with pytest.raises(LossTermsError):
        mech.aggregate(model, (bad,))
    assert not any("activations" in m.__dict__ or "max_batch_len" in m.__dict__
                   for m in model.modules())


# ---- found by the second review --------------------------------------------------------------
def _instance_forward(model: nn.Module, layer: nn.Linear, scale: float) -> nn.Module:
    layer.forward = lambda x: scale * nn.functional.linear(x, layer.weight, layer.bias)
    return model


@pytest.mark.parametrize("backend", BACKENDS)
def test_instance_level_forwards_and_parameter_hooks(backend):
    model = ParentVAE()
    _instance_forward(model, model.dec, 1000.0)
    mech = TermwiseDPSGD(max_grad_norm=1e-3, noise_multiplier=1.0, sample_share=1.0,
                         backend=backend)
    worst = _worst_change(mech, model, neighbours((6,), torch.Generator().manual_seed(5)))
    assert worst["sample"] <= 1e-3 * (1 + REL_TOL), worst
    pair = LoRAEncoderVAE(lam=50.0)
    _instance_forward(pair, pair.body, 30.0)
    mech = PairwiseDPSGD(max_grad_norm=0.5, pair_max_grad_norm=1e-2, noise_multiplier=1.0,
                         sample_share=0.5, backend=backend)
    worst = _worst_change(mech, pair, neighbours((6,), torch.Generator().manual_seed(6)))
    for part in mech.parts:
        assert worst[part] <= mech.sensitivity[part] * (1 + REL_TOL), worst
    hooked = ParentVAE()
    hooked.dec.weight.register_hook(lambda g: 1000 * g)
    with pytest.raises(UnsupportedModuleError, match="gradient hooks"):
        TermwiseDPSGD(max_grad_norm=1.0, noise_multiplier=1.0, sample_share=1.0,
                      backend=backend).aggregate(hooked, (torch.randn(4, 6),))


class _Probed(ParentVAE):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.register_buffer("run", torch.zeros(6))
        self.gen = torch.Generator().manual_seed(0)

    def loss_terms(self, batch) -> LossTerms:
        import random as pyrandom

        import numpy as np

        x = batch[0]
        if self.how == "offset":  # a detached batch statistic hidden under a constant
            out = self.dec(self.enc(x)).sum(-1)
            return LossTerms(sample={"r": 1e7 + torch.tanh(3 * x.mean().detach()) * out})
        if self.how == "data_write":
            self.run.data.mul_(0.9).add_(0.1 * x.detach().mean(0))
        elif self.how == "own_generator":
            x = x + 0.1 * torch.randn(x.shape, generator=self.gen)
        elif self.how == "python_random":
            x = x * (1.0 + 0.1 * pyrandom.random())
        elif self.how == "numpy":
            x = torch.from_numpy(np.asarray(x.detach().numpy()) + 0.0).float() + 0 * x
        elif self.how == "in_place":
            x.sub_(0.5)
        return super().loss_terms((x,))


@pytest.mark.parametrize("how", ["offset", "data_write"])
def test_the_probe_sees_hidden_dependence_and_data_writes(how):
    mech = TermwiseDPSGD(max_grad_norm=1.0, noise_multiplier=1.0, sample_share=1.0)
    model = _Probed(how)
    with pytest.raises((LossTermsError, AttributionError)):
        mech.aggregate(model, (torch.randn(6, 6, generator=torch.Generator().manual_seed(1)),))
    assert torch.equal(model.run, torch.zeros(6))  # the probe put the state back


@pytest.mark.parametrize("how", ["own_generator", "python_random", "numpy", "in_place"])
def test_legitimate_record_wise_models_pass_the_probe(how):
    import random as pyrandom

    mech = TermwiseDPSGD(max_grad_norm=1.0, noise_multiplier=1.0, sample_share=1.0)
    state = pyrandom.getstate()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mech.aggregate(_Probed(how), (torch.randn(6, 6, generator=torch.Generator()),))
    assert how == "python_random" or pyrandom.getstate() == state


class _PermutedDiscriminator(ParentVAE):
    """A batch-wise term that runs a trainable layer on permuted codes (FactorVAE's TC
    discriminator): legitimate, since no sample-wise term reaches that layer."""

    def __init__(self) -> None:
        super().__init__()
        self.disc = nn.Linear(4, 1)

    def loss_terms(self, batch) -> LossTerms:
        terms = super().loss_terms(batch)
        h = self.enc(batch[0])
        terms.batch["tc"] = self.disc(h.roll(1, 0)).mean()
        return terms


@pytest.mark.parametrize("backend", ["ghost", "functorch"])
def test_batch_terms_may_mix_records_in_layers_no_sample_term_reaches(backend):
    mech = TermwiseDPSGD(
        batch_max_grad_norm=1.0, max_grad_norm=1.0, noise_multiplier=1.0, sample_share=0.5,
                         backend=backend)
    stats = mech.aggregate(_PermutedDiscriminator(), (torch.randn(7, 6),))
    assert float(stats["batch"]["disc.weight"].abs().sum()) > 0


# ---- class: rounding upstream of a layer, amplified by clipping (review of 2026-12-04) --------
class _UpstreamConv(nn.Module):
    """A frozen Linear (its rows rounded by another kernel for one record than for two: gemv vs
    gemm) feeding a conv whose per-record gradient cancels 10⁶-fold on the record's target."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(4)
        self.lin = nn.Linear(64, 8 * 18 * 18, bias=False)
        self.lin.weight.data = 1 / 64 + 1e-6 * torch.randn(self.lin.weight.shape, generator=g)
        self.lin.requires_grad_(False)
        self.conv = nn.Conv2d(8, 8, 3, bias=False)

    def loss_terms(self, batch):
        x, t = batch
        h = self.lin(x).view(-1, 8, 18, 18)
        return LossTerms(sample={"recon": (self.conv(h) * t).flatten(1).sum(1)}, batch={})


@pytest.mark.parametrize("backend", BACKENDS)
def test_upstream_rounding_of_a_cancelling_record_is_not_amplified_by_clipping(backend):
    """The same record computed in a batch of one and of two differs by float32 rounding
    upstream (measured: 2.4e-7), and its gradient cancels, so its *computed* gradient is mostly
    that rounding; clipping rescaled it to norm C either way, and adding a record with zero
    gradient moved the release by 0.054C. Clipping at the rounding-scale floor κS keeps the
    move at ≤ 2δ/κ·C (measured 4e-6C)."""
    torch.manual_seed(0)
    model = _UpstreamConv()
    half = torch.where(torch.arange(16)[:, None] < 8, 1.0, -1.0).expand(16, 16)
    g = torch.Generator().manual_seed(4)
    t = (3e6 * half + torch.rand(8, 16, 16, generator=g) * 2 - 1)[None]
    x = torch.ones(1, 64)
    mech = TermwiseDPSGD(max_grad_norm=1.0, noise_multiplier=1.0, sample_share=1.0,
                         backend=backend)
    zero_x, zero_t = torch.randn(1, 64, generator=g), torch.zeros_like(t)
    for front in (False, True):
        xs = torch.cat([zero_x, x] if front else [x, zero_x])
        ts = torch.cat([zero_t, t] if front else [t, zero_t])
        a, b = mech.aggregate(model, (x, t))["sample"], mech.aggregate(model, (xs, ts))["sample"]
        d = float(global_norm({k: a[k] - b[k] for k in a}))
        assert d <= 1e-3, d


class _TwiceLinear(nn.Module):
    """One Linear called twice per record (aligned inputs: its two calls' gradients add)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 5)

    def loss_terms(self, batch):
        x = batch[0]
        return LossTerms(sample={"recon": (self.lin(self.lin(x).abs()) + self.lin(x)).sum(1)})


class _StridedConv(nn.Module):
    def __init__(self, **settings) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, **settings)

    def loss_terms(self, batch):
        return LossTerms(sample={"recon": self.conv(batch[0]).sum((1, 2, 3))})


@pytest.mark.parametrize("make", [
    _TwiceLinear, SeqLinear,
    lambda: _StridedConv(kernel_size=3, stride=2, dilation=2, padding=2),
    lambda: _StridedConv(kernel_size=(2, 3), padding=1, padding_mode="reflect"),
    lambda: _StridedConv(kernel_size=3, padding=1, padding_mode="replicate"),
    lambda: _StridedConv(kernel_size=3, padding="same", padding_mode="circular"),
])
def test_the_rounding_scale_bounds_every_records_gradient(make):
    """``‖g_i‖ ≤ √Σ S̄²`` (the floor's bound is a bound), on aligned inputs (all positive:
    no cancellation, the tightest case), for a layer called twice, tokens, strides, dilation
    and every padding mode."""
    from lit_dpvae.privacy.capture import capture_layers
    from lit_dpvae.privacy.clipping import layer_backprops, scale_floor_sq

    torch.manual_seed(0)
    model = make()
    for p in model.parameters():
        p.data = p.data.abs()
    x = torch.rand(4, 12) if make in (_TwiceLinear, SeqLinear) else torch.rand(4, 3, 7, 6)
    if make is _TwiceLinear:
        x = x[:, :5]
    with capture_layers(model) as cap:
        loss = model.loss_terms((x,)).per_record().sum()
    bound = scale_floor_sq(cap.calls, layer_backprops(cap, loss), 4).sqrt()
    for i in range(4):
        terms = model.loss_terms((x[i:i + 1],)).per_record().sum()
        grads = torch.autograd.grad(terms, list(model.parameters()))
        norm = torch.sqrt(sum(g.double().pow(2).sum() for g in grads))
        assert 0 < norm <= bound[i] * (1 + 1e-6), (i, float(norm), float(bound[i]))


class _NullSpaceNet(nn.Module):
    """Review of 2026-12-04: a record in the null space of the first Linear makes that layer's
    output pure rounding, which the gemv (one record) and gemm (two, three) kernels round
    differently; LayerNorm rescales it to unit size. No layer's own positions cancel, so the
    rounding-scale floor cannot see it (docs/privacy.md §7)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1 = nn.Linear(64, 32, bias=False)
        self.norm = nn.LayerNorm(32, eps=1e-12, elementwise_affine=False)
        self.l2 = nn.Linear(32, 64, bias=False)

    def loss_terms(self, batch):
        x, t = batch
        return LossTerms(sample={"recon": (self.l2(self.norm(self.l1(x))) * t).sum(1)})


class _FrozenHead(nn.Module):
    """Review of 2026-12-04: a frozen Linear 64→32, a trainable head; the record lies in the
    frozen layer's null space and its loss weighs 1e9 (3.1C released before blocks)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1 = nn.Linear(64, 32, bias=False).requires_grad_(False)
        self.l2 = nn.Linear(32, 64, bias=False)

    def loss_terms(self, batch):
        x, t = batch
        return LossTerms(sample={"recon": 1e9 * (self.l2(self.l1(x)) * t).sum(1)})


def _null_space_record(model: nn.Module, g: torch.Generator) -> tuple[Tensor, Tensor]:
    w1 = model.l1.weight.detach().double()
    x = torch.randn(64, generator=g, dtype=torch.float64)
    x = (x - w1.T @ torch.linalg.solve(w1 @ w1.T, w1 @ x)).float()[None]
    t = torch.randn(1, 64, generator=g)
    return x, t


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", [_NullSpaceNet, _FrozenHead])
def test_upstream_cancellation_under_batch_size_dependent_kernels(make, backend):
    """A record in the null space of a Linear: its output is pure rounding, rounded by a gemv
    for one record and a gemm for two or three. The sample part's forward and backward run on
    blocks of one fixed size (``record_block``), so the rounding is the same in S and
    S ∪ {x}: adding a record with zero gradient moves the release by ≈ 0 (1.20C and 3.1C
    before)."""
    model = make()
    g = torch.Generator().manual_seed(1)
    x, t = _null_space_record(model, g)
    mech = TermwiseDPSGD(max_grad_norm=1.0, noise_multiplier=1.0, sample_share=1.0,
                         backend=backend)
    worst = 0.0
    for k in (1, 2, 3):
        s = (x.repeat(k, 1), t.repeat(k, 1))
        s1 = (torch.cat([s[0], torch.randn(1, 64, generator=g)]),
              torch.cat([s[1], torch.zeros(1, 64)]))
        a, b = mech.aggregate(model, s)["sample"], mech.aggregate(model, s1)["sample"]
        worst = max(worst, float(global_norm({k: a[k] - b[k] for k in a})))
    assert worst <= 1e-4, worst


class _SharedTable(nn.Module):
    """A record-wise model that reads a shared table passed in the batch (K rows)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1 = nn.Linear(4, 1)

    def loss_terms(self, batch):
        x, table = batch
        return LossTerms(sample={"recon": (self.l1(x) - table.mean(0)).pow(2).sum(1)})


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_shared_item_with_n_rows_by_chance_is_not_cut_into_record_blocks(backend):
    """Review of 2026-12-04: when the realised n equalled a shared table's K rows, the record
    blocks sliced the table too and every record's term changed (39C at n = K = 20). The
    per-record columns are those of the first batch, fixed for the module."""
    k = 20
    table = torch.full((k, 1), -3000.0 / (k - 1))
    table[0] = 1000.0
    model, x = _SharedTable(), torch.ones(k - 1, 4)
    mech = TermwiseDPSGD(max_grad_norm=1.0, noise_multiplier=1.0, sample_share=1.0,
                         backend=backend)
    a = mech.aggregate(model, (x, table))["sample"]
    b = mech.aggregate(model, (torch.cat([x, torch.ones(1, 4)]), table))["sample"]
    assert float(global_norm({key: a[key] - b[key] for key in a})) <= 1.0 * (1 + REL_TOL)
    fresh = TermwiseDPSGD(max_grad_norm=1.0, noise_multiplier=1.0, sample_share=1.0,
                          backend=backend)
    # a first batch of n = K records: the table looks per-record, and the contract probe,
    # swapping its rows between records, refuses the model with a clear error
    with pytest.raises(LossTermsError, match="depends on record"):
        fresh.aggregate(model, (torch.ones(k, 4), table))


def test_a_first_batch_column_with_another_row_count_later_is_refused():
    mech = TermwiseDPSGD(max_grad_norm=1.0, noise_multiplier=1.0, sample_share=1.0)
    model = _SharedTable()
    assert mech.batch_columns(model, (torch.ones(5, 4), torch.ones(5, 1)), 5) == {(0,), (1,)}
    with pytest.raises(ValueError, match=r"batch items at \['\(1,\)'\] held one row per record"):
        mech.batch_columns(model, (torch.ones(4, 4), torch.ones(5, 1)), 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_records_after_keep_are_never_released(backend):
    """A record block's padding copies get clip factor exactly 0 (``keep``): the clipped sum
    over a batch of three with ``keep=1`` is the first record's alone."""
    from lit_dpvae.privacy.clipping import make_clipper

    model = ToyVAE(batch_term=False)
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(2))

    def run():
        terms = model.loss_terms((x,))
        return terms.per_record().sum(), terms

    got, _, _ = make_clipper(backend).clipped_sum(model, run, 0.5, 3, keep=1)
    want = per_record_oracle(model, x[:1], 0.5)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-7)

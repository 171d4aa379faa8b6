"""Issue 13's failure classes, each on every mechanism and backend it concerns: the released
statistic moves by at most its stated sensitivity on crafted neighbouring batches."""

from __future__ import annotations

import math

import pytest
import torch

from lit_dpvae.privacy import (
    BACKENDS,
    AttributionError,
    LossTermsError,
    PairwiseDPSGD,
    TermwiseDPSGD,
    global_norm,
)
from tests.privacy.adversarial_toys import (
    CentredCodesVAE,
    GridLinear,
    LoRAEncoderVAE,
    ParentVAE,
    SeqLinear,
    VampToy,
    cancelling_records,
)
from tests.privacy.test_mechanisms import REL_TOL, _diff_norms, _neighbours
from tests.privacy.toys import per_record_oracle


def _worst_change(mech, model, cases) -> dict[str, float]:
    worst = {part: 0.0 for part in mech.parts}
    for s, s_plus in cases:
        for part, d in _diff_norms(mech, model, s, s_plus).items():
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
    mech = TermwiseDPSGD(max_grad_norm=c, noise_multiplier=1.0, sample_share=1.0,
                         backend=backend)
    rng = torch.Generator().manual_seed(1)
    worst = _worst_change(mech, model, _neighbours(shape, rng))
    assert 0 < worst["sample"] <= c * (1 + REL_TOL), worst


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
    d = _diff_norms(mech, model, s, torch.cat([s, x]))["sample"]
    assert 0.5 * c < d <= c * (1 + REL_TOL), d


# ---- class 3: a Linear subclass is never treated as nn.Linear --------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_subclass_parameters_are_clipped_in_both_parts(backend):
    model = LoRAEncoderVAE(lam=50.0)
    c_p = 1e-2
    mech = PairwiseDPSGD(max_grad_norm=0.5, pair_max_grad_norm=c_p, noise_multiplier=1.0,
                         sample_share=0.5, backend=backend)
    rng = torch.Generator().manual_seed(3)
    worst = _worst_change(mech, model, _neighbours((6,), rng))
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
    from tests.privacy.test_pairwise import PairToy, _mech

    model = PairToy("mlp", div, lam=30.0, d_z=d_z)
    with torch.no_grad():
        model.enc[-1].bias[:d_z] = 3e3
        model.enc[-1].bias[d_z:] = -20.0  # collapsed variances
    c_p = 1e-2
    mech = _mech(c_p)
    rng = torch.Generator().manual_seed(7)
    record = torch.randn(1, 6, generator=rng)
    worst = 0.0
    for n in (8, 79, 160):
        s = record.repeat(n, 1)
        for x in (record, record + 1e-3, torch.randn(1, 6, generator=rng)):
            d = _diff_norms(mech, model, s, torch.cat([s, x]))["pairwise"]
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

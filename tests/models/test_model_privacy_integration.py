"""Every pairing against the privacy engine: the clipped per-record gradient sum that the hooks
attribute (TermwiseDPSGD's "sample" part, clipping active) equals a one-record-at-a-time oracle.
This is what the layer rules (batch-first / record-major rows, no BatchNorm, no parameter outside
a layer) buy; a model breaking them fails here."""

from __future__ import annotations

import pytest
import torch

from lit_dpvae.privacy.mechanisms import TermwiseDPSGD
from tests.models.conftest import PAIRINGS, model_class
from tests.models.helpers import make_batch, record_noise


@pytest.mark.parametrize("name", PAIRINGS)
@pytest.mark.parametrize(("arch", "k"), [("mlp", 1), ("conv", 2)])
@pytest.mark.parametrize("backend", ["ghost", "hooks"])
def test_clipped_sample_part_matches_a_per_record_oracle(name, arch, k, backend, monkeypatch):
    torch.manual_seed(0)
    model = model_class(name)(
        data_shape=(1, 8, 8),
        latent_dim=3,
        arch=arch,
        hidden=(16,),
        channels=(4, 8),
        group_norm=2,
        num_classes=3,
        conditional=True,
        n_samples=k,
    )
    _check_against_oracle(model, backend, monkeypatch)


@pytest.mark.parametrize("scale", [False, True])
@pytest.mark.parametrize(("arch", "k"), [("mlp", 1), ("conv", 2)])
def test_label_prior_clipped_sample_part_matches_a_per_record_oracle(arch, k, scale, monkeypatch):
    """The class-conditional prior's learned means (and scales) are attributed per record like
    any layer."""
    torch.manual_seed(0)
    model = model_class("VanillaVAE")(
        data_shape=(1, 8, 8), latent_dim=3, arch=arch, hidden=(16,), channels=(4, 8),
        group_norm=2, num_classes=3, conditional=True, label_prior=True, n_samples=k,
        label_prior_scale=scale,
    )
    if scale:
        with torch.no_grad():
            model.label_log_scales.weight.normal_(0.0, 0.5)
    _check_against_oracle(model, "ghost", monkeypatch)


@pytest.mark.parametrize("keep", [True, False])
def test_conv_row_blocks_keep_records_with_k_rows(keep, monkeypatch):
    """K = 2 rows per record and per-sample gradients sampled in blocks of 3 conv rows (kept:
    blocks split a record's rows; norms only, every layer with a sampler forced onto that
    route: blocks of whole records): still the per-record oracle."""
    import lit_dpvae.privacy.clipping as gs

    if not keep:
        monkeypatch.setattr(gs, "_MATERIALISE_LIMIT", 0)

    torch.manual_seed(0)
    model = model_class("VanillaVAE")(
        data_shape=(1, 8, 8), latent_dim=3, arch="conv", hidden=(16,), channels=(4, 8),
        group_norm=2, num_classes=3, conditional=True, n_samples=2,
    )
    # the decoder's last convs read [8 or 4, 8, 8] rows: 3 rows of the largest per block
    monkeypatch.setattr(gs, "_SAMPLER_BLOCK", 3 * 8 * 8 * 8 * 9)
    _check_against_oracle(model, "ghost", monkeypatch)


def _check_against_oracle(model, backend, monkeypatch):
    monkeypatch.setattr(model, "draw_noise", record_noise)
    batch = make_batch(5, (1, 8, 8))
    clip = 1.0
    share = 1.0 if model.divergence_key is None else 0.5
    mech = TermwiseDPSGD(
        batch_max_grad_norm=1.0, max_grad_norm=clip, sample_share=share, backend=backend)
    stats = mech.aggregate(model, batch)["sample"]

    params = dict(model.named_parameters())
    want = {name: torch.zeros_like(p) for name, p in params.items()}
    norms = []
    for i in range(5):
        per_record = model.loss_terms(batch).per_record()
        grads = torch.autograd.grad(per_record[i], list(params.values()), allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params.values(), grads)]
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        norms.append(float(norm))
        for (pname, _), g in zip(params.items(), grads, strict=True):
            want[pname] += g * min(1.0, clip / (float(norm) + 1e-6))
    assert min(norms) > clip  # clipping is active, so attribution errors would show
    for pname in params:
        torch.testing.assert_close(stats[pname], want[pname], atol=1e-5, rtol=1e-4)

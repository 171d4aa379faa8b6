"""The private step on a CUDA device (skipped without one).

For a session with a GPU: ``WANDB_MODE=disabled python -m pytest -q tests/test_cuda.py``
(``experiments/gpu_check.sh`` runs it on the device machine). ``LIT_DPVAE_TEST_DEVICE=cpu``
runs the same checks on the CPU, which is how their logic is tested where no GPU is lent.
"""

from __future__ import annotations

import math
import os

import lightning.pytorch as pl
import pytest
import torch

from lit_dpvae.privacy import TermwiseDPSGD
from lit_dpvae.strategy import TermwiseDPStrategy
from tests.lightning_toys import ToyData, ToyLitVAE
from tests.privacy.toys import diff_norms, make_toy, neighbours, per_record_oracle

DEVICE = torch.device(os.environ.get("LIT_DPVAE_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(),
                                reason="needs a CUDA device")
KINDS = ("mlp", "mlp-k3", "conv")
# The reduced precision a user may have set: TF32 on a GPU; on a CPU "high" changes nothing, but
# "medium" gives bf16 matmuls in oneDNN (where the CPU has them), so the checks can fail there.
REDUCED = "high" if DEVICE.type == "cuda" else "medium"


@pytest.fixture
def tensor_cores():
    """What Lightning suggests on tensor-core GPUs (TF32 matmuls; cuDNN convs are TF32 by
    default), with deterministic cuDNN so that two runs can be compared bit for bit."""
    legacy, det = torch.get_float32_matmul_precision(), torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    yield
    torch.set_float32_matmul_precision(legacy)
    torch.backends.cudnn.deterministic = det


@pytest.mark.parametrize("kind", KINDS)
def test_sample_part_equals_the_float64_oracle(kind):
    model, shape = make_toy(kind, batch_term=False)
    x = 3 * torch.randn(16, *shape, generator=torch.Generator().manual_seed(0))
    c = 0.5
    want = per_record_oracle(model.double(), x.double(), c)
    mech = TermwiseDPSGD(max_grad_norm=c, noise_multiplier=1.0, sample_share=1.0)
    got = mech.aggregate(model.float().to(DEVICE), (x.to(DEVICE),))["sample"]
    for name in want:
        assert got[name].device.type == DEVICE.type
        torch.testing.assert_close(got[name].cpu().double(), want[name], rtol=1e-4, atol=1e-6)


def _pair_toy():
    from tests.privacy.toys import PairToy, pairwise_mechanism

    torch.manual_seed(0)
    return PairToy("conv", "mmd", lam=5.0), pairwise_mechanism(0.05)


@pytest.mark.parametrize("kind", (*KINDS, "pairwise-conv"))
def test_reduced_precision_does_not_reach_the_private_statistics(kind, tensor_cores):
    if kind == "pairwise-conv":  # pair norms (Gram) and the clipped sum through a conv layer
        model, mech = _pair_toy()
        shape = model.shape
    else:
        model, shape = make_toy(kind)
        mech = TermwiseDPSGD(max_grad_norm=0.5, batch_max_grad_norm=0.3, noise_multiplier=1.0)
    model = model.to(DEVICE)
    x = torch.randn(32, *shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    torch.set_float32_matmul_precision("highest")
    want = mech.aggregate(model, (x,))
    torch.set_float32_matmul_precision(REDUCED)
    got = mech.aggregate(model, (x,))
    assert torch.get_float32_matmul_precision() == REDUCED  # the user's setting is back
    for part in want:
        for name in want[part]:
            assert torch.equal(got[part][name], want[part][name]), (part, name)


@pytest.mark.parametrize("kind", KINDS)
def test_sensitivity_holds_under_reduced_precision(kind, tensor_cores):
    torch.set_float32_matmul_precision(REDUCED)
    model, shape = make_toy(kind)
    model = model.to(DEVICE)
    mech = TermwiseDPSGD(max_grad_norm=0.7, batch_max_grad_norm=0.3, noise_multiplier=1.0)
    rng = torch.Generator().manual_seed(2)
    worst = {part: 0.0 for part in mech.parts}
    for s, s_plus in neighbours(shape, rng):
        for part, d in diff_norms(mech, model, s.to(DEVICE), s_plus.to(DEVICE)).items():
            assert math.isfinite(d)
            worst[part] = max(worst[part], d)
            assert d <= mech.sensitivity[part] * (1 + 1e-5), (part, d, mech.sensitivity)
    assert all(w > 0 for w in worst.values()), worst


def test_a_private_fit_runs_on_the_device(tmp_path):
    strategy = TermwiseDPStrategy(target_epsilon=2.0, target_delta=1e-3, max_grad_norm=0.5,
                                  batch_max_grad_norm=0.1, noise_seed=3)
    model = ToyLitVAE()
    trainer = pl.Trainer(strategy=strategy, accelerator="gpu" if DEVICE.type == "cuda" else "cpu",
                         devices=1, max_steps=5, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.fit(model, ToyData(n=200, sample_rate=0.1))
    assert strategy.accountant.steps == 5 and 0 < strategy.epsilon() <= 2.0
    for name, p in model.named_parameters():
        assert p.device.type == DEVICE.type and torch.isfinite(p).all(), name
    assert any(not torch.equal(start[k].cpu(), v.cpu()) for k, v in model.state_dict().items())

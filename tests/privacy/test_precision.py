"""Private statistics are formed under IEEE float32 kernels, whatever the user set."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_dpvae.privacy import LossTerms, NaiveDPSGD, NonPrivate, PairwiseDPSGD, TermwiseDPSGD
from lit_dpvae.privacy.precision import fp32_precision_ops, ieee_fp32, reduced_fp32_matmul
from lit_dpvae.privacy.terms import PairwiseTerm

OPS = fp32_precision_ops()  # cuda.matmul, cudnn.conv/rnn, mkldnn.matmul/conv/rnn
PARENTS = (torch.backends, torch.backends.cudnn, torch.backends.mkldnn)


@pytest.fixture(autouse=True)
def _restore_precision():
    # the legacy setting is its own state: restore it first (it also writes the backends')
    legacy = torch.get_float32_matmul_precision()
    parents = [p.fp32_precision for p in PARENTS]
    ops = [op.fp32_precision for op in OPS]
    yield
    torch.set_float32_matmul_precision(legacy)
    for p, value in zip(PARENTS, parents):
        p.fp32_precision = value
    for op, value in zip(OPS, ops):
        op.fp32_precision = value


def _settings() -> list[str]:
    return [op.fp32_precision for op in OPS]


def test_reduced_precision_is_detected_without_raising():
    assert not reduced_fp32_matmul()  # the default
    torch.set_float32_matmul_precision("high")  # legacy API: TF32
    assert reduced_fp32_matmul()
    torch.set_float32_matmul_precision("highest")
    assert not reduced_fp32_matmul()
    # The per-backend API can leave the backends inconsistent, where torch's own query raises.
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.mkldnn.matmul.fp32_precision = "none"
    with pytest.raises(RuntimeError):
        torch.get_float32_matmul_precision()
    assert reduced_fp32_matmul()
    torch.backends.cuda.matmul.fp32_precision = "none"  # inherits the generic setting
    torch.backends.fp32_precision = "tf32"
    assert reduced_fp32_matmul()


def test_the_block_is_ieee_and_the_user_setting_comes_back_even_on_error():
    torch.set_float32_matmul_precision("medium")
    before = _settings()
    assert before[0] == "tf32" and before[3] == "bf16" and reduced_fp32_matmul()
    assert before[1] == "tf32"  # cuDNN convolutions are TF32 by default
    with ieee_fp32():
        assert _settings() == ["ieee"] * len(OPS)
        assert not reduced_fp32_matmul()
        with ieee_fp32():  # nested
            pass
        assert _settings() == ["ieee"] * len(OPS)
    assert _settings() == before
    with pytest.raises(ValueError, match="boom"), ieee_fp32():
        raise ValueError("boom")
    assert _settings() == before
    assert torch.get_float32_matmul_precision() == "medium"


def test_cpu_matmuls_in_the_block_are_bitwise_full_precision():
    """oneDNN honours the setting on CPUs with bf16 units: inside the block a float32 matmul
    equals the one computed at ``"highest"`` bit for bit, whatever ``"medium"`` gives."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 500, generator=gen), torch.randn(500, 200, generator=gen)
    full = a @ b
    torch.set_float32_matmul_precision("medium")
    if torch.equal(a @ b, full):
        pytest.skip("this CPU has no bf16 matmul path (no AVX512-BF16/AMX): nothing to check")
    with ieee_fp32():
        inside = a @ b
        linear = nn.functional.linear(a, b.T)
    assert torch.equal(inside, full)
    torch.set_float32_matmul_precision("highest")
    assert torch.equal(linear, nn.functional.linear(a, b.T))


class _Spy(nn.Module):
    """A VAE-shaped toy that records the matmul setting its forward runs under."""

    def __init__(self, pairwise: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc, self.dec = nn.Linear(4, 2), nn.Linear(2, 4)
        self.pairwise, self.seen = pairwise, []
        if pairwise:
            from lit_dpvae.divergences import MMD

            self.mmd = MMD("imq", (1.0,), n_prior_samples=4)
            self.register_buffer("w", torch.linspace(-1, 1, 8).view(4, 2))

    def loss_terms(self, batch) -> LossTerms:
        self.seen.append(_settings())
        x = batch[0]
        z = self.enc(x)
        terms = LossTerms(sample={"recon": (self.dec(z) - x).pow(2).sum(-1)},
                          batch={"div": z.mean(0).pow(2).sum()})
        if self.pairwise:
            terms.batch = {"mmd": self.mmd.value(z, self.w)}
            terms.pairwise["mmd"] = PairwiseTerm(z, self.w, self.mmd, 1.0)
        return terms


@pytest.mark.parametrize("make", [
    lambda: TermwiseDPSGD(max_grad_norm=1.0, batch_max_grad_norm=0.1, noise_multiplier=1.0),
    lambda: NaiveDPSGD(max_grad_norm=1.0, max_batch_size=8, noise_multiplier=1.0),
    lambda: PairwiseDPSGD(max_grad_norm=1.0, pair_max_grad_norm=0.1, batch_max_grad_norm=0.1,
                          noise_multiplier=1.0),
], ids=["termwise", "naive", "pairwise"])
def test_every_private_mechanism_forms_its_statistics_under_ieee_kernels(make):
    """Under ``"medium"`` (bf16 matmuls in oneDNN on this CPU, which change a plain matmul by
    ~1e-4) the statistics are bit-identical to the full-precision ones."""
    mech = make()
    model = _Spy(pairwise=isinstance(mech, PairwiseDPSGD))
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
    want = mech.aggregate(model, (x,))
    torch.set_float32_matmul_precision("medium")
    user = _settings()
    got = mech.aggregate(model, (x,))
    assert model.seen and all(s == ["ieee"] * len(OPS) for s in model.seen)
    assert _settings() == user  # the user's setting is back
    for part in want:
        for name in want[part]:
            assert torch.equal(got[part][name], want[part][name]), (part, name)


def test_the_non_private_baseline_keeps_the_user_setting():
    model = _Spy()
    torch.set_float32_matmul_precision("medium")
    user = _settings()
    mech = NonPrivate()
    mech.set_sampling(3.0)
    mech.aggregate(model, (torch.randn(3, 4),))
    assert model.seen == [user]


def test_a_user_mechanism_is_covered_too():
    class Mine(TermwiseDPSGD):
        def aggregate(self, module, batch, reduce=lambda s: s):
            module.seen.append(_settings())
            return super().aggregate(module, batch, reduce)

    model = _Spy()
    torch.set_float32_matmul_precision("high")
    Mine(max_grad_norm=1.0, batch_max_grad_norm=0.1, noise_multiplier=1.0).aggregate(
        model, (torch.randn(3, 4),))
    assert model.seen[0] == ["ieee"] * len(OPS)

"""DPAdamBC: Adam with the DP noise variance removed from the second moment."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch

from lit_dpvae.optim import DPAdamBC
from lit_dpvae.privacy import NaiveDPSGD, TermwiseDPSGD
from lit_dpvae.strategy import TermwiseDPStrategy
from tests.lightning_toys import ToyData, ToyLitVAE


def _run(opt: torch.optim.Optimizer, param: torch.Tensor, grads: list[torch.Tensor]) -> None:
    for g in grads:
        param.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("eps", [1e-8, 0.1])  # a large ε checks where it is added
def test_without_noise_it_is_adam(eps):
    gen = torch.Generator().manual_seed(0)
    grads = [0.1 * torch.randn(50, generator=gen) for _ in range(20)]
    a = torch.zeros(50, requires_grad=True)
    b = torch.zeros(50, requires_grad=True)
    _run(torch.optim.Adam([a], lr=0.01, eps=eps), a, grads)
    _run(DPAdamBC([b], lr=0.01, eps=eps, noise_std=0.0), b, grads)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_the_noise_share_of_the_second_moment_is_removed():
    """Gradient g + N(0, φ²) per coordinate at signal-to-noise 1: Adam's v̂ estimates
    g² + φ² (step ≈ lr/√2), the corrected one g² (step ≈ lr, as Adam on the clean gradient)."""
    phi, g, steps, n = 0.01, 0.01, 3000, 2000
    gen = torch.Generator().manual_seed(1)
    grads = [g + phi * torch.randn(n, generator=gen) for _ in range(steps)]
    moved = {}
    for name, make in (("adam", lambda p: torch.optim.Adam([p], lr=1e-3)),
                       ("bc", lambda p: DPAdamBC([p], lr=1e-3, noise_std=phi))):
        p = torch.zeros(n, requires_grad=True)
        opt = make(p)
        _run(opt, p, grads[:-1])
        before = p.detach().clone()
        _run(opt, p, grads[-1:])
        state = opt.state[p]
        v_hat = state["exp_avg_sq"] / (1 - 0.999 ** state["step"])
        moved[name] = (before - p.detach()).mean().item() / 1e-3  # last step, in units of lr
        if name == "adam":
            assert v_hat.mean().item() == pytest.approx(g**2 + phi**2, rel=0.05)
    # m̂ ≈ g (std of m̂'s noise ≈ 0.23 φ, averaged over n coordinates)
    assert moved["adam"] == pytest.approx(1 / math.sqrt(2), rel=0.1)
    assert moved["bc"] == pytest.approx(1.0, rel=0.15)


def test_pure_noise_coordinates_are_bounded_by_the_floor():
    phi, floor, lr = 0.01, 0.05, 1e-3
    p = torch.zeros(10_000, dtype=torch.float64, requires_grad=True)  # exact step sizes
    opt = DPAdamBC([p], lr=lr, noise_std=phi, floor=floor)
    gen = torch.Generator().manual_seed(2)
    for _ in range(200):
        before = p.detach().clone()
        p.grad = phi * torch.randn(10_000, generator=gen, dtype=torch.float64)
        opt.step()
        m_hat = opt.state[p]["exp_avg"] / (1 - 0.9 ** opt.state[p]["step"])
        step = (before - p.detach()).abs()
        assert torch.all(step <= lr * m_hat.abs() / (phi * math.sqrt(floor)) * (1 + 1e-9))
    v_hat = opt.state[p]["exp_avg_sq"] / (1 - 0.999 ** 200)
    assert (v_hat < phi**2).any(), "the floor must have been reached for the check to bite"


def test_bad_settings_and_a_missing_noise_std_are_refused():
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="floor must be > 0"):
        DPAdamBC([p], floor=0.0)
    with pytest.raises(ValueError, match="noise_std must be >= 0"):
        DPAdamBC([p], noise_std=-1.0)
    with pytest.raises(ValueError, match="lr must be > 0"):
        DPAdamBC([p], lr=0.0)
    p.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="TermwiseDPStrategy"):
        DPAdamBC([p]).step()


@pytest.mark.parametrize("mech", [
    TermwiseDPSGD(max_grad_norm=0.5, batch_max_grad_norm=0.2, noise_multiplier=1.3,
                  sample_share=0.7),
    NaiveDPSGD(max_grad_norm=0.5, max_batch_size=16, noise_multiplier=1.3),
], ids=["termwise-two-parts", "naive"])
def test_update_noise_std_is_the_std_privatize_draws(mech):
    """The φ handed to the optimizer is the measured std of the noise in the released update."""
    stats = {part: {"w": torch.zeros(200_000)} for part in mech.parts}
    gen = torch.Generator().manual_seed(3)
    update = mech.privatize(stats, expected_batch_size=8.0, generator=gen)["w"]
    assert update.std().item() == pytest.approx(mech.update_noise_std(8.0), rel=0.01)
    if isinstance(mech, TermwiseDPSGD):  # both parts count: sample/B and batch unscaled
        std = mech.noise_std()
        assert mech.update_noise_std(8.0) == pytest.approx(
            math.hypot(std["sample"] / 8.0, std["batch"]))


class _BCToy(ToyLitVAE):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[float] = []

    def configure_optimizers(self):
        return DPAdamBC(self.parameters(), lr=0.01)

    def on_before_optimizer_step(self, optimizer):
        self.seen.append(optimizer.noise_std)


@pytest.mark.parametrize("private", [True, False])
def test_the_strategy_hands_the_update_noise_std_to_the_optimizer(tmp_path, private):
    kw = dict(noise_multiplier=1.0, max_grad_norm=0.5, batch_max_grad_norm=0.1) if private \
        else dict(mechanism="nonprivate")
    strategy = TermwiseDPStrategy(noise_seed=5, **kw)
    model = _BCToy()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    pl.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=4, logger=False,
               enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, default_root_dir=tmp_path).fit(
        model, ToyData(n=100, sample_rate=0.2))
    phi = strategy.update_noise_std
    assert model.seen == [phi] * 4
    if private:
        std = strategy.mechanism.noise_std()
        assert phi == pytest.approx(math.hypot(std["sample"] / 20.0, std["batch"]))
        assert phi > 0
    else:
        assert phi == 0.0
    assert any(not torch.equal(start[k], v) for k, v in model.state_dict().items())

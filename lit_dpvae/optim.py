"""Optimizers that know the DP noise of the update they are given.

``DPAdamBC``: Adam with its second moment corrected for the Gaussian noise of DP-SGD (Tang et
al., "DP-AdamBC", arXiv 2312.14334). The released update is ``ĝ = g + n`` with ``n ~ N(0, φ²I)``
and ``φ = TermwiseDPStrategy.update_noise_std`` (``σC/B`` for one part), so Adam's ``v̂``
estimates ``E[ĝ²] = g² + φ²``. Wherever ``φ² ≫ g²`` (most coordinates under DP) Adam's step is
``m̂ / φ``: DP-SGD with the learning rate ``lr / φ``, not an adaptive method. The correction
divides by ``sqrt(max(v̂ − φ², floor·φ²)) + eps`` instead.

Privacy: the optimizer reads only the released (already noised) update and the public ``φ``;
it is post-processing and costs no privacy (docs/privacy.md §9).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor


class DPAdamBC(torch.optim.Optimizer):
    """Adam with the DP noise variance removed from the second moment.

    Args:
        params: parameters or parameter groups, as for ``torch.optim.Adam``.
        lr, betas, eps: as for Adam.
        floor: the corrected second moment is at least ``floor · φ²`` (a coordinate whose
            signal is lost in the noise then moves by at most ``lr·|m̂|/(φ sqrt(floor))``).
            Must be > 0; 0.05 corresponds to the paper's γ' = 5e-8 at φ ≈ 1e-3.
        noise_std: φ, the per-coordinate noise std of the gradients this optimizer is given.
            ``TermwiseDPStrategy`` sets it before every step, so leave it ``None`` there; set it
            yourself only when you privatise gradients by other means. φ = 0 gives Adam (up to
            rounding: the same formula, evaluated in a different order).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        floor: float = 0.05,
        noise_std: float | None = None,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"DPAdamBC: lr must be > 0, got {lr}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"DPAdamBC: betas must lie in [0, 1), got {betas}")
        if not eps >= 0:
            raise ValueError(f"DPAdamBC: eps must be >= 0, got {eps}")
        if not floor > 0:
            raise ValueError(
                f"DPAdamBC: floor must be > 0, got {floor} (with 0 a coordinate whose noisy "
                "second moment falls below φ² would take an unbounded step)"
            )
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, floor=floor))
        self.noise_std = noise_std
        #: φ of single parameters where it differs from ``noise_std`` (a mechanism whose parts
        #: cover different parameters, e.g. term-wise ``batch_params``); set by ``set_noise``.
        self.param_noise_std: dict[Any, float] = {}

    def set_noise(self, mechanism: Any, expected_batch_size: float, module: Any) -> None:
        """φ of every parameter of ``module`` from ``mechanism.update_noise_std(B, name)``
        (public: σ_k, Δ_k and B are), as ``DPStrategy`` does before every step."""
        self.noise_std = mechanism.update_noise_std(expected_batch_size)
        self.param_noise_std = {p: mechanism.update_noise_std(expected_batch_size, name)
                                for name, p in module.named_parameters()}

    @property
    def noise_std(self) -> float | None:
        return self._noise_std

    @noise_std.setter
    def noise_std(self, value: float | None) -> None:
        if value is not None:
            value = float(value)
            if not value >= 0:
                raise ValueError(f"DPAdamBC: noise_std must be >= 0, got {value}")
        self._noise_std = value

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.noise_std is None:
            raise RuntimeError(
                "DPAdamBC has no noise_std: train it with TermwiseDPStrategy (which sets it to "
                "the update's noise std before every step) or set optimizer.noise_std = φ"
            )
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                phi2 = self.param_noise_std.get(p, self.noise_std) ** 2
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                m_hat = m / (1 - beta1**t)
                v_hat = v / (1 - beta2**t)
                if phi2 > 0:
                    v_hat = (v_hat - phi2).clamp_(min=group["floor"] * phi2)
                p.addcdiv_(m_hat, v_hat.sqrt_().add_(group["eps"]), value=-group["lr"])
        return loss

"""Privacy accounting for term-wise DP-SGD on top of Opacus' accountants.

One step of any mechanism here releases a tuple of Gaussian-noised statistics
``(f_k(S) + N(0, σ_k² Δ_k² I))_k``. Whitening block k by ``σ_k Δ_k`` turns it into one Gaussian
mechanism with unit noise and L2 sensitivity ``sqrt(Σ_k σ_k⁻²)``, i.e. a Gaussian mechanism with
noise multiplier ``σ_eff = (Σ_k σ_k⁻²)^(-1/2)``. Under Poisson subsampling with rate ``q`` the
step is therefore accounted as Opacus' subsampled Gaussian ``(σ_eff, q)``: the RDP/PRV analyses of
the sampled Gaussian mechanism hold for any function of the sampled set with bounded add/remove
sensitivity (Mironov, Talwar, Zhang 2019, arXiv 1908.10530). Proof: docs/privacy.md §4.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.utils import get_noise_multiplier

ACCOUNTANTS: dict[str, type[IAccountant]] = {"rdp": RDPAccountant, "prv": PRVAccountant}

# Opacus' RDP: "Optimal order is the largest (smallest) alpha". The ε it returns stays a valid
# upper bound (another order could only tighten it), so the warning, printed by every short run,
# is noise.
ALPHA_WARNING = "Optimal order is the (largest|smallest) alpha"
warnings.filterwarnings("ignore", message=ALPHA_WARNING)


def joint_noise_multiplier(sigmas: list[float]) -> float:
    """``σ_eff = (Σ_k σ_k⁻²)^(-1/2)``; a part with ``σ_k = 0`` makes the whole step non-private."""
    if not sigmas:
        raise ValueError("no noise multipliers given")
    if any(s < 0 or math.isnan(s) for s in sigmas):
        raise ValueError(f"noise multipliers must be >= 0, got {sigmas}")
    if any(s == 0 for s in sigmas):
        return 0.0
    precision = sum(0.0 if math.isinf(s) else s**-2 for s in sigmas)
    return math.inf if precision == 0 else precision**-0.5


def split_noise_multiplier(sigma_eff: float, sample_share: float) -> tuple[float, float]:
    """``(σ_s, σ_b) = (σ_eff/√γ, σ_eff/√(1−γ))`` so that ``σ_s⁻² + σ_b⁻² = σ_eff⁻²``."""
    if not 0.0 < sample_share <= 1.0:
        raise ValueError(f"sample_share γ must be in (0, 1], got {sample_share}")
    sigma_s = sigma_eff / math.sqrt(sample_share)
    sigma_b = math.inf if sample_share == 1.0 else sigma_eff / math.sqrt(1.0 - sample_share)
    return sigma_s, sigma_b


def _accountant_class(name: str) -> type[IAccountant]:
    if name not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {name!r}; choose one of {sorted(ACCOUNTANTS)}")
    return ACCOUNTANTS[name]


def check_budget(
    target_epsilon: float, target_delta: float, num_records: int | None = None
) -> None:
    """Reject budgets that are meaningless: ε ≤ 0, δ outside (0, 1), or δ ≥ 1/N."""
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target_epsilon must be a positive finite number, got {target_epsilon}")
    if not 0.0 < target_delta < 1.0:
        raise ValueError(f"target_delta must be in (0, 1), got {target_delta}")
    if num_records is not None and target_delta >= 1.0 / num_records:
        raise ValueError(
            f"target_delta={target_delta} >= 1/N = {1.0 / num_records:.3g}: a mechanism that "
            "publishes one random record in full satisfies such a δ. Use δ well below 1/N "
            f"(e.g. {10 ** math.floor(math.log10(0.1 / num_records)):.0e})."
        )


def calibrate_noise(
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    epsilon_tolerance: float = 0.01,
) -> float:
    """The smallest σ_eff (to ``epsilon_tolerance`` in ε) whose ε after ``steps`` steps of the
    subsampled Gaussian with rate ``sample_rate`` is at most ``target_epsilon`` (Opacus' search).
    """
    check_budget(target_epsilon, target_delta)
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    _accountant_class(accountant)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=ALPHA_WARNING)
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=target_delta,
                sample_rate=sample_rate,
                steps=int(steps),
                accountant=accountant,
                epsilon_tolerance=epsilon_tolerance,
            )
        )


class PrivacyAccountant:
    """A checkpointable history of ``(σ_eff, q, steps)`` with ε from Opacus' RDP or PRV analysis.

    ``step(σ_eff, q)`` records one step; a step with ``σ_eff = 0`` (non-private) makes ε infinite.
    ``state_dict()`` holds the whole history, so a resumed run continues ε where it stopped.
    """

    def __init__(self, accountant: str = "rdp") -> None:
        self.name = accountant
        self._impl = _accountant_class(accountant)()
        self.non_private_steps = 0

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return list(self._impl.history)

    @property
    def steps(self) -> int:
        return sum(int(s) for _, _, s in self._impl.history) + self.non_private_steps

    def step(self, noise_multiplier: float, sample_rate: float) -> None:
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if noise_multiplier == 0:
            self.non_private_steps += 1
            return
        self._impl.step(noise_multiplier=float(noise_multiplier), sample_rate=float(sample_rate))

    def get_epsilon(self, delta: float) -> float:
        if self.non_private_steps:
            return math.inf
        if not self._impl.history:
            return 0.0
        with warnings.catch_warnings():  # (see the module-level filter; pytest resets it)
            warnings.filterwarnings("ignore", message=ALPHA_WARNING)
            return float(self._impl.get_epsilon(delta=delta))

    def epsilon_curve(self, delta: float, marks: list[int]) -> list[float]:
        """ε after the first ``marks[i]`` steps of this history, for each mark. RDP: one RDP
        evaluation per distinct ``(σ_eff, q)`` (RDP composes linearly in the steps, so each
        mark is the same sum Opacus forms: the values equal ``get_epsilon`` of that prefix);
        PRV: one accountant per mark."""
        history = self.history
        if self.name != "rdp" or self.non_private_steps:
            out = []
            for mark in marks:
                prefix = PrivacyAccountant.from_state_dict(
                    {**self.state_dict(), "history": _prefix(history, mark),
                     "non_private_steps": 0})
                out.append(prefix.get_epsilon(delta))
            return out
        from opacus.accountants.analysis import rdp as analysis

        alphas = RDPAccountant.DEFAULT_ALPHAS
        one_step = {}
        for sigma, q, _ in history:
            if (sigma, q) not in one_step:
                one_step[(sigma, q)] = analysis.compute_rdp(q=q, noise_multiplier=sigma,
                                                            steps=1, orders=alphas)
        out = []
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=ALPHA_WARNING)
            for mark in marks:
                prefix = _prefix(history, mark)
                if not prefix:
                    out.append(0.0)
                    continue
                rdp = sum([one_step[(sigma, q)] * steps for sigma, q, steps in prefix])
                eps, _ = analysis.get_privacy_spent(orders=alphas, rdp=rdp, delta=delta)
                out.append(float(eps))
        return out

    def epsilon_after(self, delta: float, noise_multiplier: float, sample_rate: float,
                      steps: int) -> float:
        """ε after ``steps`` more steps at ``(σ_eff, q)`` on top of this history (this
        accountant is not changed)."""
        if steps and noise_multiplier == 0:
            return math.inf
        state = self.state_dict()
        if steps:
            state["history"].append((float(noise_multiplier), float(sample_rate), int(steps)))
        return PrivacyAccountant.from_state_dict(state).get_epsilon(delta)

    def steps_within(self, target_epsilon: float, delta: float, noise_multiplier: float,
                     sample_rate: float, hint: int = 1) -> int:
        """How many more steps at ``(σ_eff, q)`` keep ε ≤ ``target_epsilon`` (up to a relative
        1e-6 for the accountant's own rounding); 0 if none. ``hint``: a first guess."""
        limit = target_epsilon * (1 + 1e-6)

        def fits(k: int) -> bool:
            return self.epsilon_after(delta, noise_multiplier, sample_rate, k) <= limit

        if not fits(0) or not fits(1):
            return 0
        low, high = 1, max(2, int(hint))
        while fits(high):  # exponential search, then bisection
            low, high = high, 2 * high
            if high > 10**9:
                return high
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if fits(mid) else (low, mid)
        return low

    def calibrate(self, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                  epsilon_tolerance: float = 0.01) -> float:
        """The smallest σ_eff (to ``epsilon_tolerance`` in ε) such that ``steps`` more steps at
        rate ``sample_rate`` *after this history* end with ε ≤ ``target_epsilon``. With an
        empty history this is :func:`calibrate_noise`."""
        if not self._impl.history and not self.non_private_steps:
            return calibrate_noise(target_epsilon, delta, sample_rate, steps, self.name,
                                   epsilon_tolerance)
        check_budget(target_epsilon, delta)
        if self.get_epsilon(delta) >= target_epsilon:
            raise ValueError(
                f"the history already spends ε={self.get_epsilon(delta):.4g} >= "
                f"target_epsilon={target_epsilon}: no further step fits")
        low, high = 0.0, 10.0
        while self.epsilon_after(delta, high, sample_rate, steps) > target_epsilon:
            low, high = high, 2 * high
            if high > 1e7:
                raise ValueError("no noise multiplier below 1e7 fits the remaining budget")
        while target_epsilon - self.epsilon_after(delta, high, sample_rate, steps) \
                > epsilon_tolerance and high - low > 1e-6:
            mid = (low + high) / 2
            if self.epsilon_after(delta, mid, sample_rate, steps) > target_epsilon:
                low = mid
            else:
                high = mid
        return high

    def state_dict(self) -> dict[str, Any]:
        return {
            "accountant": self.name,
            "history": [tuple(h) for h in self._impl.history],
            "non_private_steps": self.non_private_steps,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> PrivacyAccountant:
        """A new accountant holding ``state`` (its own kind, from ``state["accountant"]``)."""
        accountant = cls(state["accountant"])
        accountant.load_state_dict(state)
        return accountant

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("accountant") != self.name:
            raise ValueError(
                f"checkpoint was accounted with {state.get('accountant')!r}, this run uses "
                f"{self.name!r}: resume with the same accountant so ε stays comparable"
            )
        self._impl.history = [tuple(h) for h in state["history"]]
        self.non_private_steps = int(state.get("non_private_steps", 0))

    def __repr__(self) -> str:
        return f"PrivacyAccountant({self.name!r}, steps={self.steps})"


def _prefix(history: list[tuple[float, float, int]], steps: int) -> list[tuple[float, float, int]]:
    """The first ``steps`` steps of a ``(σ_eff, q, steps)`` history."""
    out, left = [], int(steps)
    for sigma, q, n in history:
        take = min(int(n), left)
        if take:
            out.append((sigma, q, take))
        left -= take
    return out


#: Where ``TermwiseDPStrategy`` keeps its privacy state in a checkpoint.
CHECKPOINT_KEY = "lit_dpvae_privacy"


def provenance_from_checkpoint(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """``{"mechanism", "accountant"}`` of the run that wrote ``checkpoint`` (None without a
    privacy state): the spend that weights loaded from it carry into a later fit."""
    state = checkpoint.get(CHECKPOINT_KEY)
    if not isinstance(state, dict) or "accountant" not in state:
        return None
    return {"mechanism": state.get("mechanism"),
            "accountant": PrivacyAccountant.from_state_dict(state["accountant"])}

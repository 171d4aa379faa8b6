"""The privacy report of a run: one object for checkpoints, export, the CLI, callbacks and
experiments, built from the checkpoint's privacy state (``CHECKPOINT_KEY``).

The state a checkpoint holds (secrets included, so a resume can continue) and what may be
released (the report: mechanism, ε, δ, σ_eff, steps, the accountant's public history) are kept
apart: :meth:`PrivacyReport.public` never contains the noise generator, the sampler seed or RNG
states.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lit_dpvae.privacy.accounting import PrivacyAccountant


@dataclass
class PrivacyReport:
    """What a run spent and how.

    Attributes:
        mechanism: the registry name of the mechanism.
        epsilon: ε spent at ``delta`` (infinite after any non-private step).
        delta: the run's δ.
        sigma_eff: σ_eff of the last private step.
        steps: steps taken (private and non-private).
        target_epsilon: the budget's ε (None: no stop rule).
        accountant: the accountant's state (its ``(σ_eff, q, steps)`` history: public).
        sample_rate, num_records, expected_batch_size: the sampling of the last step (when
            known to the object that built the report).
        sensitivity, noise_multipliers: per part (when known).
    """

    mechanism: str
    epsilon: float
    delta: float
    sigma_eff: float
    steps: int
    target_epsilon: float | None = None
    accountant: dict[str, Any] = field(default_factory=dict)
    sample_rate: float | None = None
    num_records: int | None = None
    expected_batch_size: float | None = None
    sensitivity: dict[str, float] = field(default_factory=dict)
    noise_multipliers: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> PrivacyReport:
        """The report of a checkpoint's privacy state."""
        accountant = PrivacyAccountant.from_state_dict(state["accountant"])
        return cls(mechanism=state["mechanism"], epsilon=float(state["epsilon"]),
                   delta=float(state["target_delta"]),
                   sigma_eff=float(state["noise_multiplier"]), steps=accountant.steps,
                   target_epsilon=state.get("target_epsilon"), accountant=state["accountant"])

    def metrics(self) -> dict[str, float]:
        """The numbers a logger shows (``privacy/...``)."""
        return {"privacy/epsilon": self.epsilon, "privacy/delta": self.delta,
                "privacy/sigma_eff": float(self.sigma_eff), "privacy/steps": float(self.steps)}

    def public(self) -> dict[str, Any]:
        """The releasable summary (``export``): mechanism, ε, δ, σ_eff, steps and the
        accountant's history, which a later fit of these weights must continue."""
        return {"mechanism": self.mechanism, "epsilon": float(self.epsilon),
                "delta": float(self.delta), "sigma_eff": float(self.sigma_eff),
                "steps": int(self.steps), "accountant": self.accountant}

    def line(self) -> str:
        """One line for a console."""
        return (f"mechanism={self.mechanism} epsilon={self.epsilon:.4g} delta={self.delta:.4g} "
                f"sigma_eff={self.sigma_eff:.4g} steps={self.steps}")

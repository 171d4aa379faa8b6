"""The privacy budget of a run: it owns the accountant and answers every question about ε.

- ``noise_multiplier_for(q, steps)``: σ_eff requested, or calibrated so that ``steps`` steps
  at rate q, after the history already spent, end at ``target_epsilon``;
- ``next_step_exceeds(σ, q)``: the stop rule, asked before every step;
- ``steps_left(σ, q)``, ``epsilon()``, ``step(σ, q)``;
- ``resume(state)``: continue a checkpoint's accountant, refusing a raised budget;
- ``carry(mechanism, spent)``: continue the spend that the weights already carry (warm start).

Pure accounting: no Lightning, no collectives. docs/privacy.md §4.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from lit_dpvae.privacy.accounting import PrivacyAccountant, check_budget
from lit_dpvae.privacy.collectives import Collectives
from lit_dpvae.privacy.provenance import merge_histories, weights_provenance


class PrivacyConfigError(ValueError):
    """A Trainer, model or budget setting that would silently break the privacy guarantee."""


class PrivacyBudget:
    """``(target_epsilon, target_delta)`` with the accountant of the run.

    Args:
        target_epsilon, target_delta: the budget (``target_epsilon=None``: no stop rule, only
            with a ``noise_multiplier``). δ must be below 1/N.
        noise_multiplier: σ_eff set directly instead of calibrated.
        accountant: ``"rdp"`` or ``"prv"``.
        allow_increase: accept a resume with a larger budget than the checkpoint's.
        private: False for a non-private run (no budget, ε is infinite once it steps).
    """

    def __init__(self, target_epsilon: float | None = None, target_delta: float = 1e-5,
                 noise_multiplier: float | None = None, accountant: str = "rdp",
                 allow_increase: bool = False, private: bool = True) -> None:
        if private:
            if target_epsilon is None and noise_multiplier is None:
                raise PrivacyConfigError(
                    "a private mechanism needs a budget: set target_epsilon (σ is then "
                    "calibrated) or noise_multiplier, or use mechanism='nonprivate'")
            if target_epsilon is not None:
                check_budget(target_epsilon, target_delta)
            if noise_multiplier is not None and not 0 < noise_multiplier < math.inf:
                raise ValueError(f"noise_multiplier must be finite and > 0, got "
                                 f"{noise_multiplier}")
        if not private and (target_epsilon is not None or noise_multiplier is not None):
            warnings.warn(
                "a non-private mechanism ignores target_epsilon and noise_multiplier: no ε holds "
                "for this run (it is reported as inf)", stacklevel=3)
        self.target_epsilon = target_epsilon
        self.target_delta = float(target_delta)
        self.requested_noise_multiplier = noise_multiplier
        self.accountant = PrivacyAccountant(accountant)
        self.allow_increase = bool(allow_increase)
        self.private = private
        #: ((σ, q, target), steps when planned, step count at which to stop): the stop rule,
        #: recomputed whenever σ, q or the target differ from those it was computed for.
        self._plan: tuple[tuple[float, float, float | None], int, int | None] | None = None

    # -- questions ------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        return self.accountant.steps

    def epsilon(self) -> float:
        return self.accountant.get_epsilon(self.target_delta)

    def check_sampling(self, num_records: int) -> None:
        """δ must be below 1/N (raised when the data set is known or changes)."""
        if self.private:
            check_budget(self.target_epsilon or 1.0, self.target_delta, num_records)

    def steps_left(self, sigma: float, sample_rate: float, hint: int = 1) -> int | None:
        """How many more steps at ``(σ, q)`` fit in ``target_epsilon`` (None: no budget to
        enforce)."""
        if self.target_epsilon is None or not self.private:
            return None
        return self.accountant.steps_within(self.target_epsilon, self.target_delta, sigma,
                                            sample_rate, hint=max(1, hint))

    def next_step_exceeds(self, sigma: float, sample_rate: float, hint: int = 1) -> bool:
        """The stop rule, asked before every step: would *this* step, at ``(σ, q)``, take ε
        past ``target_epsilon``? A step count computed from the accountant's history, redone
        whenever σ, q or the target change."""
        if self.target_epsilon is None or not self.private:
            return False
        key = (sigma, sample_rate, self.target_epsilon)
        steps = self.accountant.steps
        if self._plan is None or self._plan[0] != key or steps < self._plan[1]:
            left = self.steps_left(sigma, sample_rate, hint)
            self._plan = (key, steps, None if left is None else steps + left)
        stop = self._plan[2]
        return stop is not None and steps >= stop

    @property
    def stop_at(self) -> int | None:
        """The step count at which the current plan stops (None: not planned or no limit)."""
        return None if self._plan is None else self._plan[2]

    # -- decisions ------------------------------------------------------------------------
    def noise_multiplier_for(self, sample_rate: float, planned_steps: int) -> float:
        """σ_eff of a fresh run: the requested one, or calibrated for the planned steps after
        the history already in the accountant (a warm start)."""
        if not self.private:
            return 0.0
        if self.requested_noise_multiplier is not None:
            return float(self.requested_noise_multiplier)
        assert self.target_epsilon is not None
        return self.accountant.calibrate(self.target_epsilon, self.target_delta, sample_rate,
                                         planned_steps)

    def check_can_step(self, sigma: float, sample_rate: float, hint: int = 1) -> None:
        """Refuse a run that could take no private step at all."""
        left = self.steps_left(sigma, sample_rate, hint)
        if left != 0:
            return
        if self.accountant.steps == 0:
            raise PrivacyConfigError(
                f"noise_multiplier={sigma:.4g} is too small for "
                f"target_epsilon={self.target_epsilon}: a single step already exceeds it. Raise "
                "noise_multiplier, or leave it unset to calibrate it from the budget.")
        raise PrivacyConfigError(
            f"the privacy budget ε={self.target_epsilon} is already spent "
            f"(ε={self.epsilon():.4g} after {self.accountant.steps} steps): this run would "
            "take no private step. Raise target_epsilon only if that is a new, justified "
            "budget (allow_budget_increase=True at resume); the spent privacy cannot be reset.")

    def step(self, sigma: float, sample_rate: float) -> None:
        self.accountant.step(sigma, sample_rate)

    def resume(self, state: dict[str, Any]) -> float:
        """Continue a checkpoint's privacy ``state``: load its accountant and return its σ.
        A raised (or dropped) target is refused unless ``allow_increase``; a requested σ that
        differs from the checkpoint's is ignored with a warning."""
        if not self.private:
            self.accountant.load_state_dict(state["accountant"])
            return 0.0
        sigma = float(state["noise_multiplier"])
        spent = PrivacyAccountant(self.accountant.name)
        spent.load_state_dict(state["accountant"])
        old = state.get("target_epsilon", "unknown")
        new = self.target_epsilon
        raised = (new is None and old is not None) or (
            new is not None and isinstance(old, (int, float)) and new > old * (1 + 1e-9))
        old_delta = float(state.get("target_delta", self.target_delta))
        raised = raised or self.target_delta > old_delta * (1 + 1e-9)
        if raised or old == "unknown":
            message = (
                f"resuming with target_epsilon={new}, target_delta={self.target_delta} from a "
                f"checkpoint trained with target_epsilon={old}, target_delta={old_delta} "
                f"(ε={spent.get_epsilon(self.target_delta):.4g} spent so far)")
            if not self.allow_increase:
                why = ("the checkpoint does not record its target, so the budget of the whole "
                       "run cannot be checked" if old == "unknown" and not raised else
                       "that raises (or drops) the budget of the whole run")
                raise PrivacyConfigError(
                    f"{message}: {why}. Resume with the checkpoint's target_epsilon and "
                    "target_delta, or, if the larger budget is a new, justified decision, pass "
                    "allow_budget_increase=True.")
            warnings.warn(message + f": the budget of the whole run is now {new} "
                          "(allow_budget_increase=True); σ stays the checkpoint's "
                          f"{sigma:.4g} and the stop rule uses the new target.", stacklevel=2)
        requested = self.requested_noise_multiplier
        if requested is not None and not math.isclose(requested, sigma):
            warnings.warn(
                f"noise_multiplier={requested} is ignored at resume: the run continues with "
                f"the checkpoint's σ_eff={sigma:.4g}.", stacklevel=2)
        self.accountant.load_state_dict(state["accountant"])
        self._plan = None
        return sigma

    def carry(self, mechanism: str | None, spent: PrivacyAccountant) -> bool:
        """Continue the spend of weights trained earlier (``warm_start="carry"``): their
        history joins this accountant. Refuses weights trained without privacy and a different
        accountant. True when the history changed."""
        if not self.private or spent is self.accountant:
            return False
        if spent.non_private_steps or mechanism == "nonprivate":
            raise PrivacyConfigError(
                f"the model's weights were trained without privacy ({spent.steps} steps, "
                "mechanism='nonprivate'): no ε holds for a model fine-tuned from them. Start "
                "from fresh weights, or pass warm_start='public' if that earlier training used "
                "public data only.")
        if mechanism == "mixed":
            raise PrivacyConfigError(
                "the model's weights combine privacy spends accounted with different "
                "accountants (weights of one run loaded into a module trained by another): they "
                "cannot be composed in one accountant. Start from one run's weights, or pass "
                "warm_start='public' if the other training used public data only.")
        if spent.name != self.accountant.name:
            raise PrivacyConfigError(
                f"the model's weights carry a privacy spend accounted with {spent.name!r}; this "
                f"run uses {self.accountant.name!r}: use accountant={spent.name!r} so ε "
                "continues.")
        merged = merge_histories(self.accountant.history, spent.history)
        if merged == self.accountant.history:
            return False
        state = self.accountant.state_dict()
        state["history"] = merged
        self.accountant.load_state_dict(state)
        self._plan = None
        return True

    def warm_start(self, module: Any, policy: str, comm: Collectives) -> str | None:
        """Weights that already carry a privacy spend (``weights_provenance``) continue it in
        this accountant (``policy="carry"``) or are declared public (``"public"``). Multi-process
        runs take rank 0's answer (the ranks' in-process registries may differ). Returns the
        warning to show, if any."""
        found = weights_provenance(module)
        if comm.distributed:
            payload = None if found is None else (found[0], found[1].state_dict(),
                                                  found[1] is self.accountant)
            payload = comm.broadcast_object(payload)
            if payload is None or payload[2]:
                return None
            found = (payload[0], PrivacyAccountant.from_state_dict(payload[1]))
        if found is None or found[1] is self.accountant:
            return None
        mechanism, spent = found
        if policy == "public":
            return (f"the model's weights carry {spent.steps} earlier training steps "
                    f"(mechanism={mechanism!r}); warm_start='public' ignores them: the reported "
                    "ε covers this run only, which is right only if those steps used public "
                    "data (or are accounted elsewhere).")
        if not self.carry(mechanism, spent):
            return None
        return (f"warm start: the model's weights already spent ε={self.epsilon():.4g} "
                f"(δ={self.target_delta}) over {self.accountant.steps} steps; this run continues "
                "that accountant (warm_start='carry'), so σ is calibrated for what is left of "
                f"target_epsilon={self.target_epsilon}.")

    def replan(self) -> None:
        """Forget the stop rule's plan (the sampling or σ changed)."""
        self._plan = None

    def state_dict(self) -> dict[str, Any]:
        return {"accountant": self.accountant.state_dict(), "target_delta": self.target_delta,
                "target_epsilon": self.target_epsilon}

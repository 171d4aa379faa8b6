"""One private training run, without Lightning: the mechanism, its budget, the secret seeds and
the sampling they are planned for. ``DPStrategy`` drives it from Lightning's hooks:

- ``attach(sampler, planned_steps, module)`` for every train loader: the sampling (q, N, B),
  σ (restored, requested, or calibrated after any spend the weights carry), the noise
  generator;
- ``step(module, batch)`` for every batch: the stop rule, the mechanism's statistics, the
  noised update and the accountant's step;
- ``state_dict()`` / ``report()``: the checkpoint's privacy state and the public report.

docs/privacy.md §4 (accounting, resumes, warm starts) and §7 (multi-process runs).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lit_dpvae.privacy.budget import PrivacyBudget
from lit_dpvae.privacy.collectives import LOCAL, Collectives
from lit_dpvae.privacy.mechanisms import AutoMechanism, Mechanism
from lit_dpvae.privacy.provenance import (
    fingerprint,
    mark_trained,
    register_spent,
    tensor_fingerprints,
)
from lit_dpvae.privacy.report import PrivacyReport
from lit_dpvae.privacy.rng import rng_state, set_rng_state
from lit_dpvae.privacy.seeds import SecretSeeds

Say = Callable[[str], None]


class PrivateRun:
    """The privacy side of a fit. ``warn``/``info`` show messages (rank 0 only in a
    multi-process run); ``warm_start`` is ``"carry"`` or ``"public"``."""

    def __init__(self, mechanism: Mechanism, budget: PrivacyBudget, seeds: SecretSeeds,
                 warm_start: str = "carry", warn: Say = print, info: Say = print) -> None:
        if warm_start not in ("carry", "public"):
            raise ValueError(f"warm_start must be 'carry' or 'public', got {warm_start!r}")
        self.mechanism, self.budget, self.seeds = mechanism, budget, seeds
        self.warm_start, self.warn, self.info = warm_start, warn, info
        self.comm: Collectives = LOCAL
        self.sample_rate: float | None = None
        self.expected_batch_size: float | None = None
        self.num_records: int | None = None
        self.planned_steps: int | None = None
        self.budget_exhausted = False
        self.restored: dict[str, Any] | None = None  # the checkpoint's privacy state (resume)
        self.sampler: Any = None
        self._restore_rng: dict[str, Any] | None = None
        self._start_fingerprints: tuple[str, set[str]] | None = None  # never registered spent

    @property
    def started(self) -> bool:
        """A train loader was attached (σ and the noise generator are set)."""
        return self.seeds.generator is not None

    # -- before the steps -----------------------------------------------------------------
    def choose_mechanism(self, module: nn.Module, owner: object) -> Mechanism:
        """``mechanism="auto"``: replace it by the mechanism ``module``'s declared terms need
        (bound to ``owner``); any other mechanism is kept."""
        if isinstance(self.mechanism, AutoMechanism):
            chosen, why = self.mechanism.resolve(module)
            chosen.bind(owner)
            self.mechanism = chosen
            self.info(f"mechanism='auto': {chosen.name} ({why})")
        return self.mechanism

    def attach(self, sampler: Any, planned_steps: int, module: nn.Module | None,
               device: torch.device | str = "cpu") -> None:
        """A (new) train loader's Poisson sampler: re-read the sampling and re-plan; the first
        one also fixes σ and the noise generator."""
        self.sampler, self.planned_steps = sampler, planned_steps
        self.read_sampling(announce=self.started)
        if not self.started and self.restored is not None:
            sigma = self.budget.resume(self.restored)
            self._restore_rng = self.restored.get("rng")
        else:
            message = self.budget.warm_start(module, self.warm_start, self.comm)
            if message:
                self.warn(message)
            if self.started:  # a second fit keeps its σ and generator
                return self._mark_weights(module)
            assert self.sample_rate is not None
            sigma = self.budget.noise_multiplier_for(self.sample_rate, planned_steps)
        self.mechanism.noise_multiplier = sigma
        self.mechanism.check_noise_composition()
        self.seeds.make_generator(self.restored, torch.device(device), self.comm)
        history = self.budget.accountant.history
        if self.restored is not None and history and self.mechanism.private \
                and not math.isclose(history[-1][1], self.sample_rate or 0.0):
            self.warn(
                f"the sample rate changed from q={history[-1][1]:.4g} (checkpoint) to "
                f"q={self.sample_rate:.4g} at resume (N={self.num_records}); σ stays "
                f"{sigma:.4g} and the stop rule is re-planned for the new q: training stops "
                f"before a step would exceed target_epsilon={self.budget.target_epsilon}.")
        self._mark_weights(module)
        self.budget.check_can_step(sigma, self.sample_rate or 1.0, planned_steps)
        assert self.expected_batch_size is not None
        message = self.mechanism.balance_warning(self.expected_batch_size)
        if message:
            self.warn(message)
        self.info(f"{self.mechanism!r}, q={self.sample_rate:.4g}, N={self.num_records}, "
                  f"planned steps={planned_steps}")

    def read_sampling(self, announce: bool) -> None:
        """Read q, N and B from the current Poisson sampler; when they changed, check δ < 1/N
        again and re-plan the stop rule (``announce``: say so)."""
        if self.sampler is None:
            return
        q, n = float(self.sampler.sample_rate), int(self.sampler.num_samples)
        if (q, n) == (self.sample_rate, self.num_records):
            return
        self.budget.check_sampling(n)
        old_q, self.sample_rate, self.num_records = self.sample_rate, q, n
        self.expected_batch_size = float(self.sampler.expected_batch_size)
        self.mechanism.set_sampling(self.expected_batch_size)
        self.budget.replan()
        if announce and old_q is not None and self.mechanism.private:
            left = self.budget.steps_left(self.mechanism.noise_multiplier, q,
                                          self.planned_steps or 1)
            self.warn(
                f"the sample rate changed from q={old_q:.4g} to q={q:.4g} (N={n}, expected "
                f"batch {self.expected_batch_size:.4g}); σ stays "
                f"{self.mechanism.noise_multiplier:.4g}, so the budget "
                f"ε={self.budget.target_epsilon} now allows "
                f"{'no limit' if left is None else left} more steps (planned: "
                f"{self.planned_steps}). Training stops before a step would exceed it.")

    # -- one step -------------------------------------------------------------------------
    def step(self, module: nn.Module, batch: Any) -> dict[str, Tensor] | None:
        """The private update of ``batch`` (None: the budget is spent, stop before this step).
        The model's own randomness continues exactly where a checkpoint left it."""
        if self._restore_rng is not None:
            rng, self._restore_rng = self._restore_rng, None
            set_rng_state(rng)
        self.read_sampling(announce=True)  # the loader's sampler may have changed in place
        mechanism = self.mechanism
        assert self.sample_rate is not None and self.expected_batch_size is not None
        if self.budget.next_step_exceeds(mechanism.noise_multiplier, self.sample_rate,
                                         self.planned_steps or 1):
            self._stop(always=True)
            return None
        stats = mechanism.aggregate(module, batch, self.comm)
        update = mechanism.privatize(stats, self.expected_batch_size, self.seeds.generator)
        self.budget.step(mechanism.noise_multiplier, self.sample_rate)
        if self.budget.next_step_exceeds(mechanism.noise_multiplier, self.sample_rate,
                                         self.planned_steps or 1):
            # stop after this step: a skipped step (returning None) is not allowed with
            # several processes, and every rank takes the same decision (public quantities)
            self._stop()
        return update

    def _stop(self, always: bool = False) -> None:
        """No further step fits the budget (said when it stops the run before the planned
        steps, or ``always``)."""
        self.budget_exhausted = True
        if always or self.budget.steps < (self.planned_steps or 0):
            self.info(f"Privacy budget ε={self.budget.target_epsilon} reached after "
                      f"{self.budget.steps} steps: stopping before the next step would "
                      "exceed it.")

    # -- the weights' provenance ----------------------------------------------------------
    def _mark_weights(self, module: nn.Module | None) -> None:
        if module is not None and self._start_fingerprints is None:
            self._start_fingerprints = (fingerprint(module),
                                        set(tensor_fingerprints(module, trainable_only=False)))
        mark_trained(module, self.mechanism.name, self.budget.accountant)

    def register_weights(self, module: nn.Module | None) -> None:
        """Remember the spend of the weights this run changed, by fingerprint."""
        if module is not None and self.started and self.budget.steps:
            register_spent(module, {"mechanism": self.mechanism.name,
                                    "accountant": self.budget.accountant.state_dict()},
                           skip=self._start_fingerprints)

    # -- state ----------------------------------------------------------------------------
    def public_state(self) -> dict[str, Any]:
        """The part of the privacy state that may be released (no seeds, no RNG states)."""
        return {**self.budget.state_dict(), "mechanism": self.mechanism.name,
                "noise_multiplier": self.mechanism.noise_multiplier,
                "epsilon": self.budget.epsilon()}

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's privacy state, secrets included (a resume continues it)."""
        return {**self.public_state(), **self.seeds.state(), "rng": rng_state()}

    def report(self, state: dict[str, Any] | None = None, curve: bool = True) -> PrivacyReport:
        """What this run spent and how (public: no secret seeds); ``curve``: with the ε curve
        (one accountant evaluation per point)."""
        report = PrivacyReport.from_state(state or self.public_state())
        report.sample_rate, report.num_records = self.sample_rate, self.num_records
        report.expected_batch_size = self.expected_batch_size
        report.planned_steps, report.world_size = self.planned_steps, self.comm.world_size
        report.mechanism_settings = self.mechanism.settings()
        bounds = self.mechanism.bounds()  # None: set from a sampling this run never had
        if bounds is not None and self.mechanism.private:
            report.sensitivity, report.noise_multipliers = bounds
            report.noise_std = dict(self.mechanism.noise_std())
            if self.expected_batch_size:  # per coordinate of the released update
                b = self.expected_batch_size
                report.noise_std.update({
                    f"update/{part}": std / (b if self.mechanism.summed_over_records[part] else 1)
                    for part, std in self.mechanism.noise_std().items()})
        return report.complete_curve() if curve else report

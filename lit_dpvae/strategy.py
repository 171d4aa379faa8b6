"""``DPStrategy``: a Lightning strategy that trains a ``loss_terms`` model with a DP mechanism,
on one device or across processes and nodes. Lightning hooks only; the work is done by

- the mechanism (``lit_dpvae.privacy.mechanisms``, by registry name or object): attributes and
  clips the local batch, with its collectives (``privacy.collectives``) summing the raw
  statistics over ranks before a whole part is clipped and serving the batch-wise terms the
  global batch (``gather_for_batch_terms``);
- the privacy budget (``privacy.budget``): σ, the accountant, the per-step stop rule;
- the privacy state (:meth:`DPStrategy.privacy_state_dict`), written into every checkpoint
  (``lit_dpvae.checkpoints``), and its report (``privacy.report``).

Every rank draws the same Gaussian noise from a generator seeded by one secret seed broadcast
from rank 0, so all replicas apply the identical update (no DistributedDataParallel wrapper).
A resume continues the accountant with fresh secret noise and sampler seeds (``exact_resume``
replays them, for tests). docs/privacy.md §4 and §7.
"""

from __future__ import annotations

import math
import secrets
import warnings
from datetime import timedelta
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor

from lit_dpvae.checkpoints import (
    CHECKPOINT_KEY,
    MODEL_CLASS_KEY,
    add_privacy,
    mark_loaded_checkpoint,
)
from lit_dpvae.hparams import scrub_hparams
from lit_dpvae.optim import DPAdamBC
from lit_dpvae.privacy import is_poisson_loader
from lit_dpvae.privacy.budget import PrivacyBudget, PrivacyConfigError
from lit_dpvae.privacy.collectives import LOCAL, Collectives, TorchDistributed
from lit_dpvae.privacy.grad_sample import check_module
from lit_dpvae.privacy.mechanisms import Mechanism, build_mechanism, mechanism_names
from lit_dpvae.privacy.provenance import (
    fingerprint,
    mark_trained,
    register_spent,
    tensor_fingerprints,
    weights_provenance,
)
from lit_dpvae.privacy.report import PrivacyReport
from lit_dpvae.privacy.rng import rng_state, set_rng_state
from lit_dpvae.privacy.terms import batch_size_of
from lit_dpvae.refusals import refuse_unsafe_trainer

MECHANISMS = mechanism_names()
__all__ = ["CHECKPOINT_KEY", "MODEL_CLASS_KEY", "DPStrategy", "PrivacyConfigError",
           "TermwiseDPStrategy"]


class DPStrategy(DDPStrategy):
    """Differentially private training of ``loss_terms`` models.

    Args:
        mechanism: a registered name (``"termwise"``, default, arXiv 2006.11204; ``"pairwise"``,
            MMD-type divergences clipped pair by pair; ``"naive"``; ``"nonprivate"``) or a
            ``Mechanism`` object (LightningCLI: ``class_path``/``init_args``).
        target_epsilon, target_delta: the budget. With ``noise_multiplier=None``, σ_eff is
            calibrated so the planned steps (``max_steps``, else ``max_epochs`` × steps per
            epoch) spend exactly ``target_epsilon``; training stops before a step would exceed
            it. δ must be below 1/N.
        noise_multiplier: σ_eff set directly (then ``target_epsilon`` is only the stop rule).
        accountant: ``"rdp"`` or ``"prv"``.
        noise_seed: seed of the Gaussian noise. Keep it secret: whoever knows it can subtract
            the noise. ``None`` (default) draws a secret seed on rank 0.
        log_train_terms: log ``train/<term>`` means of each private batch: exact statistics of
            private records (not noised), so treat the dashboard as private data.
        exact_resume: a resume restores the noise generator and sampler seed and replays the
            uninterrupted run bit for bit. **Testing only** (two continuations of one
            checkpoint then differ by a noise-free function of the data).
        allow_budget_increase: accept a resume with a larger ``target_epsilon``/``target_delta``
            than the checkpoint's (or none where it had one).
        warm_start: weights that already carry a privacy spend (docs/privacy.md §4):
            ``"carry"`` (default) continues that accountant (weights trained without privacy
            are refused); ``"public"`` asserts the earlier training used public data only.
        **mechanism_settings: the named mechanism's own settings (e.g. ``max_grad_norm``,
            ``batch_max_grad_norm``, ``sample_share``, ``pair_max_grad_norm``,
            ``pairwise_share``, ``max_batch_size``, ``backend``; see its class).
        accelerator, parallel_devices, cluster_environment, checkpoint_io, process_group_backend,
        timeout, start_method: as in Lightning's ``DDPStrategy``.
    """

    strategy_name = "dp"

    def __init__(
        self, mechanism: str | Mechanism = "termwise", target_epsilon: float | None = None,
        target_delta: float = 1e-5, noise_multiplier: float | None = None,
        accountant: Literal["rdp", "prv"] = "rdp", noise_seed: int | None = None,
        log_train_terms: bool = True, exact_resume: bool = False,
        allow_budget_increase: bool = False, warm_start: Literal["carry", "public"] = "carry",
        accelerator: pl.accelerators.Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None, cluster_environment: Any = None,
        checkpoint_io: Any = None, process_group_backend: str | None = None,
        timeout: timedelta | None = timedelta(minutes=30),
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        **mechanism_settings: Any,
    ) -> None:
        super().__init__(accelerator=accelerator, parallel_devices=parallel_devices,
                         cluster_environment=cluster_environment, checkpoint_io=checkpoint_io,
                         process_group_backend=process_group_backend, timeout=timeout,
                         start_method=start_method)
        if warm_start not in ("carry", "public"):
            raise ValueError(f"warm_start must be 'carry' or 'public', got {warm_start!r}")
        self.mechanism: Mechanism = build_mechanism(mechanism, **mechanism_settings)
        self.mechanism_name = self.mechanism.name
        self.budget = PrivacyBudget(target_epsilon, target_delta, noise_multiplier, accountant,
                                    allow_budget_increase, private=self.mechanism.private)
        self.noise_seed, self.log_train_terms = noise_seed, log_train_terms
        self.exact_resume, self.warm_start = bool(exact_resume), warm_start
        self.noise_generator: torch.Generator | None = None
        self.sample_rate: float | None = None
        self.expected_batch_size: float | None = None
        self.num_records: int | None = None
        self.planned_steps: int | None = None
        self.budget_exhausted = False
        self.comm: Collectives = LOCAL
        self.restored: dict[str, Any] | None = None  # the checkpoint's privacy state (resume)
        self._pending_update: dict[str, Tensor] | None = None
        self._restore_rng: dict[str, Any] | None = None
        self._sampler_seed: int | None = None
        self._sampler: Any = None
        self._start_fingerprints: tuple[str, set[str]] | None = None  # never registered spent

    # the budget's settings, read by callbacks, the CLI and tests
    accountant = property(lambda self: self.budget.accountant)
    target_epsilon = property(lambda self: self.budget.target_epsilon)
    target_delta = property(lambda self: self.budget.target_delta)
    is_private = property(lambda self: self.mechanism.private)

    @property
    def world_size(self) -> int:  # type: ignore[override]
        return self.num_nodes * self.num_processes

    def epsilon(self) -> float:
        return self.budget.epsilon()

    # -- setup ----------------------------------------------------------------------------
    def setup_distributed(self) -> None:
        if self.world_size > 1:
            super().setup_distributed()
            self.comm = TorchDistributed(self.world_size, self.global_rank)
        else:  # one process: no process group, no port, nothing to synchronise
            self.set_world_ranks()

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:  # type: ignore[override]
        """No DistributedDataParallel: broadcast rank 0's weights once, like Opacus' DPDDP."""
        if self.world_size > 1 and dist.is_initialized():
            with torch.no_grad():
                for tensor in list(model.parameters()) + list(model.buffers()):
                    dist.broadcast(tensor.data, src=0)
        return model

    def setup(self, trainer: pl.Trainer) -> None:
        refuse_unsafe_trainer(trainer, self.precision_plugin)
        # Before Lightning logs hyper-parameters: no record value reaches a logger.
        scrub_hparams(trainer.lightning_module)
        scrub_hparams(getattr(trainer, "datamodule", None))
        # The train loader's rank-synchronised Poisson sampler shards the global batch itself;
        # val/test loaders run whole on every rank.
        trainer._accelerator_connector.use_distributed_sampler = False
        if trainer.state.fn == "fit":
            if self.is_private:
                check_module(trainer.lightning_module)
            self.mechanism.check(trainer.lightning_module)
        if self.world_size > 1 or trainer.state.fn == "fit":
            return super().setup(trainer)
        # One process outside fit: DDPStrategy would synchronise through a missing group.
        assert self.accelerator is not None and self.model is not None  # set by Lightning
        self.accelerator.setup(trainer)
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        self.setup_precision_plugin()

    def process_dataloader(self, dataloader: object) -> object:
        trainer = self.lightning_module.trainer if self.lightning_module else None
        if trainer is None or not trainer.training or dataloader is None:
            return dataloader
        if not is_poisson_loader(dataloader):
            if self.is_private:
                raise PrivacyConfigError(
                    "the train dataloader does not use Poisson sampling, which the accountant "
                    "assumes. Build it with lit_dpvae.privacy.poisson_dataloader (the lit_dpvae "
                    "data modules do) and pass Trainer(use_distributed_sampler=False).")
            return dataloader
        sampler = dataloader.batch_sampler  # type: ignore[attr-defined]
        if (sampler.num_replicas, sampler.rank) != (self.world_size, self.global_rank):
            raise PrivacyConfigError(
                f"the Poisson sampler is set for rank {sampler.rank} of {sampler.num_replicas} "
                f"but this process is rank {self.global_rank} of {self.world_size}: build the "
                "loader after the trainer is attached (in train_dataloader())")
        if self._sampler_seed is None:
            restored = self.restored or {}
            seed = sampler.seed if self.restored is None else (
                restored["sampler_seed"] if self.exact_resume
                and restored.get("sampler_seed") is not None
                else secrets.randbits(62))  # a continuation samples with fresh randomness
            self._sampler_seed = int(self.broadcast(seed) if self.world_size > 1 else seed)
        sampler.seed = self._sampler_seed
        loop = trainer.fit_loop
        sampler.resume_at(int(trainer.current_epoch), int(loop.epoch_loop.batch_progress.current
                                                          .ready),
                          int(loop.epoch_progress.current.processed))
        warnings.filterwarnings(  # the Poisson sampler resumes mid-epoch exactly
            "ignore", message="You're resuming from a checkpoint that ended before the epoch")
        self._sampler = sampler
        self.planned_steps = planned_steps(trainer, len(sampler))
        self._prepare_privacy(trainer.lightning_module)
        return dataloader

    def _prepare_privacy(self, module: Any) -> None:
        """σ (calibrated, restored or carried), noise generator and accountant; for every train
        loader (a second fit, reloaded loaders re-read the sampling and re-plan)."""
        self._read_sampling(announce=self.noise_generator is not None)
        if self.noise_generator is None and self.restored is not None:
            sigma = self.budget.resume(self.restored)
            self._restore_rng = self.restored.get("rng")
        else:
            self._carry_warm_start(module)
            if self.noise_generator is not None:  # a second fit keeps its state
                return self._mark_weights(module)
            assert self.sample_rate is not None and self.planned_steps is not None
            sigma = self.budget.noise_multiplier_for(self.sample_rate, self.planned_steps)
        self.mechanism.noise_multiplier = sigma
        exact = self.restored is not None and self.exact_resume
        seed = self.noise_seed if self.restored is None and self.noise_seed is not None \
            else 0 if exact else secrets.randbits(62)  # fresh secret noise entropy otherwise
        seed = self.broadcast(seed) if self.world_size > 1 else seed
        self.noise_generator = torch.Generator(device=self.root_device).manual_seed(int(seed))
        if exact and self.restored and self.restored.get("noise_generator") is not None:
            self.noise_generator.set_state(self.restored["noise_generator"].cpu())
        history = self.accountant.history
        if self.restored is not None and history and self.is_private \
                and not math.isclose(history[-1][1], self.sample_rate or 0.0):
            rank_zero_warn(
                f"the sample rate changed from q={history[-1][1]:.4g} (checkpoint) to "
                f"q={self.sample_rate:.4g} at resume (N={self.num_records}); σ stays "
                f"{sigma:.4g} and the stop rule is re-planned for the new q: training stops "
                f"before a step would exceed target_epsilon={self.target_epsilon}.")
        self._mark_weights(module)
        self.budget.check_can_step(sigma, self.sample_rate or 1.0, self.planned_steps or 1)
        assert self.expected_batch_size is not None
        message = self.mechanism.balance_warning(self.expected_batch_size)
        if message:
            rank_zero_warn(message)
        rank_zero_info(
            f"{type(self).__name__}: {self.mechanism!r}, q={self.sample_rate:.4g}, "
            f"N={self.num_records}, planned steps={self.planned_steps}, "
            f"sensitivity={self.mechanism.sensitivity}")

    def _read_sampling(self, announce: bool) -> None:
        """Read q, N and B from the current Poisson sampler; when they changed, check δ < 1/N
        again and re-plan the stop rule (``announce``: say so)."""
        if self._sampler is None:
            return
        q, n = float(self._sampler.sample_rate), int(self._sampler.num_samples)
        if (q, n) == (self.sample_rate, self.num_records):
            return
        self.budget.check_sampling(n)
        old_q, self.sample_rate, self.num_records = self.sample_rate, q, n
        self.expected_batch_size = float(self._sampler.expected_batch_size)
        self.mechanism.set_sampling(self.expected_batch_size)
        self.budget.replan()
        if announce and old_q is not None and self.is_private:
            left = self.budget.steps_left(self.mechanism.noise_multiplier, q,
                                          self.planned_steps or 1)
            rank_zero_warn(
                f"the sample rate changed from q={old_q:.4g} to q={q:.4g} (N={n}, expected "
                f"batch {self.expected_batch_size:.4g}); σ stays "
                f"{self.mechanism.noise_multiplier:.4g}, so the budget "
                f"ε={self.target_epsilon} now allows {'no limit' if left is None else left} "
                f"more steps (planned: {self.planned_steps}). Training stops before a step "
                "would exceed it.")

    def _mark_weights(self, module: Any) -> None:
        if module is not None and self._start_fingerprints is None:
            self._start_fingerprints = (fingerprint(module),
                                        set(tensor_fingerprints(module, trainable_only=False)))
        mark_trained(module, self.mechanism_name, self.accountant)

    def _register_weights(self) -> None:
        """Remember the spend of the weights this run changed, by fingerprint."""
        module = self.lightning_module
        if module is not None and self.noise_generator is not None and self.accountant.steps:
            register_spent(module, {"mechanism": self.mechanism_name,
                                    "accountant": self.accountant.state_dict()},
                           skip=self._start_fingerprints)

    def _carry_warm_start(self, module: Any) -> None:
        """Weights that already carry a spend continue it (``warm_start``); multi-process runs
        take rank 0's answer (their in-process registries may differ)."""
        found = weights_provenance(module)
        if self.world_size > 1 and dist.is_initialized():
            payload = None if found is None else (found[0], found[1].state_dict(),
                                                  found[1] is self.accountant)
            payload = self.comm.broadcast_object(payload)
            if payload is None or payload[2]:
                return
            found = (payload[0], type(self.accountant).from_state_dict(payload[1]))
        if found is None or found[1] is self.accountant:
            return
        if self.warm_start == "public":
            return rank_zero_warn(
                f"the model's weights carry {found[1].steps} earlier training steps (mechanism="
                f"{found[0]!r}); warm_start='public' ignores them: the reported ε covers this "
                "run only, right only if those steps used public data (or are accounted "
                "elsewhere).")
        if self.budget.carry(*found):
            rank_zero_warn(
                f"warm start: the model's weights already spent ε={self.epsilon():.4g} "
                f"(δ={self.target_delta}) over {self.accountant.steps} steps; this run "
                "continues that accountant (warm_start='carry'), so σ is calibrated for what is "
                f"left of target_epsilon={self.target_epsilon}.")

    # -- the private step -----------------------------------------------------------------
    def training_step(self, *args: Any, **kwargs: Any) -> Tensor | None:
        batch = args[0] if args else kwargs["batch"]
        module, mechanism = self.lightning_module, self.mechanism
        assert module is not None
        if self.noise_generator is None:
            raise PrivacyConfigError(
                "the train dataloader was never seen by the strategy: train with a Poisson "
                "loader (lit_dpvae data modules) through Trainer.fit")
        if self._restore_rng is not None:  # the model's own randomness continues exactly
            rng, self._restore_rng = self._restore_rng, None
            set_rng_state(rng)
        self._read_sampling(announce=True)  # the loader's sampler may have changed in place
        assert self.sample_rate is not None and self.expected_batch_size is not None
        if self.budget.next_step_exceeds(mechanism.noise_multiplier, self.sample_rate,
                                         self.planned_steps or 1):
            self.budget_exhausted = module.trainer.should_stop = True
            rank_zero_info(
                f"Privacy budget ε={self.target_epsilon} reached after {self.accountant.steps} "
                "steps: stopping before the next step would exceed it.")
            return None
        with self.precision_plugin.train_step_context():
            stats = mechanism.aggregate(module, batch, self.comm)
            update = mechanism.privatize(stats, self.expected_batch_size, self.noise_generator)
        self._pending_update = update  # written into p.grad in backward (after zero_grad)
        self.budget.step(mechanism.noise_multiplier, self.sample_rate)
        terms, n = mechanism.last_terms, batch_size_of(batch)
        if terms is None or n == 0:
            return torch.zeros((), device=self.root_device)
        loss = terms.mean_loss(self.expected_batch_size).detach()
        if self.log_train_terms:
            for key, value in {**terms.detached(), "loss": float(loss)}.items():
                module.log(f"train/{key}", value, batch_size=n, prog_bar=key == "loss")
        return loss

    def backward(self, closure_loss: Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> Tensor:
        """Never backpropagate the loss: write the private update into ``p.grad`` instead."""
        update, self._pending_update = self._pending_update, None
        if update is None:
            raise RuntimeError(
                f"{type(self).__name__}.backward without a private update: the model's training "
                "step must not call backward itself (manual optimization is not supported)")
        for name, p in self.lightning_module.named_parameters():
            if name in update:
                p.grad = update[name].to(p.dtype)
        if isinstance(getattr(optimizer, "optimizer", optimizer), DPAdamBC):
            getattr(optimizer, "optimizer", optimizer).noise_std = self.update_noise_std
        return closure_loss

    @property
    def update_noise_std(self) -> float:
        """φ: std of the Gaussian noise per coordinate of the update in ``p.grad`` (public)."""
        if self.expected_batch_size is None:
            raise RuntimeError("update_noise_std is known once Trainer.fit has set up the "
                               "strategy (mechanism and expected batch size)")
        return self.mechanism.update_noise_std(self.expected_batch_size)

    # -- checkpoints: the privacy state travels with every checkpoint ---------------------
    def privacy_state_dict(self) -> dict[str, Any]:
        """The checkpoint's privacy state (secrets included; ``privacy_report`` is public)."""
        found = None if self.noise_generator is not None or self.restored is not None \
            else weights_provenance(self.lightning_module)
        if self.noise_generator is None and self.restored is not None:
            return dict(self.restored)  # never trained (validate/test): keep the spend
        if found is not None and found[1].steps:  # never trained: the weights' own spend
            history = found[1].history  # σ of the last private step, for a resume
            return {**self.budget.state_dict(), "rng": rng_state(), "mechanism": found[0],
                    "noise_multiplier": float(history[-1][0]) if history else 0.0,
                    "accountant": found[1].state_dict(), "noise_generator": None,
                    "sampler_seed": None, "epsilon": found[1].get_epsilon(self.target_delta)}
        return {**self.budget.state_dict(), "rng": rng_state(), "mechanism": self.mechanism_name,
                "noise_multiplier": self.mechanism.noise_multiplier,
                "noise_generator": None if self.noise_generator is None
                else self.noise_generator.get_state(),
                "sampler_seed": self._sampler_seed, "epsilon": self.epsilon()}

    def privacy_report(self) -> PrivacyReport:
        """What this run spent and how (public: no secret seeds)."""
        report = PrivacyReport.from_state(self.privacy_state_dict())
        report.sample_rate, report.num_records = self.sample_rate, self.num_records
        report.expected_batch_size = self.expected_batch_size
        report.sensitivity = dict(self.mechanism.sensitivity)
        report.noise_multipliers = dict(self.mechanism.noise_multipliers)
        return report

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any,
                        storage_options: Any = None) -> None:
        add_privacy(checkpoint, self.privacy_state_dict(), self.lightning_module)
        self._register_weights()
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        """Weights restored by the Trainer (a resume, ``validate/test(ckpt_path=...)``) carry
        the checkpoint's spend into any later fit of the module."""
        super().load_model_state_dict(checkpoint, strict=strict)
        mark_loaded_checkpoint(self.lightning_module, checkpoint)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=False)
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            if self.is_private and checkpoint.get("global_step", 0) > 0:
                raise PrivacyConfigError(
                    f"{checkpoint_path} has no privacy state: it was not written by "
                    "TermwiseDPStrategy, so the privacy already spent on it is unknown. Start "
                    "from scratch, or from a checkpoint written by this strategy.")
            return checkpoint
        if state["mechanism"] != self.mechanism_name:
            raise PrivacyConfigError(
                f"checkpoint was trained with mechanism={state['mechanism']!r}, this run uses "
                f"{self.mechanism_name!r}: resume with the same mechanism")
        if state["noise_generator"] is not None or state["accountant"].get("history") \
                or state["accountant"].get("non_private_steps"):
            self.restored = state  # something was spent: continue it
        return checkpoint

    def teardown(self) -> None:
        self._register_weights()
        super().teardown()

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        for name in ("dp", "termwise_dp"):
            strategy_registry.register(name, cls, description="DP-SGD strategies (lit_dpvae)",
                                       override=True)


def planned_steps(trainer: pl.Trainer, steps_per_epoch: int) -> int:
    """The steps a fit will take (``max_steps``, else ``max_epochs`` × limited epoch length)."""
    if trainer.max_steps and trainer.max_steps > 0:
        return int(trainer.max_steps)
    if trainer.max_epochs is None or trainer.max_epochs < 0:
        raise PrivacyConfigError(
            "cannot plan the privacy budget of an unbounded run: set max_steps or max_epochs")
    limit = trainer.limit_train_batches
    if isinstance(limit, int):
        steps_per_epoch = min(steps_per_epoch, limit)
    elif limit is not None and limit < 1.0:
        steps_per_epoch = max(1, int(steps_per_epoch * limit))
    return int(trainer.max_epochs) * steps_per_epoch


#: The name the library first shipped under (term-wise is the default mechanism).
TermwiseDPStrategy = DPStrategy
DPStrategy.register_strategies(StrategyRegistry)

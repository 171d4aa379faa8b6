"""``DPStrategy``: Lightning hooks that train a ``loss_terms`` model with a DP mechanism, on one
device or across processes and nodes. The work is done by small Lightning-free objects:
the mechanism (``privacy.mechanisms``, by registry name or object) with its collectives
(``privacy.collectives``), the budget (``privacy.budget``: σ, accountant, stop rule), the secret
seeds (``privacy.seeds``) and the run that ties them together (``privacy.run``); checkpoints
carry the privacy state (``lit_dpvae.checkpoints``), reported by ``privacy.report``. No
DistributedDataParallel wrapper: every rank adds the identical noise. docs/privacy.md §4, §7.
"""

from __future__ import annotations

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
    describe_optimizer,
    mark_loaded_checkpoint,
    restored_privacy,
    spend_of_weights,
)
from lit_dpvae.hparams import scrub_hparams
from lit_dpvae.optim import DPAdamBC
from lit_dpvae.privacy import from_opacus_loader, is_poisson_loader
from lit_dpvae.privacy.budget import PrivacyBudget, PrivacyConfigError
from lit_dpvae.privacy.capture import check_module
from lit_dpvae.privacy.collectives import TorchDistributed
from lit_dpvae.privacy.mechanisms import Mechanism, build_mechanism
from lit_dpvae.privacy.report import PrivacyReport
from lit_dpvae.privacy.run import PrivateRun
from lit_dpvae.privacy.seeds import SecretSeeds
from lit_dpvae.privacy.terms import batch_size_of
from lit_dpvae.refusals import planned_steps, refuse_private_monitors, refuse_unsafe_trainer

__all__ = ["CHECKPOINT_KEY", "MODEL_CLASS_KEY", "DPStrategy", "PrivacyConfigError",
           "TermwiseDPStrategy"]


class DPStrategy(DDPStrategy):
    """Differentially private training of ``loss_terms`` models (Lightning's own arguments,
    ``accelerator`` … ``start_method``, as in its ``DDPStrategy``).

    Args:
        mechanism: a registered name (``"auto"``, default: chosen from the model's declared
            terms when the model connects, see ``privacy.mechanisms.auto``; ``"termwise"``,
            arXiv 2006.11204; ``"pairwise"``, kernel divergences clipped pair by pair;
            ``"naive"``; ``"nonprivate"``) or a ``Mechanism`` object (LightningCLI:
            ``class_path``/``init_args``).
        target_epsilon: the budget. With ``noise_multiplier=None``, σ_eff is
            calibrated so the planned steps (``max_steps``, else ``max_epochs`` × steps per
            epoch) spend exactly ``target_epsilon``; training stops before a step would exceed
            it. δ must be below 1/N.
        target_delta: see ``target_epsilon``.
        noise_multiplier: σ_eff set directly (then ``target_epsilon`` is only the stop rule).
        accountant: ``"rdp"`` or ``"prv"``.
        noise_seed: seed of the Gaussian noise. Keep it secret: whoever knows it can subtract
            the noise. ``None`` (default) draws a secret seed on rank 0.
        log_train_terms: log ``train/<term>`` means of each private batch (exact: private).
        exact_resume: a resume replays the uninterrupted run bit for bit. **Testing only**.
        allow_budget_increase: accept a resume with a larger ``target_epsilon``/``target_delta``
            than the checkpoint's (or none where it had one).
        warm_start: weights that already carry a privacy spend (docs/privacy.md §4):
            ``"carry"`` (default) continues that accountant (weights trained without privacy
            are refused); ``"public"`` asserts the earlier training used public data only.
        **mechanism_settings: the named mechanism's own settings (e.g. ``max_grad_norm``,
            ``batch_max_grad_norm``, ``sample_share``, ``pair_max_grad_norm``,
            ``pairwise_share``, ``max_batch_size``, ``backend``; see its class).
    """

    strategy_name = "dp"

    def __init__(
        self, mechanism: str | Mechanism = "auto", target_epsilon: float | None = None,
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
        self.mechanism: Mechanism = build_mechanism(mechanism, owner=type(self),
                                                    **mechanism_settings)
        self.mechanism.bind(self)
        self.budget = PrivacyBudget(target_epsilon, target_delta, noise_multiplier, accountant,
                                    allow_budget_increase, private=self.mechanism.private)
        self.run = PrivateRun(self.mechanism, self.budget, SecretSeeds(noise_seed, exact_resume),
                              warm_start, warn=rank_zero_warn, info=rank_zero_info)
        self.log_train_terms = log_train_terms
        self._pending_update: dict[str, Tensor] | None = None

    mechanism_name = property(lambda self: self.mechanism.name)
    accountant = property(lambda self: self.budget.accountant)
    target_epsilon = property(lambda self: self.budget.target_epsilon)
    target_delta = property(lambda self: self.budget.target_delta)
    is_private = property(lambda self: self.mechanism.private)
    noise_generator = property(lambda self: self.run.seeds.generator)
    restored = property(lambda self: self.run.restored)
    budget_exhausted = property(lambda self: self.run.budget_exhausted)
    expected_batch_size = property(lambda self: self.run.expected_batch_size)

    world_size = property(lambda self: self.num_nodes * self.num_processes)  # type: ignore

    def epsilon(self) -> float:
        return self.budget.epsilon()

    # -- setup ----------------------------------------------------------------------------
    def connect(self, model: pl.LightningModule) -> None:
        super().connect(model)  # mechanism="auto" is chosen for the model (before a restore)
        self.mechanism = self.run.choose_mechanism(model, owner=self)

    def setup_distributed(self) -> None:
        if self.world_size > 1:
            super().setup_distributed()
            self.run.comm = TorchDistributed(self.world_size, self.global_rank)
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
        scrub_hparams(trainer.lightning_module)  # before Lightning logs them (no record value)
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
        opacus = from_opacus_loader(dataloader, num_replicas=self.world_size,
                                    rank=self.global_rank)
        if opacus is not None:  # same dataset, q and steps; a secret, rank-synchronised sampler
            dataloader = opacus
            rank_zero_info("Opacus DPDataLoader: its batches are drawn by the rank-synchronised "
                           "lit_dpvae Poisson sampler with the same q")
        if not is_poisson_loader(dataloader):
            if self.is_private:
                raise PrivacyConfigError(
                    "the train dataloader does not use Poisson sampling, which the accountant "
                    "assumes. Use a lit_dpvae data module (PrivateDataModule wraps any Dataset),"
                    " an Opacus DPDataLoader or lit_dpvae.privacy.poisson_dataloader.")
            return dataloader
        sampler = dataloader.batch_sampler  # type: ignore[attr-defined]
        if (sampler.num_replicas, sampler.rank) != (self.world_size, self.global_rank):
            raise PrivacyConfigError(
                f"the Poisson sampler is set for rank {sampler.rank} of {sampler.num_replicas} "
                f"but this process is rank {self.global_rank} of {self.world_size}: build the "
                "loader after the trainer is attached (in train_dataloader())")
        if self.is_private:  # (the optimizers' schedulers are set up by now)
            refuse_private_monitors(trainer)
        run = self.run
        sampler.seed = run.seeds.sampler_seed_for(sampler.seed, run.restored, run.comm)
        loop = trainer.fit_loop  # continue with the batches of the epoch where the run stopped
        epochs = loop.epoch_progress.current
        sampler.resume_at(int(trainer.current_epoch),
                          int(loop.epoch_loop.batch_progress.current.ready),
                          int(epochs.processed), epochs.started > epochs.completed)
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended")
        run.attach(sampler, planned_steps(trainer, len(sampler)), trainer.lightning_module,
                   self.root_device)
        return dataloader

    # -- the private step -----------------------------------------------------------------
    def training_step(self, *args: Any, **kwargs: Any) -> Tensor | None:
        batch = args[0] if args else kwargs["batch"]
        module = self.lightning_module
        assert module is not None
        if not self.run.started:
            raise PrivacyConfigError(
                "the train dataloader was never seen by the strategy: train with a Poisson "
                "loader (lit_dpvae data modules) through Trainer.fit")
        with self.precision_plugin.train_step_context():
            update = self.run.step(module, batch)
        if self.run.budget_exhausted:  # this step was the budget's last (or there was none)
            module.trainer.should_stop = True
        if update is None:
            return None
        self._pending_update = update  # written into p.grad in backward (after zero_grad)
        terms, n, comm = self.mechanism.last_terms, batch_size_of(batch), self.run.comm
        if self.log_train_terms and terms is not None and (n or comm.distributed):
            logged = terms.logged(self.expected_batch_size, comm)  # the global batch's values
            for key, value in logged.items() if n else ():
                module.log(f"train/{key}", value, batch_size=n, prog_bar=key == "loss")
        # Lightning hands this to every callback's on_train_batch_end (LR finders, user code):
        # a constant, never the exact private loss (backward ignores it: the update is noised)
        return torch.zeros((), device=self.root_device)

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
        if isinstance(opt := getattr(optimizer, "optimizer", optimizer), DPAdamBC):
            opt.set_noise(self.mechanism, self.expected_batch_size, self.lightning_module)
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
        """The checkpoint's privacy state (secrets included; ``privacy_report`` is public).
        A strategy that never trained (validate/test) keeps the spend its weights carry."""
        if not self.run.started:
            if self.run.restored is not None:
                return dict(self.run.restored)
            state = spend_of_weights(self.lightning_module, self.budget.state_dict())
            if state is not None:
                return state
        return self.run.state_dict()

    def privacy_report(self, curve: bool = True) -> PrivacyReport:
        """What this run spent and how (public: no secret seeds), for logs, export, the CLI."""
        report = self.run.report(None if self.run.started else self.privacy_state_dict(), curve)
        report.optimizer = describe_optimizer(self.optimizers)
        return report

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any,
                        storage_options: Any = None) -> None:
        add_privacy(checkpoint, self.privacy_state_dict(), self.lightning_module,
                    self.privacy_report())
        self.run.register_weights(self.lightning_module)
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        """Restored weights (resume, ``ckpt_path``) carry the checkpoint's spend into a fit."""
        super().load_model_state_dict(checkpoint, strict=strict)
        mark_loaded_checkpoint(self.lightning_module, checkpoint)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=False)
        if self.lightning_module is not None:  # "auto" is checked as what it chooses
            self.mechanism = self.run.choose_mechanism(self.lightning_module, owner=self)
        state = restored_privacy(checkpoint, checkpoint_path, self.mechanism_name,
                                 self.is_private, self.mechanism.settings())
        self.run.restored = state if state is not None else self.run.restored
        return checkpoint

    def teardown(self) -> None:
        self.run.register_weights(self.lightning_module)
        super().teardown()

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        for name in ("dp", "termwise_dp"):
            strategy_registry.register(name, cls, description="DP-SGD strategies (lit_dpvae)",
                                       override=True)


TermwiseDPStrategy = DPStrategy  #: the name the library first shipped under
DPStrategy.register_strategies(StrategyRegistry)

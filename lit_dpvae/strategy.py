"""``TermwiseDPStrategy``: a Lightning strategy that trains a ``loss_terms`` model with a DP
mechanism, on one device or across processes and nodes.

Each training step, on every rank:

1. the mechanism attributes and clips the *local* batch (``privacy.mechanisms``); batch-wise
   terms read the *global* batch through ``gather_for_batch_terms`` (codes of other ranks are
   gathered without gradient, the local codes keep theirs, so the per-rank divergence gradients
   sum to the global one);
2. the raw sums are all-reduced (summed) across ranks *before* a whole part is clipped, so the
   batch part is clipped once, on the global gradient (sensitivity ``2C_b`` for any world size);
3. every rank draws the same Gaussian noise from a generator seeded by one secret seed broadcast
   from rank 0, so all replicas apply the identical update (no DistributedDataParallel wrapper:
   it would average each rank's own noise and the replicas would drift);
4. the accountant records one subsampled Gaussian step ``(σ_eff, q)``.

The accountant, σ, the target, the noise generator and the sampler seed are saved in every
checkpoint. A resume continues the accountant (ε never restarts) with fresh secret noise and
sampler seeds (``exact_resume=True`` replays them, for tests). Before every step the stop rule
asks whether that step, at the current σ and q, stays within ``target_epsilon``. See
docs/privacy.md §4 and §7.
"""

from __future__ import annotations

import math
import random
import secrets
import warnings
from datetime import timedelta
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.plugins.precision import DoublePrecision, Precision
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor

from lit_dpvae.hparams import scrub_hparams, scrub_mapping
from lit_dpvae.optim import DPAdamBC
from lit_dpvae.privacy import (
    NaiveDPSGD,
    NonPrivate,
    PairwiseDPSGD,
    PrivacyAccountant,
    TermwiseDPSGD,
    check_budget,
    is_poisson_loader,
)
from lit_dpvae.privacy import provenance as registry
from lit_dpvae.privacy.accounting import CHECKPOINT_KEY, provenance_from_checkpoint
from lit_dpvae.privacy.grad_sample import BACKENDS, check_module
from lit_dpvae.privacy.mechanisms import Mechanism
from lit_dpvae.privacy.provenance import (
    fingerprint,
    mark_loaded,
    merge_histories,
    register_spent,
    tensor_fingerprints,
)
from lit_dpvae.privacy.terms import batch_size_of

MECHANISMS = ("termwise", "naive", "nonprivate", "pairwise")
MODEL_CLASS_KEY = "lit_dpvae_model_class"


def _rng_state() -> dict[str, Any]:
    """torch/CUDA/NumPy/Python RNG states as tensors and plain numbers (loadable with
    ``weights_only=True``, which ``load_from_checkpoint`` uses)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_rest": [int(pos), int(has_gauss), float(cached)],
        "python_state": torch.tensor(py_state, dtype=torch.int64),
        "python_rest": [int(version), py_gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    pos, has_gauss, cached = state["numpy_rest"]
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, int(pos), int(has_gauss), float(cached)))
    version, py_gauss = state["python_rest"]
    random.setstate((int(version), tuple(int(v) for v in state["python_state"]), py_gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class PrivacyConfigError(ValueError):
    """A Trainer or model setting that would silently break the privacy guarantee."""


class TermwiseDPStrategy(DDPStrategy):
    """Differentially private training of ``loss_terms`` models (term-wise DP-SGD by default).

    Args:
        mechanism: ``"termwise"`` (arXiv 2006.11204), ``"naive"`` (whole loss attributed per
            record, sensitivity ``2·n_max·C``), ``"nonprivate"``, or ``"pairwise"``
            (``PairwiseDPSGD``: MMD-type divergences clipped pair by pair, sensitivity ``8·C_p``;
            on one or many processes).
        target_epsilon, target_delta: the budget. With ``noise_multiplier=None``, σ_eff is
            calibrated so that the planned steps (``max_steps``, else ``max_epochs`` × steps per
            epoch) spend exactly ``target_epsilon``. Training stops before a step would exceed
            it. δ must be below 1/N.
        noise_multiplier: σ_eff set directly (then ``target_epsilon`` is only the stop rule).
        max_grad_norm: C, the per-record clipping norm of the sample-wise part.
        batch_max_grad_norm: C_b, the clipping norm of the batch-wise gradient (term-wise).
        sample_share: γ, the share of the budget spent on the sample-wise part (term-wise);
            1.0 means no batch-wise terms (exactly DP-SGD).
        pair_max_grad_norm: C_p, the clipping norm of each pair term (``pairwise``).
        pairwise_share: γ_p, the budget share of the pairwise part (``pairwise``; default
            ``1 − sample_share``, the rest goes to opaque batch-wise terms).
        max_batch_size: n_max for ``naive`` (default: 2 × the expected batch size).
        accountant: ``"rdp"`` or ``"prv"``.
        backend: per-record gradient backend, ``"ghost"`` (default), ``"hooks"``, ``"functorch"``.
        noise_seed: seed of the Gaussian noise. Keep it secret: whoever knows it can subtract
            the noise. ``None`` (default) draws a secret seed on rank 0.
        log_train_terms: log ``train/<term>`` means of each private batch. They are exact
            statistics of private records (not noised): treat the dashboard as private data.
        exact_resume: resuming from a checkpoint restores the noise generator and the sampler
            seed, so the continuation replays the uninterrupted run bit for bit. **Testing
            only**: two continuations of one checkpoint then draw identical noise, and their
            difference is a noise-free function of the data. By default (``False``) every
            resume draws fresh secret seeds for the noise and the sampler.
        allow_budget_increase: accept a resume whose ``target_epsilon`` or ``target_delta`` is
            larger than the checkpoint's (or no ``target_epsilon`` where it had one). Refused
            by default: raising the budget mid-run changes the guarantee of the whole run.
        warm_start: what to do when the model's weights already carry a privacy spend
            (trained by this library, loaded from a checkpoint with a privacy state or from
            an ``export`` file, or copied from such weights in this process; docs/privacy.md
            §4). ``"carry"`` (default): the new run's accountant starts from that history, so
            ε covers both runs (weights trained without privacy are refused). ``"public"``:
            you assert that the earlier training used only public data or is accounted
            elsewhere; the history is ignored, with a warning.
        accelerator, parallel_devices, cluster_environment, checkpoint_io, process_group_backend,
        timeout, start_method: as in Lightning's ``DDPStrategy``.
    """

    strategy_name = "termwise_dp"

    def __init__(
        self,
        mechanism: Literal["termwise", "naive", "nonprivate", "pairwise"] = "termwise",
        target_epsilon: float | None = None,
        target_delta: float = 1e-5,
        noise_multiplier: float | None = None,
        max_grad_norm: float = 1.0,
        batch_max_grad_norm: float = 1.0,
        sample_share: float = 0.5,
        pair_max_grad_norm: float = 1.0,
        pairwise_share: float | None = None,
        max_batch_size: int | None = None,
        accountant: Literal["rdp", "prv"] = "rdp",
        backend: Literal["ghost", "hooks", "functorch"] = "ghost",
        noise_seed: int | None = None,
        log_train_terms: bool = True,
        exact_resume: bool = False,
        allow_budget_increase: bool = False,
        warm_start: Literal["carry", "public"] = "carry",
        accelerator: pl.accelerators.Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: Any = None,
        checkpoint_io: Any = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = timedelta(minutes=30),
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
        )
        if mechanism not in MECHANISMS:
            raise ValueError(f"unknown mechanism {mechanism!r}; choose one of {MECHANISMS}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        if mechanism != "nonprivate":
            if target_epsilon is None and noise_multiplier is None:
                raise PrivacyConfigError(
                    f"mechanism={mechanism!r} needs a budget: set target_epsilon (σ is then "
                    "calibrated) or noise_multiplier, or use mechanism='nonprivate'"
                )
            if target_epsilon is not None:
                check_budget(target_epsilon, target_delta)
            if noise_multiplier is not None and not noise_multiplier > 0:
                raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}")
        self.mechanism_name = mechanism
        self.target_epsilon = target_epsilon
        self.target_delta = float(target_delta)
        self.requested_noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.batch_max_grad_norm = batch_max_grad_norm
        self.sample_share = sample_share
        self.pair_max_grad_norm = pair_max_grad_norm
        self.pairwise_share = pairwise_share
        self.max_batch_size = max_batch_size
        self.accountant = PrivacyAccountant(accountant)
        self.backend = backend
        self.noise_seed = noise_seed
        self.log_train_terms = log_train_terms
        if warm_start not in ("carry", "public"):
            raise ValueError(f"warm_start must be 'carry' or 'public', got {warm_start!r}")
        self.exact_resume = bool(exact_resume)
        self.allow_budget_increase = bool(allow_budget_increase)
        self.warm_start = warm_start
        self.mechanism: Mechanism | None = self._build_mechanism(noise_multiplier=0.0)
        self.noise_generator: torch.Generator | None = None
        self.sample_rate: float | None = None
        self.expected_batch_size: float | None = None
        self.num_records: int | None = None
        self.planned_steps: int | None = None
        self.budget_exhausted = False
        self._restored: dict[str, Any] | None = None
        self._pending_update: dict[str, Tensor] | None = None
        self._restore_rng: dict[str, Any] | None = None
        self._sampler_seed: int | None = None
        self._sampler: Any = None
        #: Fingerprints of the weights this strategy started from (never registered as spent).
        self._start_fingerprints: tuple[str, set[str]] | None = None
        #: ((σ, q, target), steps when planned, step count at which to stop): the stop rule,
        #: recomputed whenever σ, q or the target differ from those it was computed for.
        self._plan: tuple[tuple[float, float, float | None], int, int | None] | None = None

    # ---------------------------------------------------------------------------------------
    # Construction and checks
    def _build_mechanism(self, noise_multiplier: float) -> Mechanism:
        if self.mechanism_name == "nonprivate":
            return NonPrivate(backend=self.backend)
        if self.mechanism_name == "naive":
            return NaiveDPSGD(
                max_grad_norm=self.max_grad_norm,
                max_batch_size=self.max_batch_size or 1,
                noise_multiplier=noise_multiplier,
                backend=self.backend,
            )
        if self.mechanism_name == "pairwise":
            return PairwiseDPSGD(
                max_grad_norm=self.max_grad_norm,
                pair_max_grad_norm=self.pair_max_grad_norm,
                batch_max_grad_norm=self.batch_max_grad_norm,
                noise_multiplier=noise_multiplier,
                sample_share=self.sample_share,
                pairwise_share=self.pairwise_share,
                backend=self.backend,
            )
        return TermwiseDPSGD(
            max_grad_norm=self.max_grad_norm,
            batch_max_grad_norm=self.batch_max_grad_norm,
            noise_multiplier=noise_multiplier,
            sample_share=self.sample_share,
            backend=self.backend,
        )

    @property
    def is_private(self) -> bool:
        return self.mechanism_name != "nonprivate"

    @property
    def world_size(self) -> int:  # type: ignore[override]
        return self.num_nodes * self.num_processes

    @property
    def is_distributed(self) -> bool:  # pragma: no cover - legacy property
        return self.world_size > 1

    def _refuse_unsafe_trainer(self, trainer: pl.Trainer) -> None:
        """Every refusal in one place, raised before the first step (docs/refusals.md)."""
        problems = []
        if trainer.accumulate_grad_batches != 1:
            problems.append(
                f"accumulate_grad_batches={trainer.accumulate_grad_batches}: accumulating Poisson "
                "batches changes the sampling the accountant assumes. Use a larger batch_size "
                "(sample rate) instead."
            )
        if trainer.gradient_clip_val:
            problems.append(
                "gradient_clip_val is set: clipping the noisy update is not per-record clipping "
                "and hides misconfigured C. Set max_grad_norm / batch_max_grad_norm instead."
            )
        precision = self.precision_plugin
        if type(precision) not in (Precision, DoublePrecision):
            problems.append(
                f"precision plugin {type(precision).__name__} ({trainer.precision}): mixed or "
                "half precision scales/rounds p.grad after clipping (16-mixed's GradScaler "
                "unscales p.grad only; bf16 rounding moves clipped norms past C). Use "
                "precision='32-true'."
            )
        module = trainer.lightning_module
        if module is not None and not module.automatic_optimization:
            problems.append(
                "manual optimization: the strategy computes the private gradient itself; keep "
                "automatic_optimization=True and let configure_optimizers return one optimizer."
            )
        if problems:
            raise PrivacyConfigError(
                "TermwiseDPStrategy refuses this configuration:\n  - " + "\n  - ".join(problems)
            )

    # ---------------------------------------------------------------------------------------
    # Lightning hooks
    def setup_distributed(self) -> None:
        if self.world_size > 1:
            super().setup_distributed()
        else:  # one process: no process group, no port, nothing to synchronise
            self.set_world_ranks()

    # Lightning's DDPStrategy annotates a DistributedDataParallel return; this one wraps nothing
    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:  # type: ignore[override]
        """No DistributedDataParallel: broadcast rank 0's weights once, like Opacus' DPDDP."""
        if self.world_size > 1 and dist.is_initialized():
            with torch.no_grad():
                for tensor in list(model.parameters()) + list(model.buffers()):
                    dist.broadcast(tensor.data, src=0)
        return model

    def setup(self, trainer: pl.Trainer) -> None:
        self._refuse_unsafe_trainer(trainer)
        # Before Lightning logs hyper-parameters (after strategy.setup): no tensor, array or
        # data set among any module's or data module's __init__ arguments reaches a logger.
        scrub_hparams(trainer.lightning_module)
        scrub_hparams(getattr(trainer, "datamodule", None))
        # The strategy owns sampling: the train loader's rank-synchronised Poisson sampler shards
        # the global batch itself, and a DistributedSampler injected by Lightning would replace
        # it (or fail on the custom batch sampler). Val/test loaders run whole on every rank.
        trainer._accelerator_connector.use_distributed_sampler = False
        module = trainer.lightning_module
        if trainer.state.fn == "fit":
            assert self.mechanism is not None
            if self.is_private:
                check_module(module)
            self.mechanism.check(module)
        if self.world_size == 1 and trainer.state.fn != "fit":
            # DDPStrategy would synchronise module states through a process group that a
            # single process never creates.
            assert self.accelerator is not None and self.model is not None  # set by Lightning
            self.accelerator.setup(trainer)
            self.precision_plugin.convert_module(self.model)
            self.model_to_device()
            self.setup_precision_plugin()
            return
        super().setup(trainer)
        if trainer.state.fn == "fit" and self.world_size > 1:
            assert self.mechanism is not None
            self.mechanism.always_forward = True
            if hasattr(module, "gather_for_batch_terms"):
                # instance-level override of the model's hook (a method, not a tensor/submodule)
                module.gather_for_batch_terms = self._gather_with_local_grad  # type: ignore[assignment]

    def process_dataloader(self, dataloader: object) -> object:
        trainer = self.lightning_module.trainer if self.lightning_module else None
        if trainer is None or not trainer.training or dataloader is None:
            return dataloader
        if not is_poisson_loader(dataloader):
            if self.is_private:
                raise PrivacyConfigError(
                    "the train dataloader does not use Poisson sampling, which the accountant "
                    "assumes. Build it with lit_dpvae.privacy.poisson_dataloader (the lit_dpvae "
                    "data modules do) and pass Trainer(use_distributed_sampler=False)."
                )
            return dataloader
        sampler = dataloader.batch_sampler  # type: ignore[attr-defined]
        if (sampler.num_replicas, sampler.rank) != (self.world_size, self.global_rank):
            raise PrivacyConfigError(
                f"the Poisson sampler is set for rank {sampler.rank} of {sampler.num_replicas} "
                f"but this process is rank {self.global_rank} of {self.world_size}: build the "
                "loader after the trainer is attached (in train_dataloader())"
            )
        restored = self._restored or {}
        if self._sampler_seed is None:
            if self._restored is None:
                seed = sampler.seed
            elif self.exact_resume and restored.get("sampler_seed") is not None:
                seed = restored["sampler_seed"]
            else:  # a continuation samples with fresh secret randomness (docs/privacy.md §7)
                seed = secrets.randbits(62)
            self._sampler_seed = int(self.broadcast(seed) if self.world_size > 1 else seed)
        sampler.seed = self._sampler_seed
        # A resumed run continues with the batches of its epoch (not epoch 0's again) and, when
        # it stopped mid-epoch, with the step after the last completed one: Lightning counts the
        # epoch's batches from where it stopped but iterates a fresh loader.
        # A checkpoint written in on_train_batch_end has ``completed`` one behind; ``ready``
        # counts the batches whose step was taken, which is where Lightning's batch_idx resumes.
        done = int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)
        epoch = int(trainer.current_epoch)
        if done >= len(sampler):
            # The epoch's batches are all taken. After an end-of-epoch checkpoint Lightning still
            # reports that epoch as current (its processed counter is one ahead): the next batch
            # belongs to the next epoch, never to a replay of this one's Poisson draws.
            epoch = max(epoch, int(trainer.fit_loop.epoch_progress.current.processed))
        sampler.set_epoch(epoch)
        sampler.start_step = done if 0 < done < len(sampler) else 0
        warnings.filterwarnings(  # handled above: the Poisson sampler resumes mid-epoch exactly
            "ignore", message="You're resuming from a checkpoint that ended before the epoch")
        self._prepare_privacy(trainer, sampler)
        return dataloader

    def _prepare_privacy(self, trainer: pl.Trainer, sampler: Any) -> None:
        """Sampling parameters, σ (calibrated, restored or carried), noise generator,
        accountant. Called for every train loader (a second fit, reloaded loaders): the
        sampling is re-read each time and the stop rule re-planned (``_plan``)."""
        assert self.mechanism is not None
        self._sampler = sampler
        self.planned_steps = self._planned_steps(trainer, len(sampler))
        self._read_sampling(announce=self.noise_generator is not None)
        module = trainer.lightning_module
        if self.noise_generator is not None:
            # A second fit: the weights may have trained elsewhere since (another strategy).
            self._carry_warm_start(module)
            self._mark_weights(module)
            return  # already prepared (a second fit call keeps its state; the plan is redone)
        restored = self._restored
        if restored is None:
            self._carry_warm_start(module)
        if self.is_private:
            if restored is not None:
                sigma = self._restored_sigma(restored)
            elif self.requested_noise_multiplier is not None:
                sigma = float(self.requested_noise_multiplier)
            else:
                assert self.target_epsilon is not None and self.sample_rate is not None
                assert self.planned_steps is not None
                sigma = self.accountant.calibrate(self.target_epsilon, self.target_delta,
                                                  self.sample_rate, self.planned_steps)
            self.mechanism.noise_multiplier = sigma
        exact = restored is not None and self.exact_resume
        if restored is None and self.noise_seed is not None:
            seed = self.noise_seed
        elif exact:
            seed = 0  # replaced by the checkpoint's generator state below
        else:  # a fresh run without a seed, or any resume: fresh secret noise entropy
            seed = secrets.randbits(62)
        if self.world_size > 1:
            seed = self.broadcast(seed)
        self.noise_generator = torch.Generator(device=self.root_device).manual_seed(int(seed))
        if restored is not None:
            self.accountant.load_state_dict(restored["accountant"])
            history = self.accountant.history
            if history and self.is_private and not math.isclose(history[-1][1],
                                                                 self.sample_rate or 0.0):
                rank_zero_warn(
                    f"the sample rate changed from q={history[-1][1]:.4g} (checkpoint) to "
                    f"q={self.sample_rate:.4g} at resume (N={self.num_records}); σ stays "
                    f"{self.mechanism.noise_multiplier:.4g} and the stop rule is re-planned "
                    f"for the new q: training stops before a step would exceed "
                    f"target_epsilon={self.target_epsilon}.")
            if exact and restored.get("noise_generator") is not None:
                self.noise_generator.set_state(restored["noise_generator"].cpu())
            self._restore_rng = restored.get("rng")
        self._plan = None
        self._mark_weights(module)
        left = self._steps_left_in_budget()
        if left == 0 and self.accountant.steps == 0:
            raise PrivacyConfigError(
                f"noise_multiplier={self.mechanism.noise_multiplier:.4g} is too small for "
                f"target_epsilon={self.target_epsilon}: a single step already exceeds it. Raise "
                "noise_multiplier, or leave it unset to calibrate it from the budget."
            )
        if left == 0:
            raise PrivacyConfigError(
                f"the privacy budget ε={self.target_epsilon} is already spent "
                f"(ε={self.epsilon():.4g} after {self.accountant.steps} steps): this run would "
                "take no private step. Raise target_epsilon only if that is a new, justified "
                "budget (allow_budget_increase=True at resume); the spent privacy cannot be "
                "reset."
            )
        self._warn_if_unbalanced()
        rank_zero_info(
            f"TermwiseDPStrategy: {self.mechanism!r}, q={self.sample_rate:.4g}, "
            f"N={self.num_records}, planned steps={self.planned_steps}, "
            f"sensitivity={self.mechanism.sensitivity}"
        )

    def _read_sampling(self, announce: bool) -> None:
        """Read q, N and B from the current Poisson sampler. When they differ from what the
        run used so far, check the budget again and re-plan the stop rule; ``announce``: say
        so (a resumed or continued run whose sampling changed)."""
        sampler = self._sampler
        if sampler is None:
            return
        q, n = float(sampler.sample_rate), int(sampler.num_samples)
        if (q, n) == (self.sample_rate, self.num_records):
            return
        if self.is_private:
            check_budget(self.target_epsilon or 1.0, self.target_delta, n)
        old_q = self.sample_rate
        self.sample_rate, self.num_records = q, n
        self.expected_batch_size = float(sampler.expected_batch_size)
        if isinstance(self.mechanism, NaiveDPSGD):
            self.mechanism.expected_batch_size = self.expected_batch_size
            if self.max_batch_size is None:
                self.mechanism.max_batch_size = max(1, math.ceil(2 * self.expected_batch_size))
        self._plan = None
        if announce and old_q is not None and self.is_private:
            left = self._steps_left_in_budget()
            rank_zero_warn(
                f"the sample rate changed from q={old_q:.4g} to q={q:.4g} (N={n}, expected "
                f"batch {self.expected_batch_size:.4g}); σ stays "
                f"{self.mechanism.noise_multiplier if self.mechanism else 0:.4g}, so the "
                f"budget ε={self.target_epsilon} now allows "
                f"{'no limit' if left is None else left} more steps (planned: "
                f"{self.planned_steps}). Training stops before a step would exceed it."
            )

    def _restored_sigma(self, restored: dict[str, Any]) -> float:
        """σ of the checkpoint; refuse a raised budget unless ``allow_budget_increase``."""
        sigma = float(restored["noise_multiplier"])
        old = restored.get("target_epsilon", "unknown")
        new = self.target_epsilon
        raised = (new is None and old is not None) or (
            new is not None and isinstance(old, (int, float)) and new > old * (1 + 1e-9))
        old_delta = float(restored.get("target_delta", self.target_delta))
        raised = raised or self.target_delta > old_delta * (1 + 1e-9)
        if raised or old == "unknown":
            message = (
                f"resuming with target_epsilon={new}, target_delta={self.target_delta} from a "
                f"checkpoint trained with target_epsilon={old}, target_delta={old_delta} "
                f"(ε={self._restored_epsilon(restored):.4g} spent so far)")
            if not self.allow_budget_increase:
                why = ("the checkpoint does not record its target, so the budget of the whole "
                       "run cannot be checked" if old == "unknown" and not raised else
                       "that raises (or drops) the budget of the whole run")
                raise PrivacyConfigError(
                    f"{message}: {why}. Resume with the checkpoint's target_epsilon and "
                    "target_delta, or, if the larger budget is a new, justified decision, pass "
                    "allow_budget_increase=True.")
            rank_zero_warn(message + f": the budget of the whole run is now {new} "
                           "(allow_budget_increase=True); σ stays the checkpoint's "
                           f"{sigma:.4g} and the stop rule uses the new target.")
        if (self.requested_noise_multiplier is not None
                and not math.isclose(self.requested_noise_multiplier, sigma)):
            rank_zero_warn(
                f"noise_multiplier={self.requested_noise_multiplier} is ignored at resume: the "
                f"run continues with the checkpoint's σ_eff={sigma:.4g}.")
        return sigma

    def _restored_epsilon(self, restored: dict[str, Any]) -> float:
        trial = PrivacyAccountant(self.accountant.name)
        trial.load_state_dict(restored["accountant"])
        return trial.get_epsilon(self.target_delta)

    def _mark_weights(self, module: Any) -> None:
        """The weights now carry this run's spend: a later fit on them (another strategy,
        ``load_from_checkpoint``) continues this accountant (``warm_start``)."""
        if module is not None and self._start_fingerprints is None:
            self._start_fingerprints = (fingerprint(module),
                                        set(tensor_fingerprints(module, trainable_only=False)))
        if module is not None:
            module._lit_dpvae_provenance = {  # type: ignore[union-attr]
                "mechanism": self.mechanism_name, "accountant": self.accountant}

    def _register_weights(self) -> None:
        """Remember the privacy these weights spent, by fingerprint (copies of them, e.g. by
        ``load_state_dict``, are recognised by a later fit in this process)."""
        module = self.lightning_module
        if module is None or self.noise_generator is None or not self.accountant.steps:
            return
        record = {"mechanism": self.mechanism_name, "accountant": self.accountant.state_dict()}
        # only weights this run changed carry its spend (frozen mid-run ones included)
        register_spent(module, record, skip=self._start_fingerprints)

    def _weights_provenance(self, module: Any) -> tuple[str, PrivacyAccountant] | None:
        provenance = getattr(module, "_lit_dpvae_provenance", None)
        if provenance and provenance.get("accountant") is not None:
            return provenance.get("mechanism"), provenance["accountant"]
        if module is None or not registry.SPENT_WEIGHTS:
            return None
        known = registry.SPENT_WEIGHTS.get(fingerprint(module))
        if known is None:  # a partial copy: any parameter equal to a DP-trained one
            spent = registry.SPENT_WEIGHTS
            matches = [spent[k] for k in ("tensor:" + f for f in
                       tensor_fingerprints(module, trainable_only=False)) if k in spent]
            if not matches:
                return None
            unique = list({id(r): r for r in matches}.values())
            history: list = []
            for r in unique:  # parameters from several runs: every run's spend counts
                history = merge_histories(history, r["accountant"]["history"])
            state = dict(unique[0]["accountant"], history=history, non_private_steps=max(
                int(r["accountant"].get("non_private_steps", 0)) for r in unique))
            names = {r["mechanism"] for r in unique}
            known = {"mechanism": "nonprivate" if "nonprivate" in names else unique[0][
                "mechanism"], "accountant": state}
        accountant = PrivacyAccountant(known["accountant"]["accountant"])
        accountant.load_state_dict(known["accountant"])
        return known["mechanism"], accountant

    def _carry_warm_start(self, module: Any) -> None:
        """Weights that already carry a privacy spend continue it in this run's accountant
        (``warm_start="carry"``) or are declared public (``"public"``). The spend is known from
        the module (trained by this library, or loaded from a checkpoint) or from the weights'
        fingerprint (a copy of weights this process trained or loaded). Multi-process runs take
        rank 0's answer."""
        found = self._weights_provenance(module)
        if self.world_size > 1 and dist.is_initialized():
            # One decision for all ranks: rank 0's (their in-process registries may differ).
            payload = None if found is None else (found[0], found[1].state_dict(),
                                                  found[1] is self.accountant)
            payload = self.broadcast(payload)
            if payload is None or payload[2]:
                return
            found = (payload[0], PrivacyAccountant(payload[1]["accountant"]))
            found[1].load_state_dict(payload[1])
        if found is None:
            return
        mechanism, spent = found
        if spent is self.accountant:
            return
        if self.warm_start == "public":
            rank_zero_warn(
                f"the model's weights carry {spent.steps} earlier training steps "
                f"(mechanism={mechanism!r}); warm_start='public' ignores them: the reported ε "
                "covers this run only, which is right only if those steps used public data (or "
                "are accounted elsewhere).")
            return
        if not self.is_private:
            return
        if spent.non_private_steps or mechanism == "nonprivate":
            raise PrivacyConfigError(
                f"the model's weights were trained without privacy ({spent.steps} steps, "
                "mechanism='nonprivate'): no ε holds for a model fine-tuned from them. Start "
                "from fresh weights, or pass warm_start='public' if that earlier training used "
                "public data only.")
        if spent.name != self.accountant.name:
            raise PrivacyConfigError(
                f"the model's weights carry a privacy spend accounted with {spent.name!r}; this "
                f"run uses {self.accountant.name!r}: use accountant={spent.name!r} so ε "
                "continues.")
        merged = merge_histories(self.accountant.history, spent.history)
        if merged == self.accountant.history:
            return
        state = self.accountant.state_dict()
        state["history"] = merged
        self.accountant.load_state_dict(state)
        self._plan = None
        rank_zero_warn(
            f"warm start: the model's weights already spent ε={self.epsilon():.4g} "
            f"(δ={self.target_delta}) over {self.accountant.steps} steps; this run continues "
            "that accountant (warm_start='carry'), so σ is calibrated for what is left of "
            f"target_epsilon={self.target_epsilon}.")

    def _warn_if_unbalanced(self) -> None:
        """Warn when the batch part's noise swamps the update (σ_b·2C_b ≫ σ_s·C/B)."""
        if not isinstance(self.mechanism, TermwiseDPSGD) or "batch" not in self.mechanism.parts:
            return
        std = self.mechanism.noise_std()
        assert self.expected_batch_size is not None
        sample_std = std["sample"] / self.expected_batch_size
        if std["batch"] > 10 * sample_std:
            rank_zero_warn(
                f"the batch-wise part's noise (std {std['batch']:.3g} per coordinate) is "
                f"{std['batch'] / sample_std:.0f}x the sample-wise part's ({sample_std:.3g}): the "
                "divergence gradient is released at the scale of one clipped vector, not divided "
                "by B. Lower batch_max_grad_norm (C_b) or raise sample_share (γ) unless the "
                "divergence needs that weight."
            )

    @staticmethod
    def _planned_steps(trainer: pl.Trainer, steps_per_epoch: int) -> int:
        if trainer.max_steps and trainer.max_steps > 0:
            return int(trainer.max_steps)
        if trainer.max_epochs is None or trainer.max_epochs < 0:
            raise PrivacyConfigError(
                "cannot plan the privacy budget of an unbounded run: set max_steps or max_epochs"
            )
        limit = trainer.limit_train_batches
        if isinstance(limit, int):
            steps_per_epoch = min(steps_per_epoch, limit)
        elif limit is not None and limit < 1.0:
            steps_per_epoch = max(1, int(steps_per_epoch * limit))
        return int(trainer.max_epochs) * steps_per_epoch

    # ---------------------------------------------------------------------------------------
    # The private step
    def epsilon(self) -> float:
        return self.accountant.get_epsilon(self.target_delta)

    def _steps_left_in_budget(self) -> int | None:
        """How many more steps at the current (σ, q) fit in ``target_epsilon`` (None: no
        budget to enforce)."""
        if self.target_epsilon is None or not self.is_private:
            return None
        assert self.mechanism is not None and self.sample_rate is not None
        return self.accountant.steps_within(
            self.target_epsilon, self.target_delta, self.mechanism.noise_multiplier,
            self.sample_rate, hint=max(1, self.planned_steps or 1))

    def _next_step_exceeds_budget(self) -> bool:
        """The stop rule, asked before every step: would *this* step, at the current σ and
        q, take ε past ``target_epsilon``? The answer is a step count computed from the
        accountant's history, redone whenever σ, q or the target change."""
        if self.target_epsilon is None or not self.is_private:
            return False
        assert self.mechanism is not None and self.sample_rate is not None
        key = (self.mechanism.noise_multiplier, self.sample_rate, self.target_epsilon)
        steps = self.accountant.steps
        if self._plan is None or self._plan[0] != key or steps < self._plan[1]:
            left = self._steps_left_in_budget()
            self._plan = (key, steps, None if left is None else steps + left)
        stop = self._plan[2]
        return stop is not None and steps >= stop

    def training_step(self, *args: Any, **kwargs: Any) -> Tensor | None:
        batch = args[0] if args else kwargs["batch"]
        module = self.lightning_module
        mechanism = self.mechanism
        assert module is not None and mechanism is not None
        if self.noise_generator is None:
            raise PrivacyConfigError(
                "the train dataloader was never seen by the strategy: train with a Poisson "
                "loader (lit_dpvae data modules) through Trainer.fit"
            )
        if self._restore_rng is not None:
            # The model's own randomness (reparameterisation, prior samples) continues exactly
            # where the checkpoint left it.
            rng, self._restore_rng = self._restore_rng, None
            _set_rng_state(rng)
        self._read_sampling(announce=True)  # the loader's sampler may have changed in place
        if self._next_step_exceeds_budget():
            self.budget_exhausted = True
            module.trainer.should_stop = True
            rank_zero_info(
                f"Privacy budget ε={self.target_epsilon} reached after {self.accountant.steps} "
                "steps: stopping before the next step would exceed it."
            )
            return None
        with self.precision_plugin.train_step_context():
            if isinstance(mechanism, NaiveDPSGD) and self.world_size > 1:
                stats = mechanism.aggregate(module, batch, reduce=self._all_reduce,
                                            keep=self._naive_local_keep(mechanism.max_batch_size))
            elif isinstance(mechanism, PairwiseDPSGD) and self.world_size > 1:
                stats = mechanism.aggregate(module, batch, reduce=self._all_reduce,
                                            gather=self._gather_codes,
                                            broadcast=self._broadcast_tensor)
            else:
                stats = mechanism.aggregate(module, batch, reduce=self._all_reduce)
            assert self.expected_batch_size is not None and self.sample_rate is not None
            update = mechanism.privatize(stats, self.expected_batch_size, self.noise_generator)
        # Lightning's closure zeroes gradients *after* training_step and before backward, so
        # the update is written into p.grad in backward().
        self._pending_update = update
        self.accountant.step(mechanism.noise_multiplier, self.sample_rate)
        terms = mechanism.last_terms
        n = batch_size_of(batch)
        if self.log_train_terms and terms is not None and n > 0:
            values = terms.detached()
            values["loss"] = float(terms.mean_loss(self.expected_batch_size).detach())
            for key, value in values.items():
                module.log(f"train/{key}", value, batch_size=n, prog_bar=key == "loss")
        if terms is None or n == 0:
            return torch.zeros((), device=self.root_device)
        return terms.mean_loss(self.expected_batch_size).detach()

    def backward(self, closure_loss: Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> Tensor:
        """Never backpropagate the loss: write the private update into ``p.grad`` instead."""
        update, self._pending_update = self._pending_update, None
        if update is None:
            raise RuntimeError(
                "TermwiseDPStrategy.backward without a private update: the model's training step "
                "must not call backward itself (manual optimization is not supported)"
            )
        module = self.lightning_module
        assert module is not None
        for name, p in module.named_parameters():
            if name in update:
                p.grad = update[name].to(p.dtype)
        torch_optimizer = getattr(optimizer, "optimizer", optimizer)  # LightningOptimizer
        if isinstance(torch_optimizer, DPAdamBC):
            torch_optimizer.noise_std = self.update_noise_std
        return closure_loss

    @property
    def update_noise_std(self) -> float:
        """φ: std of the Gaussian noise in each coordinate of the update written into ``p.grad``
        (``σC/B`` for one part; public). 0 when not private."""
        if self.mechanism is None or self.expected_batch_size is None:
            raise RuntimeError("update_noise_std is known once Trainer.fit has set up the "
                               "strategy (mechanism and expected batch size)")
        return self.mechanism.update_noise_std(self.expected_batch_size)

    def _naive_local_keep(self, n_max: int) -> int:
        # Local record j of rank r is record j·W + r of the global batch; keep those < n_max.
        return max(0, math.ceil((n_max - self.global_rank) / self.world_size))

    def _all_reduce(self, stats: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.world_size == 1 or not dist.is_initialized():
            return stats
        names = list(stats)
        flat = torch.cat([stats[n].reshape(-1) for n in names])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        out, offset = {}, 0
        for n in names:
            size = stats[n].numel()
            out[n] = flat[offset : offset + size].view_as(stats[n])
            offset += size
        return out

    def _gather_codes(self, t: Tensor) -> tuple[Tensor, int]:
        """All ranks' rows of ``t`` without gradient (rank order) and this rank's offset."""
        sizes = self._all_sizes(t)
        parts = self._all_gather_rows(t.detach(), sizes)
        return torch.cat(parts), sum(sizes[: self.global_rank])

    def _broadcast_tensor(self, t: Tensor) -> Tensor:
        t = t.contiguous().clone()
        dist.broadcast(t, src=0)
        return t

    def _all_sizes(self, t: Tensor) -> list[int]:
        size = torch.tensor([t.shape[0]], device=t.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size)
        return [int(s) for s in sizes]

    def _all_gather_rows(self, t: Tensor, sizes: list[int]) -> list[Tensor]:
        longest = max(sizes)
        padded = torch.zeros(longest, *t.shape[1:], dtype=t.dtype, device=t.device)
        padded[: t.shape[0]] = t
        chunks = [torch.zeros_like(padded) for _ in range(self.world_size)]
        dist.all_gather(chunks, padded)
        return [c[:s] for c, s in zip(chunks, sizes)]

    def _gather_with_local_grad(self, t: Tensor) -> Tensor:
        """All ranks' rows of ``t`` (rank order); only the local rows carry gradient. Only in
        training steps: validation and test run the whole split on every rank (eval mode)."""
        module = self.lightning_module
        if self.world_size == 1 or not dist.is_initialized() or not (module and module.training):
            return t
        parts = self._all_gather_rows(t.detach(), self._all_sizes(t))
        parts[self.global_rank] = t
        return torch.cat(parts)

    # ---------------------------------------------------------------------------------------
    # Checkpoints: the privacy state travels with every checkpoint
    def privacy_state_dict(self) -> dict[str, Any]:
        if self.noise_generator is None:
            # Never trained (e.g. validate/test, then save_checkpoint): keep the spend these
            # weights carry instead of writing an empty accountant over it.
            if self._restored is not None:
                return dict(self._restored)
            found = self._weights_provenance(self.lightning_module)
            if found is not None and found[1].steps:
                history = found[1].history  # σ of the last private step, for a resume
                sigma = float(history[-1][0]) if history else 0.0
                return {"rng": _rng_state(), "mechanism": found[0], "noise_multiplier": sigma,
                        "accountant": found[1].state_dict(), "noise_generator": None,
                        "sampler_seed": None, "target_delta": self.target_delta,
                        "target_epsilon": self.target_epsilon,
                        "epsilon": found[1].get_epsilon(self.target_delta)}
        rng = _rng_state()
        return {
            "rng": rng,
            "mechanism": self.mechanism_name,
            "noise_multiplier": self.mechanism.noise_multiplier if self.mechanism else 0.0,
            "accountant": self.accountant.state_dict(),
            "noise_generator": None if self.noise_generator is None
            else self.noise_generator.get_state(),
            "sampler_seed": self._sampler_seed,
            "target_delta": self.target_delta,
            "target_epsilon": self.target_epsilon,
            "epsilon": self.epsilon(),
        }

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any,
                        storage_options: Any = None) -> None:
        checkpoint[CHECKPOINT_KEY] = self.privacy_state_dict()
        self._register_weights()
        for key in ("hyper_parameters", "datamodule_hyper_parameters"):
            if isinstance(checkpoint.get(key), dict):  # set after setup, e.g. in on_fit_start
                scrub_mapping(checkpoint[key], owner=key)
        module = self.lightning_module
        if module is not None:
            checkpoint[MODEL_CLASS_KEY] = f"{type(module).__module__}.{type(module).__qualname__}"
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        """Weights restored by the Trainer (``validate/test(ckpt_path=...)``, a resume) from a
        checkpoint with a privacy state carry its spend into any later fit of the module."""
        super().load_model_state_dict(checkpoint, strict=strict)
        if isinstance(checkpoint, dict):
            mark_loaded(self.lightning_module, provenance_from_checkpoint(checkpoint))

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=False)
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            if self.is_private and checkpoint.get("global_step", 0) > 0:
                raise PrivacyConfigError(
                    f"{checkpoint_path} has no privacy state: it was not written by "
                    "TermwiseDPStrategy, so the privacy already spent on it is unknown. Start "
                    "from scratch, or from a checkpoint written by this strategy."
                )
            return checkpoint
        if state["mechanism"] != self.mechanism_name:
            raise PrivacyConfigError(
                f"checkpoint was trained with mechanism={state['mechanism']!r}, this run uses "
                f"{self.mechanism_name!r}: resume with the same mechanism"
            )
        if state["noise_generator"] is None and not state["accountant"].get("history") \
                and not state["accountant"].get("non_private_steps"):
            return checkpoint  # nothing was spent: a fresh run
        self._restored = state
        return checkpoint

    def teardown(self) -> None:
        self._register_weights()
        super().teardown()

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            cls.strategy_name, cls, description="Term-wise DP-SGD (lit_dpvae)", override=True
        )


TermwiseDPStrategy.register_strategies(StrategyRegistry)


def _carry_spend_through_load_from_checkpoint() -> None:
    """Any LightningModule loaded with ``load_from_checkpoint`` from a checkpoint with a privacy
    state remembers the spend (as ``BaseVAE.on_load_checkpoint`` does for our models), so a later
    fit continues it (``warm_start``), in this process or another. Lightning has no public hook
    for every module class, so its loader is wrapped; if its internals move, BaseVAE's hook and
    the in-process fingerprints remain (docs/privacy.md §4)."""
    from lightning.pytorch.core import saving

    original = getattr(saving, "_load_state", None)
    if original is None or getattr(original, "_lit_dpvae", False):
        return

    def load_state(cls: Any, checkpoint: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        obj = original(cls, checkpoint, *args, **kwargs)
        if isinstance(checkpoint, dict) and isinstance(obj, pl.LightningModule):
            mark_loaded(obj, provenance_from_checkpoint(checkpoint))
        return obj

    load_state._lit_dpvae = True  # type: ignore[attr-defined]
    saving._load_state = load_state  # type: ignore[assignment]


_carry_spend_through_load_from_checkpoint()

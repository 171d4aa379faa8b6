"""Gradient mechanisms: non-private, naive DP-SGD, term-wise DP-SGD (arXiv 2006.11204) and
term-wise DP-SGD with pairwise-decomposed kernel divergences (``PairwiseDPSGD``).

Each mechanism splits a step into *parts*, one per randomised gradient, and exposes

- ``aggregate(module, batch)`` -> ``{part: {param name: tensor}}``: the pre-noise statistics;
- ``sensitivity`` -> ``{part: Δ_k}``: an add/remove L2 bound on how far one record moves part k;
- ``noise_multipliers`` -> ``{part: σ_k}``: part k gets Gaussian noise of std ``σ_k·Δ_k``;
- ``privatize(stats, expected_batch_size, generator)`` -> the update direction at mean scale.

The accountant sees one subsampled Gaussian mechanism per step with
``σ_eff = (Σ_k σ_k⁻²)^(-1/2)`` (``noise_multiplier``). Proofs: ``docs/privacy.md``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import warnings
from collections.abc import Callable, Iterator
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from lit_dpvae.privacy.accounting import joint_noise_multiplier, split_noise_multiplier
from lit_dpvae.privacy.grad_sample import (
    AttributionError,
    _check_finite,
    capture_layers,
    check_module,
    clip_factors,
    make_clipper,
    named_trainable,
    refuse_parameter_hooks,
    weighted_sum,
)
from lit_dpvae.privacy.pairwise import clipped_owner_sum, latent_jacobian, owner_vectors
from lit_dpvae.privacy.precision import ieee_fp32
from lit_dpvae.privacy.terms import LossTerms, LossTermsError, batch_size_of, loss_terms_of

Stats = dict[str, dict[str, Tensor]]
#: Applied to each raw statistic before any clipping of a whole part (a multi-process strategy
#: passes an all-reduce-sum, so the batch part is clipped once, on the global gradient).
Reduce = Callable[[dict[str, Tensor]], dict[str, Tensor]]


def _identity(stats: dict[str, Tensor]) -> dict[str, Tensor]:
    return stats


def _under_ieee_fp32(aggregate: Callable[..., Stats]) -> Callable[..., Stats]:
    """Form a mechanism's statistics under IEEE float32 kernels (no TF32/bf16 input rounding,
    which would let a clipped contribution exceed its bound; precision.py)."""

    @functools.wraps(aggregate)
    def wrapped(self: Mechanism, *args: Any, **kwargs: Any) -> Stats:
        with ieee_fp32():
            return aggregate(self, *args, **kwargs)

    return wrapped


def _check_positive(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return value


def _grads(loss: Tensor | None, params: dict[str, nn.Parameter], retain: bool) -> dict:
    if loss is None or not loss.requires_grad:
        return {name: torch.zeros_like(p) for name, p in params.items()}
    grads = torch.autograd.grad(
        loss, list(params.values()), retain_graph=retain, allow_unused=True
    )
    return {
        name: torch.zeros_like(p) if g is None else g.detach()
        for (name, p), g in zip(params.items(), grads)
    }


def global_norm(tensors: dict[str, Tensor]) -> Tensor:
    """L2 norm of a dict of tensors viewed as one vector."""
    if not tensors:
        return torch.zeros(())
    return torch.sqrt(cast(Tensor, sum(t.float().pow(2).sum() for t in tensors.values())))


def clip_vector(tensors: dict[str, Tensor], max_norm: float) -> dict[str, Tensor]:
    """``v · min(1, C / (‖v‖ + 1e-6))`` over the whole dict; a non-finite ``v`` clips to 0."""
    factor = clip_factors(global_norm(tensors).reshape(1), max_norm)
    return {name: weighted_sum(factor, t[None]) for name, t in tensors.items()}


class Mechanism:
    """Base class: noise calibration and the update direction; subclasses define the parts."""

    parts: tuple[str, ...] = ()
    #: part -> True if the part is a sum over records (divided by B in the update).
    summed_over_records: dict[str, bool] = {}

    #: form the statistics under IEEE float32 kernels (False only where nothing is private)
    ieee_statistics = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every private mechanism's ``aggregate`` — the shipped ones and any user subclass —
        forms its statistics under IEEE float32 kernels (precision.py, docs/privacy.md §7)."""
        super().__init_subclass__(**kwargs)
        if "aggregate" in cls.__dict__ and cls.__dict__.get("ieee_statistics", True):
            cls.aggregate = _under_ieee_fp32(cls.__dict__["aggregate"])  # type: ignore[method-assign]

    def __init__(self, *, noise_multiplier: float = 0.0, backend: str = "ghost") -> None:
        self.clipper = make_clipper(backend)
        self.backend = backend
        self._checked: nn.Module | None = None
        self._probed: nn.Module | None = None
        #: Always run the forward pass, even on an empty local batch (set by multi-process
        #: strategies: a batch-wise term all-gathers codes, so every rank must take part).
        self.always_forward = False
        #: The loss terms of the last batch (for logging by the caller).
        self.last_terms: LossTerms | None = None
        self._noise_multiplier = 0.0
        self.noise_multiplier = noise_multiplier

    # -- noise calibration ----------------------------------------------------------------
    @property
    def noise_multiplier(self) -> float:
        """σ_eff: the accountant's noise multiplier for one step of this mechanism."""
        return self._noise_multiplier

    @noise_multiplier.setter
    def noise_multiplier(self, value: float) -> None:
        value = float(value)
        if not value >= 0 or math.isnan(value):
            raise ValueError(f"noise_multiplier must be >= 0, got {value}")
        self._noise_multiplier = value

    @property
    def is_private(self) -> bool:
        return self.noise_multiplier > 0

    @property
    def sensitivity(self) -> dict[str, float]:
        raise NotImplementedError  # pragma: no cover - abstract

    @property
    def noise_multipliers(self) -> dict[str, float]:
        """σ_k per part (noise std of part k is ``σ_k · sensitivity[k]``)."""
        return {part: self.noise_multiplier for part in self.parts}

    def noise_std(self) -> dict[str, float]:
        sens = self.sensitivity
        return {
            part: 0.0 if sigma == 0 else sigma * sens[part]
            for part, sigma in self.noise_multipliers.items()
        }

    # -- statistics -----------------------------------------------------------------------
    def aggregate(self, module: nn.Module, batch: Any, reduce: Reduce = _identity) -> Stats:
        """Pre-noise statistics ``{part: {param name: tensor}}`` of ``batch``; ``reduce`` is
        applied to each raw sum before a part is clipped as a whole."""
        raise NotImplementedError  # pragma: no cover - abstract

    def zeros(self, module: nn.Module) -> Stats:
        params = named_trainable(module)
        return {part: {n: torch.zeros_like(p) for n, p in params.items()} for part in self.parts}

    def check(self, module: nn.Module) -> None:
        """Refuse a module this mechanism cannot train (once per module; cheap afterwards)."""
        if self._checked is not module:
            if not callable(getattr(module, "loss_terms", None)):
                loss_terms_of(module, None)  # raises the contract error
            if self.is_private:
                check_module(module)
            self._checked = module

    def probe_sample_terms(self, module: nn.Module, batch: Any, n: int) -> None:
        """Once per module, on its first batch of ≥ 2 records, probe the record-wise contract
        that every per-record bound rests on (docs/privacy.md §1). For each probed record ``i``
        (all of them up to 16 records, else the first, the last and 14 others at random), each
        declared sample-wise term ``ℓ_i`` and each pairwise term's code ``z_i`` (a random
        combination of its coordinates) must have

        1. zero gradient with respect to every *other* record's rows of every floating-point
           tensor of the batch (a term or code that reads other records — a batch mean, codes
           centred on the batch — breaks Theorems 2 and 5);
        2. zero gradient with respect to every row of every trainable layer's output outside
           record ``i``'s rows (``i·K … i·K+K−1``). Rows that no record owns but every record
           reads — data-independent inputs through a trainable layer, e.g. VampPrior
           pseudo-inputs through the encoder — are attributed to records *by position*, so
           one record's gradient would be spread over others' clip budgets;
        3. the same value, bit for bit up to a relative 1e-5, when another record's data (every
           tensor of the batch: inputs, labels, extra columns) is replaced by a third record's,
           under the same random draws. This catches dependence that no gradient shows:
           through integer labels, detached batch statistics, comparisons;
        4. and ``loss_terms`` must not change any parameter or buffer in place (a running
           statistic of the data, ``Embedding(max_norm=...)``'s renormalisation): those would
           be released without noise.

        Any of these is refused (``LossTermsError`` / ``AttributionError``) before the first
        step. This is a probe, not a proof: it sees this batch only. Multi-process: every rank
        probes on its first call (the probe's forwards enter the ranks' collectives together);
        a rank whose first local batch has < 2 records runs the forwards only."""
        if self._probed is module or not self.is_private:
            return
        if n < 2 and not self.always_forward:
            return
        devices = [t.device for t in _tensors(batch) if t.device.type == "cuda"][:1]
        states = _module_state(module)
        # fork_rng: the probe must not shift the model's random stream (exact resume relies on it)
        py_rng, np_rng = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=devices), _restoring(py_rng, np_rng):
            rng = torch.get_rng_state()
            cuda_rng = torch.cuda.get_rng_state(devices[0]) if devices else None

            def same_draws() -> None:  # every forward starts from the same global RNG states
                torch.set_rng_state(rng)
                if cuda_rng is not None:
                    torch.cuda.set_rng_state(cuda_rng, devices[0])
                random.setstate(py_rng)
                np.random.set_state(np_rng)

            records = _probe_records(n) if n >= 2 else []
            # 1-2: gradients of each probed record's values (inputs made non-leaf clones, so a
            # model may still write them in place; a model that cannot run on inputs that
            # require grad, e.g. one calling .numpy(), gets the layer-row check only).
            for with_inputs in (True, False):
                probe_batch, inputs = _with_grad_inputs(batch, n) if with_inputs else (batch, [])
                same_draws()
                try:
                    self._gradient_probe(module, probe_batch, n, inputs, records)
                    break
                except RuntimeError as error:
                    if not with_inputs or isinstance(error, (LossTermsError, AttributionError)):
                        raise
            # 3: replacement probe. A control forward on the same batch first: where the model's
            # randomness is not reproduced by the global RNG (its own generator, Python's
            # random), records cannot be compared across forwards and the check is skipped.
            # Every rank runs the same forwards (collectives); compared where n ≥ 3.
            same_draws()
            reference = _record_signature(module, batch, n, records)
            same_draws()
            reproducible = _same_signature(reference, _record_signature(module, batch, n,
                                                                          records), None)
            if reproducible is not True and n >= 3:
                warnings.warn(
                    "lit_dpvae: loss_terms() is not reproducible under the same torch RNG state "
                    "(randomness from its own generator or from Python/NumPy), so the probe "
                    "could not check that records do not read each other through labels or "
                    "detached statistics; the gradient probe still ran.", stacklevel=3)
            for j, first in (((n // 2, False), (0, False), (n - 1, True))
                             if n >= 3 or self.always_forward else ()):
                changed = (_replace_record(batch, j, _donor(batch, j, n, first), n)
                           if n >= 3 else batch)
                same_draws()
                signature = _record_signature(module, changed, n, records)
                if n >= 3 and reproducible is True:
                    moved = _same_signature(reference, signature, j)
                    if moved is not True:
                        label, i = moved
                        raise LossTermsError(
                            f"{label} of record {i} changed when only record {j}'s data changed "
                            "(every tensor of the batch, labels included, under the same random "
                            "draws): it reads other records — through a label, a detached batch "
                            "statistic or a comparison — so per-record clipping does not bound "
                            "it. Declare it in LossTerms.batch (a batch-wise term) instead, or "
                            "make it read record i only. (Random numbers must be drawn in a "
                            "fixed shape per batch, not in a data-dependent count.)"
                        )
        _refuse_state_changes(module, states)
        self._probed = module

    def _gradient_probe(self, module: nn.Module, batch: Any, n: int, inputs: list[Tensor],
                        records: list[int]) -> None:
        """Checks 1-2 of ``probe_sample_terms`` (one forward)."""
        with torch.enable_grad(), capture_layers(module) as cap:
            terms = loss_terms_of(module, batch)
            if n < 2:
                return
            outputs = [c.output for c in cap.calls if c.output.requires_grad]
            for label, values in _probed_values(terms, n):
                if not values.requires_grad:
                    continue
                for i in records:
                    grads = torch.autograd.grad(values[i], [*inputs, *outputs],
                                                retain_graph=True, allow_unused=True)
                    _refuse_cross_record(label, i, n, grads[:len(inputs)], cap.calls,
                                         grads[len(inputs):])

    def _forward(self, module: nn.Module, batch: Any, n: int) -> LossTerms:
        terms = loss_terms_of(module, batch)
        terms.validate(n)
        self.last_terms = terms
        return terms

    def _start(self, module: nn.Module, batch: Any) -> int:
        """Checks every ``aggregate`` starts with; returns the number of records."""
        self.check(module)
        if self.is_private:
            refuse_parameter_hooks(module)
        n = batch_size_of(batch)
        self.probe_sample_terms(module, batch, n)
        return n

    def _skip(self, n: int) -> bool:
        return n == 0 and not self.always_forward

    # -- noise and update -----------------------------------------------------------------
    def add_noise(self, stats: Stats, generator: torch.Generator | None = None) -> Stats:
        """Add ``N(0, (σ_k Δ_k)² I)`` to every part, part by part, parameter by parameter.

        The draw order (parts in ``self.parts`` order, parameters in ``named_parameters``
        order, one ``torch.normal`` each) is the order Opacus' DPOptimizer uses, so with one
        part and the same generator the noise is identical to Opacus'.
        """
        std = self.noise_std()
        noisy: Stats = {}
        for part in self.parts:
            noisy[part] = {}
            for name, stat in stats[part].items():
                if std[part] > 0:
                    noise = torch.normal(
                        mean=0,
                        std=std[part],
                        size=stat.shape,
                        device=stat.device,
                        generator=generator,
                    )
                    noisy[part][name] = stat + noise
                else:
                    noisy[part][name] = stat
        return noisy

    def combine(self, stats: Stats, expected_batch_size: float) -> dict[str, Tensor]:
        """The update direction at mean scale: ``Σ_k (part_k / B if summed over records)``."""
        if not expected_batch_size > 0:
            raise ValueError(
                f"expected_batch_size must be > 0 (q·N, public), got {expected_batch_size}"
            )
        update: dict[str, Tensor] = {}
        for part in self.parts:
            for name, value in stats[part].items():
                if self.summed_over_records[part]:
                    value = value / expected_batch_size
                update[name] = value if name not in update else update[name] + value
        return update

    def update_noise_std(self, expected_batch_size: float) -> float:
        """Std of the Gaussian noise in each coordinate of the released update (``privatize``):
        ``sqrt(Σ_k (s_k σ_k Δ_k)²)``, ``s_k`` = 1/B for parts summed over records, else 1.

        Public (σ_k, Δ_k and B are public), so an optimizer may use it freely, e.g. to remove the
        noise's share from Adam's second moment (``lit_dpvae.optim.DPAdamBC``).
        """
        if not expected_batch_size > 0:
            raise ValueError(
                f"expected_batch_size must be > 0 (q·N, public), got {expected_batch_size}"
            )
        std = self.noise_std()
        return math.sqrt(sum(
            ((1.0 / expected_batch_size if self.summed_over_records[p] else 1.0) * std[p]) ** 2
            for p in self.parts))

    def privatize(
        self,
        stats: Stats,
        expected_batch_size: float,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Noise every part with its calibrated std and return the update direction.

        Only the combined update ``Σ_k s_k (f_k + N(0, (σ_k Δ_k)² I))`` (``s_k`` = 1/B or 1) is
        released, and a sum of independent Gaussians is one Gaussian, so one draw of std
        ``sqrt(Σ_k (s_k σ_k Δ_k)²)`` per parameter has exactly the same distribution as noising
        each part (``add_noise`` then ``combine``) at half the cost for two parts. With one part
        both paths draw identically (the Opacus-equivalence test relies on it).
        """
        if len(self.parts) == 1:
            return self.combine(self.add_noise(stats, generator), expected_batch_size)
        noiseless = self.combine(stats, expected_batch_size)
        total_std = self.update_noise_std(expected_batch_size)
        if total_std == 0:
            return noiseless
        return {
            name: value + torch.normal(mean=0, std=total_std, size=value.shape,
                                       device=value.device, generator=generator)
            for name, value in noiseless.items()
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(noise_multiplier={self.noise_multiplier:.4g}, "
            f"sensitivity={self.sensitivity}, backend={self.backend!r})"
        )


class NonPrivate(Mechanism):
    """Plain gradient, split the same way as term-wise (DESIGN §2.1). No clipping, no noise.

    Parts: ``sample`` = ``Σ_i ∇ℓ_i`` and ``batch`` = ``∇ Σ_k λ_k D_k``; update ``sample/B + batch``.
    Runs at the user's float32 precision (TF32 allowed): there is no bound to protect.
    """

    parts = ("sample", "batch")
    ieee_statistics = False
    summed_over_records = {"sample": True, "batch": False}

    def __init__(self, *, backend: str = "ghost") -> None:
        super().__init__(noise_multiplier=0.0, backend=backend)

    @Mechanism.noise_multiplier.setter  # type: ignore[attr-defined]
    def noise_multiplier(self, value: float) -> None:
        if float(value) != 0.0:
            raise ValueError("NonPrivate adds no noise; use TermwiseDPSGD for a private run")
        self._noise_multiplier = 0.0

    @property
    def sensitivity(self) -> dict[str, float]:
        return {"sample": math.inf, "batch": math.inf}

    def aggregate(self, module: nn.Module, batch: Any, reduce: Reduce = _identity) -> Stats:
        n = self._start(module, batch)
        if self._skip(n):
            return {part: reduce(v) for part, v in self.zeros(module).items()}
        params = named_trainable(module)
        terms = self._forward(module, batch, n)
        per_record = terms.per_record()
        sample_loss = per_record.sum() if per_record is not None else None
        return {
            "sample": reduce(_grads(sample_loss, params, retain=True)),
            "batch": reduce(_grads(terms.batch_total(), params, retain=False)),
        }


class NaiveDPSGD(Mechanism):
    """DP-SGD with the whole loss attributed per record by layer hooks (DESIGN §2.2).

    What Opacus does when a batch-wise divergence is simply added to the loss, made honest:

    1. truncate the batch to its first ``n_max`` records (``max_batch_size``);
    2. attribute ``Σ_i ℓ_i + B·Σ_k λ_k D_k`` to records through each layer's rows
       (``B`` = ``expected_batch_size`` when set, else the batch size), clip each to ``C``, sum;
    3. one record moves every attributed gradient of a batch it joins, so the add/remove
       sensitivity of the clipped sum is ``2·n_max·C`` (proof in docs/privacy.md), not ``C``.

    Noise std ``σ·2·n_max·C``; update ``(sum + noise)/B``. This baseline shows the O(B) blow-up.
    """

    parts = ("total",)
    summed_over_records = {"total": True}

    def __init__(
        self,
        *,
        max_grad_norm: float,
        max_batch_size: int,
        noise_multiplier: float = 0.0,
        expected_batch_size: float | None = None,
        backend: str = "ghost",
    ) -> None:
        self.max_grad_norm = _check_positive("max_grad_norm (C)", max_grad_norm)
        if int(max_batch_size) != max_batch_size or max_batch_size < 1:
            raise ValueError(
                f"max_batch_size (n_max) must be a positive integer, got {max_batch_size}"
            )
        self.max_batch_size = int(max_batch_size)
        self.expected_batch_size = expected_batch_size
        super().__init__(noise_multiplier=noise_multiplier, backend=backend)

    @property
    def sensitivity(self) -> dict[str, float]:
        return {"total": 2.0 * self.max_batch_size * self.max_grad_norm}

    def aggregate(
        self, module: nn.Module, batch: Any, reduce: Reduce = _identity, keep: int | None = None
    ) -> Stats:
        """``keep``: how many local records survive the *global* truncation to ``n_max`` (a
        multi-process strategy computes it from the rank's positions in the global batch)."""
        batch = truncate_batch(batch, self.max_batch_size if keep is None else keep)
        n = self._start(module, batch)
        if self._skip(n):
            return {"total": reduce(self.zeros(module)["total"])}
        scale = float(self.expected_batch_size) if self.expected_batch_size else float(n)

        def run() -> tuple[Tensor, LossTerms]:
            terms = self._forward(module, batch, n)
            per_record = terms.per_record()
            batch_loss = terms.batch_total()
            loss = per_record.sum() if per_record is not None else 0.0
            if batch_loss is not None:
                loss = loss + scale * batch_loss
            return cast(Tensor, loss), terms  # terms carry a per-record or a batch-wise part

        total, _, _ = self.clipper.clipped_sum(module, run, self.max_grad_norm, n)
        return {"total": reduce(total)}


class TermwiseDPSGD(Mechanism):
    """Term-wise DP-SGD (Takahashi et al., arXiv 2006.11204; DESIGN §2.3).

    Two randomised gradients on the same Poisson batch:

    1. sample part ``G_s = Σ_i clip_C(∇ℓ_i) + N(0, σ_s² C² I)``; sensitivity ``C``;
    2. batch part ``h = ∇ Σ_k λ_k D_k(S)`` as one ordinary gradient (no per-record attribution),
       ``G_b = clip_{C_b}(h) + N(0, σ_b² (2C_b)² I)``; both clipped vectors lie in the
       ``C_b``-ball, so the sensitivity is ``2C_b`` whatever the batch size;
    3. update ``G_s / B + G_b``.

    The pair is one Gaussian mechanism with ``σ_eff = (σ_s⁻² + σ_b⁻²)^(-1/2)``; the share ``γ``
    (``sample_share``) of the budget spent on the sample part sets ``σ_s = σ_eff/√γ`` and
    ``σ_b = σ_eff/√(1−γ)``. With ``γ = 1`` there is no batch part and this is exactly DP-SGD.
    """

    summed_over_records = {"sample": True, "batch": False}

    def __init__(
        self,
        *,
        max_grad_norm: float,
        batch_max_grad_norm: float = 1.0,
        noise_multiplier: float = 0.0,
        sample_share: float = 0.5,
        backend: str = "ghost",
    ) -> None:
        self.max_grad_norm = _check_positive("max_grad_norm (C)", max_grad_norm)
        self.batch_max_grad_norm = _check_positive("batch_max_grad_norm (C_b)", batch_max_grad_norm)
        share = float(sample_share)
        if not 0.0 < share <= 1.0:
            raise ValueError(
                f"sample_share γ must be in (0, 1], got {sample_share}: it is the share of the "
                "privacy budget spent on the sample-wise part (1 = no batch-wise terms)"
            )
        self.sample_share = share
        self.parts = ("sample",) if share == 1.0 else ("sample", "batch")
        super().__init__(noise_multiplier=noise_multiplier, backend=backend)

    @property
    def sensitivity(self) -> dict[str, float]:
        sens = {"sample": self.max_grad_norm, "batch": 2.0 * self.batch_max_grad_norm}
        return {part: sens[part] for part in self.parts}

    @property
    def noise_multipliers(self) -> dict[str, float]:
        sigma_s, sigma_b = split_noise_multiplier(self.noise_multiplier, self.sample_share)
        sigmas = {"sample": sigma_s, "batch": sigma_b}
        return {part: sigmas[part] for part in self.parts}

    def aggregate(self, module: nn.Module, batch: Any, reduce: Reduce = _identity) -> Stats:
        n = self._start(module, batch)
        if self._skip(n):
            return {part: reduce(v) for part, v in self.zeros(module).items()}
        params = named_trainable(module)

        def run() -> tuple[Tensor, LossTerms]:
            terms = self._forward(module, batch, n)
            if terms.batch and "batch" not in self.parts:
                raise ValueError(
                    f"the model has batch-wise terms {sorted(terms.batch)} but sample_share=1 "
                    "leaves no budget for them: set sample_share < 1 (e.g. 0.5)"
                )
            if not terms.batch and "batch" in self.parts:
                raise ValueError(
                    "the model has no batch-wise terms, so the batch part would only burn budget: "
                    "set sample_share=1 (term-wise DP-SGD is then exactly DP-SGD)"
                )
            per_record = terms.per_record()
            if per_record is None:
                raise ValueError("term-wise DP-SGD needs at least one sample-wise term")
            return per_record.sum(), terms

        sample, _, terms = self.clipper.clipped_sum(module, run, self.max_grad_norm, n)
        stats: Stats = {"sample": reduce(sample)}
        if "batch" in self.parts:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                h = _grads(terms.batch_total(), params, retain=False)
            stats["batch"] = clip_vector(reduce(h), self.batch_max_grad_norm)
        return stats


class PairwiseDPSGD(Mechanism):
    """Term-wise DP-SGD with kernel divergences privatised pair by pair (DESIGN §2.4).

    Parts, on the same Poisson batch S (n = |S|):

    1. ``sample``: ``Σ_i clip_C(∇ℓ_i)``, sensitivity ``C`` (as term-wise);
    2. ``pairwise``: for each divergence declared in ``LossTerms.pairwise`` (weight λ, kernel k,
       codes z_i, prior samples w_m), ``Σ_i J_iᵀ ū_i`` with
       ``ū_i = (2/(n−1)) Σ_{j≠i} clip(λ∇₁k(z_i,z_j)) − 2·clip(λ (1/M) Σ_m ∇₁k(z_i,w_m))``,
       each clip of the *parameter* vector ``J_iᵀu`` to ``C_p`` (``pair_max_grad_norm``); 0 for
       n < 2. Unclipped it is ``n·∇(λ MMD²)``. Sensitivity ``8·C_p`` per pairwise divergence,
       whatever n (docs/privacy.md §8); divided by ``B`` in the update like the sample part;
    3. ``batch``: the remaining (opaque) batch-wise terms, ``clip_{C_b}(∇ Σ D_k)``,
       sensitivity ``2C_b`` — only when ``sample_share + pairwise_share < 1``.

    ``σ_eff = (σ_s⁻² + σ_p⁻² + σ_b⁻²)^(-1/2)`` with ``σ_k = σ_eff/√γ_k``; ``pairwise_share``
    defaults to ``1 − sample_share`` (no opaque batch part). Multi-process: ``aggregate`` takes
    ``gather``/``broadcast`` (global partners without gradient, rank 0's prior samples), so the
    all-reduced statistic equals the single-process one of the global batch.
    """

    summed_over_records = {"sample": True, "pairwise": True, "batch": False}

    def __init__(
        self,
        *,
        max_grad_norm: float,
        pair_max_grad_norm: float = 1.0,
        batch_max_grad_norm: float = 1.0,
        noise_multiplier: float = 0.0,
        sample_share: float = 0.5,
        pairwise_share: float | None = None,
        backend: str = "ghost",
    ) -> None:
        self.max_grad_norm = _check_positive("max_grad_norm (C)", max_grad_norm)
        self.pair_max_grad_norm = _check_positive("pair_max_grad_norm (C_p)", pair_max_grad_norm)
        self.batch_max_grad_norm = _check_positive("batch_max_grad_norm (C_b)", batch_max_grad_norm)
        gs = float(sample_share)
        gp = 1.0 - gs if pairwise_share is None else float(pairwise_share)
        if not (0.0 < gs < 1.0 and 0.0 < gp < 1.0 and gs + gp <= 1.0 + 1e-12):
            raise ValueError(
                f"sample_share={sample_share} and pairwise_share={pairwise_share} must be in "
                "(0, 1) with sum <= 1 (the rest, if any, is the opaque batch-wise part's share)"
            )
        gb = max(0.0, 1.0 - gs - gp)
        if gb < 1e-9:
            gb = 0.0
        self.shares = {"sample": gs, "pairwise": gp, "batch": gb}
        self.parts = ("sample", "pairwise") + (("batch",) if gb > 0 else ())
        #: How many pairwise divergences the model declares (each adds 8·C_p); set on the first
        #: batch, and a model that changes it later is refused.
        self.num_pairwise_terms = 1
        #: Scratch memory the latent-Gram pass reuses from step to step (no state).
        self._workspace: dict = {}
        super().__init__(noise_multiplier=noise_multiplier, backend=backend)

    @property
    def sensitivity(self) -> dict[str, float]:
        sens = {
            "sample": self.max_grad_norm,
            "pairwise": 8.0 * self.pair_max_grad_norm * self.num_pairwise_terms,
            "batch": 2.0 * self.batch_max_grad_norm,
        }
        return {part: sens[part] for part in self.parts}

    @property
    def noise_multipliers(self) -> dict[str, float]:
        return {p: self.noise_multiplier / math.sqrt(self.shares[p]) for p in self.parts}

    def aggregate(
        self,
        module: nn.Module,
        batch: Any,
        reduce: Reduce = _identity,
        gather: Callable[[Tensor], tuple[Tensor, int]] | None = None,
        broadcast: Callable[[Tensor], Tensor] | None = None,
    ) -> Stats:
        """``gather``/``broadcast`` (multi-process): ``gather(codes)`` returns the global codes
        of all ranks (no gradient) and the offset of this rank's rows in them; ``broadcast``
        gives every rank rank 0's prior samples. Every rank calls both for every pairwise term,
        whatever its local batch size, so the collectives line up."""
        n = self._start(module, batch)
        if self._skip(n):
            return {part: reduce(v) for part, v in self.zeros(module).items()}
        params = named_trainable(module)

        def run() -> tuple[Tensor, LossTerms]:
            terms = self._forward(module, batch, n)
            if not terms.pairwise:
                raise ValueError(
                    "the model declares no pairwise-decomposable divergence "
                    "(LossTerms.pairwise is empty): use TermwiseDPSGD"
                )
            opaque = sorted(set(terms.batch) - set(terms.pairwise))
            if opaque and "batch" not in self.parts:
                raise ValueError(
                    f"the model has opaque batch-wise terms {opaque} but sample_share + "
                    "pairwise_share = 1 leaves no budget for them: lower pairwise_share"
                )
            if not opaque and "batch" in self.parts:
                raise ValueError(
                    "all batch-wise terms are pairwise, so the batch part would only burn "
                    "budget: set pairwise_share = 1 - sample_share (the default)"
                )
            if len(terms.pairwise) != self.num_pairwise_terms:
                raise ValueError(
                    f"the model declares {len(terms.pairwise)} pairwise divergences; this "
                    f"mechanism is calibrated for {self.num_pairwise_terms} (set "
                    "num_pairwise_terms before training: each adds 8·C_p to the sensitivity)"
                )
            per_record = terms.per_record()
            if per_record is None:
                raise ValueError("PairwiseDPSGD needs at least one sample-wise term")
            return per_record.sum(), terms

        with capture_layers(module) as cap:
            sample, _, terms = self.clipper.clipped_sum(module, run, self.max_grad_norm, n)
        stats: Stats = {"sample": reduce(sample)}
        pairwise = {name: torch.zeros_like(p) for name, p in params.items()}
        for term in terms.pairwise.values():
            partners, offset, prior = None, 0, term.prior_samples
            if gather is not None:
                partners, offset = gather(term.codes.detach())
                if partners.shape[0] >= 2:
                    prior = broadcast(prior.detach()) if broadcast is not None else prior
            total = n if partners is None else partners.shape[0]
            if total < 2 or n == 0:
                continue  # the U-statistic is 0 (and so is its gradient) below two records
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                jac = latent_jacobian(cap.calls, term.codes, n, self._workspace)
            owner, _, _ = owner_vectors(term.codes, prior, term.kernel, float(term.weight),
                                        jac.gram, self.pair_max_grad_norm, partners, offset,
                                        jac.terms)
            for name, g in clipped_owner_sum(jac, owner, params, n).items():
                pairwise[name] += g
        if not math.isfinite(float(sum(float(g.sum()) for g in pairwise.values()))):
            _check_finite(pairwise)  # the cheap check failed: name the parameter and raise
        stats["pairwise"] = reduce(pairwise)
        if "batch" in self.parts:
            opaque = [v for k, v in terms.batch.items() if k not in terms.pairwise]
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                h = _grads(torch.stack(opaque).sum(), params, retain=False)
            stats["batch"] = clip_vector(reduce(h), self.batch_max_grad_norm)
        return stats


def _moved_rows(grad: Tensor, lo: int, hi: int) -> Tensor:
    """Indices of the rows outside ``[lo, hi)`` where ``grad`` is finite and non-zero
    (non-finite values are left to ``validate()``, which names them properly)."""
    flat = grad.reshape(grad.shape[0], -1)
    moved = ((flat.abs() > 0) & torch.isfinite(flat)).any(1)
    moved[lo:hi] = False
    return moved.nonzero()[:, 0]


def _refuse_cross_record(label: str, i: int, n: int, input_grads: tuple,
                         calls: list, output_grads: tuple) -> None:
    """Raise if record ``i``'s term reads another record's input or reaches a layer row that
    is attributed to another record (``probe_sample_terms``)."""
    for input_grad in input_grads:
        if input_grad is None or input_grad.dim() == 0 or input_grad.shape[0] != n:
            continue
        rows = _moved_rows(input_grad, i, i + 1)
        if rows.numel():
            raise LossTermsError(
                f"{label} of record {i} depends on record {int(rows[0])}: it reads other "
                "records, so per-record clipping does not bound it. Declare it in "
                "LossTerms.batch (a batch-wise term) instead, or make it read record i only."
            )
    outputs = [c for c in calls if c.output.requires_grad]
    for call, grad in zip(outputs, output_grads):
        if grad is None or grad.dim() == 0:
            continue
        rows_total = grad.shape[0]
        if rows_total % n:
            continue  # not record-major at all: the clipper raises AttributionError itself
        k = rows_total // n
        rows = _moved_rows(grad, i * k, (i + 1) * k)
        if rows.numel():
            raise AttributionError(
                f"{label} of record {i} reaches row {int(rows[0])} of a "
                f"{type(call.module).__name__} layer call with {rows_total} rows ({k} per "
                f"record for n={n}), a row attributed to record {int(rows[0]) // k}. Rows that "
                "every record reads (data-independent inputs through a trainable layer, e.g. "
                "VampPrior pseudo-inputs through the encoder) or that mix records cannot be "
                "clipped per record: compute them outside the trainable layers' per-record "
                "calls (e.g. as a batch-wise term), or freeze the parameters they use."
            )


@contextlib.contextmanager
def _restoring(py_rng: Any, np_rng: Any) -> Iterator[None]:
    """Put Python's and NumPy's global RNG states back afterwards (the probe is RNG-neutral)."""
    try:
        yield
    finally:
        random.setstate(py_rng)
        np.random.set_state(np_rng)


def _map_tensors(batch: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``batch`` with ``fn`` applied to every tensor (in tuples, lists and dicts, nested)."""
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, dict):
        return type(batch)((k, _map_tensors(v, fn)) for k, v in batch.items())
    if isinstance(batch, (list, tuple)):
        items = [_map_tensors(v, fn) for v in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)
    return batch


def _tensors(batch: Any) -> list[Tensor]:
    found: list[Tensor] = []

    def leaf(t: Tensor) -> Tensor:
        found.append(t)
        return t

    _map_tensors(batch, leaf)
    return found


def _with_grad_inputs(batch: Any, n: int) -> tuple[Any, list[Tensor]]:
    """A copy of ``batch`` whose floating-point tensors with ``n`` rows depend on new leaves that
    require gradients (non-leaf clones: the model may still write them in place), and those
    leaves (every such input is probed, not only the first)."""
    inputs: list[Tensor] = []

    def leaf(t: Tensor) -> Tensor:
        if t.is_floating_point() and t.dim() > 0 and t.shape[0] == n:
            source = t.detach().clone().requires_grad_(True)
            inputs.append(source)
            return source.clone()
        return t

    return _map_tensors(batch, leaf), inputs


def _replace_record(batch: Any, j: int, k: int, n: int) -> Any:
    """``batch`` with record ``j``'s row replaced by record ``k``'s in every per-record column:
    tensors and NumPy arrays with ``n`` rows, and lists of ``n`` scalars (nested)."""
    if isinstance(batch, Tensor) or isinstance(batch, np.ndarray):
        if batch.ndim > 0 and batch.shape[0] == n:
            batch = batch.clone() if isinstance(batch, Tensor) else batch.copy()
            batch[j] = batch[k]
        return batch
    if isinstance(batch, dict):
        return type(batch)((key, _replace_record(v, j, k, n)) for key, v in batch.items())
    if isinstance(batch, (list, tuple)):
        scalars = all(isinstance(v, (int, float, complex, str, bool)) for v in batch)
        if scalars and len(batch) == n:
            items = list(batch)
            items[j] = items[k]
        else:
            items = [_replace_record(v, j, k, n) for v in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)
    return batch


def _donor(batch: Any, j: int, n: int, first: bool) -> int:
    """A record whose data replaces record ``j``'s in the replacement probe: the last (or the
    first) record whose integer columns (labels, ids) differ from ``j``'s, so that label counts
    change too; ``(j + 1) % n`` when all agree."""
    ints: list[Tensor] = []
    _map_tensors(batch, lambda t: ints.append(t) or t if (
        not t.is_floating_point() and t.dim() > 0 and t.shape[0] == n) else t)
    differs = torch.zeros(n, dtype=torch.bool)
    for t in ints:
        flat = t.reshape(n, -1)
        differs |= (flat != flat[j]).any(1).cpu()
    differs[j] = False
    idx = differs.nonzero()[:, 0]
    if idx.numel() == 0:
        return (j + 1) % n
    return int(idx[0] if first else idx[-1])


def _probe_records(n: int) -> list[int]:
    """Every record up to 16; else the first, the last and 14 others drawn at random (the
    probe runs under a forked RNG)."""
    if n <= 16:
        return list(range(n))
    middle = (torch.randperm(n - 2)[:14] + 1).tolist()
    return [0, n - 1, *sorted(middle)]


def _probed_values(terms: Any, n: int) -> list[tuple[str, Tensor]]:
    """``(label, [n] values)`` of the sample-wise terms and of a fixed random combination of
    each pairwise term's code coordinates."""
    checked: list[tuple[str, Tensor]] = []
    sample = terms.sample if isinstance(getattr(terms, "sample", None), dict) else {}
    for name, values in sample.items():
        if isinstance(values, Tensor) and values.dim() == 1 and values.shape[0] == n:
            checked.append((f"sample-wise term {name!r}", values))
    pairwise = terms.pairwise if isinstance(getattr(terms, "pairwise", None), dict) else {}
    for name, term in pairwise.items():
        codes = getattr(term, "codes", None)
        if isinstance(codes, Tensor) and codes.dim() == 2 and codes.shape[0] == n:
            gen = torch.Generator().manual_seed(codes.shape[1])
            mix = torch.randn(codes.shape[1], generator=gen).to(codes)
            checked.append((f"the codes of pairwise term {name!r}", codes @ mix))
    return checked


def _rows(t: Tensor, n: int, records: list[int]) -> Tensor | None:
    """The rows of ``records`` (``K`` rows each when ``t`` has ``n·K`` rows), detached."""
    if t.dim() == 0 or t.shape[0] % n:
        return None
    k = t.shape[0] // n
    idx = torch.tensor([r * k + m for r in records for m in range(k)], device=t.device)
    return t.detach().index_select(0, idx).reshape(len(records), -1)


def _record_signature(module: nn.Module, batch: Any, n: int, records: list[int]) -> dict:
    """What each probed record's released gradient is a function of: its values (sample-wise
    terms, pairwise codes), every layer call's input and output rows, and the backprops of each
    value's sum at those rows. ``{key: [len(records), ...]}``; records are rows."""
    signature: dict[str, Any] = {}
    if n < 2:
        with torch.no_grad():
            loss_terms_of(module, batch)
        return signature
    with torch.enable_grad(), capture_layers(module) as cap:
        checked = _probed_values(loss_terms_of(module, batch), n)
        calls = [c for c in cap.calls if c.output.requires_grad]
        reached: set[int] = set()  # calls whose rows some probed value's gradient goes through
        for label, values in checked:
            signature[label] = values.detach()[records].reshape(len(records), -1)
            if not values.requires_grad or not calls:
                continue
            grads = torch.autograd.grad(values.sum(), [c.output for c in calls],
                                        retain_graph=True, allow_unused=True)
            for c_idx, g in enumerate(grads):
                if g is not None:
                    reached.add(c_idx)
                    signature[f"{label}: backprop at layer {c_idx}"] = _rows(g, n, records)
        # Only those calls: a layer that only a batch-wise term runs (a discriminator on
        # permuted codes) mixes records legitimately and adds nothing to a record's gradient.
        signature["#calls"] = [(i, type(calls[i].module).__name__, tuple(calls[i].output.shape))
                               for i in sorted(reached)]
        for c_idx in sorted(reached):
            for a_idx, a in enumerate(calls[c_idx].activations):
                signature[f"layer {c_idx} input {a_idx}"] = _rows(a, n, records)
            signature[f"layer {c_idx} output"] = _rows(calls[c_idx].output, n, records)
    signature["#records"] = records
    return signature


def _same_signature(a: dict, b: dict, replaced: int | None) -> bool | tuple[str, int]:
    """True if every probed record other than ``replaced`` has the same signature in ``a``
    and ``b`` (bit for bit on CPU; relative 1e-6 of the row's scale on accelerators), else
    ``(what moved, which record)``."""
    if a.keys() != b.keys() or a.get("#calls") != b.get("#calls"):
        return ("the layer calls", -1 if replaced is None else (replaced + 1) % 2)
    records = a.get("#records", [])
    for key, x in a.items():
        if key.startswith("#") or x is None or b[key] is None:
            continue
        y = b[key]
        if x.shape != y.shape:
            return (key, records[0] if records else -1)
        for r, record in enumerate(records):
            if record == replaced:
                continue
            u, v = x[r], y[r]
            if u.device.type == "cpu":
                same = bool(((u == v) | (torch.isnan(u) & torch.isnan(v))).all())
            else:
                scale = torch.maximum(u.abs().max(), v.abs().max()).item()
                same = bool(((u - v).abs() <= 1e-6 * scale).all())
            if not same:
                label = key.split(":")[0] if not key.startswith("layer") else key
                return (label, record)
    return True


def _module_state(module: nn.Module) -> dict[str, Tensor]:
    """A copy of every parameter and buffer (by value: writes through ``.data`` bump no
    version counter)."""
    named = list(module.named_parameters()) + list(module.named_buffers())
    return {name: t.detach().clone() for name, t in named}


def _refuse_state_changes(module: nn.Module, before: dict[str, Tensor]) -> None:
    after = dict(list(module.named_parameters()) + list(module.named_buffers()))
    changed = sorted(
        k for k in set(before) | set(after)
        if k not in before or k not in after or before[k].shape != after[k].shape
        or not bool(((before[k] == after[k].detach())
                     | (torch.isnan(before[k]) & torch.isnan(after[k].detach()))).all()))
    if changed:
        with torch.no_grad():  # put the state back: nothing of the batch stays in the module
            for k in changed:
                if k in before and k in after and before[k].shape == after[k].shape:
                    after[k].copy_(before[k])
        raise AttributionError(
            f"loss_terms() changed {changed} in place (or replaced them): a parameter or buffer "
            "written from the batch during the forward (a running statistic of the data, "
            "Embedding(max_norm=...)'s renormalisation) is released without noise. Keep "
            "loss_terms free of side effects on the module's state."
        )


def truncate_batch(batch: Any, n_max: int) -> Any:
    """The first ``n_max`` records of a batch (every tensor sliced along dim 0)."""
    if isinstance(batch, Tensor):
        return batch[:n_max]
    if isinstance(batch, dict):
        return {k: truncate_batch(v, n_max) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        items = [truncate_batch(v, n_max) for v in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)
    return batch


def effective_noise_multiplier(mechanism: Mechanism) -> float:
    """σ_eff recomputed from the parts (a check on ``mechanism.noise_multiplier``)."""
    return joint_noise_multiplier(list(mechanism.noise_multipliers.values()))

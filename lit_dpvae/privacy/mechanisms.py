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

import functools
import math
import warnings
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor, nn

from lit_dpvae.privacy.accounting import joint_noise_multiplier, split_noise_multiplier
from lit_dpvae.privacy.grad_sample import (
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
from lit_dpvae.privacy.probe import probe_record_contract
from lit_dpvae.privacy.terms import LossTerms, batch_size_of, loss_terms_of

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
        """Once per module, on its first batch of ≥ 2 records (every rank's first batch in a
        multi-process run): the record-wise contract probe,
        :func:`lit_dpvae.privacy.probe.probe_record_contract`."""
        if self._probed is module or not self.is_private:
            return
        if n < 2 and not self.always_forward:
            return
        probe_record_contract(module, batch, n, collective=self.always_forward)
        self._probed = module

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

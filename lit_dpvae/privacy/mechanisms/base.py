"""The mechanism interface every gradient mechanism implements (docs/privacy.md §1–2).

A mechanism splits a step into *parts*, one per randomised gradient, and exposes

- ``aggregate(module, batch, comm)`` -> ``{part: {param name: tensor}}``: the pre-noise
  statistics of the local batch; ``comm`` (:mod:`lit_dpvae.privacy.collectives`) sums raw
  statistics over processes before a whole part is clipped, and gathers what a part needs from
  the other ranks, so one code path serves one process and many;
- ``sensitivity`` -> ``{part: Δ_k}``: an add/remove L2 bound on how far one record moves part k;
- ``noise_multipliers`` -> ``{part: σ_k}``: part k gets Gaussian noise of std ``σ_k·Δ_k``;
- ``privatize(stats, expected_batch_size, generator)`` -> the update direction at mean scale.

The accountant sees one subsampled Gaussian mechanism per step with
``σ_eff = (Σ_k σ_k⁻²)^(-1/2)`` (``noise_multiplier``, set by the privacy budget once the
sampling is known). A new mechanism subclasses :class:`Mechanism` and registers itself with
:func:`lit_dpvae.privacy.mechanisms.register_mechanism`; the strategy then accepts its name.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from lit_dpvae.privacy import collectives
from lit_dpvae.privacy.accounting import joint_noise_multiplier
from lit_dpvae.privacy.capture import check_module, named_trainable, refuse_parameter_hooks
from lit_dpvae.privacy.clipping import clip_factors, make_clipper, weighted_sum
from lit_dpvae.privacy.collectives import LOCAL, Collectives
from lit_dpvae.privacy.precision import ieee_fp32
from lit_dpvae.privacy.probe import (
    opaque_leaves,
    probe_record_contract,
    record_columns,
    remap_records,
    verify_batch_terms,
)
from lit_dpvae.privacy.terms import (
    LossTerms,
    batch_size_of,
    batch_terms_of,
    has_trusted_batch_terms,
    loss_terms_of,
)

Stats = dict[str, dict[str, Tensor]]


def _prepared(aggregate: Callable[..., Stats], ieee: bool) -> Callable[..., Stats]:
    """Form a mechanism's statistics with its collectives active (``gather_for_batch_terms``)
    and, where anything is private, under IEEE float32 kernels (no TF32/bf16 input rounding,
    which would let a clipped contribution exceed its bound; precision.py)."""

    @functools.wraps(aggregate)
    def wrapped(self: Mechanism, module: nn.Module, batch: Any, comm: Collectives | None = None,
                **kwargs: Any) -> Stats:
        if comm is None:  # a nested call (e.g. super().aggregate) keeps the caller's collectives
            comm = collectives.current()
        with contextlib.ExitStack() as stack:
            if ieee:
                stack.enter_context(ieee_fp32())
            stack.enter_context(collectives.active(comm))
            return aggregate(self, module, batch, comm, **kwargs)

    return wrapped


def check_positive(name: str, value: float) -> float:
    """``value`` as a float, or a ValueError naming the setting."""
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return value


def parameter_prefixes(value: Sequence[str] | None, what: str) -> tuple[str, ...] | None:
    """``value`` as a tuple of non-empty parameter-name prefixes (None stays None: every
    trainable parameter); anything else is refused with the setting's name."""
    if value is None:
        return None
    if isinstance(value, str) or not value or not all(isinstance(b, str) and b for b in value):
        raise ValueError(f"{what} must be a non-empty list of parameter-name prefixes (e.g. "
                         f"['encoder.']), got {value!r}")
    return tuple(value)


def grads_of(loss: Tensor | None, params: dict[str, nn.Parameter], retain: bool) -> dict:
    """``∇ loss`` for each of ``params`` (zeros where it does not depend on one), detached."""
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
    """Base class: noise calibration and the update direction; subclasses define the parts.

    Subclass contract: set ``parts`` and ``summed_over_records``, implement ``sensitivity``
    (with its proof in docs/privacy.md) and ``aggregate(module, batch, comm)`` (start it with
    ``n = self.start(module, batch, comm)``; ``self.skip(n, comm)`` says whether to return
    ``self.zeros(module)``); optionally ``noise_multipliers`` (budget shares),
    ``set_sampling`` and ``balance_warning``. Register it with ``register_mechanism``.
    """

    #: the registry name (set by ``register_mechanism``; written into checkpoints)
    name: str = ""
    #: False only for a mechanism that releases the exact gradient (no ε holds)
    private: bool = True
    parts: tuple[str, ...] = ()
    #: part -> True if the part is a sum over records (divided by B in the update).
    summed_over_records: dict[str, bool] = {}

    #: form the statistics under IEEE float32 kernels (False only where nothing is private)
    ieee_statistics = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every mechanism's ``aggregate`` — the shipped ones and any user subclass — runs with
        its collectives active and, when private, under IEEE float32 kernels (precision.py,
        docs/privacy.md §7)."""
        super().__init_subclass__(**kwargs)
        if "aggregate" in cls.__dict__:
            ieee = bool(cls.__dict__.get("ieee_statistics", True))
            cls.aggregate = _prepared(cls.__dict__["aggregate"], ieee)  # type: ignore[method-assign]

    def __init__(self, *, noise_multiplier: float = 0.0, backend: str = "ghost") -> None:
        self.clipper = make_clipper(backend)
        self.backend = backend
        self._checked: nn.Module | None = None
        self._probed: nn.Module | None = None
        #: The loss terms of the last batch (for logging by the caller).
        self.last_terms: LossTerms | None = None
        self._noise_multiplier = 0.0
        self.noise_multiplier = noise_multiplier
        self.__dict__.setdefault("_expected_batch_size", None)  # a subclass may set it first

    # -- noise calibration ----------------------------------------------------------------
    @property
    def noise_multiplier(self) -> float:
        """σ_eff: the accountant's noise multiplier for one step of this mechanism."""
        return self._noise_multiplier

    @noise_multiplier.setter
    def noise_multiplier(self, value: float) -> None:
        value = float(value)
        if not value >= 0 or not math.isfinite(value):
            raise ValueError(f"noise_multiplier must be finite and >= 0, got {value}")
        self._noise_multiplier = value

    @property
    def is_private(self) -> bool:
        """σ is set and positive (a private mechanism is built with σ = 0 until its budget
        calibrates it: ``private`` says what it will be)."""
        return self.noise_multiplier > 0

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_owner", None)  # a weak reference does not pickle (spawned processes)
        state.pop("_columns", None)  # decided again on the first batch the copy sees
        state.pop("_fast", None)  # verified again on the copy's first probed batch
        return state

    def bind(self, owner: object) -> None:
        """Give this mechanism to one strategy: σ and the probe's state are per run, so a second
        owner is refused (build a new mechanism object for it)."""
        bound = getattr(self, "_owner", None)
        if bound is not None and bound() is not None and bound() is not owner:
            raise ValueError(f"this {type(self).__name__} object already belongs to another "
                             "strategy (its σ is that run's): pass a new object to each strategy")
        self._owner = weakref.ref(owner)

    def set_sampling(self, expected_batch_size: float) -> None:
        """Called with the public expected batch size ``q·N`` whenever the sampling changes
        (before the first step and after every change of q or N); kept as
        ``_expected_batch_size`` (an override calls ``super().set_sampling`` first)."""
        b = float(expected_batch_size)
        if not (b > 0 and math.isfinite(b)):
            raise ValueError(f"expected_batch_size must be finite and > 0 (q·N, public), got {b}")
        self._expected_batch_size: float | None = b

    def balance_warning(self, expected_batch_size: float) -> str | None:
        """A warning to show before training when the noise of one part swamps the update
        (None: nothing to say)."""
        return None

    @property
    def sensitivity(self) -> dict[str, float]:
        raise NotImplementedError  # pragma: no cover - abstract

    @property
    def noise_multipliers(self) -> dict[str, float]:
        """σ_k per part (noise std of part k is ``σ_k · sensitivity[k]``). They must compose to
        ``noise_multiplier``: ``(Σ_k σ_k⁻²)^(-1/2) = σ_eff`` (``check_noise_composition``).
        Default: equal budget shares, ``σ_k = σ_eff·√P`` for P parts (override to split the
        budget otherwise, as term-wise's ``sample_share`` does)."""
        scale = math.sqrt(len(self.parts)) if self.parts else 1.0
        return {part: self.noise_multiplier * scale for part in self.parts}

    def check_noise_composition(self) -> None:
        """Refuse per-part noise that does not compose to the σ_eff the accountant records (a
        mechanism giving every part the full σ_eff would release at σ_eff/√P), and a part
        without a finite positive sensitivity (its noise would be zero)."""
        if not self.private or self.noise_multiplier == 0:
            return
        bad = {p: d for p, d in self.sensitivity.items() if not 0 < d < math.inf}
        if bad or set(self.sensitivity) != set(self.parts):
            raise ValueError(
                f"{type(self).__name__}.sensitivity {self.sensitivity} must give every part "
                f"{self.parts} a finite bound > 0 (its noise std is σ_k·Δ_k)")
        joint = effective_noise_multiplier(self)
        if not math.isclose(joint, self.noise_multiplier, rel_tol=1e-9):
            raise ValueError(
                f"{type(self).__name__}.noise_multipliers {self.noise_multipliers} compose to "
                f"σ_eff={joint:.6g}, but the accountant records σ_eff={self.noise_multiplier:.6g}: "
                "the parts must satisfy (Σ_k σ_k⁻²)^(-1/2) = noise_multiplier (split the budget "
                "in shares γ_k: σ_k = σ_eff/√γ_k with Σ γ_k = 1)")

    def noise_std(self) -> dict[str, float]:
        sens = self.sensitivity
        return {
            part: 0.0 if sigma == 0 else sigma * sens[part]
            for part, sigma in self.noise_multipliers.items()
        }

    # -- statistics -----------------------------------------------------------------------
    def aggregate(self, module: nn.Module, batch: Any, comm: Collectives = LOCAL) -> Stats:
        """Pre-noise statistics ``{part: {param name: tensor}}`` of the local ``batch``;
        ``comm.all_reduce`` is applied to each raw sum before a part is clipped as a whole, so
        the result is the statistic of the global batch on every rank."""
        raise NotImplementedError  # pragma: no cover - abstract

    def part_parameters(self, part: str) -> tuple[str, ...] | None:
        """Name prefixes of the parameters ``part`` is computed and noised on (None: every
        trainable parameter). Fixed before training (data-independent); a part's released
        statistic is 0, without noise, on the other parameters."""
        return None

    def select(self, params: dict[str, Any], part: str) -> dict[str, Any]:
        """The entries of ``params`` (name -> anything) that ``part`` covers; a subset that
        matches no trainable parameter is refused."""
        prefixes = self.part_parameters(part)
        if prefixes is None:
            return params
        chosen = {n: p for n, p in params.items() if n.startswith(prefixes)}
        loose = sorted({pre for pre in prefixes for n in chosen if n.startswith(pre)
                        and n != pre and not pre.endswith(".") and n[len(pre)] != "."})
        if loose:
            warnings.warn(f"the {part} part's prefixes {loose} also match parameters of other "
                          "modules (e.g. 'encoder.head' matches 'encoder.head2.weight'): end a "
                          "module prefix with '.'", stacklevel=2)
        if not chosen:
            raise ValueError(
                f"the {part} part's parameter prefixes {list(prefixes)} match no trainable "
                f"parameter (they are named like {list(params)[:4]})")
        return chosen

    def zeros(self, module: nn.Module) -> Stats:
        params = named_trainable(module)
        return {part: {n: torch.zeros_like(p) for n, p in self.select(params, part).items()}
                for part in self.parts}

    def check(self, module: nn.Module) -> None:
        """Refuse a module this mechanism cannot train (once per module; cheap afterwards)."""
        if self._checked is not module:
            if not callable(getattr(module, "loss_terms", None)):
                loss_terms_of(module, None)  # raises the contract error
            if self.is_private:
                check_module(module)
            self._checked = module

    def probe_sample_terms(self, module: nn.Module, batch: Any, n: int,
                           comm: Collectives = LOCAL) -> None:
        """The record-wise contract probe (:func:`lit_dpvae.privacy.probe.probe_record_contract`)
        on every batch until one of ≥ 3 records (on every rank, in a multi-process run) made it
        complete; once per module afterwards."""
        if self._probed is module or not self.is_private:
            return
        if n < 2 and not comm.distributed:
            return
        complete = probe_record_contract(module, batch, n, collective=comm.distributed)
        self.verify_batch_forward(module, batch, n, comm)
        if comm.distributed:  # one decision for all ranks: probed again until every rank was
            device = next((p.device for p in module.parameters()), torch.device("cpu"))
            done = comm.all_reduce({"complete": torch.tensor([float(complete)], device=device)})
            complete = int(done["complete"].item()) == comm.world_size
        if complete:  # else (n = 2: no replacement check) the next batch is probed too
            self._probed = module

    def verify_batch_forward(self, module: nn.Module, batch: Any, n: int,
                             comm: Collectives = LOCAL) -> None:
        """Decide, once per module, whether ``batch_forward`` may call the model's
        ``batch_terms`` (:func:`lit_dpvae.privacy.probe.verify_batch_terms` on a probed batch,
        one decision for all ranks); where it may not, the full ``loss_terms`` forward is used,
        with a warning that says why."""
        fast = getattr(self, "_fast", None)
        if not has_trusted_batch_terms(module) or (fast is not None and fast[0] is module):
            return
        reason = verify_batch_terms(module, batch, n)
        ok = reason is None
        if comm.distributed:
            device = next((p.device for p in module.parameters()), torch.device("cpu"))
            votes = comm.all_reduce({"ok": torch.tensor([float(ok)], device=device)})["ok"]
            ok = int(votes.item()) == comm.world_size
            reason = reason or "it differs from loss_terms on another process's records"
        self._fast = (module, ok)
        if not ok:
            warnings.warn(
                f"lit_dpvae: {type(module).__name__}.batch_terms is not used: "
                f"{reason.rstrip('.')}. The "
                "batch-wise and pairwise parts are computed from the full loss_terms forward "
                "instead (slower, and what the record probe checked).", stacklevel=3)

    def forward_terms(self, module: nn.Module, batch: Any, n: int) -> LossTerms:
        """The model's validated loss terms of ``batch`` (kept in ``last_terms`` for logging)."""
        terms = loss_terms_of(module, batch)
        terms.validate(n)
        self.last_terms = terms
        return terms

    def batch_forward(self, module: nn.Module, batch: Any, n: int) -> LossTerms:
        """The batch-wise (and pairwise) terms of the whole batch, from one forward: the
        model's ``batch_terms`` (no decoder) where ``verify_batch_forward`` verified it for
        this module, else ``loss_terms``; validated; empty terms are left to the mechanism's
        own checks."""
        fast = getattr(self, "_fast", None)
        verified = fast is not None and fast[0] is module and fast[1]
        terms = batch_terms_of(module, batch) if verified else loss_terms_of(module, batch)
        if terms.sample or terms.batch:
            terms.validate(n)
        return terms

    def record_block(self, world_size: int = 1) -> int:
        """Records per forward of the sample part: fixed for the run, never a function of the
        realised batch, so every record's forward and backward run with the same shapes. A
        multiple of 32 covering one process's share ``b = B / world_size`` of the public
        expected batch size plus two standard deviations of a Poisson batch,
        ``32·⌈(b + 2√b)/32⌉`` (one block in almost every step), or 64 before the sampling is
        known."""
        total = self._expected_batch_size
        if total is None:
            return 64
        b = total / max(1, world_size)
        return 32 * max(1, math.ceil((b + 2 * math.sqrt(b)) / 32))

    def blocked_sample_sum(self, module: nn.Module, batch: Any, n: int,
                           check: Callable[[LossTerms], None] | None = None,
                           comm: Collectives = LOCAL
                           ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``Σ_i clip_C(∇ℓ_i)`` of the sample-wise terms, with the model's forward *and*
        backward run on blocks of exactly ``record_block`` records (the last padded with copies
        of its first record, whose terms are left out and whose clip factors are 0), under
        local collectives. BLAS and convolution libraries choose their kernels by batch size
        (a Linear's row for one record, a gemv, is rounded differently from the same row in a
        batch of two, a gemm); a record whose gradient is rounding (a record in a layer's null
        space) then differed between S and S ∪ {x}, and clipping rescaled it to norm C in two
        directions (1.2C released; docs/privacy.md §2). With one block shape every record is
        computed the same way whatever else is in the batch. Returns the sum and the real
        records' sample terms (detached, for logging). ``check`` sees each block's terms;
        ``comm``: the run's collectives (its world size sets the block, ``record_block``)."""
        if n == 0:  # a multi-process rank without records: nothing to clip, but the logged
            # terms need the model's keys (shape [0]), or train/* logging's all-reduce would
            # not line up across ranks; one forward on the empty batch, local, RNG-neutral
            device = next((p.device for p in module.parameters()), torch.device("cpu"))
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                    torch.no_grad(), collectives.active(LOCAL):
                empty = loss_terms_of(module, batch).sample
            return ({name: torch.zeros_like(p) for name, p in named_trainable(module).items()},
                    {k: v.detach() for k, v in empty.items()})
        # A batch item the library cannot open (the probe warns about it) may hold records it
        # cannot split: one unblocked forward then (docs/privacy.md §7).
        size = n if opaque_leaves(batch) else self.record_block(comm.world_size)
        columns = self.batch_columns(module, batch, n)
        total: dict[str, Tensor] | None = None
        logged: dict[str, list[Tensor]] = {}
        for lo in range(0, n, size):
            real = min(n, lo + size) - lo
            block = batch if size == n else remap_records(
                batch, list(range(lo, lo + real)) + [lo] * (size - real), n, paths=columns)

            def run(block: Any = block, real: int = real) -> tuple[Tensor, LossTerms]:
                terms = loss_terms_of(module, block)
                terms.validate(size)
                if check is not None:
                    check(terms)
                per_record = terms.per_record()
                if per_record is None:
                    raise ValueError(f"{type(self).__name__} needs at least one sample-wise term")
                return per_record[:real].sum(), terms

            with collectives.active(LOCAL):
                sums, _, terms = self.clipper.clipped_sum(module, run, self.max_grad_norm, size,
                                                          keep=real)
            for key, value in terms.sample.items():
                logged.setdefault(key, []).append(value[:real].detach())
            total = sums if total is None else {k: total[k] + v for k, v in sums.items()}
        assert total is not None
        return total, {k: torch.cat(v) for k, v in logged.items()}

    def batch_columns(self, module: nn.Module, batch: Any, n: int) -> set[tuple]:
        """Which items of the batch are per-record columns (positions in its structure),
        decided on the first batch a module trains on and fixed for it: an item with n rows
        by chance in a later batch (a shared table of K rows when n = K) is not sliced into
        blocks (it moved every record's term: 39C at n = K = 20), and a column of the first
        batch that later has another number of rows than records is refused."""
        known = getattr(self, "_columns", None)
        if known is None or known[0] is not module:
            known = (module, record_columns(batch, n))
            self._columns = known
        now = record_columns(batch, n)
        missing = sorted(map(str, known[1] - now))
        if missing:
            raise ValueError(
                f"batch items at {missing} held one row per record in the first batch but not "
                f"in this one ({n} records): a per-record column must have one row per record "
                "in every batch; pass shared tables as module buffers, not in the batch")
        return known[1]

    def start(self, module: nn.Module, batch: Any, comm: Collectives = LOCAL) -> int:
        """Checks every ``aggregate`` starts with; returns the number of local records."""
        self.check(module)
        if self.is_private:
            refuse_parameter_hooks(module)
        n = batch_size_of(batch)
        self.probe_sample_terms(module, batch, n, comm)
        return n

    @staticmethod
    def skip(n: int, comm: Collectives = LOCAL) -> bool:
        """An empty local batch needs no forward pass, unless other ranks wait on its
        collectives."""
        return n == 0 and not comm.distributed

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

    def update_noise_std(self, expected_batch_size: float, name: str | None = None) -> float:
        """Std of the Gaussian noise in each coordinate of the released update (``privatize``):
        ``sqrt(Σ_k (s_k σ_k Δ_k)²)`` over the parts ``k`` that cover parameter ``name``
        (``part_parameters``; all parts when ``name`` is None: the largest std of any
        coordinate), ``s_k`` = 1/B for parts summed over records, else 1.

        Public (σ_k, Δ_k and B are public), so an optimizer may use it freely, e.g. to remove the
        noise's share from Adam's second moment (``lit_dpvae.optim.DPAdamBC``).
        """
        if not expected_batch_size > 0:
            raise ValueError(
                f"expected_batch_size must be > 0 (q·N, public), got {expected_batch_size}"
            )
        std = self.noise_std()
        parts = [p for p in self.parts if name is None or self.covers(p, name)]
        return math.sqrt(sum(
            ((1.0 / expected_batch_size if self.summed_over_records[p] else 1.0) * std[p]) ** 2
            for p in parts))

    def covers(self, part: str, name: str) -> bool:
        """Whether ``part`` is computed and noised on parameter ``name``."""
        prefixes = self.part_parameters(part)
        return prefixes is None or name.startswith(prefixes)

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
        self.check_noise_composition()
        for part in self.parts:  # a statistic outside its part's coverage would miss its noise
            stray = [n for n in stats[part] if not self.covers(part, n)]
            if stray:
                raise ValueError(f"the {part} part's statistic has entries {stray[:3]} outside "
                                 "the parameters it covers (part_parameters): refusing to "
                                 "release them without that part's noise")
        if len(self.parts) == 1:
            return self.combine(self.add_noise(stats, generator), expected_batch_size)
        noiseless = self.combine(stats, expected_batch_size)
        if self.update_noise_std(expected_batch_size) == 0:
            return noiseless
        return {
            name: value + torch.normal(mean=0, std=self.update_noise_std(expected_batch_size, name),
                                       size=value.shape, device=value.device, generator=generator)
            for name, value in noiseless.items()
        }

    def bounds(self) -> tuple[dict[str, float], dict[str, float]] | None:
        """``(sensitivity, noise_multipliers)``, or None while a bound still waits for the
        sampling (term-wise's default C_b = C/(2B) before ``set_sampling``)."""
        try:
            return dict(self.sensitivity), dict(self.noise_multipliers)
        except RuntimeError:
            return None

    #: attributes reported next to the constructor's arguments (``settings``), e.g. resolved
    #: budget shares; a subclass lists only public, data-independent ones
    extra_settings: tuple[str, ...] = ()

    def settings(self) -> dict[str, Any]:
        """The public settings of this mechanism for the privacy report: the attributes named
        like an argument of its (or a base class's) constructor, plus ``extra_settings``, with
        their resolved values (e.g. term-wise's C_b = C/(2B) once the sampling is known) —
        an allow-list, so nothing else a subclass keeps on ``self`` is ever published.
        ``noise_multiplier`` is reported as σ_eff, not here."""
        names: list[str] = []
        for klass in type(self).__mro__:
            init = klass.__dict__.get("__init__")
            if init is None or klass is object:
                continue
            names += [p for p in inspect.signature(init).parameters
                      if p not in ("self", "noise_multiplier") and p not in names]
        names += [n for n in self.extra_settings if n not in names]
        plain = (bool, int, float, str, type(None))
        out: dict[str, Any] = {}
        for key in names:
            try:
                value = getattr(self, key)
            except (AttributeError, RuntimeError):  # not kept, or waits for the sampling
                continue
            if isinstance(value, (list, tuple)) and all(isinstance(v, plain) for v in value):
                out[key] = list(value)
            elif isinstance(value, dict) and all(isinstance(v, plain) for v in value.values()):
                out[key] = {str(k): v for k, v in value.items()}
            elif isinstance(value, plain):
                out[key] = value
        return out

    def __repr__(self) -> str:
        bounds = self.bounds()
        sensitivity: Any = "<set with the sampling>" if bounds is None else bounds[0]
        return (
            f"{type(self).__name__}(noise_multiplier={self.noise_multiplier:.4g}, "
            f"sensitivity={sensitivity}, backend={self.backend!r})"
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

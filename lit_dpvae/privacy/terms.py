"""The loss-term contract between models and privacy mechanisms.

A model exposes ``loss_terms(batch) -> LossTerms``. Sample-wise terms hold one value per record
(term ``i`` reads record ``i`` only); batch-wise terms are scalars that may read the whole batch.
Weights (β, λ) are applied by the model. At the scale of a mean the loss of a batch of expected
size ``B`` is

    L(S) = (1/B) Σ_i Σ_name sample[name][i]  +  Σ_name batch[name].

The privacy code never guesses which term is which: the model declares it here.

Optionally a batch-wise term that is a kernel U-statistic (MMD, dimension-wise MMD) also declares
its pair decomposition in ``LossTerms.pairwise`` (``PairwiseTerm``): the pairwise mechanism then
privatises it pair by pair (docs/privacy.md §8); every other mechanism ignores the declaration and
uses the scalar in ``LossTerms.batch``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn


class LossTermsError(ValueError):
    """A model returned loss terms that break the contract."""


class PairKernel(Protocol):
    """What the pairwise mechanism reads of a kernel (``lit_dpvae.divergences.PairwiseDivergence``
    declares it): ``pair_grad(a, b) = ∇₁k(a, b)``, broadcast over ``[..., d]`` inputs ->
    ``[..., d]``; ``radial``: whether ``∇₁k(a, b) = pair_scale(‖a−b‖², d)·(a − b)``, a form the
    mechanism bounds without forming the pair vectors (docs/privacy.md §8)."""

    radial: bool

    def pair_grad(self, a: Tensor, b: Tensor) -> Tensor: ...  # pragma: no cover

    def pair_scale(self, sq_dist: Tensor, d: int) -> Tensor: ...  # pragma: no cover


@dataclass
class PairwiseTerm:
    """The pair decomposition of a batch-wise term ``weight · MMD²_k(codes, prior_samples)``
    (unbiased U-statistic, see ``lit_dpvae.divergences.MMDPieces``).

    Attributes:
        codes: ``[n, d]``, row i = the code of record i, *with* its autograd graph (it must
            depend on record i only: the record-wise model contract).
        prior_samples: ``[M, d]`` data-independent samples ``w_m`` (``[0, d]`` when n < 2).
        kernel: the kernel ``k`` (a ``PairKernel``), symmetric.
        weight: λ, the weight the model applied to the divergence.
    """

    codes: Tensor
    prior_samples: Tensor
    kernel: PairKernel
    weight: float

    def __post_init__(self) -> None:
        missing = [a for a in ("pair_grad", "radial") if not hasattr(self.kernel, a)]
        if getattr(self.kernel, "radial", False) and not hasattr(self.kernel, "pair_scale"):
            missing.append("pair_scale")
        if missing:
            raise LossTermsError(
                f"the kernel of a PairwiseTerm lacks {missing}: subclass "
                "lit_dpvae.divergences.PairwiseDivergence (it declares what the pairwise "
                "mechanism reads)")


@dataclass
class LossTerms:
    """Named loss terms of one batch.

    Attributes:
        sample: name -> tensor of shape ``[n]``, one value per record (sample-wise terms).
        batch: name -> scalar tensor (batch-wise terms, e.g. a divergence estimated on the batch).
        pairwise: optional, name -> ``PairwiseTerm`` for batch-wise terms (same name, value in
            ``batch``) that are kernel U-statistics; only the pairwise mechanism reads it.
    """

    sample: dict[str, Tensor] = field(default_factory=dict)
    batch: dict[str, Tensor] = field(default_factory=dict)
    pairwise: dict[str, PairwiseTerm] = field(default_factory=dict)

    def validate(self, n: int | None = None, *, check_finite: bool = True) -> int:
        """Check shapes and values; return the number of records ``n``.

        Raises:
            LossTermsError: a sample term that is not ``[n]``, sample terms of different lengths,
                a batch term that is not a scalar, a term that is not a tensor, or NaN/Inf.
        """
        if not isinstance(self.sample, Mapping) or not isinstance(self.batch, Mapping):
            raise LossTermsError("LossTerms.sample and .batch must be dicts name -> tensor")
        if not self.sample and not self.batch:
            raise LossTermsError("LossTerms is empty: declare at least one sample or batch term")
        for name, value in {**self.sample, **self.batch}.items():
            if not isinstance(value, Tensor):
                raise LossTermsError(f"loss term {name!r} is {type(value).__name__}, not a tensor")
        for name, value in self.sample.items():
            if value.dim() != 1:
                raise LossTermsError(
                    f"sample-wise term {name!r} has shape {tuple(value.shape)}; it must have shape "
                    "[n] (one value per record). Do not reduce it: the mechanism clips per record."
                )
            if n is None:
                n = value.shape[0]
            elif value.shape[0] != n:
                raise LossTermsError(
                    f"sample-wise term {name!r} has {value.shape[0]} values but the batch has {n} "
                    "records: every sample-wise term needs exactly one value per record"
                )
        for name, value in self.batch.items():
            if value.dim() != 0:
                raise LossTermsError(
                    f"batch-wise term {name!r} has shape {tuple(value.shape)}; it must be a scalar."
                    " "
                    "A term with one value per record is sample-wise: put it in LossTerms.sample."
                )
        for name, term in self.pairwise.items():
            if name not in self.batch:
                raise LossTermsError(
                    f"pairwise term {name!r} has no value in LossTerms.batch: declare the "
                    "divergence's value there (other mechanisms use it) and its pairs here"
                )
            if not isinstance(term, PairwiseTerm):
                raise LossTermsError(f"pairwise term {name!r} is not a PairwiseTerm")
            if term.codes.dim() != 2 or (n is not None and term.codes.shape[0] != n):
                raise LossTermsError(
                    f"pairwise term {name!r} has codes of shape {tuple(term.codes.shape)}; they "
                    f"must be [n, d] with one row per record (n = {n})"
                )
        if check_finite:
            for kind, terms in (("sample", self.sample), ("batch", self.batch)):
                for name, value in terms.items():
                    if not bool(torch.isfinite(value.detach()).all()):
                        raise LossTermsError(
                            f"{kind}-wise term {name!r} contains NaN or Inf. Refusing to take a "
                            "private step on it (check the learning rate, the likelihood's input "
                            "range and the data)."
                        )
        return 0 if n is None else int(n)

    def per_record(self) -> Tensor | None:
        """Σ_name sample[name]: the per-record loss ``ℓ_i``, shape ``[n]`` (None if no terms)."""
        if not self.sample:
            return None
        return torch.stack(list(self.sample.values())).sum(0)

    def batch_total(self) -> Tensor | None:
        """Σ_name batch[name]: the batch-wise part of the loss (None if no terms)."""
        if not self.batch:
            return None
        return torch.stack(list(self.batch.values())).sum()

    def mean_loss(self, expected_batch_size: float | None = None) -> Tensor:
        """The loss at the scale of a mean: ``Σ ℓ_i / B + Σ D_k`` (``B`` defaults to ``n``)."""
        total: Tensor | None = None
        per_record = self.per_record()
        if per_record is not None:
            denom = expected_batch_size if expected_batch_size is not None else per_record.numel()
            total = per_record.sum() / max(float(denom), 1.0)
        batch = self.batch_total()
        if batch is not None:
            total = batch if total is None else total + batch
        assert total is not None  # validate() rejects empty LossTerms
        return total

    def detached(self) -> dict[str, float]:
        """Mean of each term as a float, for logging (sample terms averaged over records)."""
        out = {k: float(v.detach().mean()) if v.numel() else 0.0 for k, v in self.sample.items()}
        out.update({k: float(v.detach()) for k, v in self.batch.items()})
        return out

    def logged(self, expected_batch_size: float, comm: Any = None) -> dict[str, float]:
        """What ``train/*`` shows for the whole (global) batch of a multi-process step: each
        sample term's mean over all ranks' records, the batch terms (already global), and
        ``loss`` = Σ_all ℓ_i / B + Σ D_k — the same numbers one process would log. ``comm``:
        the run's collectives (one process: None)."""
        names = sorted(self.sample)
        per_record = self.per_record()
        values = list(self.sample.values()) + list(self.batch.values())
        device = values[0].device if values else torch.device("cpu")
        n = 0 if per_record is None else per_record.numel()
        local = [self.sample[k].detach().sum() for k in names]
        local += [per_record.detach().sum() if per_record is not None else torch.zeros(()),
                  torch.tensor(float(n))]
        sums = torch.stack([t.to(device=device, dtype=torch.float64) for t in local])
        if comm is not None and comm.distributed:  # NCCL: the tensors' own device
            sums = comm.all_reduce({"sums": sums})["sums"]
        count = max(float(sums[-1]), 1.0)
        out = {k: float(sums[i]) / count for i, k in enumerate(names)}
        out.update({k: float(v.detach()) for k, v in self.batch.items()})
        batch = self.batch_total()
        out["loss"] = float(sums[-2]) / max(float(expected_batch_size), 1.0) + (
            0.0 if batch is None else float(batch.detach()))
        return out


def loss_terms_of(module: nn.Module, batch: Any) -> LossTerms:
    """Call ``module.loss_terms(batch)`` with a clear error when the contract is not met."""
    fn = getattr(module, "loss_terms", None)
    if not callable(fn):
        raise TypeError(
            f"{type(module).__name__} has no loss_terms(batch) method. A DP mechanism needs to "
            "know which loss terms are per record and which read the whole batch: implement "
            "loss_terms(batch) -> lit_dpvae.privacy.LossTerms (see lit_dpvae.models.base)."
        )
    terms = fn(batch)
    if not isinstance(terms, LossTerms):
        raise TypeError(
            f"{type(module).__name__}.loss_terms returned {type(terms).__name__}; it must return "
            "lit_dpvae.privacy.LossTerms(sample={...}, batch={...})"
        )
    return terms


#: Model classes whose ``batch_terms`` the mechanisms may use (exact types, not subclasses):
#: those whose ``batch_terms`` computes ``loss_terms``' batch-wise and pairwise terms by the
#: same code, so no state or draw can differ between the two (``register_batch_terms``).
_TRUSTED_BATCH_TERMS: set[type] = set()


def register_batch_terms(cls: type) -> type:
    """Let the mechanisms call ``cls.batch_terms`` for the full-batch forward of the batch and
    pairwise parts (a class decorator). Only for a class whose ``batch_terms`` is, by
    construction, ``loss_terms``' batch part (the same functions, the same draws in the same
    order, no state shared with the rest of ``loss_terms``): that cannot be checked from
    outside (review of 2026-12-04: state handed from ``batch_terms`` to ``loss_terms``, or
    read from the previous forward, passed every probe and released up to 4.9× a part's
    bound). The library registers its own pairings; a subclass is not covered (register it
    too only if it keeps that property). The probe still verifies each registered model
    (``lit_dpvae.privacy.probe.verify_batch_terms``)."""
    _TRUSTED_BATCH_TERMS.add(cls)
    _CLASS_SNAPSHOTS[cls] = _class_methods(cls)
    return cls


#: The methods (along the MRO) of each registered class when it was registered: a class-level
#: monkeypatch of one (``InfoVAE.encode = ...``, or on ``BaseVAE``) makes the class untrusted
#: (review: a patched encode/decode pair that saw batch_terms' call pattern released 4.6C).
_CLASS_SNAPSHOTS: dict[type, dict[tuple[str, str], int]] = {}


def _class_methods(cls: type) -> dict[tuple[str, str], int]:
    """``(class, name) -> id`` of every callable or descriptor in the class dictionaries along
    the MRO (raw entries: a descriptor may build a new object on each access)."""
    return {(klass.__qualname__, name): id(value) for klass in cls.__mro__
            for name, value in vars(klass).items()
            if callable(value) or hasattr(value, "__get__")}


#: Where the types of a trusted model's submodules may come from: torch's own layers and the
#: library's (an injected module of another origin could see that ``batch_terms`` encodes
#: without decoding and act on it: 4.6C and 2.2× 8·C_p released in review, 2026-12-04).
_TRUSTED_MODULE_ORIGINS = ("torch.nn.", "lit_dpvae.")


def _plain(module: nn.Module) -> bool:
    """No instance-level method, no hook but the library's own capture hooks."""
    shadowed = {name for name, value in vars(module).items()
                if callable(value) and not isinstance(value, nn.Module)
                and callable(getattr(type(module), name, None))}
    hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values(),
             *module._backward_hooks.values(), *module._backward_pre_hooks.values()]
    return not shadowed and all(getattr(h, "_lit_dpvae_capture", False) for h in hooks)


def has_trusted_batch_terms(module: nn.Module) -> bool:
    """May the mechanisms call ``module.batch_terms``? Its exact class is registered
    (``register_batch_terms``), every submodule is one of torch's or the library's own layer
    types, and neither the module nor a submodule has an instance-level method or a hook
    (the library's own capture hooks aside), nor is a global module hook set: then
    ``batch_terms`` runs exactly the code ``loss_terms`` runs for its batch part; and no
    method of the class or its bases was replaced since it was registered. Not covered: a
    module type whose ``__module__`` is forged to torch's or the library's, and class-level
    patches of torch's or the library's layer types (docs/privacy.md §1 (e))."""
    if type(module) not in _TRUSTED_BATCH_TERMS or not callable(getattr(module, "batch_terms",
                                                                          None)):
        return False
    if _class_methods(type(module)) != _CLASS_SNAPSHOTS.get(type(module)):
        return False  # a method of the class (or of a base class) was replaced since
    global_hooks = [*nn.modules.module._global_forward_hooks.values(),
                    *nn.modules.module._global_forward_pre_hooks.values(),
                    *nn.modules.module._global_backward_hooks.values()]
    if not all(getattr(h, "_lit_dpvae_capture", False) for h in global_hooks):
        return False
    return all(_plain(sub) and (sub is module
                                or type(sub).__module__.startswith(_TRUSTED_MODULE_ORIGINS))
               for sub in module.modules())


def batch_terms_of(module: nn.Module, batch: Any) -> LossTerms:
    """The batch-wise (and pairwise) terms of ``batch`` for a mechanism's full-batch forward:
    ``module.batch_terms(batch)`` where the model's class is registered
    (``register_batch_terms``), else ``loss_terms(batch)``.

    ``batch_terms`` is a speed-up (a VAE's divergence reads the codes only, so its full-batch
    forward can skip the decoder): it must return exactly ``loss_terms``' batch and pairwise
    terms under the same random draws, with no sample-wise terms (the record blocks compute
    those). The mechanisms call it only once the record probe verified that as well
    (``lit_dpvae.privacy.probe.verify_batch_terms``, docs/privacy.md §1 (e))."""
    if not has_trusted_batch_terms(module):
        return loss_terms_of(module, batch)
    terms = module.batch_terms(batch)
    if not isinstance(terms, LossTerms):
        raise TypeError(
            f"{type(module).__name__}.batch_terms returned {type(terms).__name__}; it must return "
            "lit_dpvae.privacy.LossTerms(batch={...}, pairwise={...})")
    if terms.sample:
        raise LossTermsError(
            f"{type(module).__name__}.batch_terms returned sample-wise terms "
            f"{sorted(terms.sample)}: it returns only the batch-wise (and pairwise) terms; the "
            "sample-wise ones come from loss_terms")
    return terms


def batch_size_of(batch: Any) -> int:
    """Number of records in a batch: the leading dimension of its first tensor."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0])
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            if isinstance(item, Tensor):
                return int(item.shape[0])
    raise TypeError(
        f"cannot tell the number of records in a batch of type {type(batch).__name__}: "
        "a batch must be a tensor or a tuple/list/dict whose first tensor is batch-first"
    )

"""``mechanism="auto"`` (the strategy's default): the mechanism that fits the model's loss terms,
chosen from what the model declares, before any record is read (docs/privacy.md §8.5)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from lit_dpvae.privacy.collectives import LOCAL, Collectives
from lit_dpvae.privacy.mechanisms.base import Mechanism, Stats, parameter_prefixes
from lit_dpvae.privacy.mechanisms.registry import build_mechanism, register_mechanism


def declared_compositions(module: nn.Module) -> dict[str, str] | None:
    """``{batch-wise term name: composition}`` the module declares through
    ``batch_term_compositions()`` ("pairwise" or "batch-wise"; ``{}``: sample-wise terms only),
    or None when it declares nothing."""
    declare = getattr(module, "batch_term_compositions", None)
    if not callable(declare):
        return None
    kinds = dict(declare())
    bad = {k: v for k, v in kinds.items() if v not in ("pairwise", "batch-wise")}
    if bad:
        raise ValueError(f"{type(module).__name__}.batch_term_compositions() gave {bad}: each "
                         "batch-wise term is 'pairwise' or 'batch-wise'")
    return kinds


def choose(module: nn.Module) -> tuple[str, dict[str, Any], str]:
    """``(mechanism name, default settings, why)`` for ``module``: DP-SGD (term-wise with
    ``sample_share=1``) without batch-wise terms, ``"pairwise"`` when every batch-wise term is
    pairwise-decomposable, ``"termwise"`` otherwise or when the module declares nothing."""
    kinds = declared_compositions(module)
    if kinds is None:
        return "termwise", {}, ("the model does not declare batch_term_compositions(), so "
                                "term-wise DP-SGD (it privatises any batch-wise term)")
    if not kinds:
        return "termwise", {"sample_share": 1.0}, "no batch-wise term: DP-SGD"
    if all(v == "pairwise" for v in kinds.values()):
        return "pairwise", {"num_pairwise_terms": len(kinds)}, (
            f"every batch-wise term ({', '.join(sorted(kinds))}) is pairwise-decomposable")
    opaque = sorted(k for k, v in kinds.items() if v != "pairwise")
    return "termwise", {}, f"batch-wise terms {opaque} are not pairwise-decomposable"


@register_mechanism("auto")
class AutoMechanism(Mechanism):
    """A placeholder the strategy replaces by ``resolve(module)`` when it connects the model:

    * no batch-wise term (VanillaVAE, λ = 0): term-wise with ``sample_share=1``, i.e. DP-SGD;
    * every batch-wise term pairwise-decomposable (InfoVAE, ClusterVAE's MMD, SparseVAE's
      ``dim_mmd``; SparseVAE's default Hoyer term is sample-wise, so it takes the first case):
      ``PairwiseDPSGD`` with its defaults (C_p = C/16, shares proportional to sensitivity);
    * otherwise (an opaque divergence such as ``AggregateKL``): ``TermwiseDPSGD`` with its
      defaults (C_b = C/(2B), γ = 1/2).

    With a batch-wise term, its parts cover only the parameters the model declares its
    gradient can reach (``batch_term_parameters()``: the encoder, not the decoder), unless
    ``batch_params`` is given.

    The choice reads only the model's declared structure (public), never a record. Settings
    (``max_grad_norm``, ...) are passed on to the chosen mechanism; one it does not take is
    ignored with a warning.

    Args:
        max_grad_norm: C, the per-record clipping norm of the sample-wise gradient (sensitivity C).
        pair_max_grad_norm: C_p of ``PairwiseDPSGD`` (None: C/16).
        batch_max_grad_norm: C_b of the batch part (None: the chosen mechanism's default).
        sample_share: γ_s (None: the chosen mechanism's default).
        pairwise_share: γ_p of ``PairwiseDPSGD`` (None: its default).
        batch_params: the parameter subset (name prefixes) the batch-wise parts are computed,
            clipped and noised on (None: the model's ``batch_term_parameters()`` if it has
            one — every module but the decoder for the shipped pairings — else all).
        noise_multiplier: σ_eff; 0 until the strategy's budget calibrates it (leave it unset).
        backend: per-record clipping backend: ``"ghost"`` (norms without per-record gradients
            where possible), ``"hooks"`` or ``"functorch"``.
    """

    def __init__(
        self,
        *,
        max_grad_norm: float = 1.0,
        pair_max_grad_norm: float | None = None,
        batch_max_grad_norm: float | None = None,
        sample_share: float | None = None,
        pairwise_share: float | None = None,
        batch_params: Sequence[str] | None = None,
        noise_multiplier: float = 0.0,
        backend: str = "ghost",
    ) -> None:
        given = dict(pair_max_grad_norm=pair_max_grad_norm,
                     batch_max_grad_norm=batch_max_grad_norm, sample_share=sample_share,
                     pairwise_share=pairwise_share, batch_params=batch_params)
        #: the settings passed on to the chosen mechanism (None = that mechanism's default)
        self.passed_on: dict[str, Any] = {"max_grad_norm": max_grad_norm, "backend": backend,
                                         **{k: v for k, v in given.items() if v is not None}}
        super().__init__(noise_multiplier=noise_multiplier, backend=backend)

    def resolve(self, module: nn.Module) -> tuple[Mechanism, str]:
        """The mechanism for ``module`` (built with σ = 0) and why it was chosen."""
        name, defaults, why = choose(module)
        declared = getattr(module, "batch_term_parameters", None)
        if name != "termwise" or defaults.get("sample_share") != 1.0:
            prefixes = parameter_prefixes(declared() if callable(declared) else None,
                                          f"{type(module).__name__}.batch_term_parameters()")
            if prefixes is not None:
                defaults = {**defaults, "batch_params": prefixes}
        settings = {**defaults, **self.passed_on}
        if name == "termwise" and defaults.get("sample_share") == 1.0:
            settings = {k: v for k, v in settings.items()
                        if k not in ("batch_max_grad_norm", "batch_params")}
        return build_mechanism(name, **settings), why

    @property
    def sensitivity(self) -> dict[str, float]:
        return {}

    def aggregate(self, module: nn.Module, batch: Any, comm: Collectives = LOCAL) -> Stats:
        raise RuntimeError("mechanism='auto' is resolved when DPStrategy connects the model "
                           "(Trainer.fit); call resolve(module) to use it outside a Trainer")

    def __repr__(self) -> str:
        return f"AutoMechanism(settings={self.passed_on})"

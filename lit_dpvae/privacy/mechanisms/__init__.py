"""Gradient mechanisms, one module each, behind one interface (``base.Mechanism``) and a
registry (``registry``): non-private, naive DP-SGD, term-wise DP-SGD (arXiv 2006.11204) and
term-wise DP-SGD with pairwise-decomposed kernel divergences. Proofs: docs/privacy.md."""

from lit_dpvae.privacy.mechanisms.auto import AutoMechanism, choose  # noqa: I001
from lit_dpvae.privacy.mechanisms.base import (
    Mechanism,
    Stats,
    check_positive,
    clip_vector,
    effective_noise_multiplier,
    global_norm,
    grads_of,
    truncate_batch,
)
from lit_dpvae.privacy.mechanisms.naive import NaiveDPSGD
from lit_dpvae.privacy.mechanisms.nonprivate import NonPrivate
from lit_dpvae.privacy.mechanisms.pairwise import PairwiseDPSGD
from lit_dpvae.privacy.mechanisms.registry import (
    build_mechanism,
    mechanism_class,
    mechanism_names,
    register_mechanism,
    unregister_mechanism,
)

# Registration order is the order ``mechanism_names()`` lists them in.
from lit_dpvae.privacy.mechanisms.termwise import TermwiseDPSGD  # noqa: I001

__all__ = [
    "AutoMechanism",
    "Mechanism",
    "NaiveDPSGD",
    "NonPrivate",
    "PairwiseDPSGD",
    "Stats",
    "TermwiseDPSGD",
    "build_mechanism",
    "check_positive",
    "choose",
    "clip_vector",
    "effective_noise_multiplier",
    "global_norm",
    "grads_of",
    "mechanism_class",
    "mechanism_names",
    "register_mechanism",
    "truncate_batch",
    "unregister_mechanism",
]

"""Privacy engine: loss-term contract, mechanisms, per-sample gradient backends, accounting and
Poisson sampling. Pure torch + opacus; importing it never imports Lightning."""

from lit_dpvae.privacy.accounting import (
    PrivacyAccountant,
    calibrate_noise,
    check_budget,
    joint_noise_multiplier,
    split_noise_multiplier,
)
from lit_dpvae.privacy.capture import AttributionError
from lit_dpvae.privacy.clipping import BACKENDS
from lit_dpvae.privacy.mechanisms import (
    Mechanism,
    NaiveDPSGD,
    NonPrivate,
    PairwiseDPSGD,
    TermwiseDPSGD,
    clip_vector,
    global_norm,
)
from lit_dpvae.privacy.sampling import (
    EmptySafeCollate,
    PoissonBatchSampler,
    from_opacus_loader,
    is_poisson_loader,
    poisson_dataloader,
)
from lit_dpvae.privacy.terms import (
    LossTerms,
    LossTermsError,
    PairwiseTerm,
    batch_size_of,
    loss_terms_of,
)

__all__ = [
    "BACKENDS",
    "AttributionError",
    "Mechanism",
    "NaiveDPSGD",
    "NonPrivate",
    "PairwiseDPSGD",
    "PairwiseTerm",
    "PrivacyAccountant",
    "TermwiseDPSGD",
    "calibrate_noise",
    "check_budget",
    "clip_vector",
    "global_norm",
    "joint_noise_multiplier",
    "split_noise_multiplier",
    "EmptySafeCollate",
    "LossTerms",
    "LossTermsError",
    "PoissonBatchSampler",
    "batch_size_of",
    "is_poisson_loader",
    "loss_terms_of",
    "from_opacus_loader",
    "poisson_dataloader",
]

"""Privacy engine: loss-term contract, mechanisms, per-sample gradient backends, accounting and
Poisson sampling. Pure torch + opacus; importing it never imports Lightning."""

from lit_dpvae.privacy.sampling import (
    EmptySafeCollate,
    PoissonBatchSampler,
    is_poisson_loader,
    poisson_dataloader,
)
from lit_dpvae.privacy.terms import LossTerms, LossTermsError, batch_size_of, loss_terms_of

__all__ = [
    "EmptySafeCollate",
    "LossTerms",
    "LossTermsError",
    "PoissonBatchSampler",
    "batch_size_of",
    "is_poisson_loader",
    "loss_terms_of",
    "poisson_dataloader",
]

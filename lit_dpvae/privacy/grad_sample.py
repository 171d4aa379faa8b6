"""The per-record gradient engine's public names in one place (compatibility module): layer
capture and layer rules live in ``privacy.capture``, the clipping backends in
``privacy.clipping``."""

from lit_dpvae.privacy.capture import (
    AttributionError,
    Capture,
    LayerCall,
    UnsupportedModuleError,
    capture_layers,
    check_module,
    is_plain_linear,
    named_trainable,
    refuse_parameter_hooks,
    rows_per_record,
    trainable_layers,
)
from lit_dpvae.privacy.clipping import (
    BACKENDS,
    check_finite,
    clip_factors,
    make_clipper,
    per_sample_grads,
    weighted_sum,
)

__all__ = [
    "BACKENDS",
    "AttributionError",
    "Capture",
    "LayerCall",
    "UnsupportedModuleError",
    "capture_layers",
    "check_finite",
    "check_module",
    "clip_factors",
    "is_plain_linear",
    "make_clipper",
    "named_trainable",
    "per_sample_grads",
    "refuse_parameter_hooks",
    "rows_per_record",
    "trainable_layers",
    "weighted_sum",
]

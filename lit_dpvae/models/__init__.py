"""VAE/prior pairings: one LightningModule per file on a shared base (``BaseVAE``)."""

# Importing the strategy installs the checkpoint-loader wrap that carries a DP checkpoint's
# privacy spend into any LightningModule.load_from_checkpoint (docs/privacy.md §4), so that it
# is in place whichever of the Lightning-facing packages is imported first.
from lit_dpvae import checkpoints as _checkpoints  # noqa: E402,F401,I001
from lit_dpvae.models.base import BaseVAE
from lit_dpvae.models.cluster import ClusterVAE
from lit_dpvae.models.info import InfoVAE
from lit_dpvae.models.sparse import SparseVAE
from lit_dpvae.models.vanilla import VanillaVAE

__all__ = ["BaseVAE", "VanillaVAE", "InfoVAE", "SparseVAE", "ClusterVAE"]

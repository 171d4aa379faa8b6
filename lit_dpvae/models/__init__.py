"""VAE/prior pairings: one LightningModule per file on a shared base (``BaseVAE``)."""

from lit_dpvae.models.base import BaseVAE
from lit_dpvae.models.cluster import ClusterVAE
from lit_dpvae.models.info import InfoVAE
from lit_dpvae.models.sparse import SparseVAE
from lit_dpvae.models.vanilla import VanillaVAE

__all__ = ["BaseVAE", "VanillaVAE", "InfoVAE", "SparseVAE", "ClusterVAE"]

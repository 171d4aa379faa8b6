"""Suite-wide settings: one torch thread (the CI machine has 2 cores and pytest, Lightning and
spawned DDP workers share them; two threads per process oversubscribe and run ~10x slower),
W&B disabled."""

from __future__ import annotations

import os
import sys

import torch

os.environ.setdefault("WANDB_MODE", "disabled")
# Lightning raises the thread count to the number of cores at the first fit unless this is set
# (lightning.fabric.utilities.distributed._set_num_threads_if_needed).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_spend_registry():
    """Each test starts with an empty in-process registry of DP-trained weights (the warm-start
    fingerprints): one test's trained models must not decide another's ε."""
    from lit_dpvae.privacy import provenance

    provenance.SPENT_WEIGHTS.clear()
    yield
    provenance.SPENT_WEIGHTS.clear()


@pytest.fixture(autouse=True)
def _no_open_wandb_run():
    """A W&B run a test left open (a WandbLogger it never finished) would be reused by the next
    test's WandbLogger (Lightning reuses ``wandb.run``): close it after each test."""
    yield
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()

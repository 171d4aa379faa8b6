"""Suite-wide settings: one torch thread (the CI machine has 2 cores and pytest, Lightning and
spawned DDP workers share them; two threads per process oversubscribe and run ~10x slower),
W&B disabled."""

from __future__ import annotations

import os

import torch

os.environ.setdefault("WANDB_MODE", "disabled")
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

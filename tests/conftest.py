"""Suite-wide settings: one torch thread (the CI machine has 2 cores and pytest, Lightning and
spawned DDP workers share them; two threads per process oversubscribe and run ~10x slower),
W&B disabled."""

from __future__ import annotations

import os

import torch

os.environ.setdefault("WANDB_MODE", "disabled")
torch.set_num_threads(1)

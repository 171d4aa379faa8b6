"""The secret randomness of a private run: the Gaussian noise generator and the Poisson sampler's
seed. Both are drawn on rank 0 and broadcast, so every rank adds the identical noise and draws
the identical global batch. A resume draws them afresh (two continuations of one checkpoint
must not share noise), unless ``exact_resume`` replays the checkpoint's (tests only).
docs/privacy.md §7."""

from __future__ import annotations

import secrets
from typing import Any

import torch

from lit_dpvae.privacy.collectives import Collectives


class SecretSeeds:
    """``noise_seed``: a fixed noise seed for a fresh run (None: secret); ``exact_resume``:
    replay a checkpoint's generator state and sampler seed."""

    def __init__(self, noise_seed: int | None = None, exact_resume: bool = False) -> None:
        self.noise_seed, self.exact_resume = noise_seed, bool(exact_resume)
        self.generator: torch.Generator | None = None
        self.sampler_seed: int | None = None

    def sampler_seed_for(self, default: int, restored: dict[str, Any] | None,
                         comm: Collectives) -> int:
        """The sampler seed of this run (fixed at the first train loader)."""
        if self.sampler_seed is None:
            if restored is None:
                seed = default
            elif self.exact_resume and restored.get("sampler_seed") is not None:
                seed = restored["sampler_seed"]
            else:  # a continuation samples with fresh secret randomness
                seed = secrets.randbits(62)
            self.sampler_seed = int(comm.broadcast_object(seed))
        return self.sampler_seed

    def make_generator(self, restored: dict[str, Any] | None, device: torch.device,
                       comm: Collectives) -> torch.Generator:
        """The noise generator of this run, the same on every rank."""
        exact = restored is not None and self.exact_resume
        if restored is None and self.noise_seed is not None:
            seed = self.noise_seed
        elif exact:
            seed = 0  # replaced by the checkpoint's generator state below
        else:  # a fresh run without a seed, or any resume: fresh secret noise entropy
            seed = secrets.randbits(62)
        seed = comm.broadcast_object(seed)
        self.generator = torch.Generator(device=device).manual_seed(int(seed))
        if exact and restored is not None and restored.get("noise_generator") is not None:
            self.generator.set_state(restored["noise_generator"].cpu())
        return self.generator

    def state(self) -> dict[str, Any]:
        return {"noise_generator": None if self.generator is None
                else self.generator.get_state(), "sampler_seed": self.sampler_seed}

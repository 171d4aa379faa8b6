"""Rank-synchronised Poisson sampling."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from lit_dpvae.privacy import PoissonBatchSampler, poisson_dataloader


def test_ranks_partition_the_global_batch_and_take_the_same_steps():
    single = PoissonBatchSampler(1000, 0.02, seed=5)
    ranks = [PoissonBatchSampler(1000, 0.02, seed=5, num_replicas=3, rank=r) for r in range(3)]
    global_batches = list(single)
    local = [list(s) for s in ranks]
    assert all(len(batches) == len(global_batches) == 50 for batches in local)
    for t, batch in enumerate(global_batches):
        union = sorted(i for r in range(3) for i in local[r][t])
        assert union == batch


def test_inclusion_rate_is_q_and_epochs_differ():
    sampler = PoissonBatchSampler(2000, 0.05, seed=1)
    epoch0, epoch1 = list(sampler), list(sampler)
    assert sampler.epoch == 2 and epoch0 != epoch1
    sizes = torch.tensor([len(b) for b in epoch0 + epoch1], dtype=torch.float)
    # 40 steps of Binomial(2000, 0.05): mean 100, std of the mean ≈ 9.7/sqrt(40) ≈ 1.5.
    assert abs(float(sizes.mean()) - 100) < 6


def test_state_dict_resumes_the_epoch_and_default_seed_is_secret_and_random():
    a = PoissonBatchSampler(100, 0.1, seed=2)
    list(a)
    b = PoissonBatchSampler(100, 0.1, seed=99)
    b.load_state_dict(a.state_dict())
    assert list(a) == list(b)
    assert PoissonBatchSampler(100, 0.1).seed != PoissonBatchSampler(100, 0.1).seed


def test_loader_yields_empty_batches_with_the_right_shapes():
    data = TensorDataset(torch.randn(30, 1, 4, 4), torch.arange(30))
    loader = poisson_dataloader(data, 0.01, seed=0)
    batches = list(loader)
    empty = [b for b in batches if len(b[0]) == 0]
    assert empty, "rate 0.01 over 30 records should give empty batches"
    x, y = empty[0]
    assert x.shape == (0, 1, 4, 4) and x.dtype == torch.float32 and y.dtype == torch.int64

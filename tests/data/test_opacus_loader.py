"""An Opacus ``DPDataLoader`` is accepted: the strategy draws its batches with the
rank-synchronised Poisson sampler at the same q and steps per epoch (secret seed, resumable),
instead of refusing it as "not Poisson"."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from opacus.data_loader import DPDataLoader
from torch.utils.data import DataLoader, TensorDataset

from lit_dpvae.privacy import PoissonBatchSampler, from_opacus_loader, is_poisson_loader


def test_an_opacus_loader_becomes_an_equivalent_poisson_loader():
    data = TensorDataset(torch.rand(200, 6), torch.zeros(200, dtype=torch.int64))
    loader = DPDataLoader.from_data_loader(DataLoader(data, batch_size=16))
    converted = from_opacus_loader(loader, num_replicas=2, rank=1)
    sampler = converted.batch_sampler
    assert isinstance(sampler, PoissonBatchSampler) and is_poisson_loader(converted)
    assert sampler.sample_rate == loader.sample_rate == 1 / 13  # Opacus: 1 / len(loader)
    assert len(sampler) == len(loader.batch_sampler) and (sampler.num_replicas, sampler.rank) \
        == (2, 1)
    assert converted.dataset is data and from_opacus_loader(DataLoader(data)) is None
    sampler.seed = 5  # an empty batch still has the records' trailing shapes
    sampler.sample_rate = 1e-9
    x, y = next(iter(converted))
    assert x.shape == (0, 6) and y.shape == (0,)


def test_a_private_fit_accepts_an_opacus_dp_data_loader(tmp_path):
    from lit_dpvae.models import VanillaVAE
    from lit_dpvae.strategy import DPStrategy

    data = TensorDataset(torch.rand(300, 6), torch.zeros(300, dtype=torch.int64))
    loader = DPDataLoader.from_data_loader(DataLoader(data, batch_size=30))
    model = VanillaVAE(data_shape=(6,), latent_dim=2, hidden=(8,))
    strategy = DPStrategy(target_epsilon=2.0, sample_share=1.0, noise_seed=4)
    pl.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=5, logger=False,
               enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, default_root_dir=tmp_path).fit(model, loader)
    report = strategy.privacy_report()
    assert strategy.accountant.steps == 5 and report.sample_rate == 1 / 10
    assert 0 < strategy.epsilon() <= 2.0 * (1 + 1e-6)


def test_empty_batches_are_zero_length_whatever_the_opacus_collate():
    """A plain DataLoader over Opacus' sampler (default collate) and a DPDataLoader with
    rand_on_empty=True (a random stand-in record) both give zero-length empty batches."""
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    data = TensorDataset(torch.rand(50, 3), torch.zeros(50, dtype=torch.int64))
    plain = DataLoader(data, batch_sampler=UniformWithReplacementSampler(num_samples=50,
                                                                         sample_rate=0.1))
    stand_in = DPDataLoader(data, sample_rate=0.1, rand_on_empty=True)
    for loader in (plain, stand_in):
        converted = from_opacus_loader(loader)
        converted.batch_sampler.sample_rate = 1e-12
        x, y = next(iter(converted))
        assert x.shape == (0, 3) and y.shape == (0,)

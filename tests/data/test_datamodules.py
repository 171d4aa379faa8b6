"""The shared base: Poisson train loader (empty batches, rank sharding), deterministic val/test
loaders, load-time checks of every split, configuration errors, Lightning integration."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from data_helpers import ArrayDataModule
from torch.utils.data import SequentialSampler

from lit_dpvae.data import DataError, DigitsDataModule, check_split
from lit_dpvae.privacy import is_poisson_loader


def _ids(dm, batch) -> list[int]:
    """Record indices (in the full pool) of a batch of an ``indexed_dm``."""
    n = dm.n_pool
    return [round(v * n) for v in batch[0].flatten().tolist()]


@pytest.fixture
def make_dm(indexed_dm):
    def make(n=200, **kw):
        dm = indexed_dm(n, **kw)
        dm.n_pool = n
        dm.setup("fit")
        return dm

    return make


def test_train_loader_is_poisson_with_q_from_expected_batch_size(make_dm):
    dm = make_dm(200, batch_size=16, val_size=40)
    loader = dm.train_dataloader()
    assert is_poisson_loader(loader)
    assert dm.num_train == 160
    assert dm.sample_rate == pytest.approx(16 / 160)
    assert loader.batch_sampler.sample_rate == pytest.approx(dm.sample_rate)
    assert len(loader) == 10
    sizes = [len(y) for _, y in loader]
    assert len(sizes) == 10 and len(set(sizes)) > 1  # sizes vary: Poisson, not fixed batches


def test_empty_batches_are_yielded_with_the_right_shapes(make_dm):
    dm = make_dm(200, batch_size=1, val_size=100)  # q = 1/100: about a third of steps are empty
    batches = list(dm.train_dataloader())
    assert len(batches) == 100
    empty = [b for b in batches if len(b[1]) == 0]
    assert empty
    x, y = empty[0]
    assert x.shape == (0, 1) and x.dtype == torch.float32
    assert y.shape == (0,) and y.dtype == torch.int64


def _attach(dm, world_size=1, rank=0, epoch=0):
    dm.trainer = SimpleNamespace(world_size=world_size, global_rank=rank, current_epoch=epoch)
    return dm


def test_two_ranks_partition_the_same_global_batch(make_dm):
    loaders = [
        _attach(make_dm(300, batch_size=40, seed=7), 2, rank).train_dataloader() for rank in (0, 1)
    ]
    reference = make_dm(300, batch_size=40, seed=7).train_dataloader()  # single process
    assert [s.batch_sampler.num_replicas for s in loaders] == [2, 2]
    assert [s.batch_sampler.rank for s in loaders] == [0, 1]
    dm = make_dm(300)
    steps = 0
    for b0, b1, whole in zip(*loaders, reference, strict=True):
        ids0, ids1, ids = _ids(dm, b0), _ids(dm, b1), _ids(dm, whole)
        assert not set(ids0) & set(ids1)
        assert sorted(ids0 + ids1) == sorted(ids)
        steps += 1
    assert steps == len(loaders[0]) == len(loaders[1]) == len(reference)


def test_same_seed_same_batches_other_seed_other_batches(make_dm):
    def ids(seed):
        return [_ids(make_dm(), b) for b in make_dm(seed=seed, batch_size=20).train_dataloader()]

    assert ids(3) == ids(3)
    assert ids(3) != ids(4)


def test_epochs_differ_and_resume_starts_at_trainer_epoch(make_dm):
    dm = make_dm(batch_size=20, seed=3)
    loader = dm.train_dataloader()
    epoch0 = [_ids(dm, b) for b in loader]
    epoch1 = [_ids(dm, b) for b in loader]
    assert epoch0 != epoch1
    resumed = _attach(make_dm(batch_size=20, seed=3), epoch=1).train_dataloader()
    assert resumed.batch_sampler.epoch == 1
    assert [_ids(dm, b) for b in resumed] == epoch1


@pytest.mark.parametrize("split", ["val", "test"])
def test_eval_loaders_are_sequential_and_deterministic(make_dm, split):
    dm = make_dm(200, batch_size=16, eval_batch_size=32, val_size=50)
    loader = getattr(dm, f"{split}_dataloader")()
    assert not is_poisson_loader(loader)
    assert isinstance(loader.sampler, SequentialSampler)
    first = [_ids(dm, b) for b in loader]
    assert first == [_ids(dm, b) for b in loader]
    flat = [i for batch in first for i in batch]
    assert flat == sorted(flat)  # the split's records in their original order
    assert len(first[0]) == 32


def test_splits_partition_the_pool_and_depend_on_data_seed_only(make_dm):
    dm = make_dm(200, val_size=0.25)
    train, val = (sorted(_ids(dm, dm.splits[s])) for s in ("train", "val"))
    assert len(val) == 50 and sorted(train + val) == list(range(200))
    same = make_dm(200, val_size=0.25, seed=99)  # sampling seed does not move records
    assert torch.equal(same.splits["val"][0], dm.splits["val"][0])
    other = make_dm(200, val_size=0.25, data_seed=1)
    assert not torch.equal(other.splits["val"][0], dm.splits["val"][0])


def test_limit_train_subsamples_deterministically(make_dm):
    a, b = (make_dm(200, limit_train=30, batch_size=10) for _ in range(2))
    assert a.num_train == 30 and a.sample_rate == pytest.approx(10 / 30)
    assert torch.equal(a.splits["train"][0], b.splits["train"][0])
    assert len(a.splits["val"][0]) == 20  # val is carved before subsampling


@pytest.mark.parametrize(
    ("x", "y", "kw", "message"),
    [
        (torch.full((4, 2), float("nan")), torch.zeros(4, dtype=torch.long), {}, "NaN/Inf"),
        (torch.tensor([[0.1], [float("inf")]]), torch.zeros(2, dtype=torch.long), {}, "NaN/Inf"),
        (torch.tensor([[0.5], [1.5]]), torch.zeros(2, dtype=torch.long), {}, r"out of \[0, 1\]"),
        (torch.tensor([[-0.1], [0.5]]), torch.zeros(2, dtype=torch.long), {}, r"out of \[0, 1\]"),
        (torch.zeros(3, 1), torch.tensor([0, 1, 10]), {}, r"labels out of range \[0, 10\)"),
        (torch.zeros(3, 1), torch.tensor([0, -1, 2]), {}, r"labels out of range"),
        (torch.zeros(3, 1), torch.zeros(2, dtype=torch.long), {}, "count mismatch"),
        (torch.zeros(3, 1), torch.zeros(3), {}, "labels must be integers"),
        (torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), {"shape": (1,)}, "data_shape"),
        (torch.zeros(0, 1), torch.zeros(0, dtype=torch.long), {}, "empty"),
    ],
    ids=["nan", "inf", "above-1", "below-0", "label-high", "label-negative", "count", "float-y",
         "shape", "empty"],
)  # fmt: skip
def test_check_split_names_the_problem(x, y, kw, message):
    shape = kw.get("shape", tuple(x.shape[1:]))
    with pytest.raises(DataError, match=message):
        check_split("train", x, y, data_shape=shape, num_classes=10)


def test_real_valued_data_may_leave_the_unit_interval():
    x, y = check_split("train", torch.tensor([[-3.0], [4.0]]), torch.tensor([0, 1]),
                       data_shape=(1,), num_classes=2, unit_interval=False)  # fmt: skip
    assert x.dtype == torch.float32 and y.dtype == torch.int64


def test_bad_data_fails_in_setup_naming_the_split():
    x = torch.rand(50, 3)
    x_test = x[:10].clone()
    x_test[4, 1] = float("nan")
    y = torch.zeros(50, dtype=torch.long)
    dm = ArrayDataModule(x, y, x_test, y[:10], batch_size=5)
    with pytest.raises(DataError, match="test split: 1 NaN/Inf values in 1 records"):
        dm.setup("fit")


@pytest.mark.parametrize(
    ("kw", "error"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"val_size": 0}, "val_size"),
        ({"val_size": 1.0}, "val_size"),
        ({"limit_train": 0}, "limit_train"),
    ],
)
def test_bad_configuration_is_an_error(indexed_dm, kw, error):
    with pytest.raises(ValueError, match=error):
        indexed_dm(100, **kw)


def test_val_size_too_large_and_batch_larger_than_dataset(indexed_dm):
    with pytest.raises(DataError, match="val_size=100"):
        indexed_dm(100, val_size=100).setup()
    with pytest.raises(ValueError, match="exceeds the 90 training records"):
        _ = indexed_dm(100, val_size=10, batch_size=91).sample_rate


def test_unknown_keys_are_errors():
    with pytest.raises(TypeError, match="bogus"):
        DigitsDataModule(bogus=1)


def test_hyperparameters_include_subclass_and_base_arguments():
    dm = DigitsDataModule(32, test_size=100, limit_train=500, seed=3)
    assert dm.hparams == {
        "batch_size": 32,
        "test_size": 100,
        "limit_train": 500,
        "seed": 3,
        "data_seed": 0,
        "val_size": 0.1,
        "eval_batch_size": None,
        "num_workers": 0,
    }


def test_cli_parser_sees_every_argument():
    jsonargparse = pytest.importorskip("jsonargparse")
    from lit_dpvae.data import FashionMNISTDataModule, PinwheelDataModule

    for cls, own in [
        (DigitsDataModule, {"test_size"}),
        (PinwheelDataModule, {"num_arms", "rate", "test_size"}),
        (FashionMNISTDataModule, {"data_dir"}),
    ]:
        parser = jsonargparse.ArgumentParser()
        parser.add_class_arguments(cls, "data")
        keys = set(vars(parser.get_defaults().data))
        assert own | {"batch_size", "seed", "data_seed", "val_size", "limit_train"} <= keys


def test_fits_under_a_lightning_trainer(tmp_path):
    import lightning.pytorch as pl

    class Tiny(pl.LightningModule):
        training_step_runs_without_dp_only = True

        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(64, 1)
            self.sizes = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            self.sizes.append(len(y))
            return self.layer(x.flatten(1)).sum() / 8 + 0.0 * self.layer.bias.sum()

        def validation_step(self, batch, batch_idx):
            self.log("val/loss", self.layer(batch[0].flatten(1)).mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    dm = DigitsDataModule(batch_size=8, seed=1)
    model = Tiny()
    trainer = pl.Trainer(
        max_steps=5, limit_val_batches=1, use_distributed_sampler=False, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, accelerator="cpu", devices=1,
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    assert len(model.sizes) == 5
    assert is_poisson_loader(trainer.train_dataloader)
    assert trainer.train_dataloader.batch_sampler.num_replicas == 1

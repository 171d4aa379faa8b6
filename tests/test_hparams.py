"""Issue 13, class 7: no record value reaches hparams, the logger config or checkpoint metadata.

A data module (or model) that takes its records in ``__init__`` is trained for two private steps
with a W&B logger and a ModelCheckpoint; every record carries a sentinel value, which must appear
neither in what ``log_hyperparams`` receives nor in the checkpoint (its hyper-parameter dicts, and
the raw bytes of the whole file).
"""

from __future__ import annotations

import array
import dataclasses
import struct
import warnings
from argparse import Namespace
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lit_dpvae.data import VAEDataModule
from lit_dpvae.hparams import (
    MAX_CHARS,
    MAX_DEPTH,
    MAX_LEAVES,
    MAX_NUMBERS,
    data_like,
    scrub_hparams,
)
from lit_dpvae.models import VanillaVAE
from lit_dpvae.strategy import TermwiseDPStrategy

SENTINEL = 0.123456789  # the value of pixel (0, 0) of every record
N_TRAIN, N_TEST = 48, 12


def _records() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(N_TRAIN + N_TEST, 1, 8, 8, generator=gen)
    x[:, 0, 0, 0] = SENTINEL
    return x, torch.arange(N_TRAIN + N_TEST) % 10


def _as_tensor(x: Any) -> Tensor:
    return torch.as_tensor(np.asarray(x), dtype=torch.float32)


class RecordsData(VAEDataModule):
    """A user's data module in the natural style: the records come in through ``__init__``."""

    def __init__(self, records: Any, labels: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.records, self.labels = records, labels

    @property
    def data_shape(self) -> tuple[int, ...]:
        return (1, 8, 8)

    @property
    def num_classes(self) -> int:
        return 10

    def _load(self):
        if isinstance(self.records, TensorDataset):
            x, y = self.records.tensors
        else:
            x, y = _as_tensor(self.records), torch.as_tensor(np.asarray(self.labels)).long()
        return {"train": (x[:N_TRAIN], y[:N_TRAIN]), "test": (x[N_TRAIN:], y[N_TRAIN:])}


class MeansVAE(VanillaVAE):
    """A user's model that takes a tensor (class means of the data) in ``__init__``."""

    def __init__(self, class_means: Tensor, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._class_means = class_means  # not a buffer: it is no part of the state_dict


def _data(kind: str) -> RecordsData:
    x, y = _records()
    records: Any = {"ndarray": x.numpy(), "tensor": x, "list": x.tolist(),
                    "dataset": TensorDataset(x, y)}[kind]
    labels: Any = y.numpy() if kind == "ndarray" else y
    return RecordsData(records, labels, batch_size=8, val_size=8, seed=1)


def _model(with_means: bool) -> VanillaVAE:
    kwargs = dict(data_shape=(1, 8, 8), latent_dim=2, hidden=(16,))
    if with_means:
        return MeansVAE(torch.full((10, 2), SENTINEL), **kwargs)
    return VanillaVAE(**kwargs)


def _sentinel_in(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` holds the sentinel, or anything array-like, anywhere (recursively)."""
    if depth > 20:
        return False
    if isinstance(value, (Tensor, np.ndarray, TensorDataset)):
        return True
    if isinstance(value, float):
        return abs(value - SENTINEL) < 1e-6
    if isinstance(value, str):
        return "0.12345" in value
    if isinstance(value, dict):
        return any(_sentinel_in(k, depth + 1) or _sentinel_in(v, depth + 1)
                   for k, v in value.items())
    if isinstance(value, (list, tuple, set)):
        return any(_sentinel_in(v, depth + 1) for v in value)
    return False


def _sentinel_bytes() -> list[bytes]:
    """The sentinel as a checkpoint stores it: float32 tensor storage, a Python float pickled as
    big-endian double (``tolist()`` of float32 records gives the float32-rounded value), and a
    numpy array's buffer, which pickle protocol 2 (torch.save's) writes as latin-1 text in UTF-8."""
    f32 = struct.pack("<f", SENTINEL)
    rounded = float(np.float32(SENTINEL))
    return [f32, struct.pack(">d", rounded), struct.pack(">d", SENTINEL),
            f32.decode("latin-1").encode("utf-8")]


@pytest.mark.parametrize("kind, with_means", [("ndarray", False), ("tensor", False),
                                              ("dataset", False), ("list", False),
                                              ("tensor", True)])
def test_records_reach_neither_the_logger_config_nor_the_checkpoint(tmp_path, monkeypatch,
                                                                    kind, with_means):
    logged: list[dict] = []
    original = WandbLogger.log_hyperparams

    def spy(self, params, *args, **kwargs):
        logged.append(dict(params))
        return original(self, params, *args, **kwargs)

    monkeypatch.setattr(WandbLogger, "log_hyperparams", spy)
    with pytest.warns(UserWarning, match="can hold record values") as caught:
        data = _data(kind)
        model = _model(with_means)
    messages = " ".join(str(w.message) for w in caught)
    assert "'records'" in messages
    assert ("'class_means'" in messages) == with_means
    assert "0.12345" not in messages  # the warning names the key, never the value

    strategy = TermwiseDPStrategy(noise_multiplier=1.0, max_grad_norm=1.0, sample_share=1.0,
                                  target_delta=1e-3, noise_seed=0)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=2,
                         limit_val_batches=1, logger=WandbLogger(offline=True, save_dir=tmp_path),
                         callbacks=[saver], enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False,
                         default_root_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, data)
    assert strategy.accountant.steps == 2  # the run trained privately

    assert logged, "the trainer logged no hyper-parameters"
    for params in logged:
        assert "records" not in params and "class_means" not in params
        assert not _sentinel_in(params)
        assert params["batch_size"] == 8 and params["hidden"] == (16,)  # the legit ones stay

    ckpt_path = tmp_path / "ckpt" / "last.ckpt"
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    for key in ("hyper_parameters", "datamodule_hyper_parameters"):
        assert key in checkpoint
        assert not _sentinel_in(checkpoint[key]), key
    assert "records" not in checkpoint["datamodule_hyper_parameters"]
    assert "class_means" not in checkpoint["hyper_parameters"]
    raw = ckpt_path.read_bytes()
    for pattern in _sentinel_bytes():
        assert pattern not in raw


def test_the_records_would_leak_without_the_scrub(tmp_path, monkeypatch):
    """The check above is not vacuous: with the scrub disabled (Lightning's behaviour), the records
    are in ``hparams_initial`` (what the loggers receive) and in the checkpoint (its
    hyper-parameters and its bytes)."""
    import lit_dpvae.hparams as hp

    monkeypatch.setattr(hp, "scrub_hparams", lambda obj: [])
    monkeypatch.setattr(hp, "_data_like_init_args", lambda frame, declared=(): {})
    data = _data("tensor")
    assert "records" in data.hparams and "records" in data.hparams_initial
    saved = tmp_path / "leak.ckpt"
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(_model(False), data)
    trainer.save_checkpoint(saved)
    checkpoint = torch.load(saved, map_location="cpu", weights_only=False)
    assert _sentinel_in(checkpoint["datamodule_hyper_parameters"])
    raw = saved.read_bytes()
    assert any(pattern in raw for pattern in _sentinel_bytes())


class _ArrayLike:
    """Stands in for a pandas DataFrame/Series (pandas is not a dependency)."""

    def __array__(self, dtype=None, copy=None):
        return np.zeros(3)


@dataclasses.dataclass
class _Config:
    width: int = 4
    means: Any = None


@pytest.mark.parametrize("value", [
    torch.zeros(3), torch.tensor(0.5), np.zeros((2, 2)), _ArrayLike(),
    TensorDataset(torch.zeros(2)), DataLoader(TensorDataset(torch.zeros(2))), [torch.zeros(1)],
    (1, np.zeros(1)),
    {"a": {"b": torch.zeros(1)}}, [[0.1, 0.2], [0.3, 0.4]], [(1, 2)], list(range(MAX_NUMBERS + 1)),
    [True] * (MAX_NUMBERS + 1), {i: float(i) for i in range(MAX_NUMBERS + 1)}, b"\x00\x01",
    bytearray(4), _Config(means=np.zeros(2)), nn.Linear(2, 2),
], ids=lambda v: type(v).__name__)
def test_data_like_values_are_recognised(value):
    reason = data_like(value)
    assert reason is not None
    assert "0." not in reason  # names the type, never the value


@pytest.mark.parametrize("value", [
    None, 3, 1e-3, np.float64(1e-3), "bernoulli", [400, 200], (1, 28, 28), (32, 64),
    list(range(MAX_NUMBERS)), {"betas": (0.9, 0.999), "name": "adam"}, ["a", "b"], range(1000),
    _Config(), torch.float32,
], ids=lambda v: type(v).__name__)
def test_ordinary_hyper_parameters_are_kept(value):
    assert data_like(value) is None


def test_scrub_hparams_on_a_module_that_does_not_derive_from_our_bases():
    """``scrub_hparams`` (which the strategy calls on any module/data module it trains) cleans
    both ``hparams`` (checkpoints) and ``hparams_initial`` (loggers) and warns once per key."""

    class PlainData(pl.LightningDataModule):
        def __init__(self, x: np.ndarray, batch_size: int = 4, hidden: tuple = (8, 4)) -> None:
            super().__init__()
            self.save_hyperparameters()

    data = PlainData(np.full((5, 2), SENTINEL))
    assert "x" in data.hparams and "x" in data.hparams_initial  # Lightning captured the records
    with pytest.warns(UserWarning, match="'x' is a numpy.ndarray") as caught:
        assert scrub_hparams(data) == ["x"]
    assert len([w for w in caught if "'x'" in str(w.message)]) == 1
    assert dict(data.hparams) == dict(data.hparams_initial) == {"batch_size": 4, "hidden": (8, 4)}
    assert scrub_hparams(data) == [] and scrub_hparams(None) == []


def test_our_bases_scrub_when_a_subclass_saves_its_own_hyper_parameters():
    class SavesAgain(RecordsData):
        def __init__(self, records: Any, extra: Any, **kwargs: Any) -> None:
            super().__init__(records, None, **kwargs)
            self.save_hyperparameters()  # the override passes the caller's frame on

    with pytest.warns(UserWarning, match="can hold record values"):
        data = SavesAgain(np.zeros((4, 1, 8, 8)), extra=[[1.0, 2.0]], batch_size=4)
    assert "records" not in data.hparams and "extra" not in data.hparams
    assert data.hparams["batch_size"] == 4 and "labels" in data.hparams
    assert set(data.hparams) == set(data.hparams_initial)


# --- text, tabular records, structured numpy scalars, buffers, long strings (class 7, review) ---

_SENTENCES = [f"patient {i}: alice smith, 41, HIV positive" for i in range(100)]


@dataclasses.dataclass
class _Row:
    name: str = "alice"
    dx: str = "HIV"


class _FrameLike:
    """Stands in for an object speaking only the dataframe interchange protocol."""

    def __dataframe__(self, nan_as_null=False, allow_copy=True):
        raise NotImplementedError


def _structured_record() -> np.void:
    rec = np.zeros(1, dtype=[("name", "U10"), ("age", "i4")])
    rec[0] = ("carol", 41)
    return rec[0]


def _nested_dict(depth: int) -> dict:
    value: dict = {"leaf": 1}
    for _ in range(depth):
        value = {"k": value}
    return value


@pytest.mark.parametrize("value", [
    _SENTENCES, tuple(_SENTENCES), set(_SENTENCES), frozenset(_SENTENCES),
    ["age"] * (MAX_LEAVES + 1), [None] * (MAX_LEAVES + 1), [1, "a", None] * 11,
    [{"name": "alice", "dx": "HIV"}, {"name": "bob", "dx": "diabetes"}], ({"name": "alice"},),
    [_Row()], [Namespace(name="alice")], [["alice", "HIV"], ["bob", "diabetes"]],
    (("alice", "HIV"),), [frozenset({"alice"})], {"rows": [{"name": "alice"}]},
    {f"k{i}": "v" for i in range(MAX_LEAVES + 1)}, {f"k{i}": None for i in range(MAX_LEAVES + 1)},
    {f"k{i}": {"a": 1, "b": "x"} for i in range(17)}, _Config(means=["s"] * (MAX_LEAVES + 1)),
    Namespace(**{f"a{i}": i for i in range(MAX_LEAVES + 1)}),
    "x" * (MAX_CHARS + 1), ["x" * 3000, "y" * 3000], {"x" * 3000: "y" * 3000},
    _structured_record(), np.rec.array([(1, "a")], dtype=[("x", "i4"), ("y", "U3")])[0],
    np.bytes_(b"alice"), np.datetime64("1983-04-01"), np.timedelta64(3, "D"),
    memoryview(b"alice"), array.array("d", [0.5]), _FrameLike(), _nested_dict(MAX_DEPTH + 2),
], ids=lambda v: type(v).__name__)
def test_records_of_any_type_are_recognised(value):
    reason = data_like(value)
    assert reason is not None
    for secret in ("alice", "HIV", "carol", "41", "1983"):
        assert secret not in reason  # names the type, never the value


@pytest.mark.parametrize("value", [
    [400, 200], (1, 28, 28), (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0), ["age", "income"],
    ["c"] * MAX_LEAVES, [None] * MAX_LEAVES, {f"k{i}": "v" for i in range(MAX_LEAVES)},
    {"name": "adam", "betas": (0.9, 0.999), "eps": None, "amsgrad": False},
    {"optimizer": {"name": "adam", "lr": 1e-3}, "scheduler": None}, {"sample": 0.5, "batch": 0.2},
    "/data/" + "d" * 4000, "x" * MAX_CHARS, ["x" * 2000, "y" * 2000], np.float32(0.5),
    np.int64(3), np.bool_(True), np.str_("bernoulli"), [], {}, (), _nested_dict(MAX_DEPTH - 2),
    Namespace(lr=1e-3, hidden=[400, 200]), [torch.float32, "relu", None],
], ids=lambda v: type(v).__name__)
def test_configuration_values_are_kept(value):
    assert data_like(value) is None


def test_text_and_tabular_records_reach_neither_the_logger_nor_the_checkpoint(tmp_path):
    """The review's reproducer: text records as ``list[str]``, tabular records as dicts with string
    fields and a structured-array row, taken by a data module's ``__init__``, trained privately
    with a logger and checkpointed; legitimate string lists stay."""
    from lightning.pytorch.loggers.logger import Logger

    class Spy(Logger):
        got: dict = {}

        @property
        def name(self):
            return "spy"

        @property
        def version(self):
            return 0

        def log_hyperparams(self, params, *args, **kwargs):
            Spy.got.update(dict(params))

        def log_metrics(self, *args, **kwargs):
            pass

    class TextData(RecordsData):
        def __init__(self, texts: Any, rows: Any, row: Any, columns: Any, **kwargs: Any) -> None:
            x, y = _records()
            super().__init__(x, y, **kwargs)

    with pytest.warns(UserWarning, match="can hold record values") as caught:
        data = TextData(_SENTENCES, [{"name": "alice smith", "dx": "HIV positive"}] * 3,
                        _structured_record(), ["age", "income"], batch_size=8, val_size=8, seed=1)
    messages = " ".join(str(w.message) for w in caught)
    for key in ("'texts'", "'rows'", "'row'", "'records'"):
        assert key in messages
    assert "alice" not in messages and "HIV" not in messages and "carol" not in messages
    strategy = TermwiseDPStrategy(noise_multiplier=1.0, max_grad_norm=1.0, sample_share=1.0,
                                  target_delta=1e-3, noise_seed=0)
    trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=1,
                         limit_val_batches=0, logger=Spy(), enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         use_distributed_sampler=False, default_root_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(_model(False), data)
    saved = tmp_path / "text.ckpt"
    trainer.save_checkpoint(saved)
    checkpoint = torch.load(saved, map_location="cpu", weights_only=False)
    for params in (Spy.got, checkpoint["datamodule_hyper_parameters"]):
        assert not {"texts", "rows", "row", "records"} & set(params)
        assert params["columns"] == ["age", "income"] and params["batch_size"] == 8
    raw = saved.read_bytes()
    for secret in ("alice smith", "HIV positive", "carol"):
        assert secret.encode() not in raw and secret.encode("utf-32-le") not in raw

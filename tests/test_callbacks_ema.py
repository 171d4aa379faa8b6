"""ParamEMA: the exponential moving average of the parameters (post-processing of the iterates)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_dpvae.callbacks import ParamEMA


def hand_ema(iterates: list[torch.Tensor], decay: float) -> torch.Tensor:
    """θ̄_0 = θ_0; θ̄_t = d_t θ̄_{t-1} + (1 − d_t) θ_t with d_t = min(decay, (1 + t)/(10 + t))."""
    avg = iterates[0].double()
    for t, theta in enumerate(iterates[1:], start=1):
        d = min(decay, (1 + t) / (10 + t))
        avg = d * avg + (1 - d) * theta.double()
    return avg


def test_average_equals_the_hand_computed_ema():
    ema = ParamEMA(0.1)
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        for value in (0.0, 1.0, 2.0):
            model.weight.fill_(value)
            ema.update(model)
    ema.apply(model)
    # d = min(0.1, (1+t)/(10+t)) = 0.1: 0 -> 0.9 -> 0.9·0.1 + 0.9·2 = 1.89
    assert torch.allclose(model.weight, torch.full((1, 2), 1.89))

    # the warm-up decay, on random iterates of several parameters
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    ema = ParamEMA(0.99)
    history: list[list[torch.Tensor]] = []
    for _ in range(30):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        history.append([p.detach().clone() for p in net.parameters()])
        ema.update(net)
    assert ema.t == 29
    for i, shadow in enumerate(ema.shadow):
        torch.testing.assert_close(shadow.double(), hand_ema([h[i] for h in history], 0.99))


class _Toy(pl.LightningModule):
    training_step_runs_without_dp_only = True

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return (self.net(x) - y).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _Record(pl.Callback):
    """The parameters after every optimizer step (registered before the EMA)."""

    def __init__(self) -> None:
        self.iterates: list[list[torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.iterates.append([p.detach().clone() for p in pl_module.parameters()])


def _fit(callbacks, max_steps=12, accumulate=1):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 3, generator=g)
    data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)
    model = _Toy()
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks,
                         accumulate_grad_batches=accumulate)
    trainer.fit(model, data)
    return model


def test_trainer_updates_once_per_step_and_apply_restore_averaged():
    record, ema = _Record(), ParamEMA(0.9)
    model = _fit([record, ema])
    assert len(record.iterates) == 12 and ema.t == 11
    last = [p.detach().clone() for p in model.parameters()]
    expected = [hand_ema([it[i] for it in record.iterates], 0.9) for i in range(len(last))]
    for shadow, want in zip(ema.shadow, expected):
        torch.testing.assert_close(shadow.double(), want)
    # the module keeps its last iterate unless asked
    for p, q in zip(model.parameters(), record.iterates[-1]):
        assert torch.equal(p, q)

    ema.apply(model)
    for p, want in zip(model.parameters(), expected):
        torch.testing.assert_close(p.double(), want)
    ema.restore(model)
    for p, q in zip(model.parameters(), last):
        assert torch.equal(p, q)
    with pytest.raises(RuntimeError, match="apply was not called"):
        ema.restore(model)
    with ema.averaged(model):
        torch.testing.assert_close(next(model.parameters()).double(), expected[0])
    for p, q in zip(model.parameters(), last):
        assert torch.equal(p, q)


def test_gradient_accumulation_counts_optimizer_steps_not_batches():
    record, ema = _Record(), ParamEMA(0.9)
    _fit([record, ema], max_steps=5, accumulate=2)
    assert len(record.iterates) == 10  # batches
    assert ema.t == 4  # 5 optimizer steps: the first one starts the average
    steps = record.iterates[1::2]  # the parameters after each optimizer step
    for i, shadow in enumerate(ema.shadow):
        torch.testing.assert_close(shadow.double(), hand_ema([s[i] for s in steps], 0.9))


def test_apply_on_train_end_and_state_dict_round_trip():
    record, ema = _Record(), ParamEMA(0.5, apply_on_train_end=True)
    model = _fit([record, ema], max_steps=4)
    want = hand_ema([it[0] for it in record.iterates], 0.5)
    torch.testing.assert_close(next(model.parameters()).double(), want)

    state = ema.state_dict()
    other = ParamEMA(0.5)
    other.load_state_dict(state)
    assert other.t == ema.t and all(torch.equal(a, b) for a, b in zip(other.shadow, ema.shadow))


def test_refusals():
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="decay"):
            ParamEMA(bad)
    ema = ParamEMA(0.5)
    model = nn.Linear(2, 2)
    ema.apply(model)  # nothing trained yet: a no-op
    ema.update(model)
    with pytest.raises(RuntimeError, match="parameters"):
        ema.apply(nn.Linear(2, 2, bias=False))


def test_a_resumed_run_continues_the_same_average(tmp_path):
    def fit(max_steps, callbacks, ckpt=None):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(32, 3, generator=g)
        data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)
        trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=callbacks)
        trainer.fit(_Toy(), data, ckpt_path=ckpt)
        return trainer

    before, after = _Record(), _Record()
    fit(4, [before, ParamEMA(0.9)]).save_checkpoint(tmp_path / "half.ckpt")
    resumed = ParamEMA(0.9)  # its state comes from the checkpoint
    fit(8, [after, resumed], ckpt=str(tmp_path / "half.ckpt"))
    iterates = before.iterates + after.iterates
    assert len(iterates) == 8 and resumed.t == 7
    for i, shadow in enumerate(resumed.shadow):
        torch.testing.assert_close(shadow.double(), hand_ema([it[i] for it in iterates], 0.9))

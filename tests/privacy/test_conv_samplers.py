"""The project's Conv2d per-record gradients (lit_dpvae/privacy/conv.py): every method equals a
one-record-at-a-time autograd oracle on strided, dilated, padded, rectangular and bias-free
layers; the choice between them depends on the layer and shapes only (never on values or on the
number of records); and a clipped release through a conv model stays within C per record
whichever method is forced (neighbouring batches, adversarial images)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_dpvae.privacy import TermwiseDPSGD
from lit_dpvae.privacy import conv as conv_samplers
from lit_dpvae.privacy.terms import LossTerms

LAYERS = [
    dict(in_channels=1, out_channels=3, kernel_size=3, padding=1),
    dict(in_channels=3, out_channels=4, kernel_size=(3, 2), stride=(2, 1), padding=(1, 0)),
    dict(in_channels=2, out_channels=5, kernel_size=3, stride=2, padding=2, dilation=2,
         bias=False),
    dict(in_channels=4, out_channels=1, kernel_size=1),
    dict(in_channels=3, out_channels=2, kernel_size=4, stride=3),
    dict(in_channels=2, out_channels=3, kernel_size=3, padding=1, dilation=(2, 1)),
]


def _oracle(layer: nn.Conv2d, x: torch.Tensor, g: torch.Tensor) -> dict:
    """∂⟨layer(x_i), g_i⟩/∂θ for each record alone."""
    params = [p for p in (layer.weight, layer.bias) if p is not None]
    rows = [torch.autograd.grad((layer(x[i:i + 1]) * g[i:i + 1]).sum(), params)
            for i in range(x.shape[0])]
    return {p: torch.stack([r[k] for r in rows]) for k, p in enumerate(params)}


@pytest.mark.parametrize("settings", LAYERS)
@pytest.mark.parametrize("method", sorted(conv_samplers.METHODS))
def test_every_method_equals_the_per_record_oracle(settings, method, monkeypatch):
    torch.manual_seed(0)
    layer = nn.Conv2d(**settings)
    x = torch.randn(5, settings["in_channels"], 11, 9)
    g = torch.randn_like(layer(x))
    monkeypatch.setattr(conv_samplers, "method_for", lambda *a: method)
    got = conv_samplers.conv2d_grad_sample(layer, [x], g)
    want = _oracle(layer, x, g)
    assert set(got) == set(want)
    for p in want:
        torch.testing.assert_close(got[p], want[p], rtol=1e-4, atol=1e-5)


def test_the_choice_depends_on_shapes_not_on_values_or_the_number_of_records(monkeypatch):
    """Timed once per layer configuration and per-record shapes; later calls with other values
    or another number of records reuse it (a record joining a batch never switches the method,
    so the other records' gradients keep their rounding)."""
    monkeypatch.setattr(conv_samplers, "_chosen", {})
    timed = []
    real = conv_samplers._timed
    monkeypatch.setattr(conv_samplers, "_timed",
                        lambda fn, device: timed.append(1) or real(fn, device))
    layer = nn.Conv2d(2, 3, 3, padding=1)
    for n, scale in [(4, 1.0), (7, 1e30), (1, 0.0)]:
        x = torch.randn(n, 2, 6, 6) * scale
        conv_samplers.conv2d_grad_sample(layer, [x], torch.randn(n, 3, 6, 6))
    assert len(timed) == len(conv_samplers.METHODS)
    assert len(conv_samplers._chosen) == 1
    conv_samplers.conv2d_grad_sample(layer, [torch.randn(3, 2, 8, 6)], torch.randn(3, 3, 8, 6))
    assert len(conv_samplers._chosen) == 2  # another image shape is another configuration


@pytest.mark.parametrize("layer", [
    nn.Conv2d(2, 4, 3, groups=2), nn.Conv2d(2, 3, 3, padding="same"),
    nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect")])
def test_layers_outside_the_methods_keep_opacus_sampler(layer):
    from opacus.grad_sample.conv import compute_conv_grad_sample

    assert not conv_samplers.covered(layer)
    x = torch.randn(3, 2, 7, 7)
    g = torch.randn_like(layer(x))
    got = conv_samplers.conv2d_grad_sample(layer, [x], g)
    want = compute_conv_grad_sample(layer, [x], g)
    for p in want:
        assert torch.equal(got[p], want[p])


class _ConvNet(nn.Module):
    """Conv stack ending in one record-wise loss: a stride-2 conv, a 3×3 conv, a one-channel
    conv (each method's favourite case)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(1, 6, 4, stride=2, padding=1), nn.Tanh(),
                                 nn.Conv2d(6, 6, 3, padding=1), nn.Tanh(),
                                 nn.Conv2d(6, 1, 3, padding=1))

    def loss_terms(self, batch):
        x = batch[0]
        return LossTerms(sample={"recon": self.net(x).flatten(1).pow(2).sum(1)}, batch={})


@pytest.mark.parametrize("method", sorted(conv_samplers.METHODS))
def test_neighbouring_batches_move_the_clipped_sum_by_at_most_c(method, monkeypatch):
    """Add one adversarial image (huge, tiny, constant, a copy of another record) to a batch:
    the released sample sum moves by ≤ C, with each method forced for every layer."""
    monkeypatch.setattr(conv_samplers, "method_for", lambda *a: method)
    model = _ConvNet()
    g = torch.Generator().manual_seed(2)
    base = torch.rand(6, 1, 8, 8, generator=g)
    clip = 0.05
    mech = TermwiseDPSGD(max_grad_norm=clip, noise_multiplier=1.0, sample_share=1.0)
    released = mech.aggregate(model, (base,))["sample"]
    for extra in (torch.full((1, 1, 8, 8), 1e18), torch.full((1, 1, 8, 8), 1e-30),
                  torch.ones(1, 1, 8, 8), base[:1].clone()):
        neighbour = mech.aggregate(model, (torch.cat([base, extra]),))["sample"]
        moved = torch.sqrt(sum((neighbour[k].double() - released[k].double()).pow(2).sum()
                               for k in released))
        assert float(moved) <= clip * (1 + 1e-5)
        assert float(moved) > 0 or float(extra.abs().max()) == 0


@pytest.mark.parametrize("rows_per_record", [1, 3])
@pytest.mark.parametrize("block", [1, 10 ** 9])
@pytest.mark.parametrize("method", sorted(conv_samplers.METHODS))
def test_jacobian_rows_equal_one_direction_at_a_time(rows_per_record, block, method,
                                                     monkeypatch):
    """The pairwise Gram's per-record Jacobian rows ``[n, d, P]`` of a conv layer, all ``d``
    directions in one grouped call per block of records (blocks of one record, or one block;
    K rows per record summed), equal the per-sample sampler called once per direction."""
    import lit_dpvae.privacy.clipping as gs
    from lit_dpvae.privacy.capture import LayerCall

    monkeypatch.setattr(conv_samplers, "method_for", lambda *a: method)
    monkeypatch.setattr(gs, "_SAMPLER_BLOCK", block)
    torch.manual_seed(1)
    layer = nn.Conv2d(2, 3, 3, stride=2, padding=1)
    n, d = 4, 5
    x = torch.randn(n * rows_per_record, 2, 7, 6)
    out = layer(x)
    b = torch.randn(d, *out.shape)
    call = LayerCall(layer, [x], out, [x])
    own = [layer.weight, layer.bias]
    got = gs.per_record_jacobian(call, b, n, own)
    for p in own:
        want = torch.stack([_oracle(layer, x, b[k])[p].reshape(n, rows_per_record, -1).sum(1)
                            for k in range(d)], 1)
        torch.testing.assert_close(got[p], want, rtol=1e-4, atol=1e-5)


class _TargetConv(nn.Module):
    """Record-wise ``loss_i = ⟨conv(a_i), t_i⟩``: the backprops are the record's own targets, so
    a target of large values of both signs makes its weight gradient cancel almost exactly (the
    computed gradient is then mostly rounding, which clipping rescales to norm C)."""

    def __init__(self, c_in: int = 8, c_out: int = 8, k: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(c_in, c_out, k, bias=False)

    def loss_terms(self, batch):
        x, t = batch
        return LossTerms(sample={"recon": (self.conv(x) * t).flatten(1).sum(1)}, batch={})


def _cancelling(c_in: int, c_out: int, size: int, out: int) -> tuple:
    half = torch.where(torch.arange(out)[:, None] < out // 2, 1.0, -1.0).expand(out, out)
    g = torch.Generator().manual_seed(4)
    t = 3e5 * half + torch.rand(c_out, out, out, generator=g) * 2 - 1
    return torch.ones(1, c_in, size, size), t[None]


def _distance(a: dict, b: dict) -> float:
    return float(torch.sqrt(sum((a[k].double() - b[k].double()).pow(2).sum() for k in a)))


@pytest.mark.parametrize("method", [*sorted(conv_samplers.METHODS), "timed"])
@pytest.mark.parametrize(("k", "c_in", "c_out"), [(3, 8, 8), (1, 32, 32)])
@pytest.mark.parametrize("copies", [1, 7])
def test_a_cancelling_record_keeps_its_rounding_when_a_record_joins(method, k, c_in, c_out,
                                                                    copies, monkeypatch):
    """One record, or seven duplicates of a record, whose conv gradient cancels (a kernel
    chosen per block size rounded it differently in S and S ∪ {x}, and clipping turned the
    difference into up to 2C per duplicate: 6.0C released, review of 2026-12-04). With blocks
    of one fixed size each record's gradient is bit-identical whatever joins, so the release
    moves by ≤ C."""
    if method != "timed":
        monkeypatch.setattr(conv_samplers, "method_for", lambda *a: method)
    size = 18
    model = _TargetConv(c_in, c_out, k)
    x, t = _cancelling(c_in, c_out, size, size - k + 1)
    base = (x.repeat(copies, 1, 1, 1), t.repeat(copies, 1, 1, 1))
    clip = 1.0
    mech = TermwiseDPSGD(max_grad_norm=clip, noise_multiplier=1.0, sample_share=1.0)
    released = mech.aggregate(model, base)["sample"]
    g = torch.Generator().manual_seed(5)
    extras = [(torch.zeros_like(x), torch.zeros_like(t)),
              (torch.rand(x.shape, generator=g), torch.rand(t.shape, generator=g) * 1e-4)]
    for xa, ta in extras:
        for front in (True, False):
            pair = ((xa, base[0]), (ta, base[1])) if front else ((base[0], xa), (base[1], ta))
            neighbour = mech.aggregate(model, tuple(torch.cat(p) for p in pair))["sample"]
            assert _distance(neighbour, released) <= clip * (1 + 1e-5)


@pytest.mark.parametrize("method", sorted(conv_samplers.METHODS))
def test_one_records_gradient_is_bit_identical_in_every_batch(method, monkeypatch):
    """Record 0's per-sample gradient, computed inside batches of 1 to 70 records (blocks of
    one fixed size, the last padded) at the front, middle or end: the same bits every time."""
    import lit_dpvae.privacy.clipping as gs
    from lit_dpvae.privacy.capture import LayerCall

    monkeypatch.setattr(conv_samplers, "method_for", lambda *a: method)
    layer = nn.Conv2d(4, 5, 3, padding=1)
    g = torch.Generator().manual_seed(6)
    x0, b0 = torch.randn(1, 4, 9, 9, generator=g), torch.randn(1, 5, 9, 9, generator=g) * 1e5
    want = None
    for n in (1, 2, 7, 8, 9, 16, 65, 70):
        for pos in {0, n // 2, n - 1}:
            x = torch.randn(n, 4, 9, 9, generator=g)
            b = torch.randn(n, 5, 9, 9, generator=g)
            x[pos], b[pos] = x0[0], b0[0]
            call = LayerCall(layer, [x], layer(x), [x])
            got = gs.per_sample_grads(call, b, n, functorch=False)[layer.weight][pos]
            if want is None:
                want = got
            assert torch.equal(got, want), (n, pos)


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def _batch_innermost(x: torch.Tensor) -> torch.Tensor:
    return x.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2)


class _LayoutConv(nn.Module):
    def __init__(self, conv: nn.Conv2d, layout) -> None:
        super().__init__()
        self.conv, self.layout = conv, layout

    def loss_terms(self, batch):
        h = self.layout(batch[0])
        return LossTerms(sample={"recon": torch.tanh(self.conv(h)).flatten(1).pow(2).sum(1)},
                         batch={})


@pytest.mark.parametrize("backend", ["ghost", "functorch", "hooks"])
@pytest.mark.parametrize("layout", [_channels_last, _batch_innermost])
@pytest.mark.parametrize("settings", [dict(kernel_size=1), dict(kernel_size=2, stride=2),
                                      dict(kernel_size=3, padding="same"),
                                      dict(kernel_size=3, groups=2)])
def test_inputs_in_any_memory_layout_keep_records_apart(backend, layout, settings):
    """A channels-last or batch-innermost conv input (Opacus' unfold read pixels by assumed
    strides and mixed records: 4.2C released, review of 2026-12-04): every backend gives the
    one-record-at-a-time oracle's clipped sum."""
    from tests.privacy.toys import per_record_oracle

    torch.manual_seed(0)
    model = _LayoutConv(nn.Conv2d(4, 4, **settings), layout)
    x = torch.rand(6, 4, 4, 4, generator=torch.Generator().manual_seed(7))
    got = TermwiseDPSGD(max_grad_norm=0.5, noise_multiplier=1.0, sample_share=1.0,
                        backend=backend).aggregate(model, (x,))["sample"]
    want = per_record_oracle(model, x, 0.5)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)

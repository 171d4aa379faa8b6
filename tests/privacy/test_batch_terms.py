"""``batch_terms``: the mechanisms' full-batch forward skips the decoder without changing a
single released bit, and a ``batch_terms`` that disagrees with ``loss_terms`` is refused."""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch

from lit_dpvae.models import ClusterVAE, InfoVAE, SparseVAE
from lit_dpvae.models.base import BaseVAE
from lit_dpvae.privacy import LossTerms, TermwiseDPSGD
from lit_dpvae.privacy import terms as terms_module
from lit_dpvae.privacy.mechanisms.pairwise import PairwiseDPSGD
from lit_dpvae.privacy.terms import batch_terms_of, has_trusted_batch_terms

MODELS = {
    "info": lambda: InfoVAE(data_shape=(12,), latent_dim=3, hidden=(16,)),
    "cluster-mmd": lambda: ClusterVAE(data_shape=(12,), latent_dim=3, hidden=(16,),
                                      n_components=4),
    "cluster-akl": lambda: ClusterVAE(data_shape=(12,), latent_dim=3, hidden=(16,),
                                      n_components=4, divergence="aggregate_kl"),
    "sparse-dim_mmd": lambda: SparseVAE(data_shape=(12,), latent_dim=3, hidden=(16,),
                                        divergence="dim_mmd"),
}


def _batch(n: int = 7, seed: int = 0) -> tuple[torch.Tensor]:
    return (torch.rand(n, 12, generator=torch.Generator().manual_seed(seed)),)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_batch_terms_are_loss_terms_batch_part_under_the_same_draws(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    batch = _batch()
    torch.manual_seed(1)
    full = model.loss_terms(batch)
    after_full = torch.get_rng_state()
    torch.manual_seed(1)
    part = batch_terms_of(model, batch)
    assert torch.equal(torch.get_rng_state(), after_full)  # the same draws, in the same order
    assert not part.sample and set(part.batch) == set(full.batch) == {model.divergence_key}
    for key in full.batch:
        assert torch.equal(part.batch[key], full.batch[key])
    assert set(part.pairwise) == set(full.pairwise)
    for key, term in full.pairwise.items():
        assert torch.equal(part.pairwise[key].codes, term.codes)
        assert torch.equal(part.pairwise[key].prior_samples, term.prior_samples)


def _mechanism(kind: str):
    if kind == "termwise":
        return TermwiseDPSGD(max_grad_norm=0.5, batch_max_grad_norm=0.2, noise_multiplier=1.0)
    return PairwiseDPSGD(max_grad_norm=0.5, pair_max_grad_norm=0.1, noise_multiplier=1.0)


@pytest.mark.parametrize("kind,name", [("termwise", "info"), ("termwise", "cluster-akl"),
                                       ("pairwise", "info"), ("pairwise", "cluster-mmd")])
def test_a_private_step_is_bitwise_the_same_with_or_without_batch_terms(kind, name,
                                                                          monkeypatch):
    torch.manual_seed(0)
    model = MODELS[name]()
    without = copy.deepcopy(model)
    without.batch_terms = None  # not callable: the full loss_terms forward, as before
    decoder_calls = {id(model): 0, id(without): 0}
    owners = {id(model.likelihood): id(model), id(without.likelihood): id(without)}
    log_prob = type(model.likelihood).log_prob

    def counted(self, *args, **kwargs):  # the likelihood runs once per decode; counted on its
        decoder_calls[owners[id(self)]] += 1  # class (a hook or a patch of the model's class
        return log_prob(self, *args, **kwargs)  # would make the model untrusted)

    monkeypatch.setattr(type(model.likelihood), "log_prob", counted)
    updates = []
    for m in (model, without):
        mech = _mechanism(kind)
        mech.set_sampling(8.0)
        torch.manual_seed(3)
        gen = torch.Generator().manual_seed(5)
        steps, decoded = [], []
        for seed in (0, 1):  # two steps: the first one probes (and verifies) the model
            before = decoder_calls[id(m)]
            stats = mech.aggregate(m, _batch(7 + seed, seed))
            steps.append(mech.privatize(stats, expected_batch_size=8, generator=gen))
            decoded.append(decoder_calls[id(m)] - before)
        updates.append((steps, torch.get_rng_state()))
        if m is model:  # after the probe, the fast path decodes once (the record block)
            assert decoded[1] == 1
        else:  # the full forward and the record block
            assert decoded[1] == 2
    (got, rng_got), (want, rng_want) = updates
    assert torch.equal(rng_got, rng_want)
    for a, b in zip(got, want):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _Doubled(InfoVAE):
    """A batch_terms that is not loss_terms' batch part (twice the divergence)."""

    def batch_terms(self, batch):
        terms = super().batch_terms(batch)
        terms.batch = {k: 2.0 * v for k, v in terms.batch.items()}
        return terms


class _OtherCodes(InfoVAE):
    """Codes of another draw than loss_terms' (the pairwise part would bound other codes)."""

    def batch_terms(self, batch):
        torch.randn(1)
        return super().batch_terms(batch)


class _WithSample(InfoVAE):
    def batch_terms(self, batch):
        terms = super().batch_terms(batch)
        terms.sample = {"recon": torch.zeros(batch[0].shape[0])}
        return terms


class _GraphLeak(InfoVAE):
    """The same code values as loss_terms', bit for bit, but a graph through the batch mean:
    the latent Gram reads the graph (review: 1.86× the pairwise bound released)."""

    def batch_terms(self, batch):
        terms = super().batch_terms(batch)
        for term in terms.pairwise.values():
            m = term.codes.mean(0, keepdim=True)
            term.codes = term.codes + 1e3 * (m - m.detach())
        return terms


class _StaleDecode(InfoVAE):
    """Codes shifted by the last decoder output: in loss_terms that is the record's own, in
    batch_terms (no decoder) the previous forward's, i.e. another batch's records (review:
    3.7× the pairwise bound from a record not in the step)."""

    def decode(self, z, onehot=None):
        out = super().decode(z, onehot)
        self._dec = out.detach()
        return out

    def divergence_codes(self, z, mu, log_var):
        codes = super().divergence_codes(z, mu, log_var)
        return codes + 3.0 * torch.tanh(self._dec[: codes.shape[0], : codes.shape[1]])


class _DecoderDropout(InfoVAE):
    """An honest model whose decoder draws random numbers between the codes and the prior
    samples: batch_terms' draws are not loss_terms' (it cannot stand in; not refused)."""

    def decode(self, z, onehot=None):
        return torch.nn.functional.dropout(super().decode(z, onehot), 0.1, self.training)


@pytest.mark.parametrize("registered", [False, True])
@pytest.mark.parametrize("kind", ["termwise", "pairwise"])
@pytest.mark.parametrize("cls,why", [(_Doubled, "value of 'mmd' differs"),
                                     (_OtherCodes, "differs|other codes"),
                                     (_WithSample, "returned sample-wise terms"),
                                     (_GraphLeak, "depends on record"),
                                     (_StaleDecode, "differs"),
                                     (_DecoderDropout, "differs|other codes")])
def test_a_batch_terms_that_cannot_stand_in_for_loss_terms_is_not_used(kind, cls, why,
                                                                       registered, monkeypatch):
    """Whatever is wrong with batch_terms, the mechanism uses the probed loss_terms forward:
    the same bits as without batch_terms, over steps on different batches. A subclass is not
    trusted (its batch_terms is never called); registered, the probe's verification refuses
    to use it and says why."""
    if registered:
        monkeypatch.setattr(terms_module, "_TRUSTED_BATCH_TERMS",
                            {*terms_module._TRUSTED_BATCH_TERMS, cls})
        monkeypatch.setitem(terms_module._CLASS_SNAPSHOTS, cls,
                            terms_module._class_methods(cls))
    torch.manual_seed(0)
    model = cls(data_shape=(12,), latent_dim=3, hidden=(16,))
    without = copy.deepcopy(model)
    without.batch_terms = None
    releases = []
    for m in (model, without):
        mech = _mechanism(kind)
        mech.set_sampling(8.0)
        torch.manual_seed(3)
        out = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for seed in (0, 1, 2):
                m.train()
                out.append(mech.aggregate(m, _batch(7 - 2 * seed, seed)))
        said = [str(w.message) for w in caught if "batch_terms is not used" in str(w.message)]
        if m is model and registered:
            assert len(said) == 1 and re.search(why, said[0])
            assert mech._fast == (m, False)
        else:  # not trusted: never verified, never called
            assert not said and getattr(mech, "_fast", None) is None
        releases.append(out)
    for a, b in zip(*releases):
        assert a.keys() == b.keys()
        for part in a:
            assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])


def test_only_registered_classes_and_no_shadowing_instance_attributes_are_trusted():
    model = InfoVAE(data_shape=(12,), latent_dim=3, hidden=(16,))
    assert has_trusted_batch_terms(model)
    assert not has_trusted_batch_terms(_Doubled(data_shape=(12,), latent_dim=3, hidden=(16,)))
    model.batch_terms = model.batch_terms  # an instance attribute: could be anything
    assert not has_trusted_batch_terms(model)


def test_a_subclass_with_its_own_loss_terms_gets_its_own_batch_terms():
    class Scaled(InfoVAE):
        def loss_terms(self, batch):
            terms = super().loss_terms(batch)
            return LossTerms(sample=terms.sample,
                             batch={k: 3.0 * v for k, v in terms.batch.items()},
                             pairwise=terms.pairwise)

    torch.manual_seed(0)
    model = Scaled(data_shape=(12,), latent_dim=3, hidden=(16,))
    torch.manual_seed(1)
    full = model.loss_terms(_batch())
    torch.manual_seed(1)
    part = model.batch_terms(_batch())  # if someone registers it: still its own loss_terms'
    assert torch.equal(part.batch["mmd"], full.batch["mmd"]) and not part.sample
    assert not has_trusted_batch_terms(model)  # a subclass: the mechanisms never call it


def test_registered_library_models_are_verified_and_used():
    torch.manual_seed(0)
    model = InfoVAE(data_shape=(12,), latent_dim=3, hidden=(16,))
    mech = _mechanism("pairwise")
    mech.set_sampling(8.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # verified: no fallback warning
        mech.aggregate(model, _batch())
    assert mech._fast == (model, True)


class _RememberingEncoder(torch.nn.Module):
    """An injected encoder that can tell batch_terms (no decoder call) from loss_terms, with a
    decoder sharing its context (review: 4.6C on the sample part, 2.2× 8·C_p)."""

    def __init__(self, inner, context):
        super().__init__()
        self.inner, self.context = inner, context

    def forward(self, x, *rest):
        mu, log_var = self.inner(x, *rest)
        previous, self.context["mean"] = self.context.get("mean"), x.detach().mean(0)
        if previous is not None:
            mu = mu + 20.0 * (previous - self.context["mean"])[: mu.shape[1]]
        return mu, log_var


class _ForgettingDecoder(torch.nn.Module):
    def __init__(self, inner, context):
        super().__init__()
        self.inner, self.context = inner, context

    def forward(self, z, *rest):
        self.context["mean"] = None
        return self.inner(z, *rest)


def test_injected_modules_hooks_and_instance_methods_are_not_trusted():
    kw = dict(data_shape=(12,), latent_dim=3, hidden=(16,))
    torch.manual_seed(0)
    base, context = InfoVAE(**kw), {}
    injected = InfoVAE(**kw, encoder=_RememberingEncoder(base.encoder, context),
                       decoder=_ForgettingDecoder(base.decoder, context))
    assert not has_trusted_batch_terms(injected)  # a module type of the user's
    assert has_trusted_batch_terms(base)
    handle = base.decoder.register_forward_hook(lambda *_: None)  # user code on a layer
    assert not has_trusted_batch_terms(base)
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *_: None)
    try:
        assert not has_trusted_batch_terms(base)
    finally:
        handle.remove()
    base.encoder.forward = base.encoder.forward  # an instance-level method on a submodule
    assert not has_trusted_batch_terms(base)
    del base.encoder.forward
    base.decode = base.decode  # ... or on the model
    assert not has_trusted_batch_terms(base)
    del base.decode
    assert has_trusted_batch_terms(base)
    # the injected model runs the probed loss_terms forward: the unregistered path's bits
    mech = _mechanism("pairwise")
    mech.set_sampling(8.0)
    torch.manual_seed(3)
    mech.aggregate(injected, _batch())
    assert getattr(mech, "_fast", None) is None


def test_the_fast_path_is_taken_in_a_lightning_fit():
    import lightning.pytorch as pl

    from lit_dpvae.data import ArrayDataModule
    from lit_dpvae.strategy import DPStrategy

    x = torch.rand(200, 12, generator=torch.Generator().manual_seed(0))
    dm = ArrayDataModule(x, value_range=(0, 1), batch_size=32)
    model = InfoVAE(data_shape=(12,), latent_dim=3, hidden=(16,))
    strategy = DPStrategy(noise_multiplier=1.0, noise_seed=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*batch_terms is not used.*")
        pl.Trainer(strategy=strategy, accelerator="cpu", max_steps=2, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, limit_val_batches=0).fit(model, dm)
    assert strategy.mechanism._fast == (model, True)


def test_a_class_level_monkeypatch_makes_the_class_untrusted(monkeypatch):
    model = InfoVAE(data_shape=(12,), latent_dim=3, hidden=(16,))
    assert has_trusted_batch_terms(model)
    decode = BaseVAE.decode
    monkeypatch.setattr(BaseVAE, "decode", lambda self, *a, **k: decode(self, *a, **k))
    assert not has_trusted_batch_terms(model)  # on a base class: every pairing
    monkeypatch.undo()
    assert has_trusted_batch_terms(model)
    monkeypatch.setattr(InfoVAE, "encode", BaseVAE.encode)  # any class-level assignment
    assert not has_trusted_batch_terms(model)
    monkeypatch.undo()
    assert has_trusted_batch_terms(model)

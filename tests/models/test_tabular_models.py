"""Every pairing on a table: with the schema's mixed-type likelihood the sample-wise terms stay
per record, and the mechanisms' statistics of neighbouring tables (random, duplicated and
extreme rows) move by at most their sensitivities."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from lit_dpvae.data import Schema
from lit_dpvae.divergences import PairwiseDivergence
from lit_dpvae.likelihoods import Tabular
from lit_dpvae.privacy.mechanisms import AutoMechanism, build_mechanism
from tests.models.conftest import PAIRINGS, model_class
from tests.models.helpers import record_noise

SCHEMA = Schema.coerce({
    "x": {"type": "numeric", "bounds": [-5, 5]},
    "c": {"type": "categorical", "categories": ["a", "b", "c", "d"]},
    "b": {"type": "binary"},
    "n": {"type": "numeric", "bounds": [0, 1000], "integer": True},
})
REL_TOL = 1e-5


def rows(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    frame = pd.DataFrame({
        "x": (torch.rand(n, generator=g) * 10 - 5).tolist(),
        "c": [["a", "b", "c", "d"][int(i)] for i in torch.randint(0, 4, (n,), generator=g)],
        "b": torch.randint(0, 2, (n,), generator=g).tolist(),
        "n": torch.randint(0, 1001, (n,), generator=g).tolist(),
    })
    return SCHEMA.encode(frame)[0]


def make(name: str) -> torch.nn.Module:
    """``name`` a pairing, or ``SparseVAE-means`` / ``SparseVAE-samples`` (its dimension-wise
    MMD on the posterior means / on one sample per record instead of its default Hoyer term)."""
    torch.manual_seed(0)
    extra = {"-means": {"divergence": "dim_mmd"},
             "-samples": {"divergence": "dim_mmd", "reads": "sample"}}.get(
        name[name.find("-"):] if "-" in name else "", {})
    model = model_class(name.split("-")[0])(data_shape=(SCHEMA.width,), latent_dim=3,
                                                      hidden=(16,), schema=SCHEMA, **extra)
    assert isinstance(model.likelihood, Tabular)
    return model


@pytest.mark.parametrize("name", PAIRINGS)
def test_tabular_sample_terms_are_per_record(name, monkeypatch):
    model = make(name)
    monkeypatch.setattr(model, "draw_noise", record_noise)
    x = rows(6, 0)
    terms = model.loss_terms((x,))
    assert terms.validate() == 6
    x2 = x.clone()
    x2[2] = rows(1, 7)[0]
    changed = model.loss_terms((x2,))
    added = model.loss_terms((torch.cat([x, rows(1, 9)]),))
    for key in terms.sample:
        torch.testing.assert_close(changed.sample[key][[0, 1, 3, 4, 5]],
                                   terms.sample[key][[0, 1, 3, 4, 5]])
        torch.testing.assert_close(added.sample[key][:6], terms.sample[key])
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model.loss_terms((xg,)).per_record()[0], xg)
    assert grad[0].abs().sum() > 0 and grad[1:].abs().sum() == 0


def neighbouring_tables(seed: int):
    """(S, S ∪ {x}) with x random, a duplicate, or at the schema's extremes."""
    cases = []
    for trial, n in enumerate((0, 1, 4, 7, 7, 7)):
        s = rows(n, seed + trial)
        if trial == 4 and n:
            x = s[:1].clone()  # a duplicate
        elif trial == 5:
            x = torch.zeros(1, SCHEMA.width)  # every numeric at its lower bound, category a
            x[0, 1], x[0, 6] = 1.0, 1.0
        else:
            x = rows(1, 100 + trial)
        cases.append((s, torch.cat([s[:1], x, s[1:]])))
    return cases


def coupled_diff(mech, model, s, s_plus) -> dict[str, float]:
    """``diff_norms`` under the coupling of docs/privacy.md §1: every record keeps its own
    reparameterisation draw (a function of the record) and the batch-level prior draws are the
    same for S and S ∪ {x} (the global RNG reset before each statistic)."""
    stats = []
    for batch in (s, s_plus):
        torch.manual_seed(3)
        stats.append(mech.aggregate(model, (batch,)))
    a, b = stats
    return {part: float(torch.sqrt(sum(((a[part][k] - b[part][k]) ** 2).sum()
                                       for k in a[part])))
            for part in mech.parts}


@pytest.mark.parametrize("name", [*PAIRINGS, "SparseVAE-means", "SparseVAE-samples"])
def test_neighbouring_tables_move_each_part_by_at_most_its_sensitivity(name, monkeypatch):
    model = make(name)
    monkeypatch.setattr(model, "draw_noise", record_noise)
    mechanisms = [build_mechanism("termwise", max_grad_norm=0.5, batch_max_grad_norm=0.1,
                                  sample_share=0.9)]
    if model.divergence_key is None:
        mechanisms = [build_mechanism("termwise", max_grad_norm=0.5, sample_share=1.0)]
    elif isinstance(model.divergence, PairwiseDivergence):
        mechanisms.append(build_mechanism("pairwise", max_grad_norm=0.5,
                                          pair_max_grad_norm=0.05))
    if model.divergence_key is not None:  # term-wise's default C_b = C/(2B)
        mechanisms.append(build_mechanism("termwise"))
    mechanisms.append(AutoMechanism().resolve(model)[0])  # what a user gets by default
    for mech in mechanisms:
        mech.noise_multiplier = 1.0
        mech.set_sampling(8.0)
        worst = {part: 0.0 for part in mech.parts}
        for s, s_plus in neighbouring_tables(1):
            for part, d in coupled_diff(mech, model, s, s_plus).items():
                assert math.isfinite(d) and d <= mech.sensitivity[part] * (1 + REL_TOL), \
                    (mech.name, part, d)
                worst[part] = max(worst[part], d)
        assert all(w > 0 for w in worst.values()), (mech.name, worst)  # not vacuous

"""The DP VAE side of the Adult benchmark (experiments/adult/vae.py): a short private fit on a few
hundred rows gives a synthetic table over the public domain with the spent ε within budget."""

from __future__ import annotations

import pytest

from experiments.adult.common import COLUMNS, find_shared_dir, load_adult, split
from experiments.adult.vae import adult_schema, synthesize

SHARED = find_shared_dir()


@pytest.mark.skipif(SHARED is None, reason="shared/data/adult/adult.csv not found")
def test_a_short_private_fit_gives_a_synthetic_table_over_the_domain():
    df, domain = load_adult(SHARED)
    train, _ = split(df)
    schema = adult_schema(domain)
    assert schema.width == sum(k if k > 2 else 1 for k in domain.values())  # binary: 1 entry
    synthetic, info = synthesize(train.head(600), domain, 3.0, 1e-5, seed=0, epochs=2,
                                 batch_size=100, hidden=(32,), num=200)
    assert list(synthetic.columns) == COLUMNS and len(synthetic) == 200
    for column, size in domain.items():
        assert synthetic[column].between(0, size - 1).all()
    assert info["steps"] == 12 and 0 < info["epsilon"] <= 3.0 * (1 + 1e-6)

"""TabularDataModule and Schema: a table with a public schema (bounds and categories declared,
never measured), encoded for the VAE and decoded back with the original names and categories;
the mixed-type likelihood is sample-wise and draws valid rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from lit_dpvae.data import DataError, Schema, TabularDataModule, read_table
from lit_dpvae.likelihoods import Tabular

SCHEMA = {
    "age": {"type": "numeric", "bounds": [18, 90], "integer": True},
    "score": {"type": "numeric", "bounds": [-1.0, 1.0]},
    "city": {"type": "categorical", "categories": ["Oslo", "Lima", "Pune"]},
    "smoker": {"type": "binary", "categories": ["no", "yes"]},
    "grade": {"type": "categorical", "categories": [1, 2, 3, 4]},
}


def table(n=300, seed=0) -> pd.DataFrame:
    g = np.random.default_rng(seed)
    return pd.DataFrame({
        "age": g.integers(18, 91, n),
        "score": g.uniform(-1, 1, n),
        "city": g.choice(["Oslo", "Lima", "Pune"], n, p=[0.6, 0.3, 0.1]),
        "smoker": g.choice(["no", "yes"], n),
        "grade": g.integers(1, 5, n),
        "id": np.arange(n),  # not in the schema: dropped
    })


def test_schema_encodes_into_unit_records_and_decodes_back_exactly():
    schema = Schema.coerce(SCHEMA)
    df = table()
    x, y = schema.encode(df)
    assert y is None and x.shape == (300, 1 + 1 + 3 + 1 + 4) == (300, schema.width)
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    assert torch.equal(x[:, 2:5].sum(1), torch.ones(300))  # one-hot city
    back = schema.decode(x)
    assert list(back.columns) == list(SCHEMA)
    assert (back["age"] == df["age"]).all() and np.allclose(back["score"], df["score"])
    for col in ("city", "smoker", "grade"):
        assert (back[col].to_numpy() == df[col].to_numpy()).all()
    assert back["grade"].dtype == np.int64  # integer categories stay integers
    assert Schema.coerce(schema.to_dict()) == schema and "3 columns" not in repr(schema)


def test_bad_values_are_refused_by_count_never_by_value():
    schema = Schema.coerce(SCHEMA)
    df = table()
    df.loc[5, "age"] = 123
    with pytest.raises(DataError, match="'age': 1 values .* outside the declared") as info:
        schema.encode(df)
    assert "123" not in str(info.value)
    df = table()
    df.loc[[1, 2], "city"] = "Atlantis-77"
    with pytest.raises(DataError, match="'city': 2 values are missing or not among") as info:
        schema.encode(df)
    assert "Atlantis" not in str(info.value)
    df = table()
    df.loc[3, "score"] = np.nan
    with pytest.raises(DataError, match="'score': 1 values are missing"):
        schema.encode(df)
    with pytest.raises(DataError, match="lacks 1 of the schema.s columns"):
        schema.encode(table().drop(columns=["smoker"]))


@pytest.mark.parametrize("spec, match", [
    ({"a": {"type": "numeric"}}, "public bounds"),
    ({"a": {"type": "numeric", "bounds": [1, 1]}}, "low < high"),
    ({"a": {"type": "categorical"}}, "list of categories"),
    ({"a": {"type": "binary", "categories": [1, 2, 3]}}, "exactly 2"),
    ({"a": {"type": "text"}}, "type must be one of"),
    ({"a": {"type": "numeric", "bounds": [0, 1], "max": 3}}, "unknown keys"),
])
def test_schema_declaration_errors_name_the_fix(spec, match):
    with pytest.raises(DataError, match=match):
        Schema.coerce(spec)


def test_schema_files_and_label_column(tmp_path):
    import yaml

    (tmp_path / "schema.yaml").write_text(yaml.safe_dump({"columns": SCHEMA, "label": "city"}))
    schema = Schema.coerce(tmp_path / "schema.yaml")
    assert schema.label == "city" and schema.num_classes == 3 and schema.width == 7
    x, y = schema.encode(table())
    assert x.shape == (300, 7) and set(y.tolist()) == {0, 1, 2}
    assert (schema.decode(x, y)["city"] == table()["city"]).all()
    with pytest.raises(DataError, match="must be categorical or binary"):
        Schema.coerce(SCHEMA, label="score")


def test_tabular_likelihood_is_sample_wise_and_draws_valid_rows():
    schema = Schema.coerce(SCHEMA)
    lik = Tabular(schema, scale=0.1)
    x, _ = schema.encode(table(n=8))
    params = torch.randn(8, schema.width, requires_grad=True)
    lp = lik.log_prob(x, params)
    assert lp.shape == (8,) and torch.isfinite(lp).all()
    # per-record contract: row i's log-likelihood reads only x_i and params_i
    (grad,) = torch.autograd.grad(lp[3], params)
    assert grad[3].abs().sum() > 0 and grad[torch.arange(8) != 3].abs().sum() == 0
    # categorical block: log softmax at the record's category
    logits = params[:, 2:5].detach()
    want = torch.log_softmax(logits, 1)[torch.arange(8), x[:, 2:5].argmax(1)]
    numeric = Tabular(Schema.coerce({"city": SCHEMA["city"]}))
    assert torch.allclose(numeric.log_prob(x[:, 2:5], logits), want)
    torch.manual_seed(0)
    draw = lik.sample(torch.randn(500, schema.width) * 3)
    lik.check_support(draw)  # every draw is a valid encoding
    back = schema.decode(draw)
    assert set(back["city"]) <= {"Oslo", "Lima", "Pune"} and back["age"].between(18, 90).all()
    with pytest.raises(ValueError, match="not valid encodings in their categorical"):
        bad = x.clone()
        bad[0, 2:5] = torch.tensor([1.0, 1.0, 0.0])
        lik.log_prob(bad, params)


def test_draws_follow_the_likelihood_not_its_mean():
    """x ~ p(x | z): a numeric column's draws spread by the likelihood scale around the mean,
    a categorical column's draws follow the softmax (``mean`` would give one value)."""
    schema = Schema.coerce({"v": {"type": "numeric", "bounds": [0, 1]},
                            "c": {"type": "categorical", "categories": ["a", "b"]}})
    lik = Tabular(schema, scale=0.1)
    params = torch.tensor([[0.5, 0.0, float(np.log(3.0))]]).repeat(20000, 1)  # P(b) = 3/4
    torch.manual_seed(1)
    draw = lik.sample(params)
    assert abs(float(draw[:, 0].std()) - 0.1) < 0.005
    assert abs(float(draw[:, 2].mean()) - 0.75) < 0.01
    assert torch.allclose(lik.mean(params)[0], torch.tensor([0.5, 0.25, 0.75]))


def test_tabular_data_module_trains_privately_and_exports_the_schema(tmp_path):
    """A CSV in, a private fit, a CSV out with the schema's names, categories and bounds; the
    table never reaches hparams, the checkpoint or the logger config."""
    import lightning.pytorch as pl

    from lit_dpvae.cli import load_model, sample_main
    from lit_dpvae.models import InfoVAE
    from lit_dpvae.strategy import DPStrategy

    table(n=400).to_csv(tmp_path / "records.csv", index=False)
    dm = TabularDataModule(tmp_path / "records.csv", SCHEMA, batch_size=40)
    assert dm.data_shape == (10,) and dm.num_classes == 1
    model = InfoVAE(data_shape=dm.data_shape, latent_dim=2, hidden=(16,), schema=dm.schema)
    assert isinstance(model.likelihood, Tabular)
    strategy = DPStrategy(target_epsilon=3.0, mechanism="pairwise", noise_seed=0)
    trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=6,
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model, dm)
    assert strategy.accountant.steps == 6 and 0 < strategy.epsilon() <= 3.0 * (1 + 1e-6)
    ckpt = tmp_path / "run.ckpt"
    trainer.save_checkpoint(ckpt)
    assert load_model(ckpt).hparams["schema"] == dm.schema
    out = sample_main(["--ckpt", str(ckpt), "--num", "50", "--out", str(tmp_path / "s.csv")])
    synthetic = read_table(out)
    assert list(synthetic.columns) == list(SCHEMA) and len(synthetic) == 50
    assert set(synthetic["city"]) <= {"Oslo", "Lima", "Pune"}
    assert set(synthetic["smoker"]) <= {"no", "yes"} and set(synthetic["grade"]) <= {1, 2, 3, 4}
    assert synthetic["age"].between(18, 90).all() and synthetic["score"].between(-1, 1).all()
    assert synthetic["age"].dtype == np.int64
    parquet = sample_main(["--ckpt", str(ckpt), "--num", "20", "--out",
                           str(tmp_path / "s.parquet")])
    assert list(read_table(parquet).columns) == list(SCHEMA)


def test_a_dataframe_is_never_a_hyper_parameter():
    dm = TabularDataModule(table(), SCHEMA, label="smoker", batch_size=20)
    dm.setup()
    assert "data" not in dm.hparams and isinstance(dm.hparams["schema"], Schema)
    assert dm.num_classes == 2 and dm.data_shape == (9,)
    assert sum(len(v[0]) for v in dm.splits.values()) == 300


def test_the_cli_fits_a_csv_with_a_schema_file_and_samples_a_csv(tmp_path, monkeypatch, capsys):
    """``lit-dpvae fit --data TabularDataModule ...``: the CLI links the data module's schema to
    the model, trains privately, and ``sample`` writes the table back."""
    import yaml

    from lit_dpvae.cli import main

    monkeypatch.chdir(tmp_path)
    table(n=300).to_csv("records.csv", index=False)
    (tmp_path / "schema.yaml").write_text(yaml.safe_dump(SCHEMA, sort_keys=False))
    main(["fit", "--model", "lit_dpvae.models.VanillaVAE", "--model.latent_dim", "2",
          "--model.hidden", "[16]", "--data", "lit_dpvae.data.TabularDataModule",
          "--data.data", "records.csv", "--data.schema", "schema.yaml",
          "--data.batch_size", "30", "--trainer.max_steps=3",
          "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
          "--trainer.logger.save_dir", "logs",  # a logger merges the two modules' hparams
          "--trainer.enable_progress_bar=false",
          "--trainer.strategy", "lit_dpvae.strategy.DPStrategy",
          "--trainer.strategy.target_epsilon", "3.0",
          "--trainer.strategy.mechanism", "lit_dpvae.privacy.TermwiseDPSGD",
          "--trainer.strategy.mechanism.sample_share", "1.0",
          "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
          "--trainer.callbacks.dirpath", "ckpt", "--trainer.callbacks.save_last=true"])
    assert "lit_dpvae result: epsilon=" in capsys.readouterr().out
    logged = next((tmp_path / "logs").rglob("hparams.yaml")).read_text()
    assert "schema:" in logged and "records.csv" in logged  # public: the schema and the path
    main(["sample", "--ckpt", "ckpt/last.ckpt", "--num", "30", "--out", "synthetic.csv"])
    synthetic = read_table(tmp_path / "synthetic.csv")
    assert list(synthetic.columns) == list(SCHEMA) and len(synthetic) == 30
    assert set(synthetic["city"]) <= {"Oslo", "Lima", "Pune"}


def test_declared_data_arguments_never_reach_hparams_even_when_short(tmp_path):
    """Short label lists and small column dicts are records too: a data module's declared data
    arguments stay out of hparams, checkpoints and logger configs unless they are paths."""
    from lit_dpvae.data import ArrayDataModule
    from lit_dpvae.hparams import scrub_hparams

    labels = [0, 1, 2] * 10
    dm = ArrayDataModule(np.random.rand(30, 4), labels, value_range=(0, 1), num_classes=3)
    assert "y" not in dm.hparams and "x" not in dm.hparams
    assert "y" not in dm.hparams_initial
    small = {"city": ["Oslo", "Lima", "Pune"] * 2}
    tab = TabularDataModule(pd.DataFrame(small), {"city": SCHEMA["city"]}, batch_size=2)
    assert "data" not in tab.hparams
    (tmp_path / "t.csv").write_text("city\nOslo\nLima\nPune\n")
    assert TabularDataModule(tmp_path / "t.csv", {"city": SCHEMA["city"]},
                             batch_size=1).hparams["data"] == tmp_path / "t.csv"
    dm._hparams["y"] = labels  # put back by hand: the strategy's scrub drops it again
    dm._hparams_initial["y"] = labels
    with pytest.warns(UserWarning, match="declared data argument"):
        assert scrub_hparams(dm) == ["y"]
    assert "y" not in dm.hparams and "y" not in dm.hparams_initial


def test_a_table_without_its_header_is_refused_without_echoing_its_first_row(tmp_path):
    (tmp_path / "noheader.csv").write_text("47,HIV+,52311.5\n33,none,1000.0\n")
    schema = {"age": {"type": "numeric", "bounds": [0, 120]},
              "dx": {"type": "categorical", "categories": ["HIV+", "none"]},
              "income": {"type": "numeric", "bounds": [0, 1e6]}}
    dm = TabularDataModule(tmp_path / "noheader.csv", schema, batch_size=1)
    with pytest.raises(DataError, match="header row missing") as info:
        dm.setup()
    assert "47" not in str(info.value) and "52311" not in str(info.value)


def test_bounds_whose_span_overflows_are_refused():
    with pytest.raises(DataError, match="finite span"):
        Schema.coerce({"v": {"type": "numeric", "bounds": [-1e308, 1e308]}})
    tiny = Schema.coerce({"v": {"type": "numeric", "bounds": [0, 1e-30]}})
    x, _ = tiny.encode(pd.DataFrame({"v": [0.0, 5e-31, 1e-30]}))
    assert torch.allclose(x[:, 0], torch.tensor([0.0, 0.5, 1.0]))


def test_the_bernoulli_check_reports_a_count_never_the_records_range():
    from lit_dpvae.likelihoods import Bernoulli

    x = torch.rand(5, 3)
    x[2, 1] = 3.14159
    with pytest.raises(ValueError, match="1 records have values outside") as info:
        Bernoulli().check_support(x)
    assert "3.14" not in str(info.value)


def test_a_conditional_model_on_unlabelled_data_is_refused_before_training(tmp_path):
    import lightning.pytorch as pl

    from lit_dpvae.models import VanillaVAE
    from lit_dpvae.strategy import DPStrategy

    dm = TabularDataModule(table(n=120), SCHEMA, batch_size=12)
    model = VanillaVAE(data_shape=dm.data_shape, latent_dim=2, hidden=(8,), schema=dm.schema,
                       conditional=True, num_classes=2)
    trainer = pl.Trainer(strategy=DPStrategy(target_epsilon=3.0, sample_share=1.0),
                         accelerator="cpu", devices=1, max_steps=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="the data have no labels: pass label="):
        trainer.fit(model, dm)
    with pytest.raises(DataError, match=r"not integers but the schema says integer"):
        frame = table(n=10)
        frame["age"] = frame["age"].astype(float)
        frame.loc[0, "age"] = 40.5
        Schema.coerce(SCHEMA).encode(frame)
    with pytest.raises(DataError, match=r"declared categories \['no', 'yes'\].*quote yes/no"):
        frame = table(n=10)
        frame["smoker"] = True
        Schema.coerce(SCHEMA).encode(frame)

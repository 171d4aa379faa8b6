"""Your own table (CSV, parquet or a DataFrame) as a private data module, with a public schema.

The schema (:class:`lit_dpvae.data.schema.Schema`) declares every column the model sees, with its
public domain: numeric bounds, category lists, and optionally the label column. Nothing about the
domain is measured from the records. Columns of the table that the schema does not name are
dropped. Rows with missing values, values outside the bounds or unknown categories are refused
with counts (never values); clean or drop them first, or declare a category for them.

The model reads the schema from :attr:`TabularDataModule.schema` (``BaseVAE(schema=...)``; the
CLI links it) and then uses the mixed-type likelihood :class:`lit_dpvae.likelihoods.Tabular`;
``python -m lit_dpvae sample --out synthetic.csv`` writes a table with the original column
names and categories.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lit_dpvae.data.base import Split, VAEDataModule, carve
from lit_dpvae.data.checks import DataError
from lit_dpvae.data.schema import Schema, read_table


class TabularDataModule(VAEDataModule):
    """Records from a table, encoded by its public schema and Poisson-sampled for training.

    Args:
        data: a ``.csv``/``.parquet`` path or a pandas ``DataFrame``.
        schema: the public schema: a :class:`Schema`, a ``{column: spec}`` mapping or the path
            of a JSON/YAML file with it (see :mod:`lit_dpvae.data.schema`).
        label: a categorical/binary column to use as the class label ``y`` of conditional
            models (then it is not part of the records); None (default): every column is in
            the records and every label is 0. Overrides the schema's own ``label``.
        test_size: test records carved from the table (count or fraction, default 0.2).
        batch_size: expected batch size B of the Poisson sampling (sample rate q = B/N).
            ``data_seed`` for the split, ...).
        **kwargs: see ``batch_size``.

    A DataFrame is not a hyper-parameter (left out of the logger config and checkpoints); a
    path and the schema (public metadata) are.
    """

    data_arguments = ("data",)

    def __init__(self, data: Any, schema: Any, *, label: str | None = None,
                 test_size: int | float = 0.2, batch_size: int = 64, **kwargs: Any) -> None:
        schema = Schema.coerce(schema, label)  # hparams keep the Schema object
        super().__init__(batch_size, **kwargs)
        for attr in ("_hparams", "_hparams_initial"):  # LightningCLI passes the raw spec
            hp = getattr(self, attr, None)
            if hp is not None and "schema" in hp:
                hp["schema"] = schema  # the same Schema the model gets (merged by loggers)
        self._schema = schema
        self._data = data
        self.test_size = test_size

    @property
    def schema(self) -> Schema:
        """The table's public schema (pass it to the model: ``BaseVAE(schema=dm.schema)``)."""
        return self._schema

    @property
    def data_shape(self) -> tuple[int, ...]:
        return (self._schema.width,)

    @property
    def num_classes(self) -> int:
        return self._schema.num_classes

    def _load(self) -> dict[str, Split]:
        import torch

        frame = read_table(self._data) if isinstance(self._data, (str, Path)) else self._data
        x, y = self._schema.encode(frame)
        if x.shape[0] < 3:
            raise DataError(f"the table has {x.shape[0]} rows: at least 3 are needed")
        if y is None:
            y = torch.zeros(x.shape[0], dtype=torch.int64)
        self._data = self._data if isinstance(self._data, (str, Path)) else None  # free it
        gen = torch.Generator().manual_seed(self.data_seed + 1)
        train, test = carve((x, y), self.test_size, gen, what="test_size")
        return {"train": train, "test": test}

"""A table's public schema: which columns there are, their types and their public domains.

Everything a schema holds is *public*: column names, numeric bounds, category lists and the label
column are declared by the data holder (from a data dictionary, a standard, a questionnaire),
never measured from the private records — a minimum, a maximum or the list of categories that
occur would each leak records. The schema encodes a table into the records the VAE trains on
(numeric columns mapped to [0, 1] by their bounds, categorical columns one-hot, binary columns
0/1) and decodes model output back into a table with the original column names and categories.

Declare it as a mapping ``{name: spec}`` (Python, YAML or a JSON/YAML file), in column order::

    {"age": {"type": "numeric", "bounds": [17, 90], "integer": True},
     "workclass": {"type": "categorical", "categories": ["private", "public", "self"]},
     "smoker": {"type": "binary", "categories": ["no", "yes"]}}

A :class:`Schema` is an ordinary object (neither a container nor a data set), so it stays in a
model's hyper-parameters and checkpoints, where ``sample`` finds it again; its ``repr`` is short.

Pure pandas/numpy/torch; importing it never imports Lightning.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lit_dpvae.data.checks import DataError

KINDS = ("numeric", "categorical", "binary")


class Column:
    """One column: ``kind`` ``"numeric"`` (public ``bounds``, optional ``integer``),
    ``"categorical"`` (public ``categories``, at least 2) or ``"binary"`` (two public
    ``categories``, default ``(0, 1)``)."""

    def __init__(self, name: str, kind: str, *, bounds: Any = None, categories: Any = None,
                 integer: bool = False) -> None:
        if not isinstance(name, str) or not name:
            raise DataError(f"column names must be non-empty strings, got {name!r}")
        if kind not in KINDS:
            raise DataError(f"column {name!r}: type must be one of {KINDS}, got {kind!r}")
        self.name, self.kind, self.integer = name, kind, bool(integer)
        self.bounds: tuple[float, float] | None = None
        self.categories: tuple[Any, ...] | None = None
        if kind == "numeric":
            if bounds is None or len(bounds) != 2:
                raise DataError(
                    f"numeric column {name!r} needs public bounds [low, high] (from a data "
                    "dictionary or the measurement's range, never the records' min/max)")
            low, high = float(bounds[0]), float(bounds[1])
            if not (np.isfinite(low) and np.isfinite(high) and low < high
                    and np.isfinite(high - low)):
                raise DataError(f"column {name!r}: bounds must be finite with low < high and "
                                f"a finite span high - low, got {list(bounds)}")
            self.bounds = (low, high)
        else:
            if bounds is not None:
                raise DataError(f"column {name!r}: bounds are for numeric columns only")
            if categories is None and kind == "binary":
                categories = (0, 1)
            if categories is None:
                raise DataError(f"categorical column {name!r} needs its public list of "
                                "categories (every value it may take, in a fixed order)")
            cats = tuple(_plain(c) for c in categories)
            if len(set(cats)) != len(cats):
                raise DataError(f"column {name!r}: categories must be distinct")
            if kind == "binary" and len(cats) != 2:
                raise DataError(f"binary column {name!r} needs exactly 2 categories, got "
                                f"{len(cats)} (use type 'categorical' for more)")
            if len(cats) < 2:
                raise DataError(f"categorical column {name!r} needs at least 2 categories")
            self.categories = cats

    @property
    def width(self) -> int:
        """Encoded width: 1 (numeric, binary) or the number of categories (one-hot)."""
        return len(self.categories) if self.kind == "categorical" else 1  # type: ignore[arg-type]

    def spec(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.kind}
        if self.bounds is not None:
            out["bounds"] = list(self.bounds)
            if self.integer:
                out["integer"] = True
        if self.categories is not None:
            out["categories"] = list(self.categories)
        return out

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Column) and (self.name, self.spec()) == (other.name, other.spec())

    def __hash__(self) -> int:
        return hash((self.name, self.kind))

    def __repr__(self) -> str:
        return f"Column({self.name!r}, {self.kind!r})"


def _plain(value: Any) -> Any:
    """NumPy scalars as Python ones (so categories compare, print and serialise plainly)."""
    return value.item() if isinstance(value, np.generic) else value


class Schema:
    """The public schema of a table (column order = declaration order).

    Args:
        columns: ``{name: spec}`` (or a list of :class:`Column`).
        label: the name of a categorical/binary column used as the class label of conditional
            models (``y``); it is then not part of the encoded records ``x``.
    """

    def __init__(self, columns: Mapping[str, Mapping[str, Any]] | list[Column],
                 label: str | None = None) -> None:
        if isinstance(columns, Mapping):
            cols = []
            for name, spec in columns.items():
                if not isinstance(spec, Mapping):
                    raise DataError(f"column {name!r}: its spec must be a mapping such as "
                                    "{'type': 'numeric', 'bounds': [0, 1]}")
                unknown = set(spec) - {"type", "bounds", "categories", "integer"}
                if unknown:
                    raise DataError(f"column {name!r}: unknown keys {sorted(unknown)} (use "
                                    "type, bounds, categories, integer)")
                cols.append(Column(str(name), spec.get("type", ""), bounds=spec.get("bounds"),
                                   categories=spec.get("categories"),
                                   integer=spec.get("integer", False)))
        else:
            cols = list(columns)
        if not cols:
            raise DataError("a schema needs at least one column")
        names = [c.name for c in cols]
        if len(set(names)) != len(names):
            raise DataError("column names in a schema must be distinct")
        if label is not None:
            if label not in names:
                raise DataError(f"label column {label!r} is not in the schema")
            if cols[names.index(label)].kind == "numeric":
                raise DataError(f"label column {label!r} must be categorical or binary")
        self.columns: tuple[Column, ...] = tuple(cols)
        self.label = label

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def coerce(cls, value: Schema | Mapping[str, Any] | str | Path,
               label: str | None = None) -> Schema:
        """A schema from a Schema, a ``{name: spec}`` mapping, or a ``.json``/``.yaml`` file
        holding that mapping (or ``{"columns": {...}, "label": ...}``)."""
        if isinstance(value, Schema):
            if label is not None and label != value.label:
                return Schema(list(value.columns), label)
            return value
        if isinstance(value, (str, Path)):
            path = Path(value)
            if not path.is_file():
                raise DataError(f"schema file {path} does not exist")
            text = path.read_text()
            if path.suffix == ".json":
                value = json.loads(text)
            else:
                import yaml

                value = yaml.safe_load(text)
        if not isinstance(value, Mapping):
            raise DataError("a schema is a mapping {column: {type: ..., ...}}, a Schema, or the "
                            "path of a JSON/YAML file with that mapping")
        if "columns" in value and isinstance(value["columns"], Mapping):
            return cls(value["columns"], label if label is not None else value.get("label"))
        return cls(value, label)

    def to_dict(self) -> dict[str, Any]:
        """``{"columns": {name: spec}, "label": ...}`` (JSON/YAML-able; :meth:`coerce` reads it)."""
        return {"columns": {c.name: c.spec() for c in self.columns}, "label": self.label}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schema) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(tuple(c.name for c in self.columns))

    def __repr__(self) -> str:
        label = "" if self.label is None else f", label={self.label!r}"
        return f"Schema({len(self.columns)} columns, width {self.width}{label})"

    # -- layout --------------------------------------------------------------------------------
    @property
    def features(self) -> tuple[Column, ...]:
        """The columns encoded into ``x`` (all but the label)."""
        return tuple(c for c in self.columns if c.name != self.label)

    @property
    def label_column(self) -> Column | None:
        return next((c for c in self.columns if c.name == self.label), None)

    @property
    def num_classes(self) -> int:
        """Categories of the label column (1 without a label)."""
        col = self.label_column
        return 1 if col is None else len(col.categories)  # type: ignore[arg-type]

    @property
    def width(self) -> int:
        """Width of an encoded record ``x``."""
        return sum(c.width for c in self.features)

    def blocks(self) -> list[tuple[str, int, int]]:
        """``(kind, start, stop)`` of each feature column in an encoded record."""
        out, start = [], 0
        for col in self.features:
            out.append((col.kind, start, start + col.width))
            start += col.width
        return out

    # -- encode / decode -----------------------------------------------------------------------
    def encode(self, frame: Any) -> tuple[Tensor, Tensor | None]:
        """``(x [N, width] float32 in [0, 1], y [N] int64 or None)`` from a DataFrame.

        Refuses missing columns, missing values, numeric values outside the bounds and values
        that are not among a column's categories; errors give counts, never record values.
        """
        import pandas as pd

        if not isinstance(frame, pd.DataFrame):
            raise DataError(f"expected a pandas DataFrame, got {type(frame).__name__}")
        missing = [c.name for c in self.columns if c.name not in frame.columns]
        if missing:
            raise DataError(  # not the table's own column names: a header-less CSV's are a record
                f"the table lacks {len(missing)} of the schema's columns: {missing} (it has "
                f"{len(frame.columns)} columns; is its header row missing or spelled "
                "differently?)")
        parts = [self._encode_column(col, frame[col.name]) for col in self.features]
        encoded = np.concatenate(parts, axis=1).astype(np.float32)
        if not bool(np.isfinite(encoded).all()):  # bounds are checked: cannot happen
            raise DataError("the encoded table has non-finite values: check the schema's bounds")
        x = torch.from_numpy(np.clip(encoded, 0.0, 1.0))  # float32 rounding of (v−lo)/(hi−lo)
        y = None
        if self.label_column is not None:
            y = torch.from_numpy(self._codes(self.label_column, frame[self.label]))
        return x, y

    def _codes(self, col: Column, series: Any) -> np.ndarray:
        cats = col.categories
        assert cats is not None
        values = series.to_numpy(dtype=object)
        lookup = {c: i for i, c in enumerate(cats)}
        as_text = {str(c): i for i, c in enumerate(cats)}
        codes = np.empty(len(values), dtype=np.int64)
        bad = 0
        for i, v in enumerate(values):
            v = _plain(v)
            code = lookup.get(v)
            if code is None:
                code = as_text.get(str(v))
            if code is None:
                bad += 1
                code = -1
            codes[i] = code
        if bad:
            shown = ", ".join(repr(c) for c in cats[:8]) + (", ..." if len(cats) > 8 else "")
            raise DataError(  # the declared categories are public; the offending values are not
                f"column {col.name!r}: {bad} values are missing or not among its {len(cats)} "
                f"declared categories [{shown}]: add the category to the schema (e.g. "
                "'missing' for empty cells, filled in before training) or drop those rows "
                "(in YAML, quote yes/no/on/off: unquoted they are read as True/False)")
        return codes

    def _encode_column(self, col: Column, series: Any) -> np.ndarray:
        if col.kind == "numeric":
            import pandas as pd

            values = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64)
            low, high = col.bounds  # type: ignore[misc]
            missing = np.isnan(values)  # empty cells and non-numbers
            outside = ~missing & ~((values >= low) & (values <= high))
            fractional = ~missing & ~outside & (values != np.round(values)) if col.integer \
                else np.zeros_like(missing)
            if missing.any():
                raise DataError(
                    f"column {col.name!r}: {int(missing.sum())} values are missing or not "
                    "numbers: fill them (e.g. with a value inside the bounds plus a binary "
                    "'was missing' column) or drop those rows before training")
            if outside.any():
                raise DataError(
                    f"column {col.name!r}: {int(outside.sum())} values are outside the "
                    f"declared bounds [{low:g}, {high:g}]: declare the public bounds the data "
                    "really has, or clip/drop those rows before training")
            if fractional.any():
                raise DataError(
                    f"column {col.name!r}: {int(fractional.sum())} values are not integers but "
                    "the schema says integer: true; round them, or drop 'integer'")
            return ((values - low) / (high - low))[:, None]
        codes = self._codes(col, series)
        if col.kind == "binary":
            return codes[:, None].astype(np.float64)
        return np.eye(col.width)[codes]

    def decode(self, x: Tensor | np.ndarray, y: Tensor | np.ndarray | None = None) -> Any:
        """A DataFrame with the schema's column names and categories from encoded records
        (draws or means): numeric values are clamped to the bounds (rounded when ``integer``),
        a one-hot block gives its largest entry's category, a binary value >= 0.5 the second
        category. ``y`` (label codes) is required when the schema has a label."""
        import pandas as pd

        x = np.asarray(x.detach().cpu() if isinstance(x, Tensor) else x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.width:
            raise DataError(f"decode expects records [n, {self.width}], got {x.shape}")
        out: dict[str, Any] = {}
        for col, (_, start, stop) in zip(self.features, self.blocks(), strict=True):
            block = x[:, start:stop]
            if col.kind == "numeric":
                low, high = col.bounds  # type: ignore[misc]
                values = low + np.clip(block[:, 0], 0.0, 1.0) * (high - low)
                out[col.name] = np.round(values).astype(np.int64) if col.integer else values
            elif col.kind == "binary":
                out[col.name] = _take(col.categories, (block[:, 0] >= 0.5).astype(np.int64))
            else:
                out[col.name] = _take(col.categories, block.argmax(1))
        if self.label_column is not None:
            if y is None:
                raise DataError(f"the schema's label {self.label!r} needs the labels y")
            codes = np.asarray(y.cpu() if isinstance(y, Tensor) else y, dtype=np.int64)
            out[self.label] = _take(self.label_column.categories, codes)  # type: ignore[index]
        return pd.DataFrame({c.name: out[c.name] for c in self.columns})


def _take(categories: Any, codes: np.ndarray) -> np.ndarray:
    cats = np.empty(len(categories), dtype=object)
    cats[:] = list(categories)
    values = cats[codes]
    if all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in categories):
        return values.astype(np.int64)
    return values


def read_table(path: str | Path) -> Any:
    """A DataFrame from a ``.csv`` or ``.parquet`` file."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist: pass a DataFrame, or a .csv/.parquet path")
    if path.suffix == ".csv":
        return pd.read_csv(path)
    if path.suffix in (".parquet", ".pq"):
        return pd.read_parquet(path)
    raise DataError(f"{path}: expected a .csv or .parquet file, got {path.suffix!r}")


def write_table(frame: Any, path: str | Path) -> Path:
    """Write a DataFrame as ``.csv`` or ``.parquet`` (by the suffix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix in (".parquet", ".pq"):
        frame.to_parquet(path, index=False)
    else:
        raise DataError(f"{path}: write a table as .csv or .parquet")
    return path


torch.serialization.add_safe_globals([Schema, Column])

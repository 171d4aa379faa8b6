"""Keep record values out of hyper-parameters (issue 13, class 7).

Lightning's ``save_hyperparameters()`` captures the ``__init__`` arguments of a class *and of
every subclass* (it walks the calling frames). A data module that takes its array in
``__init__`` therefore copies the raw records into ``hparams``, from where Lightning sends them to
the logger (``log_hyperparams(hparams_initial)``, e.g. the W&B run config) and writes them into
every checkpoint (``hyper_parameters`` / ``datamodule_hyper_parameters``, read from ``hparams``).
None of this is covered by the DP guarantee. Rule: no tensor, array or data set may reach
``hparams``, a logger config or checkpoint metadata.

:func:`data_like` decides whether a value can hold record values; :func:`scrub_hparams` removes
every such top-level key from an object's ``_hparams`` and ``_hparams_initial`` (with a warning
that names the key and the reason, never the value); :class:`ScrubbedHyperparametersMixin` makes
``save_hyperparameters`` do it right after capturing (``VAEDataModule`` and ``BaseVAE`` use it);
``TermwiseDPStrategy`` calls :func:`scrub_hparams` on any module and data module it trains.

What counts as data-like (:func:`data_like`; checked on each top-level hyper-parameter):

- ``torch.Tensor`` (any shape), ``numpy.ndarray``, anything exposing ``__array__``,
  ``__array_interface__``, ``__cuda_array_interface__``, ``__dlpack__``, ``__dataframe__``,
  ``__arrow_c_array__`` or ``__arrow_c_stream__`` (pandas / polars / pyarrow frames and series,
  JAX / CuPy arrays), and raw buffers (``bytes``, ``bytearray``, ``memoryview``,
  ``array.array``).
- NumPy scalars other than plain numbers: only ``np.bool_`` and ``np.number``
  (``np.float64(1e-3)``, ``np.int64(3)``) are numbers and ``np.str_`` is a string; every other
  ``np.generic`` is data-like, in particular ``np.void`` / ``np.record`` (a row of a structured
  array: a whole record), ``np.bytes_``, ``np.datetime64`` and ``np.timedelta64`` (which NumPy
  files under ``np.number``, but is a date difference, not a setting).
- ``torch.utils.data.Dataset`` / ``DataLoader`` / ``Sampler`` (a sampler can hold record
  indices), any other sized indexable object that is not a plain container (``__len__`` and
  ``__getitem__``: a map-style data set), and ``torch.nn.Module`` (its parameters and buffers are
  tensors; a module belongs in the state_dict, pass it again to ``load_from_checkpoint``).
- A string of more than :data:`MAX_CHARS` (4096) characters (a pasted CSV or text; paths and
  names are shorter).
- Containers: ``list``, ``tuple``, ``set``, ``frozenset``, ``dict`` and other
  mappings/sequences/sets, and dataclass instances and ``Namespace`` objects (taken as the
  mapping of their fields). A container is data-like when

  * it holds any of the above at any depth (mapping keys included), or is nested deeper than
    16 levels;
  * it is a list/tuple/set with an element that is a mapping, a dataclass or a ``Namespace``
    (records, e.g. ``[{"name": ..., "dx": ...}, ...]``), or a non-empty list/tuple/set
    (rows, e.g. ``[[0.1, 0.2], ...]`` or ``[["alice", "HIV"], ...]``);
  * it has more than :data:`MAX_LEAVES` (32) leaves in total, counted recursively: every
    element of a sequence/set and every value of a mapping/dataclass/namespace that is not
    itself a container counts one, whatever its type (number, ``bool``, string, ``None``, any
    object), and an empty container counts one; mapping keys are not counted. So 100 sentences,
    a mask of 33 records or a dict of 33 settings are data; or
  * its strings (values and mapping keys, at any depth) have more than :data:`MAX_CHARS`
    characters in total.

  Kept: ``None``, numbers, short strings (paths, names), types, functions, ``range``, and flat
  containers of at most 32 leaves such as ``hidden=[400, 200]``, ``data_shape=(1, 28, 28)``,
  ``bandwidths=(0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)``, ``columns=["age", "income"]`` or
  ``optimizer={"name": "adam", "betas": (0.9, 0.999)}`` (a dict of settings may nest dicts).

The rule is on types and shapes, so it cannot catch a record spelled out as a few scalar
arguments (``x0=0.3, x1=0.7``) or as a short flat list (up to 32 values), nor one hidden in the
attributes of an arbitrary object (neither a container nor a dataclass/namespace); do not do
that.
"""

from __future__ import annotations

import array
import dataclasses
import inspect
import os
from argparse import Namespace
from collections.abc import Mapping, MutableMapping, Sequence, Set
from types import FunctionType, MethodType, ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Sampler

#: a container with more leaves than this (of any type, counted recursively) is treated as data.
MAX_LEAVES = 32
#: the former name of :data:`MAX_LEAVES` (it counted numbers only).
MAX_NUMBERS = MAX_LEAVES
#: a string, or the strings of a container together, with more characters than this is data.
MAX_CHARS = 4096

MAX_DEPTH = 16
_ARRAY_PROTOCOLS = ("__array__", "__array_interface__", "__cuda_array_interface__", "__dlpack__",
                    "__dataframe__", "__arrow_c_array__", "__arrow_c_stream__")
_NUMBER = (bool, int, float, complex, np.bool_, np.number)


def _type_name(value: Any) -> str:
    t = type(value)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _is_container(value: Any) -> bool:
    return isinstance(value, (Mapping, Sequence, Set)) and not isinstance(
        value, (str, bytes, bytearray, memoryview, range)
    )


def _fields(value: Any) -> Mapping[str, Any] | None:
    """The attributes of a dataclass instance or a namespace, else None."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name, None) for f in dataclasses.fields(value)}
    if isinstance(value, (Namespace, SimpleNamespace)):
        return vars(value)
    return None


def _as_mapping(value: Any) -> Mapping[Any, Any] | None:
    """``value`` itself when a mapping, its fields when a dataclass or namespace, else None."""
    return value if isinstance(value, Mapping) else _fields(value)


class _Over(Exception):
    """Raised by :func:`_measure` once a limit is exceeded."""


def _measure(value: Any, totals: list[int], depth: int = 0) -> None:
    """Add the leaves (``totals[0]``) and string characters (``totals[1]``) of ``value`` to
    ``totals``, raising :class:`_Over` as soon as one exceeds its limit (so it stops early on
    large or cyclic values; shared sub-containers count every time they occur)."""
    if isinstance(value, str):
        totals[1] += len(value)
    mapping = _as_mapping(value)
    items: Any = None
    if mapping is not None:
        totals[1] += sum(len(key) for key in mapping if isinstance(key, str))
        items = mapping.values()
    elif _is_container(value):
        items = value
    if totals[1] > MAX_CHARS or depth > MAX_DEPTH:
        raise _Over
    before = totals[0]
    for item in items or ():
        _measure(item, totals, depth + 1)
    if totals[0] == before:  # a leaf, or an empty container
        totals[0] += 1
        if totals[0] > MAX_LEAVES:
            raise _Over


def _too_big(value: Any) -> str | None:
    totals = [0, 0]
    try:
        _measure(value, totals)
    except _Over:
        if totals[1] > MAX_CHARS:
            return f"a {_type_name(value)} of more than {MAX_CHARS} characters of text (data-like)"
        if totals[0] > MAX_LEAVES:
            return f"a {_type_name(value)} of more than {MAX_LEAVES} values (data-like)"
        return f"a {_type_name(value)} nested deeper than {MAX_DEPTH} levels (data-like)"
    return None


def data_like(value: Any, _depth: int = 0, _seen: set[int] | None = None) -> str | None:
    """Why ``value`` can hold record values (a short phrase naming its type, never its content),
    or None when it is an ordinary hyper-parameter. See the module docstring for the rule."""
    if isinstance(value, np.void):
        return f"a numpy structured record ({_type_name(value)})"
    if isinstance(value, np.generic) and (
        isinstance(value, np.timedelta64) or not isinstance(value, (np.bool_, np.number, np.str_))
    ):
        return f"a numpy scalar that is not a plain number ({_type_name(value)})"
    if value is None or isinstance(value, (range, _NUMBER)):
        return None
    if isinstance(value, str):  # np.str_ included
        if len(value) > MAX_CHARS:
            return f"a string of more than {MAX_CHARS} characters (data-like)"
        return None
    if isinstance(value, torch.Tensor):
        return "a torch.Tensor"
    if isinstance(value, torch.nn.Module):
        return f"a torch.nn.Module ({_type_name(value)}; its tensors belong in the state_dict)"
    if isinstance(value, DataLoader):
        return "a DataLoader"
    if isinstance(value, Dataset):
        return f"a data set ({_type_name(value)})"
    if isinstance(value, Sampler):
        return f"a Sampler ({_type_name(value)}, it can hold record indices)"
    if isinstance(value, np.ndarray):
        return "a numpy.ndarray"
    if isinstance(value, type):
        return None
    if any(hasattr(value, attr) for attr in _ARRAY_PROTOCOLS):
        return f"array-like ({_type_name(value)})"
    if isinstance(value, (bytes, bytearray, memoryview, array.array)):
        return f"a raw buffer ({_type_name(value)})"
    if isinstance(value, (FunctionType, MethodType, ModuleType)):
        return None
    mapping = _as_mapping(value)
    if mapping is None and not _is_container(value):
        if hasattr(value, "__len__") and hasattr(value, "__getitem__"):
            return f"a sized indexable object ({_type_name(value)}, a map-style data set)"
        return None
    if _depth > MAX_DEPTH:
        return f"a {_type_name(value)} nested deeper than {MAX_DEPTH} levels (data-like)"
    if _depth == 0 and (reason := _too_big(value)) is not None:  # first: it stops early
        return reason
    seen = set() if _seen is None else _seen
    if id(value) in seen:  # already checked (a cycle or a shared sub-container)
        return None
    seen.add(id(value))
    if mapping is not None:
        for key, item in mapping.items():
            reason = data_like(key, _depth + 1, seen) or data_like(item, _depth + 1, seen)
            if reason is not None:
                if mapping is value:
                    return f"a {_type_name(value)} holding {reason}"
                return f"{_type_name(value)} whose field {key!r} is {reason}"
    else:
        for item in value:
            reason = data_like(item, _depth + 1, seen)
            if reason is not None:
                return f"a {_type_name(value)} holding {reason}"
            if _as_mapping(item) is not None:
                return f"a {_type_name(value)} of records ({_type_name(item)} elements, data-like)"
            if _is_container(item) and len(item) > 0:
                return f"a nested {_type_name(value)} (rows of values, data-like)"
    return None


def _warn(owner: str, key: str, reason: str) -> None:
    rank_zero_warn(
        f"{owner}: hyper-parameter {key!r} is {reason}, which can hold record values; it was "
        "removed from hparams, so it reaches neither the logger config nor checkpoints "
        "(issue 13). Pass it again when loading from a checkpoint."
    )


def scrub_mapping(hparams: MutableMapping[str, Any], *, owner: str = "hparams",
                  warn: bool = True) -> dict[str, str]:
    """Remove every data-like value (see :func:`data_like`) of ``hparams`` in place and return
    ``{removed key: reason}``; with ``warn``, one warning per key naming the key and the reason,
    never the value. Also usable on a checkpoint's ``hyper_parameters`` dicts."""
    dropped = {}
    for key in list(hparams.keys()):
        reason = data_like(hparams[key])
        if reason is not None:
            del hparams[key]
            dropped[key] = reason
            if warn:
                _warn(owner, key, reason)
    return dropped


def scrub_hparams(obj: Any) -> list[str]:
    """Remove every data-like hyper-parameter from ``obj._hparams`` (``obj.hparams``, which
    checkpointing writes as ``hyper_parameters`` / ``datamodule_hyper_parameters``) and
    ``obj._hparams_initial`` (``obj.hparams_initial``, which Lightning sends to every logger's
    ``log_hyperparams``), with one warning per key. ``obj`` is a Lightning
    ``HyperparametersMixin`` (LightningModule or LightningDataModule); None or an object without
    hyper-parameters is a no-op. Returns the removed keys, sorted."""
    if obj is None:
        return []
    dropped: dict[str, str] = {}
    declared = declared_data_arguments(obj)
    for attr in ("_hparams", "_hparams_initial"):
        hp = getattr(obj, attr, None)
        if isinstance(hp, MutableMapping):
            for key, reason in scrub_mapping(hp, warn=False).items():
                dropped.setdefault(key, reason)
            for key in [k for k in declared if k in hp]:
                reason = declared_data(hp[key])
                if reason is not None:
                    del hp[key]
                    dropped.setdefault(key, reason)
    for key, reason in dropped.items():
        _warn(type(obj).__name__, key, reason)
    return sorted(dropped)


class ScrubbedHyperparametersMixin:
    """Put before ``LightningModule`` / ``LightningDataModule`` in the bases: its
    ``save_hyperparameters`` is Lightning's followed by :func:`scrub_hparams`. Data-like
    ``__init__`` arguments (of the class or any subclass) are also passed to Lightning as
    ``ignore``, so they are never stored, not even in the deep copy behind ``hparams_initial``.
    A class lists the arguments that are meant to carry records (a data module's arrays or
    table) in ``data_arguments``: they are left out the same way, without a warning."""

    #: ``__init__`` arguments that carry records by design (left out of hparams silently).
    data_arguments: tuple[str, ...] = ()

    def save_hyperparameters(self, *args: Any, ignore: Sequence[str] | str | None = None,
                             frame: Any = None, logger: bool = True) -> None:
        # Lightning inspects the frame of whoever called save_hyperparameters: with this override
        # in between, that is our caller's frame, which must be passed explicitly.
        if frame is None:
            current = inspect.currentframe()
            frame = current.f_back if current is not None else None
        try:
            ignore = [ignore] if isinstance(ignore, str) else list(ignore or [])
            if not args:  # all __init__ arguments: leave the data-like ones out from the start
                declared = declared_data_arguments(self)
                for key, reason in _data_like_init_args(frame, declared).items():
                    if key not in ignore:
                        ignore.append(key)
                        if key not in declared:
                            _warn(type(self).__name__, key, reason)
            super().save_hyperparameters(  # type: ignore[misc]
                *args, ignore=ignore, frame=frame, logger=logger
            )
        finally:
            del frame
        scrub_hparams(self)


def _data_like_init_args(frame: Any, declared: Sequence[str] = ()) -> dict[str, str]:
    """``{argument: reason}`` for the data-like ``__init__`` arguments Lightning would capture
    (``declared``: the class's ``data_arguments``, data unless a path)."""
    from lightning.pytorch.core.mixins import HyperparametersMixin
    from lightning.pytorch.utilities.parsing import collect_init_args

    try:  # private: set by LightningCLI while it instantiates a class
        from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
    except ImportError:  # pragma: no cover - other Lightning versions; the post-scrub remains
        given = None
    else:
        given = _given_hyperparameters.get()
    if given is not None:  # LightningCLI passes the parsed config instead of frames
        init_args = dict(given)
    elif frame is None:
        return {}
    else:
        init_args = {}
        for local_args in collect_init_args(frame, [], classes=(HyperparametersMixin,)):
            init_args.update(local_args)
    return {key: reason for key, value in init_args.items()
            if (reason := data_like(value)) is not None
            or (key in declared and (reason := declared_data(value)) is not None)}


def declared_data_arguments(obj: Any) -> tuple[str, ...]:
    """The ``data_arguments`` of ``obj``'s class and of every base class (a subclass that
    declares its own does not drop its parents')."""
    cls = obj if isinstance(obj, type) else type(obj)
    names: list[str] = []
    for klass in cls.__mro__:
        names += [n for n in vars(klass).get("data_arguments", ()) if n not in names]
    return tuple(names)


def declared_data(value: Any) -> str | None:
    """Why a value of an argument that a class declares record-carrying (``data_arguments``)
    must stay out of hparams: anything but None, a path or a short string (a file name). Short
    label lists and small tables are records too, whatever :func:`data_like` says of them."""
    if value is None or isinstance(value, os.PathLike):
        return None
    if isinstance(value, str) and len(value) <= MAX_CHARS:
        return None
    return f"a declared data argument holding a {_type_name(value)}, not a path"

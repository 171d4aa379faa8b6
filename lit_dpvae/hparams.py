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

What counts as data-like (:func:`data_like`):

- ``torch.Tensor`` (any shape), ``numpy.ndarray``, anything exposing ``__array__``,
  ``__array_interface__``, ``__cuda_array_interface__`` or ``__dlpack__`` (pandas / polars
  frames and series, JAX / CuPy arrays), and raw buffers (``bytes``, ``bytearray``,
  ``memoryview``, ``array.array``). NumPy *scalars* (``np.float64(1e-3)``) are numbers, not
  arrays.
- ``torch.utils.data.Dataset`` / ``DataLoader`` / ``Sampler`` (a sampler can hold record
  indices), any other sized indexable object that is not a plain container (``__len__`` and
  ``__getitem__``: a map-style data set), and ``torch.nn.Module`` (its parameters and buffers are
  tensors; a module belongs in the state_dict, pass it again to ``load_from_checkpoint``).
- Containers (``list``, ``tuple``, ``set``, ``dict`` and other mappings/sequences, dataclasses,
  ``Namespace``) holding any of the above, recursively.
- Numeric containers that look like data rather than configuration: a list/tuple/set whose
  elements include a list/tuple/set of numbers (a nested numeric list, e.g. ``[[0.1, 0.2], ...]``,
  records or class means), or any container holding more than :data:`MAX_NUMBERS` numbers in
  total (``bool`` counts: a mask of records is data). Flat short lists such as
  ``hidden=[400, 200]`` or ``data_shape=(1, 28, 28)`` stay.

The rule is on types and shapes, so it cannot catch a record spelled out as a few scalar
arguments (``x0=0.3, x1=0.7``) or hidden in an arbitrary object; do not do that.
"""

from __future__ import annotations

import array
import dataclasses
import inspect
from argparse import Namespace
from collections.abc import Mapping, MutableMapping, Sequence, Set
from types import FunctionType, MethodType, ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Sampler

#: a container with more numbers than this (counted recursively) is treated as data.
MAX_NUMBERS = 32

_MAX_DEPTH = 16
_ARRAY_PROTOCOLS = ("__array__", "__array_interface__", "__cuda_array_interface__", "__dlpack__")
_NUMBER = (bool, int, float, complex, np.generic)


def _type_name(value: Any) -> str:
    t = type(value)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _is_container(value: Any) -> bool:
    return isinstance(value, (Mapping, Sequence, Set)) and not isinstance(
        value, (str, bytes, bytearray, range)
    )


def _count_numbers(value: Any, limit: int, depth: int = 0) -> int:
    """Numbers in ``value`` (recursively through containers), stopping once above ``limit``."""
    if isinstance(value, _NUMBER):
        return 1
    if depth > _MAX_DEPTH or not _is_container(value):
        return 0
    items = value.values() if isinstance(value, Mapping) else value
    total = 0
    for item in items:
        total += _count_numbers(item, limit - total, depth + 1)
        if total > limit:
            break
    return total


def _fields(value: Any) -> Mapping[str, Any] | None:
    """The attributes of a dataclass instance or a namespace, else None."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name, None) for f in dataclasses.fields(value)}
    if isinstance(value, (Namespace, SimpleNamespace)):
        return vars(value)
    return None


def data_like(value: Any, _depth: int = 0, _seen: set[int] | None = None) -> str | None:
    """Why ``value`` can hold record values (a short phrase naming its type, never its content),
    or None when it is an ordinary hyper-parameter. See the module docstring for the rule."""
    if value is None or isinstance(value, (str, range, _NUMBER)):
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
    seen = set() if _seen is None else _seen
    if id(value) in seen or _depth > _MAX_DEPTH:
        return None
    fields = _fields(value)
    if fields is not None:
        seen.add(id(value))
        for key, item in fields.items():
            reason = data_like(item, _depth + 1, seen)
            if reason is not None:
                return f"{_type_name(value)} whose field {key!r} is {reason}"
        return None
    if _is_container(value):
        seen.add(id(value))
        if isinstance(value, Mapping):
            for key, item in value.items():
                reason = data_like(key, _depth + 1, seen) or data_like(item, _depth + 1, seen)
                if reason is not None:
                    return f"a {_type_name(value)} holding {reason}"
        else:
            for item in value:
                reason = data_like(item, _depth + 1, seen)
                if reason is not None:
                    return f"a {_type_name(value)} holding {reason}"
                if (
                    _is_container(item)
                    and not isinstance(item, Mapping)
                    and any(isinstance(e, _NUMBER) for e in item)
                ):
                    return f"a nested numeric {_type_name(value)} (data-like)"
        if _count_numbers(value, MAX_NUMBERS) > MAX_NUMBERS:
            return f"a {_type_name(value)} of more than {MAX_NUMBERS} numbers (data-like)"
        return None
    if hasattr(value, "__len__") and hasattr(value, "__getitem__"):
        return f"a sized indexable object ({_type_name(value)}, a map-style data set)"
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
    for attr in ("_hparams", "_hparams_initial"):
        hp = getattr(obj, attr, None)
        if isinstance(hp, MutableMapping):
            for key, reason in scrub_mapping(hp, warn=False).items():
                dropped.setdefault(key, reason)
    for key, reason in dropped.items():
        _warn(type(obj).__name__, key, reason)
    return sorted(dropped)


class ScrubbedHyperparametersMixin:
    """Put before ``LightningModule`` / ``LightningDataModule`` in the bases: its
    ``save_hyperparameters`` is Lightning's followed by :func:`scrub_hparams`. Data-like
    ``__init__`` arguments (of the class or any subclass) are also passed to Lightning as
    ``ignore``, so they are never stored, not even in the deep copy behind ``hparams_initial``."""

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
                for key, reason in _data_like_init_args(frame).items():
                    if key not in ignore:
                        ignore.append(key)
                        _warn(type(self).__name__, key, reason)
            super().save_hyperparameters(  # type: ignore[misc]
                *args, ignore=ignore, frame=frame, logger=logger
            )
        finally:
            del frame
        scrub_hparams(self)


def _data_like_init_args(frame: Any) -> dict[str, str]:
    """``{argument: reason}`` for the data-like ``__init__`` arguments Lightning would capture."""
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
            if (reason := data_like(value)) is not None}

"""The mechanism registry: a name for every mechanism the strategy can build.

A new mechanism is one module with a :class:`~lit_dpvae.privacy.mechanisms.base.Mechanism`
subclass, registered by name::

    @register_mechanism("mine")
    class Mine(Mechanism):
        ...

after which ``DPStrategy(mechanism="mine", <Mine's settings>)`` builds it, the benchmark lists
it, and the registry-parametrised tests (tests/privacy/test_registry.py) cover it.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from lit_dpvae.privacy.mechanisms.base import Mechanism

M = TypeVar("M", bound=type[Mechanism])

_REGISTRY: dict[str, type[Mechanism]] = {}


def register_mechanism(name: str, *, override: bool = False) -> Callable[[M], M]:
    """Class decorator: make ``cls`` buildable as ``mechanism=name``."""
    if not name or not name.isidentifier():
        raise ValueError(f"a mechanism name must be an identifier, got {name!r}")

    def register(cls: M) -> M:
        if not (isinstance(cls, type) and issubclass(cls, Mechanism)):
            raise TypeError(f"{cls!r} is not a Mechanism subclass")
        if name in _REGISTRY and _REGISTRY[name] is not cls and not override:
            raise ValueError(f"mechanism {name!r} is already registered "
                             f"({_REGISTRY[name].__qualname__}); pass override=True to replace it")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return register


def unregister_mechanism(name: str) -> None:
    """Remove ``name`` (for tests that register a toy mechanism)."""
    _REGISTRY.pop(name, None)


def mechanism_names() -> tuple[str, ...]:
    """The registered names, in registration order."""
    return tuple(_REGISTRY)


def mechanism_class(name: str) -> type[Mechanism]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown mechanism {name!r}; choose one of "
                         f"{mechanism_names()} or pass a Mechanism object") from None


def settings_of(cls: type[Mechanism]) -> set[str]:
    """The keyword settings ``cls`` takes (its ``__init__`` signature, ``noise_multiplier``
    excluded: σ is the privacy budget's)."""
    params = inspect.signature(cls.__init__).parameters
    return {n for n, p in params.items()
            if n not in ("self", "noise_multiplier")
            and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def build_mechanism(spec: str | Mechanism, owner: Any = None, **settings: Any) -> Mechanism:
    """The mechanism ``spec`` names, built with ``settings`` (σ = 0 until the budget sets it);
    a Mechanism object is returned as it is (then ``settings`` must be empty).

    A setting that only *another* registered mechanism takes is ignored with a warning (Python
    code that switches the mechanism name keeps its other keywords; a YAML config gives the
    mechanism as ``class_path``/``init_args``, where every key must be the class's). One that no
    mechanism takes is an error naming the valid ones (and ``owner``'s own keywords, when the
    settings came through a strategy's ``**mechanism_settings``)."""
    if isinstance(spec, Mechanism):
        if settings:
            raise ValueError(
                f"mechanism is a {type(spec).__name__} object, so its settings are its own: "
                f"set {sorted(settings)} on the object, not on the strategy")
        return spec
    cls = mechanism_class(spec)
    known = set().union(*(settings_of(c) for c in _REGISTRY.values()))
    own = settings_of(cls)
    unknown = sorted(set(settings) - known)
    if unknown:
        theirs = ""
        if owner is not None:
            skip = {"self", "mechanism", "mechanism_settings"}
            keywords = set(inspect.signature(owner.__init__).parameters) - skip
            theirs = f"; {owner.__name__} itself takes {sorted(keywords)}"
        raise ValueError(f"unknown setting(s) {unknown}: mechanism={spec!r} takes "
                         f"{sorted(own)}{theirs}")
    ignored = sorted(set(settings) - own)
    if ignored:
        warnings.warn(f"mechanism={spec!r} does not use {ignored}; they are ignored",
                      stacklevel=3)
    return cls(**{k: v for k, v in settings.items() if k in own})

"""Attributors by name: ``register`` a class, ``get_method(name, **options)`` an instance.

The built-in methods beyond the last layer live in :mod:`instattr.layers` (torch); they are known
here by module name and imported only when asked for, so importing :mod:`instattr.methods`
does not load torch.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Callable, Dict, Iterable, List, Type, Union

from ..errors import InstattrError
from .base import Attributor

# The paper's methods, in the order tables and reports list them.
METHOD_NAMES = ("nn-euc", "nn-cos", "nn-dot", "sbert-euc", "sbert-cos", "sbert-dot",
                "gd", "gc", "if", "rif", "rep")
# Built-in methods registered by importing a module (on first use).
LAZY = {"gd-top": "instattr.layers.attributors", "gc-top": "instattr.layers.attributors",
        "if-top": "instattr.layers.attributors", "rif-top": "instattr.layers.attributors",
        "tracin": "instattr.methods.tracin", "tracin-top": "instattr.layers.tracin"}

_REGISTRY: Dict[str, Type[Attributor]] = {}


def register(name: str) -> Callable[[Type[Attributor]], Type[Attributor]]:
    """Class decorator: make ``cls`` available as ``name`` (and set ``cls.name``)."""
    def add(cls: Type[Attributor]) -> Type[Attributor]:
        if not (isinstance(cls, type) and issubclass(cls, Attributor)):
            raise TypeError(f"register({name!r}): {cls!r} is not an Attributor subclass")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method {name!r} is already registered to {_REGISTRY[name].__name__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return add


def registered() -> tuple:
    """Every registered name: the paper's methods first, the built-in layered ones, then any
    added by users."""
    names = [n for n in METHOD_NAMES if n in _REGISTRY] + [n for n in LAZY]
    return tuple(names + [n for n in _REGISTRY if n not in names])


def _lookup(name: str) -> Type[Attributor]:
    if name not in _REGISTRY and name in LAZY:
        importlib.import_module(LAZY[name])
    if name not in _REGISTRY:
        raise _unknown(name)
    return _REGISTRY[name]


def _unknown(name: str) -> ValueError:
    return ValueError(f"unknown method {name!r}; known: {', '.join(registered())}")


def method_class(name: str) -> Type[Attributor]:
    """The class registered as ``name``."""
    return _lookup(name)


def get_method(name: str, **options) -> Attributor:
    """A new, unfitted attributor ``name`` constructed with ``options``."""
    cls = _lookup(name)
    try:
        inspect.signature(cls).bind(**options)
    except TypeError:
        allowed = [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]
        bad = sorted(set(options) - set(allowed)) or sorted(options)
        raise InstattrError(f"{name}: unknown option(s) {', '.join(bad)}; "
                            f"options: {', '.join(allowed) or 'none'}") from None
    return cls(**options)


def expand_methods(spec: Union[str, Iterable[str]]) -> List[str]:
    """``"paper"`` (the eleven last-layer methods), ``"all"`` (every registered method) or
    ``"a,b"`` (or a list of names) -> validated names, duplicates dropped."""
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    names: List[str] = []
    for part in (p.strip() for p in parts):
        if not part:
            continue
        group = {"all": registered(), "paper": METHOD_NAMES}.get(part, (part,))
        for name in group:
            if name not in _REGISTRY and name not in LAZY:
                raise _unknown(name)
            if name not in names:
                names.append(name)
    if not names:
        raise InstattrError(f"no methods given; choose 'paper', 'all' or some of: {', '.join(registered())}")
    return names

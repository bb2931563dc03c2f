"""A fitted method's state without its training side: what an index needs to compute test sides.

``save_state(method)`` -> ``(arrays, meta)``: the fitted attributes the method *declares* in its
``state`` (:class:`~instattr.methods.base.Attributor`), each an array, a
:class:`~instattr.arrays.FinalLayer`, a scalar, a string, a tuple or a small dict; renaming any
other attribute changes no file. ``load_state`` rebuilds the method from its name, constructor
options and that state, with no pickling. A method that declares no state (``state = None``: the
layered ones hold a torch model, TracIn its checkpoints) cannot be saved; an index refits it from
the run instead.
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

from ..arrays import FinalLayer


class StateError(ValueError):
    """The method's fitted state holds something that cannot be saved without pickling."""


def save_state(method) -> Tuple[Dict[str, np.ndarray], dict]:
    if method.state is None:
        raise StateError(f"{method.name}: declares no state to save; refit it from the run instead")
    arrays: Dict[str, np.ndarray] = {}
    meta: dict = {"name": method.name, "config": method.config(), "attrs": {}}
    for k in method.state:
        if not hasattr(method, k):           # e.g. center_ exists on binary tasks only
            continue
        v = getattr(method, k)
        if isinstance(v, np.ndarray):
            arrays[k] = v
            meta["attrs"][k] = {"type": "array"}
        elif isinstance(v, FinalLayer):
            arrays[k + ".w"] = np.asarray(v.w)
            if v.b is not None:
                arrays[k + ".b"] = np.asarray(v.b)
            meta["attrs"][k] = {"type": "final_layer", "l2": float(v.l2), "bias": v.b is not None}
        elif v is None or isinstance(v, (bool, int, float, str, dict, np.generic)):
            meta["attrs"][k] = {"type": "value", "value": v.item() if isinstance(v, np.generic) else v}
        elif isinstance(v, tuple) and all(isinstance(x, (str, int, float, bool)) for x in v):
            meta["attrs"][k] = {"type": "tuple", "value": list(v)}
        else:
            raise StateError(f"{method.name}: its fitted {k} ({type(v).__name__}) cannot be saved; "
                             "refit it from the run instead")
    return arrays, meta


def load_state(arrays: Dict[str, np.ndarray], meta: dict):
    """The fitted method (no training side kept) from :func:`save_state`'s output."""
    from .registry import get_method
    method = get_method(meta["name"], **{k: v for k, v in meta["config"].items()})
    for k, spec in meta["attrs"].items():
        kind = spec["type"]
        if kind == "array":
            setattr(method, k, np.asarray(arrays[k]))
        elif kind == "final_layer":
            setattr(method, k, FinalLayer(w=np.asarray(arrays[k + ".w"]),
                                          b=np.asarray(arrays[k + ".b"]) if spec["bias"] else None, l2=spec["l2"]))
        elif kind == "tuple":
            setattr(method, k, tuple(spec["value"]))
        else:
            setattr(method, k, spec["value"])
    return method

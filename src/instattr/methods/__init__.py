"""Instance-attribution methods on the last layer, by name.

>>> from instattr.methods import get_method, top_k
>>> scores = get_method("if").fit(train, run.final_layer()).score(test)   # (n_test, n_train) float32
>>> idx, vals = top_k(scores, 5)                              # the five strongest supporters

See DESIGN.md (the score convention) and each family's module for the math.
"""
from . import gradient, representer, similarity, tracin  # noqa: E402,F401  (register the methods)
from .base import Attributor, NotFittedError
from .registry import METHOD_NAMES, expand_methods, get_method, register, registered
from .topk import bottom_k, stream_top_k, top_k

__all__ = ["Attributor", "NotFittedError", "METHOD_NAMES", "register", "registered", "get_method",
           "expand_methods", "top_k", "bottom_k", "stream_top_k"]

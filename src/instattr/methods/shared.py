"""Per-row quantities that several methods compute alike, computed once while they work together.

The paper's methods repeat each other's row work: nn-*, gd, gc and rep all centre the same
features on the same training mean, if and rif form the same gradients and the same
``H^-1 g_t``, gd, gc, if and rif the same class probabilities. Inside ``with sharing():``
(``instattr attribute`` and :func:`instattr.attribution.score_together` enter it) :func:`once`
computes each such quantity once per distinct input and hands every later caller the same
arrays; outside it, it just computes. Callers treat what they get as read-only.

An input is identified by its memory (data pointer, shape, strides, dtype), and the memo holds a
reference to it so that the memory cannot be freed and reused while the memo lives; inputs are
not written to while methods are fitted and scored, so equal memory means equal values. The
memo is per context (a ``ContextVar``), so threads do not see each other's.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator, Optional, TypeVar

import numpy as np

T = TypeVar("T")
_MEMO: ContextVar[Optional[dict]] = ContextVar("instattr_shared_rows", default=None)


@contextmanager
def sharing() -> Iterator[None]:
    """Share row quantities among the methods fitted and scored inside (nested: the outer one)."""
    if _MEMO.get() is not None:
        yield
        return
    token = _MEMO.set({})
    try:
        yield
    finally:
        _MEMO.reset(token)


def _identity(a) -> tuple:
    if isinstance(a, np.ndarray):
        return ("array", a.__array_interface__["data"][0], a.shape, a.strides, a.dtype.str)
    if isinstance(a, (str, bytes, int, float, bool, type(None))):
        return ("value", a)
    if isinstance(a, tuple):
        return ("tuple",) + tuple(_identity(x) for x in a)
    raise TypeError(f"shared.once: cannot identify a {type(a).__name__}")


MEMO_BYTES = 256 << 20    # what a memo keeps at most; the oldest entries go first


def once(what: str, inputs: tuple, compute: Callable[[], T]) -> T:
    """``compute()``, or inside :func:`sharing` the result of the first call with the same
    ``what`` and ``inputs`` (arrays by memory, small values by value). The memo keeps at most
    ``MEMO_BYTES`` of results (a split streamed in blocks does not pile up in it)."""
    memo = _MEMO.get()
    if memo is None:
        return compute()
    key = (what, _identity(inputs))
    hit = memo.get(key)
    if hit is None:
        hit = memo[key] = (inputs, compute())      # the inputs are kept: their memory stays theirs
        total = sum(_nbytes(v) for _, v in memo.values())
        while total > MEMO_BYTES and len(memo) > 1:
            oldest = next(iter(memo))
            total -= _nbytes(memo.pop(oldest)[1])
    return hit[1]


def _nbytes(value) -> int:
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, tuple):
        return sum(_nbytes(v) for v in value)
    return 0


def value_of(a: Optional[np.ndarray]) -> Optional[bytes]:
    """A small fitted array (a centre, a weight) as a key part: by value, not by memory."""
    return None if a is None else np.ascontiguousarray(a).tobytes()

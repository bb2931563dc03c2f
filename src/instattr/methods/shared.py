"""Per-row quantities that several methods compute alike, computed once while they work together.

The paper's methods repeat each other's row work: nn-*, gd, gc and rep all centre the same
features on the same training mean, if and rif form the same gradients and the same
``H^-1 g_t``, gd, gc, if and rif the same class probabilities. Inside ``with sharing():``
(``instattr attribute`` and :func:`instattr.attribution.score_together` enter it) :func:`once`
computes each such quantity once per distinct input and hands every later caller the same
arrays; outside it, it just computes. Callers treat what they get as read-only.

An input is identified by its memory (data pointer, shape, strides, dtype), and the memo holds a
reference to it so that the memory cannot be freed and reused while the memo lives; inputs are
not written to while methods are fitted and scored, so equal memory means equal values (a caller
that reuses one buffer for successive batches inside its own ``sharing()`` would get the first
batch's results). The memo is per context (a ``ContextVar``): threads do not see each other's,
and a copied context shares its memo under a lock.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator, Optional, TypeVar

import numpy as np

T = TypeVar("T")
MEMO_BYTES = 256 << 20    # what a memo keeps at most; the oldest entries go first
_MEMO: ContextVar[Optional["_Memo"]] = ContextVar("instattr_shared_rows", default=None)


class _Memo:
    """Results by key, oldest first, and a lock: a copied context (a task, a thread started
    with one) shares its memo."""

    def __init__(self):
        self.entries: dict = {}
        self.bytes = 0
        self.lock = threading.Lock()


@contextmanager
def sharing() -> Iterator[None]:
    """Share row quantities among the methods fitted and scored inside (nested: the outer one)."""
    if _MEMO.get() is not None:
        yield
        return
    token = _MEMO.set(_Memo())
    try:
        yield
    finally:
        _MEMO.reset(token)


class _Unknown(Exception):
    pass


def _identity(a) -> tuple:
    if isinstance(a, np.ndarray):
        return ("array", a.__array_interface__["data"][0], a.shape, a.strides, a.dtype.str)
    if isinstance(a, (str, bytes, int, float, bool, type(None))):
        return ("value", a)
    if isinstance(a, tuple):
        return ("tuple",) + tuple(_identity(x) for x in a)
    raise _Unknown(type(a).__name__)


def once(what: str, inputs: tuple, compute: Callable[[], T]) -> T:
    """``compute()``, or inside :func:`sharing` the result of the first call with the same
    ``what`` and ``inputs`` (arrays by memory, small values by value), made read-only
(:func:`_read_only`). Inputs it
    cannot identify (e.g. lists) are computed for each call. The memo keeps at most
    ``MEMO_BYTES`` of results and never one over a quarter of that (a split streamed in blocks
    does not pile up in it)."""
    memo = _MEMO.get()
    if memo is None:
        return compute()
    try:
        key = (what, _identity(inputs))
    except _Unknown:
        return compute()
    with memo.lock:
        hit = memo.entries.get(key)
    if hit is not None:
        return hit[1]
    value = compute()
    size = _nbytes(value)
    if size > MEMO_BYTES // 4:
        return value
    _read_only(value, [a for a in _arrays(inputs)])
    with memo.lock:
        hit = memo.entries.setdefault(key, (inputs, value))   # the inputs are kept: their memory stays theirs
        if hit[1] is value:
            memo.bytes += size
            while memo.bytes > MEMO_BYTES and len(memo.entries) > 1:
                oldest = next(iter(memo.entries))
                memo.bytes -= _nbytes(memo.entries.pop(oldest)[1])
    return hit[1]


def _arrays(value) -> Iterator[np.ndarray]:
    if isinstance(value, np.ndarray):
        yield value
    elif isinstance(value, tuple):
        for v in value:
            yield from _arrays(v)


def _read_only(value, inputs) -> None:
    """Results become read-only, so that a caller writing into an array other callers were
    handed fails instead of changing their scores; an input handed back (a float64 array
    ``asarray`` did not copy) stays as its owner made it."""
    for v in _arrays(value):
        if not any(np.may_share_memory(v, a) for a in inputs):
            v.flags.writeable = False


def _nbytes(value) -> int:
    return sum(v.nbytes for v in _arrays(value))


def value_of(a: Optional[np.ndarray]) -> Optional[bytes]:
    """A small fitted array (a centre, a weight) as a key part: by value, not by memory."""
    return None if a is None else np.ascontiguousarray(a).tobytes()

"""Top-k over score matrices: supporters (largest scores) and opponents (smallest).

Results are ``(indices, values)``, both (n_rows, k), best first per row; ties go to the lower
training index, so results are deterministic. ``stream_top_k`` consumes the ``(rows, block)``
pairs of :meth:`Attributor.score_chunks` and keeps only k columns per row.
"""
from __future__ import annotations

from typing import Iterable, Tuple

import numpy as np

from ..errors import InstattrError

TopK = Tuple[np.ndarray, np.ndarray]


def _largest(scores: np.ndarray, k: int) -> TopK:
    s = np.asarray(scores)
    if s.ndim != 2:
        raise InstattrError(f"scores must be a 2-D (n_test, n_train) matrix, got shape {s.shape}")
    if np.isnan(s).any():
        raise InstattrError("scores contain NaN")
    n, m = s.shape
    k = min(int(k), m)
    if k < 0:
        raise InstattrError(f"k must be >= 0, got {k}")
    if k == 0 or n == 0:
        return np.zeros((n, k), dtype=np.int64), np.zeros((n, k), dtype=s.dtype)
    kth = np.partition(s, m - k, axis=1)[:, m - k, None]        # k-th largest value per row
    above = s > kth
    tied = s == kth
    need = k - above.sum(axis=1, keepdims=True)                 # how many ties to keep
    keep = above | (tied & (np.cumsum(tied, axis=1) <= need))   # lowest-index ties first
    idx = np.nonzero(keep)[1].reshape(n, k)                     # ascending index within a row
    vals = np.take_along_axis(s, idx, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1).astype(np.int64), np.take_along_axis(vals, order, axis=1)


def top_k(scores: np.ndarray, k: int) -> TopK:
    """The k largest scores per row (most supporting first)."""
    return _largest(scores, k)


def bottom_k(scores: np.ndarray, k: int) -> TopK:
    """The k smallest scores per row (most opposing first)."""
    idx, vals = _largest(-np.asarray(scores), k)
    return idx, -vals


def stream_top_k(chunks: Iterable[Tuple[slice, np.ndarray]], k: int, largest: bool = True) -> TopK:
    """Top-k (or bottom-k) per test row from ``(row slice, block)`` pairs; the blocks must
    cover rows 0..n-1 once each, in any order. Memory: one block plus n x k results."""
    pick = top_k if largest else bottom_k
    parts = []
    for rows, block in chunks:
        start, stop, _ = rows.indices(rows.start + len(block) if rows.stop is None else rows.stop)
        if stop - start != len(block):
            raise ValueError(f"block of {len(block)} rows does not match rows {start}:{stop}")
        parts.append((start, stop) + pick(block, k))
        del block  # release it before the producer computes the next one
    parts.sort(key=lambda p: p[0])
    if any(a[1] != b[0] for a, b in zip(parts, parts[1:])) or (parts and parts[0][0] != 0):
        raise ValueError("score blocks must cover test rows 0..n-1 exactly once")
    if not parts:
        return np.zeros((0, max(int(k), 0)), dtype=np.int64), np.zeros((0, max(int(k), 0)), dtype=np.float32)
    return np.concatenate([p[2] for p in parts]), np.concatenate([p[3] for p in parts])

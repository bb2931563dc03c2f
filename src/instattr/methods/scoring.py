"""The one scorer: blocks of test rows against blocks of training rows, for one or many methods.

Each method contributes a :class:`Member`: a test side per block of test rows, a train side
(in memory, or shards of an index), and a finishing step (:mod:`.sides`). Per pair of blocks the
scorer forms each distinct product ``U V^T`` once (members whose sides share a key share it),
then each member's scores ``finish(r c (P + x + y))``, and hands them to a sink: the dense
matrix (:func:`score_dense`, :func:`dense_row_blocks`) or a running top-k
(:func:`score_top_k`). Blocks follow a fixed :class:`Grid` from row 0, so every path -- dense,
top-k, an index's shards, Ray tasks -- performs the same float32 operations on the same blocks
and gets bit-identical scores (BLAS results depend on a product's shape).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import InstattrError
from .sides import INNER_PRODUCT, Finish, Side

TopK = Tuple[np.ndarray, np.ndarray]
TEST_BLOCK = 1024      # test rows per block
TRAIN_BLOCK = 16384    # training rows per block (an index's shards hold a multiple of it)


@dataclass(frozen=True)
class Grid:
    """Block sizes: ``test_rows`` x ``train_rows`` scores per block (64 MB of float32 by default)."""
    test_rows: int = TEST_BLOCK
    train_rows: int = TRAIN_BLOCK

    def __post_init__(self):
        if int(self.test_rows) < 1 or int(self.train_rows) < 1:
            raise InstattrError(f"block sizes must be positive, got {self.test_rows} x {self.train_rows}")

    def test_blocks(self, n: int) -> List[slice]:
        return [slice(s, min(s + self.test_rows, n)) for s in range(0, n, self.test_rows)]

    def train_blocks(self, n: int, start: int = 0, stop: Optional[int] = None) -> List[slice]:
        stop = n if stop is None else stop
        return [slice(s, min(s + self.train_rows, stop)) for s in range(start, stop, self.train_rows)]


@dataclass
class Member:
    """One method in a scoring pass. ``test(rows)`` gives the test side of test rows ``rows``;
    ``train`` has ``len`` and ``rows(slice) -> Side``; ``dense(rows)``, when set, replaces the
    inner product (methods with no stored train side) and gives full score rows."""
    name: str
    test: Optional[Callable[[slice], Side]] = None
    train: object = None
    finish: Finish = INNER_PRODUCT
    dense: Optional[Callable[[slice], np.ndarray]] = None
    n_train: int = 0

    def __post_init__(self):
        if self.train is not None:
            self.n_train = len(self.train)


TILE_BYTES = 1 << 20    # rows of a block finished together: the passes below then stay in cache


def finished(product: np.ndarray, test: Side, train: Side, finish: Finish, out: np.ndarray,
             memo: Optional[list] = None) -> np.ndarray:
    """``out`` = finish(r c ((P + x) + y)), always with the same operations in the same order
    (elementwise, so tiling rows or reusing another member's ``(P + x) + y`` from ``memo``, a list
    kept per product, changes no bit)."""
    if test.offset is not None or train.offset is not None:
        product = _offset_product(product, test.offset, train.offset, memo)
    rows = max(1, TILE_BYTES // (4 * max(1, product.shape[1])))
    if finish is not INNER_PRODUCT:        # norms once per block, sliced by the tiles
        test.sq_norms()
        train.sq_norms()
    for s in range(0, len(product), rows):
        t = slice(s, s + rows)
        ts = test.rows(t) if rows < len(product) else test
        o, wrote = out[t], False
        for arr, axis in ((ts.scale, 1), (train.scale, 0)):
            if arr is not None:
                np.multiply(o if wrote else product[t], arr[:, None] if axis else arr[None, :], out=o)
                wrote = True
        if not wrote:
            np.copyto(o, product[t])
        finish(o, ts, train)
    return out


def _same(a: Optional[np.ndarray], b: Optional[np.ndarray]) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))


def _offset_product(product: np.ndarray, x: Optional[np.ndarray], y: Optional[np.ndarray], memo) -> np.ndarray:
    """``(P + x) + y`` for one block, shared by the members with the same offsets."""
    for mx, my, summed in memo or ():
        if _same(mx, x) and _same(my, y):
            return summed
    summed = np.empty_like(product)
    rows = max(1, TILE_BYTES // (4 * max(1, product.shape[1])))
    for s in range(0, len(product), rows):
        t = slice(s, s + rows)
        src = product[t]
        for arr, axis in ((x, 1), (y, 0)):
            if arr is not None:
                np.add(src, arr[t, None] if axis else arr[None, :], out=summed[t])
                src = summed[t]
    if memo is not None:
        memo.append((x, y, summed))
    return summed


def _pair_blocks(members: Sequence[Member], tests: Dict[str, Side], cols: slice, trains=None):
    """Yield (member, test side, train side, product) for one block of training rows; members
    whose sides share a key share one product. ``trains`` maps names to train sides already cut."""
    products: Dict[tuple, tuple] = {}
    for m in members:
        ts = tests[m.name]
        tr = trains[m.name] if trains is not None else m.train.rows(cols)
        key = (ts.key, tr.key) if ts.key and tr.key else None
        p, memo = products.get(key, (None, None)) if key is not None else (None, None)
        if p is None:
            p, memo = ts.vectors @ tr.vectors.T, []
            if key is not None:
                products[key] = p, memo
        yield m, ts, tr, p, memo


def dense_row_blocks(members: Sequence[Member], n_test: int, grid: Grid = Grid(),
                     full: Optional[Dict[str, np.ndarray]] = None
                     ) -> Iterator[Tuple[slice, Dict[str, np.ndarray]]]:
    """Yield (test rows, {name: (rows, n_train) float32 scores}) per block of test rows; with
    ``full`` (name -> (n_test, n_train) arrays) the blocks are written into it."""
    inner = [m for m in members if m.dense is None]
    for rows in grid.test_blocks(n_test):
        if full is not None:
            out = {m.name: full[m.name][rows] for m in members}
        else:
            out = {m.name: np.empty((rows.stop - rows.start, m.n_train), dtype=np.float32) for m in members}
        for m in members:
            if m.dense is not None:
                out[m.name][...] = m.dense(rows)
        tests = {m.name: m.test(rows) for m in inner}
        n_train = inner[0].n_train if inner else 0
        for cols in grid.train_blocks(n_train):
            for m, ts, tr, p, memo in _pair_blocks(inner, tests, cols):
                finished(p, ts, tr, m.finish, out[m.name][:, cols], memo)
        yield rows, out


def score_dense(members: Sequence[Member], n_test: int, grid: Grid = Grid()) -> Dict[str, np.ndarray]:
    """The full (n_test, n_train) float32 matrix of every member."""
    full = {m.name: np.empty((n_test, m.n_train), dtype=np.float32) for m in members}
    for _ in dense_row_blocks(members, n_test, grid, full):
        pass
    return full


# ---------------------------------------------------------------- top-k
def merge_top_k(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, n_rows: int, k: int,
                largest: bool = True, pad: bool = False) -> TopK:
    """From candidate (row, column, value) triples, each row's k best by (value, then lower
    column): ``(columns, values)``, each (n_rows, k'), k' = min(k, candidates per row); with
    ``pad``, k' = k and rows with fewer candidates end in column -1, value NaN."""
    order = np.lexsort((cols, -vals if largest else vals, rows))
    rows, cols, vals = rows[order], cols[order], vals[order]
    if n_rows == 0:
        return np.zeros((0, max(k, 0)), dtype=np.int64), np.zeros((0, max(k, 0)), dtype=np.float32)
    counts = np.bincount(rows, minlength=n_rows)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(len(rows)) - starts[rows]
    if pad:
        keep = rank < k
        out_c, out_v = np.full((n_rows, k), -1, dtype=np.int64), np.full((n_rows, k), np.nan, dtype=np.float32)
        out_c[rows[keep], rank[keep]] = cols[keep]
        out_v[rows[keep], rank[keep]] = vals[keep]
        return out_c, out_v
    width = int(min(k, counts.min()))
    keep = rank < width
    return cols[keep].reshape(n_rows, width), vals[keep].reshape(n_rows, width)


class RunningTopK:
    """The k best columns per row seen so far, over blocks of columns given in ascending order."""

    def __init__(self, n_rows: int, k: int, largest: bool = True):
        self.n, self.k, self.largest = n_rows, int(k), largest
        self.idx = np.zeros((n_rows, 0), dtype=np.int64)
        self.vals = np.zeros((n_rows, 0), dtype=np.float32)

    def update(self, block: np.ndarray, start: int) -> None:
        """Add columns ``start..start + block.shape[1]`` (higher than any seen before)."""
        n, m = block.shape
        if self.k == 0 or m == 0 or n == 0:
            return
        if np.isnan(block).any():
            raise InstattrError("scores contain NaN")
        if self.vals.shape[1] >= self.k:     # full: only strictly better values can enter (ties lose to lower columns)
            thr = self.vals[:, -1][:, None]
            cand = block > thr if self.largest else block < thr
            if cand.sum() > 4 * n * self.k:
                cand &= self._block_cut(block)
        else:
            cand = self._block_cut(block)
        r, c = np.nonzero(cand)
        v = block[r, c]
        rows = np.concatenate([np.repeat(np.arange(n), self.vals.shape[1]), r])
        cols = np.concatenate([self.idx.ravel(), c.astype(np.int64) + start])
        vals = np.concatenate([self.vals.ravel(), v.astype(np.float32, copy=False)])
        self.idx, self.vals = merge_top_k(rows, cols, vals, n, self.k, self.largest)

    def _block_cut(self, block: np.ndarray) -> np.ndarray:
        """Entries at least as good as each row's k-th best within the block (ties kept)."""
        m = block.shape[1]
        if m <= self.k:
            return np.ones(block.shape, dtype=bool)
        if self.largest:
            kth = np.partition(block, m - self.k, axis=1)[:, m - self.k, None]
            return block >= kth
        kth = np.partition(block, self.k - 1, axis=1)[:, self.k - 1, None]
        return block <= kth

    def result(self) -> TopK:
        return self.idx, self.vals


def score_top_k(members: Sequence[Member], n_test: int, k: int, bottom_k: int = 0, grid: Grid = Grid(),
                train_range: Optional[Tuple[int, int]] = None, progress=None) -> Dict[str, Dict[str, TopK]]:
    """Per member, ``{"top": (columns, values)}`` (and ``"bottom"`` with ``bottom_k``): the k
    largest (smallest) scores per test row, best first, ties to the lower training row; identical
    to :func:`instattr.methods.topk.top_k` on :func:`score_dense`'s matrix. Memory: a few blocks.
    ``train_range`` limits the columns to ``[start, stop)`` (grid-aligned; columns stay global)."""
    if k < 0 or bottom_k < 0:
        raise InstattrError(f"k must be >= 0, got {k} and {bottom_k}")
    res = {m.name: {"top": [], **({"bottom": []} if bottom_k else {})} for m in members}
    inner = [m for m in members if m.dense is None]
    for rows in grid.test_blocks(n_test):
        n = rows.stop - rows.start
        run = {m.name: {"top": RunningTopK(n, k, True), **({"bottom": RunningTopK(n, bottom_k, False)}
                                                           if bottom_k else {})} for m in members}
        for m in members:
            if m.dense is not None:
                block = np.ascontiguousarray(m.dense(rows), dtype=np.float32)
                for acc in run[m.name].values():
                    acc.update(block, 0)
        tests = {m.name: m.test(rows) for m in inner}
        n_train = inner[0].n_train if inner else 0
        start, stop = train_range or (0, n_train)
        buf = None
        for cols in grid.train_blocks(n_train, start, stop):
            for m, ts, tr, p, memo in _pair_blocks(inner, tests, cols):
                if buf is None or buf.shape != p.shape:
                    buf = np.empty(p.shape, dtype=np.float32)
                finished(p, ts, tr, m.finish, buf, memo)
                for acc in run[m.name].values():
                    acc.update(buf, cols.start)
            if progress is not None:
                progress(cols.stop - cols.start)
        for m in members:
            for which, acc in run[m.name].items():
                res[m.name][which].append(acc.result())
    return {name: {which: _stack(parts, k if which == "top" else bottom_k) for which, parts in d.items()}
            for name, d in res.items()}


def _stack(parts: List[TopK], k: int) -> TopK:
    if not parts:
        return np.zeros((0, k), dtype=np.int64), np.zeros((0, k), dtype=np.float32)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def merge_shards(parts: Sequence[TopK], k: int, largest: bool = True) -> TopK:
    """Merge per-shard top-k results (global columns) of the same test rows into one."""
    parts = [p for p in parts if p[0].size] or list(parts[:1])
    n = len(parts[0][0])
    rows = np.concatenate([np.repeat(np.arange(n), p[0].shape[1]) for p in parts])
    cols = np.concatenate([p[0].ravel() for p in parts])
    vals = np.concatenate([p[1].ravel() for p in parts])
    return merge_top_k(rows, cols, vals, n, k, largest)

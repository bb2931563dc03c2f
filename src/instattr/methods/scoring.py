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


def _tile_rows(product: np.ndarray) -> int:
    return max(1, TILE_BYTES // (4 * max(1, product.shape[1])))


def finished(product: np.ndarray, test: Side, train: Side, finish: Finish, out: np.ndarray) -> np.ndarray:
    """``out`` = finish(r c ((P + x) + y)), always with the same operations in the same order
    (elementwise, so tiling rows or finishing several members tile by tile
    (:func:`finished_together`) changes no bit)."""
    finished_together(product, [(test, train, finish)], [out])
    return out


def finished_together(product: np.ndarray, parts: Sequence[Tuple[Side, Side, Finish]],
                      outs: Sequence[np.ndarray]) -> None:
    """:func:`finished` for several members sharing ``product`` (``parts``: their (test side,
    train side, finish)), tile by tile: each tile of the product, and of ``(P + x) + y`` for each
    distinct pair of offsets, is formed once and read from cache by every member. Same bits."""
    offsets: list = []                     # distinct (x, y) pairs; which[j]: part j's, or -1
    which = []
    for ts, tr, finish in parts:
        _prepare(finish, ts, tr)
        if ts.offset is None and tr.offset is None:
            which.append(-1)
            continue
        same = [i for i, (x, y) in enumerate(offsets) if _same(x, ts.offset) and _same(y, tr.offset)]
        if not same:
            offsets.append((ts.offset, tr.offset))
        which.append(same[0] if same else len(offsets) - 1)
    rows = _tile_rows(product)
    bufs = [np.empty((min(rows, len(product)), product.shape[1]), dtype=np.float32) for _ in offsets]
    for s in range(0, len(product), rows):
        t = slice(s, s + rows)
        p = product[t]
        sums = [_offset_tile(p, None if x is None else x[t], y, buf[:len(p)])
                for (x, y), buf in zip(offsets, bufs)]
        for (ts, tr, finish), out, w in zip(parts, outs, which):
            _finish_tile(p if w < 0 else sums[w], ts.rows(t) if rows < len(product) else ts, tr, finish, out[t])


def _prepare(finish: Finish, test: Side, train: Side) -> None:
    if finish is not INNER_PRODUCT:        # norms once per block, sliced by the tiles
        test.sq_norms()
        train.sq_norms()


def _finish_tile(src: np.ndarray, test: Side, train: Side, finish: Finish, out: np.ndarray) -> None:
    """out = finish(r c src) for one tile of rows (``test``: those rows)."""
    wrote = False
    for arr, axis in ((test.scale, 1), (train.scale, 0)):
        if arr is not None:
            np.multiply(out if wrote else src, arr[:, None] if axis else arr[None, :], out=out)
            wrote = True
    if wrote:
        finish(out, test, train)
    else:
        finish.finish_into(src, out, test, train)


def _same(a: Optional[np.ndarray], b: Optional[np.ndarray]) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and
                                         (a is b or np.array_equal(a, b)))


def _offset_tile(src: np.ndarray, x: Optional[np.ndarray], y: Optional[np.ndarray], out: np.ndarray) -> np.ndarray:
    """``(src + x) + y`` for one tile of rows (``x``: those rows' offsets)."""
    for arr, axis in ((x, 1), (y, 0)):
        if arr is not None:
            np.add(src, arr[:, None] if axis else arr[None, :], out=out)
            src = out
    return out


def _cut(m: Member, cols: slice) -> Side:
    if m.finish is not INNER_PRODUCT and isinstance(m.train, Side):
        m.train.sq_norms()          # once for the whole side; each block of rows inherits its part
    return m.train.rows(cols)


def _shared_products(members: Sequence[Member], tests: Dict[str, Side], cols: slice, buffer: list):
    """Yield (product, [(member, test side, train side)]) for one block of training rows, one
    product per group of members whose sides share a key. Each product is written into
    ``buffer`` (:func:`_buffers`), so it is valid until the next one is asked for."""
    groups: Dict[object, list] = {}
    for m in members:
        ts, tr = tests[m.name], _cut(m, cols)
        key = (ts.key, tr.key) if ts.key and tr.key else ("alone", m.name)
        groups.setdefault(key, []).append((m, ts, tr))
    for items in groups.values():
        ts, tr = items[0][1], items[0][2]
        yield np.matmul(ts.vectors, tr.vectors.T, out=_buffers(buffer, 1, (len(ts), len(tr)))[0]), items


def dense_row_blocks(members: Sequence[Member], n_test: int, grid: Grid = Grid(),
                     full: Optional[Dict[str, np.ndarray]] = None
                     ) -> Iterator[Tuple[slice, Dict[str, np.ndarray]]]:
    """Yield (test rows, {name: (rows, n_train) float32 scores}) per block of test rows; with
    ``full`` (name -> (n_test, n_train) arrays) the blocks are written into it. Members sharing
    a product are finished together (:func:`finished_together`)."""
    inner = [m for m in members if m.dense is None]
    buffer: list = []
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
            for p, items in _shared_products(inner, tests, cols, buffer):
                finished_together(p, [(ts, tr, m.finish) for m, ts, tr in items],
                                  [out[m.name][:, cols] for m, _, _ in items])
        yield rows, out


def score_dense(members: Sequence[Member], n_test: int, grid: Grid = Grid()) -> Dict[str, np.ndarray]:
    """The full (n_test, n_train) float32 matrix of every member."""
    full = {m.name: np.empty((n_test, m.n_train), dtype=np.float32) for m in members}
    for _ in dense_row_blocks(members, n_test, grid, full):
        pass
    return full


# ---------------------------------------------------------------- top-k
def merge_top_k(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, n_rows: int, k: int,
                largest: bool = True, pad: bool = False, ties_in_order: bool = False) -> TopK:
    """From candidate (row, column, value) triples, each row's k best by (value, then lower
    column): ``(columns, values)``, each (n_rows, k'), k' = min(k, candidates per row); with
    ``pad``, k' = k and rows with fewer candidates end in column -1, value NaN. ``ties_in_order``:
    the candidates already put the lower column first among equal (row, value) (the running
    top-k's: kept entries, then a block's in row-major order), so one stable sort on a (row,
    value) key does what the three-key lexsort does."""
    order = _value_order(rows, vals, largest) if ties_in_order else np.lexsort((cols, -vals if largest else vals, rows))
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


def _value_order(rows: np.ndarray, vals: np.ndarray, largest: bool) -> np.ndarray:
    """The stable order by (row, value best first) of float32 ``vals``, -0.0 tying with 0.0."""
    bits = (vals.astype(np.float32) + np.float32(0)).view(np.uint32)
    order_bits = np.where(bits >> 31, ~bits, bits | np.uint32(1 << 31))   # ascending as the floats
    if largest:
        order_bits = ~order_bits
    return np.argsort((rows.astype(np.uint64) << np.uint64(32)) | order_bits.astype(np.uint64), kind="stable")


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
        if np.isnan(block.min()):           # min propagates NaN: one reduction, no mask
            raise InstattrError("scores contain NaN")
        full = self.vals.shape[1] >= self.k
        if full:     # only strictly better values can enter (ties lose to lower columns)
            thr = self.vals[:, -1][:, None]
            cand = np.greater(block, thr) if self.largest else np.less(block, thr)
            count = np.count_nonzero(cand)
            if count == 0:
                return
            if count > 4 * n * self.k:
                cand &= self._block_cut(block)
        else:
            cand = self._block_cut(block)
        flat = np.flatnonzero(cand)              # row-major: rows ascending, columns ascending in a row
        r, c = np.divmod(flat, m)
        v = block.reshape(-1)[flat]
        touched = np.arange(n)
        if full:                                 # merge only the rows that have candidates
            touched = r[np.concatenate(([True], r[1:] != r[:-1]))]
            r = np.searchsorted(touched, r)
        width = self.vals.shape[1]
        rows = np.concatenate([np.repeat(np.arange(len(touched)), width), r])
        cols = np.concatenate([self.idx[touched].ravel(), c + start])
        vals = np.concatenate([self.vals[touched].ravel(), v.astype(np.float32, copy=False)])
        idx, best = merge_top_k(rows, cols, vals, len(touched), self.k, self.largest, ties_in_order=True)
        if full:
            self.idx[touched], self.vals[touched] = idx, best
        else:
            self.idx, self.vals = idx, best

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
    to :func:`instattr.methods.topk.top_k` on :func:`score_dense`'s matrix. Memory: a few blocks
    (one product, and one block of scores per member of the largest group sharing it).
    ``train_range`` limits the columns to ``[start, stop)`` (grid-aligned; columns stay global)."""
    if k < 0 or bottom_k < 0:
        raise InstattrError(f"k must be >= 0, got {k} and {bottom_k}")
    res = {m.name: {"top": [], **({"bottom": []} if bottom_k else {})} for m in members}
    inner = [m for m in members if m.dense is None]
    product: list = []                      # the product of the group being finished, reused
    bufs: List[np.ndarray] = []             # its members' finished scores, reused
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
        for cols in grid.train_blocks(n_train, start, stop):
            for p, items in _shared_products(inner, tests, cols, product):
                outs = _buffers(bufs, len(items), p.shape)
                finished_together(p, [(ts, tr, m.finish) for m, ts, tr in items], outs)
                for (m, _, _), buf in zip(items, outs):
                    for acc in run[m.name].values():
                        acc.update(buf, cols.start)
            if progress is not None:
                progress(cols.stop - cols.start)
        for m in members:
            for which, acc in run[m.name].items():
                res[m.name][which].append(acc.result())
    return {name: {which: _stack(parts, k if which == "top" else bottom_k) for which, parts in d.items()}
            for name, d in res.items()}


def _buffers(pool: List[np.ndarray], count: int, shape: tuple) -> List[np.ndarray]:
    """``count`` C-contiguous float32 arrays of ``shape``: views of flat arrays that ``pool``
    keeps for the next block (grown when too small, never shrunk: the narrower last block of
    training rows and the next block of test rows touch no fresh pages)."""
    size = int(np.prod(shape))
    if pool and pool[0].size < size:
        pool.clear()
    while len(pool) < count:
        pool.append(np.empty(max(size, pool[0].size if pool else 0), dtype=np.float32))
    return [a[:size].reshape(shape) for a in pool[:count]]


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

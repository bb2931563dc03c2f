"""One side of a method's inner product, and the per-pair finishing steps.

Every method scores ``score(t, i) = finish(r_t c_i (<u_t, v_i> + x_t + y_i))``: ``u``/``v`` are
float32 base vectors of the test/train rows, ``x``/``y`` optional per-row offsets, ``r``/``c``
optional per-row scales, and ``finish`` a per-pair step (identity, or the negative Euclidean
distance of nn-euc). A :class:`Side` holds ``(vectors, offset, scale)`` for some rows; its
``key`` names the base vectors, so methods whose sides share a key share the product
``U V^T`` (nn-dot, nn-cos, nn-euc, gd, gc and rep on binary tasks all use the centred features).

Any side is also a plain inner product over augmented vectors (:func:`plain_vectors`),
``<[r u, r x, r], [c v, c, c y]>``, which is what a vector index (FAISS) searches; nn-euc's
``-sqrt(|a|^2 + |b|^2 - 2ab)`` is monotone, for a fixed query, in ``<[2a, -1], [b, |b|^2]>``.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Optional

import numpy as np


@dataclass
class Side:
    """Rows of one side: ``vectors`` (n, D) float32, ``offset``/``scale`` (n,) float32 or None."""
    vectors: np.ndarray
    offset: Optional[np.ndarray] = None
    scale: Optional[np.ndarray] = None
    key: tuple = ()
    norms: Optional[np.ndarray] = field(default=None, repr=False, compare=False)  # cached sq_norms

    def __len__(self) -> int:
        return len(self.vectors)

    def sq_norms(self) -> np.ndarray:
        """Squared norms of the vectors (computed once, then kept; row blocks inherit them)."""
        if self.norms is None:
            self.norms = sq_norms(self.vectors)
        return self.norms

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def rows(self, rows) -> "Side":
        """The rows ``rows`` (a slice or indices), float32."""
        def pick(a):
            return (None if a is None else np.asarray(a[rows], dtype=np.float32))
        return Side(np.ascontiguousarray(self.vectors[rows], dtype=np.float32), pick(self.offset),
                    pick(self.scale), self.key, pick(self.norms))

    @classmethod
    def gather(cls, parts, n: int) -> "Side":
        """One side of ``n`` rows from ``parts``, (rows, Side) pairs covering them, each written
        into arrays allocated once (never a list of blocks and their concatenation at once)."""
        out = None
        for rows, part in parts:
            if out is None:
                out = cls(np.empty((n, part.dim), dtype=np.float32),
                          None if part.offset is None else np.empty(n, dtype=np.float32),
                          None if part.scale is None else np.empty(n, dtype=np.float32), part.key)
            out.vectors[rows] = part.vectors
            for name in ("offset", "scale"):
                if getattr(out, name) is not None:
                    getattr(out, name)[rows] = getattr(part, name)
        if out is None:
            raise ValueError("Side.gather: no parts")
        return out

    @classmethod
    def concat(cls, parts) -> "Side":
        parts = list(parts)

        def cat(name):
            arrays = [getattr(p, name) for p in parts]
            return None if arrays[0] is None else np.concatenate(arrays)
        return cls(np.concatenate([p.vectors for p in parts]), cat("offset"), cat("scale"), parts[0].key)


def side(vectors, offset=None, scale=None, key: tuple = ()) -> Side:
    """A :class:`Side` with every array cast to C-contiguous float32."""
    def f32(a):
        return (None if a is None else np.ascontiguousarray(a, dtype=np.float32))
    return Side(f32(vectors), f32(offset), f32(scale), tuple(key))


def digest(*arrays) -> str:
    """A short content digest of fitted arrays, for product keys."""
    h = hashlib.sha1()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


NORM_TILE = 512   # rows per float64 temporary when summing squares


def row_sq_sums(x: np.ndarray, transform: Optional[np.ndarray] = None) -> np.ndarray:
    """Squared norms of the rows of ``x`` (with ``transform``, k x d: of ``transform @ x_i``),
    float64, a tile of ``NORM_TILE`` rows at a time so that the float64 temporaries stay in cache
    (per row the same sums as on the whole array)."""
    out = np.empty(len(x))
    for s in range(0, len(x), NORM_TILE):
        t = np.asarray(x[s:s + NORM_TILE], dtype=np.float64)
        if transform is not None:
            t = t @ transform.T
        out[s:s + NORM_TILE] = (t * t).sum(axis=1)
    return out


def sq_norms(vectors: np.ndarray) -> np.ndarray:
    """Squared row norms of float32 vectors, summed row by row in float64, rounded to float32."""
    return row_sq_sums(vectors).astype(np.float32)


class Finish:
    """The identity: the score is the (offset, scaled) inner product. Subclasses transform a
    block in place; ``ann_train``/``ann_query`` give vectors whose plain inner product orders
    each query's candidates as the finished score does (largest first)."""

    name = "inner-product"

    def __call__(self, block: np.ndarray, test: Side, train: Side) -> None:
        """Finish ``block`` (len(test), len(train)) in place."""

    def finish_into(self, src: np.ndarray, out: np.ndarray, test: Side, train: Side) -> None:
        """``out`` = the finished ``src`` (``src`` unchanged); the same bits as copying it into
        ``out`` and finishing that, one pass sooner where a subclass can fold the copy in."""
        np.copyto(out, src)
        self(out, test, train)

    def ann_train(self, vectors: np.ndarray) -> np.ndarray:
        return vectors

    def ann_query(self, vectors: np.ndarray, largest: bool = True) -> np.ndarray:
        return vectors if largest else -vectors

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class NegativeDistance(Finish):
    """``-sqrt(max(|a|^2 + |b|^2 - 2<a, b>, 0))`` from the block of inner products."""

    name = "negative-distance"

    def __call__(self, block: np.ndarray, test: Side, train: Side) -> None:
        block *= -2.0
        self._rest(block, test, train)

    def finish_into(self, src: np.ndarray, out: np.ndarray, test: Side, train: Side) -> None:
        np.multiply(src, -2.0, out=out)
        self._rest(out, test, train)

    @staticmethod
    def _rest(block: np.ndarray, test: Side, train: Side) -> None:
        block += train.sq_norms()[None, :]
        block += test.sq_norms()[:, None]
        np.maximum(block, 0.0, out=block)
        np.sqrt(block, out=block)
        np.negative(block, out=block)

    def ann_train(self, vectors: np.ndarray) -> np.ndarray:
        return np.concatenate([vectors, sq_norms(vectors)[:, None]], axis=1)

    def ann_query(self, vectors: np.ndarray, largest: bool = True) -> np.ndarray:
        ones = np.ones((len(vectors), 1), dtype=np.float32)
        aug = np.concatenate([2.0 * vectors, -ones], axis=1)
        return aug if largest else -aug


INNER_PRODUCT = Finish()
NEGATIVE_DISTANCE = NegativeDistance()
FINISHES = {f.name: f for f in (INNER_PRODUCT, NEGATIVE_DISTANCE)}


def plain_vectors(s: Side, test: bool) -> np.ndarray:
    """float32 vectors whose plain inner products equal ``r c (<u, v> + x + y)``:
    test rows ``[r u, r x, r]``, train rows ``[c v, c, c y]`` (columns dropped when unused)."""
    u = np.asarray(s.vectors, dtype=np.float32)
    cols = [u]
    if s.offset is not None:
        one = np.ones((len(u), 1), dtype=np.float32)
        off = np.asarray(s.offset, dtype=np.float32)[:, None]
        cols += [off, one] if test else [one, off]
    out = np.concatenate(cols, axis=1) if len(cols) > 1 else u
    if s.scale is not None:
        out = out * np.asarray(s.scale, dtype=np.float32)[:, None]
    return np.ascontiguousarray(out, dtype=np.float32)

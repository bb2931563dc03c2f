"""Approximate search with FAISS (optional: ``pip install 'instattr[faiss]'``).

Each method's training side becomes plain inner-product vectors (:func:`~instattr.methods.sides.plain_vectors`,
then the finish's augmentation: nn-euc's ``[b, |b|^2]``), indexed by an inner-product IVF
(``ivf``) or HNSW (``hnsw``) index. At build time the exact top-k of sample queries is computed
with the exact scorer and the search breadth (IVF ``nprobe``, HNSW ``efSearch``) is raised until
recall@k reaches the target; the breadth and the recall reached are stored in the manifest. A
query's candidates are rescored exactly, so reported scores are exact and only the candidate set
is approximate. With faiss-gpu and a GPU, IVF searches run on the GPU.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np

from ..methods.scoring import Grid, Member, finished, merge_top_k, score_top_k
from ..methods.sides import FINISHES, plain_vectors
from .layout import IndexStoreError, file_entry

KINDS = ("ivf", "hnsw")
ANN_TEST_ROWS = 64       # queries per block when rescoring candidates


def faiss_module():
    try:
        import faiss
    except ImportError:
        raise IndexStoreError("approximate search needs faiss: pip install 'instattr[faiss]' (faiss-cpu)") from None
    return faiss


def train_vectors(side, finish, max_norm: Optional[float] = None) -> np.ndarray:
    """Plain inner-product vectors of training rows; with ``max_norm`` M, ``[x, sqrt(M^2 - |x|^2)]``:
    every row then has norm M, so the largest inner product is the nearest neighbour (the
    maximum-inner-product to nearest-neighbour reduction), which IVF and HNSW search well."""
    x = np.ascontiguousarray(finish.ann_train(plain_vectors(side, test=False)), dtype=np.float32)
    if max_norm is None:
        return x
    extra = np.sqrt(np.maximum(max_norm ** 2 - (x.astype(np.float64) ** 2).sum(1), 0.0))
    return np.ascontiguousarray(np.concatenate([x, extra[:, None].astype(np.float32)], axis=1))


def query_vectors(side, finish, largest: bool = True) -> np.ndarray:
    """Plain inner-product query vectors (``-a`` for the bottom), with the reduction's 0 appended."""
    q = finish.ann_query(plain_vectors(side, test=True), largest)
    return np.ascontiguousarray(np.concatenate([q, np.zeros((len(q), 1), dtype=np.float32)], axis=1))


def _breadths(kind: str, nlist: int):
    if kind == "ivf":
        b, out = 1, []
        while b < nlist:
            out.append(b)
            b *= 2
        return out + [nlist]
    return [16, 32, 64, 128, 256, 512, 1024]


PART_ROWS = 12500       # rows per norm range (at most MAX_PARTS ranges)
MAX_PARTS = 8


def _write(index, path: Path) -> None:
    faiss = faiss_module()
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        faiss.write_index(index, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build_ann(root: Path, manifest: dict, name: str, method, train, queries, kind: str, k: int, target: float,
              progress: bool = False) -> dict:
    """Build ``kind`` over method ``name``'s shards, tune its breadth to ``target`` recall@k; the
    manifest entry.

    Rows are split into up to ``MAX_PARTS`` ranges of the plain vectors' norm, each indexed with
    its own maximum norm in the reduction (norm-ranged search): with one global maximum, the many
    small gradients of gd or if would all sit near the added axis and IVF could not tell them
    apart. A query searches every range; the candidates are rescored exactly."""
    from .search import ShardSource
    faiss = faiss_module()
    if kind not in KINDS:
        raise IndexStoreError(f"--ann must be one of {', '.join(KINDS)}, got {kind!r}")
    entry = manifest["methods"][name]
    finish = FINISHES[entry["finish"]]
    n, train_rows = int(manifest["n"]), int(manifest["train_rows"])
    src = ShardSource(Path(root), entry, n, int(manifest["shard_rows"]), getattr(method, "key_", ()))
    norms = np.concatenate([np.sqrt((train_vectors(src.rows(b), finish).astype(np.float64) ** 2).sum(1))
                            for b in Grid(1, train_rows).train_blocks(n)])
    order = np.argsort(norms, kind="stable")
    n_parts = int(np.clip(round(n / PART_ROWS), 1, MAX_PARTS))
    rng = np.random.default_rng(0)
    indexes, parts = [], []
    for j, rows in enumerate(np.array_split(order, n_parts)):
        rows = np.sort(rows)
        top = float(norms[rows].max())
        dim = train_vectors(src.take(rows[:1]), finish, top).shape[1]
        if kind == "ivf":
            nlist = int(max(1, min(np.sqrt(len(rows)), len(rows) // 40)))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            sample = np.sort(rng.choice(rows, size=min(len(rows), 40 * nlist), replace=False))
            index.train(train_vectors(src.take(sample), finish, top))
        else:
            nlist = 0
            index = faiss.IndexIDMap(faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT))
            faiss.downcast_index(index.index).hnsw.efConstruction = 80
        for s in range(0, len(rows), train_rows):
            ids = rows[s:s + train_rows]
            index.add_with_ids(train_vectors(src.take(ids), finish, top), ids.astype(np.int64))
        indexes.append(index)
        parts.append({"rows": int(len(rows)), "nlist": nlist, "max_norm": top})
    if queries is None:       # no held-out rows given: the test side of sampled training rows
        queries = train.subset(np.sort(rng.choice(n, size=min(n, 200), replace=False)))
    member = Member(name, test=lambda rows: method.test_side(queries.subset(rows)), train=src, finish=finish)
    exact, _ = score_top_k([member], len(queries), k, 0, Grid(Grid().test_rows, train_rows))[name]["top"]
    recall, breadth = 0.0, None
    for breadth in _breadths(kind, max(p["nlist"] for p in parts)):
        found, _ = _candidates(indexes, kind, breadth, member, len(queries), k, True)
        recall = float(np.mean([len(set(a[a >= 0]) & set(b)) / max(1, len(b)) for a, b in zip(found, exact)]))
        if recall >= target:
            break
    for j, (index, part) in enumerate(zip(indexes, parts)):
        rel = f"{name}/ann-{kind}-{j}.faiss"
        _write(index, Path(root) / rel)
        part.update(file_entry(root, rel))
    return {"kind": kind, "parts": parts, "k": k, "recall": recall, "target": target, "breadth": breadth,
            "n_queries": len(queries)}


_OPEN: dict = {}


def _open(root: Path, entry: dict) -> list:
    key = tuple(str(Path(root) / p["file"]) for p in entry["parts"])
    if key not in _OPEN:
        faiss = faiss_module()
        indexes = [faiss.read_index(path) for path in key]
        if entry["kind"] == "ivf" and getattr(faiss, "get_num_gpus", lambda: 0)() > 0:
            indexes = [faiss.index_cpu_to_all_gpus(i) for i in indexes]       # faiss-gpu on a GPU machine
        _OPEN.clear()
        _OPEN[key] = indexes
    return _OPEN[key]


def _search(index, kind: str, breadth: int, q: np.ndarray, k: int) -> np.ndarray:
    if kind == "ivf":
        index.nprobe = int(breadth)
    else:
        faiss_module().downcast_index(index.index).hnsw.efSearch = int(breadth)
    return index.search(q, k)[1]


def _candidates(indexes, kind: str, breadth: int, member: Member, n_test: int, k: int, largest: bool):
    """(rows, scores) (n_test, k): every range's candidates, rescored exactly, merged; a row with
    fewer than k candidates ends in position -1, score NaN."""
    k = min(k, member.n_train)
    pos_out, val_out = [], []
    for rows in Grid(ANN_TEST_ROWS).test_blocks(n_test):
        ts = member.test(rows)
        q = query_vectors(ts, member.finish, largest)
        cand = np.concatenate([_search(ix, kind, breadth, q, min(k, ix.ntotal)) for ix in indexes], axis=1)
        uniq = np.unique(cand[cand >= 0])
        if len(uniq) == 0:
            raise IndexStoreError("the ANN index returned no candidates")
        tr = member.train.take(uniq)
        block = finished(ts.vectors @ tr.vectors.T, ts, tr, member.finish,
                         np.empty((len(ts), len(uniq)), dtype=np.float32))
        r, c = np.nonzero(cand >= 0)
        _, first = np.unique(r.astype(np.int64) * (member.n_train + 1) + cand[r, c], return_index=True)
        r, c = r[first], c[first]                    # a row found twice counts once
        col = np.searchsorted(uniq, cand[r, c])
        pos, vals = merge_top_k(r, cand[r, c].astype(np.int64), block[r, col], len(ts), k, largest, pad=True)
        pos_out.append(pos)
        val_out.append(vals)
    return np.concatenate(pos_out), np.concatenate(val_out)


def ann_top_k(root: Path, entry: dict, member: Member, n_test: int, k: int, largest: bool = True,
              breadth: Optional[int] = None):
    """(rows, scores), each (n_test, k): the ANN candidates of every test row, rescored exactly."""
    return _candidates(_open(root, entry), entry["kind"], breadth or entry["breadth"], member, n_test, k, largest)

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


def _set_breadth(index, kind: str, breadth: int) -> None:
    if kind == "ivf":
        index.nprobe = int(breadth)
    else:
        index.hnsw.efSearch = int(breadth)


def build_ann(root: Path, manifest: dict, name: str, method, train, queries, kind: str, k: int, target: float,
              progress: bool = False) -> dict:
    """Build ``kind`` over method ``name``'s shards, tune its breadth to ``target`` recall@k; the
    manifest entry."""
    from .search import ShardSource
    faiss = faiss_module()
    if kind not in KINDS:
        raise IndexStoreError(f"--ann must be one of {', '.join(KINDS)}, got {kind!r}")
    entry = manifest["methods"][name]
    finish = FINISHES[entry["finish"]]
    n, train_rows = int(manifest["n"]), int(manifest["train_rows"])
    src = ShardSource(Path(root), entry, n, int(manifest["shard_rows"]), getattr(method, "key_", ()))
    blocks = Grid(1, train_rows).train_blocks(n)
    norm = max(float(np.sqrt((train_vectors(src.rows(b), finish).astype(np.float64) ** 2).sum(1).max()))
               for b in blocks)
    dim = train_vectors(src.rows(slice(0, 1)), finish, norm).shape[1]
    rng = np.random.default_rng(0)
    if kind == "ivf":
        nlist = int(max(1, min(np.sqrt(n), n // 40)))          # 2,000 lists for 4M rows
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = np.sort(rng.choice(n, size=min(n, 40 * nlist), replace=False))
        index.train(train_vectors(src.take(sample), finish, norm))
    else:
        nlist = 0
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
    for rows in blocks:
        index.add(train_vectors(src.rows(rows), finish, norm))
    if queries is None:       # no held-out rows given: the test side of sampled training rows
        queries = train.subset(np.sort(rng.choice(n, size=min(n, 200), replace=False)))
    member = Member(name, test=lambda rows: method.test_side(queries.subset(rows)), train=src, finish=finish)
    exact, _ = score_top_k([member], len(queries), k, 0, Grid(Grid().test_rows, train_rows))[name]["top"]
    q = query_vectors(method.test_side(queries), finish)
    recall, breadth = 0.0, None
    for breadth in _breadths(kind, nlist):
        _set_breadth(index, kind, breadth)
        _, found = index.search(q, min(k, n))
        recall = float(np.mean([len(set(a[a >= 0]) & set(b)) / max(1, len(b)) for a, b in zip(found, exact)]))
        if recall >= target:
            break
    rel = f"{name}/ann-{kind}.faiss"
    fd, tmp = tempfile.mkstemp(dir=Path(root) / name, suffix=".tmp")
    os.close(fd)
    try:
        faiss.write_index(index, tmp)
        os.replace(tmp, Path(root) / rel)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return {"kind": kind, **file_entry(root, rel), "k": k, "recall": recall, "target": target,
            "breadth": breadth, "nlist": nlist, "n_queries": len(queries), "dim": dim, "max_norm": norm}


_OPEN: dict = {}


def _open(root: Path, entry: dict):
    path = str(Path(root) / entry["file"])
    if path not in _OPEN:
        faiss = faiss_module()
        index = faiss.read_index(path)
        if entry["kind"] == "ivf" and getattr(faiss, "get_num_gpus", lambda: 0)() > 0:
            index = faiss.index_cpu_to_all_gpus(index)       # faiss-gpu on a GPU machine
        _OPEN.clear()
        _OPEN[path] = index
    return _OPEN[path]


def ann_top_k(root: Path, entry: dict, member: Member, n_test: int, k: int, largest: bool = True,
              breadth: Optional[int] = None):
    """(rows, scores), each (n_test, k): the ANN candidates of every test row, rescored exactly."""
    index = _open(root, entry)
    _set_breadth(index, entry["kind"], breadth or entry["breadth"])
    k = min(k, member.n_train)
    pos_out, val_out = [], []
    for rows in Grid(ANN_TEST_ROWS).test_blocks(n_test):
        ts = member.test(rows)
        _, cand = index.search(query_vectors(ts, member.finish, largest), k)
        uniq = np.unique(cand[cand >= 0])
        if len(uniq) == 0:
            raise IndexStoreError("the ANN index returned no candidates")
        tr = member.train.take(uniq)
        block = finished(ts.vectors @ tr.vectors.T, ts, tr, member.finish,
                         np.empty((len(ts), len(uniq)), dtype=np.float32))
        r, c = np.nonzero(cand >= 0)
        col = np.searchsorted(uniq, cand[r, c])
        pos, vals = merge_top_k(r, cand[r, c].astype(np.int64), block[r, col], len(ts), k, largest)
        pos_out.append(pos)
        val_out.append(vals)
    return np.concatenate(pos_out), np.concatenate(val_out)

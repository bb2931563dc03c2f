"""Approximate search with FAISS (optional: ``pip install 'instattr[faiss]'``).

Each method's training side becomes plain inner-product vectors (:func:`~instattr.methods.sides.plain_vectors`,
then the finish's augmentation: nn-euc's ``[b, |b|^2]``), indexed by one FAISS index per method:

- ``ivf``: an inner-product IVF over the plain vectors as they are (``IndexIVFFlat``, k-means
  lists, each row in the list whose centroid has the largest inner product with it; a query
  scans the ``nprobe`` lists whose centroids score highest). Rows whose norms differ by orders of
  magnitude (gd and if: most training rows have near-zero gradients) stay where they are: the
  large rows pull their lists' centroids, so a query's best rows sit in its best lists.
- ``ivf-sq8``: the same lists with each vector stored as 8-bit codes (``IndexIVFScalarQuantizer``,
  one byte per dimension instead of four: a quarter of ``ivf``'s memory). The codes rank a list's
  rows only roughly, so a query takes ``SQ_CANDIDATES`` times k candidates from them, and the
  exact rescoring picks the k best.
- ``hnsw``: a graph over the maximum-inner-product to nearest-neighbour reduction
  ``[x, sqrt(M^2 - |x|^2)]`` (queries ``[q, 0]``), which a graph needs to navigate; good for the
  nn-* methods, weak for gradients (their near-zero rows crowd the added axis).

At build time the exact top-k of sample queries is computed with the exact scorer and the search
breadth (IVF ``nprobe``, HNSW ``efSearch``) is raised until recall@k reaches the target; the
breadth and the recall reached are stored in the manifest. A query's candidates are rescored
exactly, so reported scores are exact and only the candidate set is approximate. With faiss-gpu
and a GPU, IVF searches run on the GPU.

(Indexes written before this layout -- up to 8 per method, one per range of norms, each with the
reduction -- are still searched: every part, the query padded to the part's dimension.)
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import InstattrError
from ..files import write_stream
from ..methods.scoring import Grid, Member, finished, merge_top_k, score_top_k
from ..methods.sides import FINISHES, plain_vectors
from .layout import IndexStoreError, file_entry

KINDS = ("ivf", "ivf-sq8", "hnsw")
ANN_TEST_ROWS = 64       # queries per block when rescoring candidates
MAX_LISTS = 1024         # IVF lists: sqrt(n), at most this many (4M rows: lists of ~4,000 rows)
TRAIN_PER_LIST = 40      # k-means sample: rows per list
SQ_CANDIDATES = 4        # ivf-sq8: candidates per result taken from the codes, then rescored exactly
GPU_MAX_K = 2048         # faiss-gpu's largest k per query


def faiss_module():
    try:
        import faiss
    except ImportError:
        raise IndexStoreError("approximate search needs faiss: pip install 'instattr[faiss]' (faiss-cpu)") from None
    return faiss


def train_vectors(side, finish, max_norm: Optional[float] = None) -> np.ndarray:
    """Plain inner-product vectors of training rows; with ``max_norm`` M, ``[x, sqrt(M^2 - |x|^2)]``:
    every row then has norm M, so the largest inner product is the nearest neighbour (the
    maximum-inner-product to nearest-neighbour reduction, for HNSW)."""
    x = np.ascontiguousarray(finish.ann_train(plain_vectors(side, test=False)), dtype=np.float32)
    if max_norm is None:
        return x
    extra = np.sqrt(np.maximum(max_norm ** 2 - (x.astype(np.float64) ** 2).sum(1), 0.0))
    return np.ascontiguousarray(np.concatenate([x, extra[:, None].astype(np.float32)], axis=1))


def query_vectors(side, finish, largest: bool = True) -> np.ndarray:
    """Plain inner-product query vectors (``-a`` for the bottom)."""
    return np.ascontiguousarray(finish.ann_query(plain_vectors(side, test=True), largest), dtype=np.float32)


def current_ann(entry: Optional[dict], kind: str) -> bool:
    """Whether a manifest's ANN entry is a ``kind`` index of this layout (one index; IVF without
    the reduction), so a resumed build keeps it; an earlier layout's is rebuilt."""
    if not entry or entry.get("kind") != kind or len(entry.get("parts", [])) != 1:
        return False
    return not kind.startswith("ivf") or "max_norm" not in entry["parts"][0]


def _breadths(kind: str, nlist: int):
    if kind.startswith("ivf"):
        b, out = 1, []
        while b < nlist:
            out.append(b)
            b *= 2
        return out + [nlist]
    return [16, 32, 64, 128, 256, 512, 1024]


def _write(index, path: Path) -> None:
    """The FAISS index at ``path``, written atomically (a temporary beside it, fsync, rename)."""
    faiss = faiss_module()
    write_stream(path, lambda f: faiss.write_index(index, faiss.PyCallbackIOWriter(f.write)))


def build_ann(root: Path, manifest: dict, name: str, method, train, queries, kind: str, k: int, target: float,
              progress: bool = False) -> dict:
    """Build ``kind`` over method ``name``'s shards, tune its breadth to ``target`` recall@k; the
    manifest entry."""
    from tqdm.auto import tqdm

    from .search import ShardSource
    faiss = faiss_module()
    if kind not in KINDS:
        raise IndexStoreError(f"--ann must be one of {', '.join(KINDS)}, got {kind!r}")
    entry = manifest["methods"][name]
    finish = FINISHES[entry["finish"]]
    n, train_rows = int(manifest["n"]), int(manifest["train_rows"])
    src = ShardSource(Path(root), entry, n, int(manifest["shard_rows"]), getattr(method, "key_", ()))
    blocks = Grid(1, train_rows).train_blocks(n)
    rng = np.random.default_rng(0)
    part = {"rows": n}
    if kind.startswith("ivf"):
        nlist = int(max(1, min(round(np.sqrt(n)), n // TRAIN_PER_LIST, MAX_LISTS)))
        sample = train_vectors(src.take(np.sort(rng.choice(n, size=min(n, TRAIN_PER_LIST * nlist),
                                                           replace=False))), finish)
        dim = sample.shape[1]
        if kind == "ivf":
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        else:       # 8-bit codes, each dimension's range learnt from the sample
            index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(dim), dim, nlist, faiss.ScalarQuantizer.QT_8bit,
                                                  faiss.METRIC_INNER_PRODUCT)
        index.train(sample)
        part["nlist"], top = nlist, None
    else:
        top = max(float(np.sqrt((train_vectors(src.rows(b), finish).astype(np.float64) ** 2).sum(1)).max())
                  for b in blocks)
        dim = train_vectors(src.take(np.arange(1)), finish, top).shape[1]
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        part.update(nlist=0, max_norm=top)
    for b in tqdm(blocks, desc=f"{name}: {kind} index", unit="block", disable=not progress, leave=False):
        index.add(train_vectors(src.rows(b), finish, top))       # ids: positions, in order
    if queries is None:       # no held-out rows given: the test side of sampled training rows
        queries = train.subset(np.sort(rng.choice(n, size=min(n, 200), replace=False)))
    member = Member(name, test=lambda rows: method.test_side(queries.subset(rows)), train=src, finish=finish)
    exact, _ = score_top_k([member], len(queries), k, 0, Grid(Grid().test_rows, train_rows))[name]["top"]
    recall, breadth = 0.0, None
    for breadth in _breadths(kind, part["nlist"]):
        found, _ = _candidates([index], kind, breadth, member, len(queries), k, True)
        recall = float(np.mean([len(set(a[a >= 0]) & set(b)) / max(1, len(b)) for a, b in zip(found, exact)]))
        if recall >= target:
            break
    rel = f"{name}/ann-{kind}-0.faiss"
    _write(index, Path(root) / rel)
    part.update(file_entry(root, rel))
    return {"kind": kind, "parts": [part], "k": k, "recall": recall, "target": target, "breadth": breadth,
            "n_queries": len(queries)}


_OPEN: dict = {}       # the last opened method's indexes (reading one takes seconds: 1M rows, 1.5 GB)


def close() -> None:
    """Forget the open FAISS indexes (and free their memory)."""
    _OPEN.clear()


def _open(root: Path, entry: dict) -> list:
    key = tuple((str(Path(root) / p["file"]), p["sha256"]) for p in entry["parts"])   # a rebuilt file is reread
    if key not in _OPEN:
        faiss = faiss_module()
        indexes = [faiss.read_index(path) for path, _ in key]
        if _on_gpu(entry["kind"]):
            indexes = [faiss.index_cpu_to_all_gpus(i) for i in indexes]       # faiss-gpu on a GPU machine
        _OPEN.clear()
        _OPEN[key] = indexes
    return _OPEN[key]


def _on_gpu(kind: str) -> bool:
    """Whether ``kind``'s indexes are searched on the GPU (faiss-gpu on a machine with one)."""
    return kind.startswith("ivf") and getattr(faiss_module(), "get_num_gpus", lambda: 0)() > 0


def _candidates_per_query(kind: str, k: int) -> int:
    """Neighbours to ask FAISS for: k, or SQ_CANDIDATES x k from 8-bit codes; on a GPU at most
    GPU_MAX_K, which FAISS cannot exceed there."""
    take = k * SQ_CANDIDATES if kind == "ivf-sq8" else k
    if not _on_gpu(kind):
        return take
    if k > GPU_MAX_K:
        raise InstattrError(f"--ann on a GPU: FAISS returns at most {GPU_MAX_K} neighbours per query, "
                            f"asked for {k}; lower --top-k or search exactly (no --ann)")
    return min(take, GPU_MAX_K)


def _search(index, kind: str, breadth: int, q: np.ndarray, k: int) -> np.ndarray:
    faiss = faiss_module()
    if kind.startswith("ivf"):
        index.nprobe = int(breadth)
    else:
        graph = index if hasattr(index, "hnsw") else faiss.downcast_index(index.index)   # older builds: an IDMap
        graph.hnsw.efSearch = int(breadth)
    return index.search(query_pad(q, index.d), k)[1]


def query_pad(q: np.ndarray, dim: int) -> np.ndarray:
    """``q`` with zero columns appended up to the index's dimension (the reduction's added axis)."""
    if dim <= q.shape[1]:
        return q
    return np.ascontiguousarray(np.concatenate([q, np.zeros((len(q), dim - q.shape[1]), dtype=np.float32)], axis=1))


def _candidates(indexes, kind: str, breadth: int, member: Member, n_test: int, k: int, largest: bool):
    """(rows, scores) (n_test, k): the candidates of every index (one; older builds: one per
    range of norms), rescored exactly, merged; a row with fewer than k candidates ends in
    position -1, score NaN."""
    k = min(k, member.n_train)
    pos_out, val_out = [], []
    take = _candidates_per_query(kind, k)
    for rows in Grid(ANN_TEST_ROWS).test_blocks(n_test):
        ts = member.test(rows)
        q = query_vectors(ts, member.finish, largest)
        cand = np.concatenate([_search(ix, kind, breadth, q, min(take, ix.ntotal)) for ix in indexes], axis=1)
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

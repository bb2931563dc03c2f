"""Scale: exact top-k from an index over 100k-4M synthetic training rows, FAISS, and Ray against local.

    python bench/scale.py --rows 100000 [1000000 4000000] [--classes 2 3] [--queries 1000] [--k 100]
                          [--dir /tmp/instattr-scale] [--hans RUN] [--import-model MODEL] [--workers 2] [--no-ann]
                          [--ann-kind ivf [ivf-sq8 hnsw]]
                          [--layered RUN [--layered-limit TRAIN TEST]]

Synthetic training sets: d = 384 features drawn around 256 cluster centres (as sentence
embeddings are), stored as float16 memory-mapped .npy files; gold labels from a noisy linear
teacher, probabilities from a random final layer with a bias. For each size and class count:

1. fit gd, if and nn-cos (``embed=False``: their training sides are streamed), build a float16
   index (``build_index``; shards of 262,144 rows);
2. exact top-k of ``--queries`` queries per method (``Index.search``), timed against the GEMM floor
   of the same shape measured in the same run (the product of the float32 query sides with every
   block of float32 training-side vectors, conversion excluded), with the peak anonymous memory
   (RssAnon, sampled every 20 ms; the memory-mapped vectors are file-backed and not in it) and
   RssAnon when the search started (what the build and earlier searches left in the process);
3. on a 20k-row sample: a float32 index's exact search against top_k of the dense scores (must
   be bit-identical);
4. for each ``--ann-kind`` (default ivf; ivf-sq8 stores 8-bit codes), one after the other on the
   same index: the build's seconds and peak RssAnon, each method's FAISS file size, recall@10
   against exact over the queries, the lists searched (nprobe, tuned at build time on the first
   200 queries to recall@10 0.95), the seconds to read the FAISS index (once per process: the
   first query), and seconds per query after it, ANN (top 10, candidates rescored exactly)
   against exact (top 100): a first pass over the queries ("cold": the candidates' rows of the
   memory-mapped shards are read from disk, after the build pushed them out of the page cache)
   and a second ("ANN s/q", from the page cache, as a query service runs), the speed-up from
   the second.

A finished index of the same size is reused (``build_index`` resumes it: nothing to do).

With ``--import-model MODEL`` (a Hugging Face checkpoint folder): ``import`` of ``--import-data``
(``--import-limit`` training rows) locally and with Ray, every array compared bit for bit.

With ``--layered RUN``: ``attribute --top-k`` of gd-top and if-top (their default options), local
against Ray, on copies of the run without its cache (both compute the hidden states and the
per-example gradients); bit-identical results and both times (Ray started before, its actors not).

With ``--hans RUN`` (a trained hans run): ``attribute --top-k`` of gd, if and nn-cos, local
against Ray with ``--workers`` local workers, and the encoding of its training texts (what
``train --backend ray`` does); bit-identical results and both times.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np

from instattr.arrays import FeatureSet, FinalLayer
from instattr.index import Index, build_index
from instattr.index.ann import close as close_ann
from instattr.methods import get_method, top_k
from instattr.methods.scoring import TRAIN_BLOCK, Grid

D, CENTRES = 384, 256
METHODS = ("gd", "if", "nn-cos")


class PeakAnon:
    """Peak RssAnon (anonymous resident memory, MB) while the block runs, and ``start``: RssAnon
    when it began (what earlier steps of this process still hold: freed memory that the allocator
    keeps, FAISS indexes, the training arrays)."""

    def __enter__(self):
        self.start = self.now()
        self.peak, self.stop = self.start, False
        self.thread = threading.Thread(target=self.watch, daemon=True)
        self.thread.start()
        return self

    @staticmethod
    def now() -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def watch(self):
        while not self.stop:
            self.peak = max(self.peak, self.now())
            time.sleep(0.02)

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()


def release_freed_memory() -> None:
    """Hand memory that earlier steps freed back to the system (glibc keeps it otherwise), so each
    search's RssAnon starts from what the process still holds."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def synthetic(folder: Path, n: int, c: int, seed: int = 0):
    """(train FeatureSet with float16 memmapped features, final layer, query FeatureSet)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CENTRES, D)).astype(np.float32)
    w = (rng.standard_normal((c, D)) / np.sqrt(D)).astype(np.float64) * 4
    b = rng.standard_normal(c) * 0.1
    teacher = w + 0.5 * rng.standard_normal(w.shape) / np.sqrt(D)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"features-{n}-{c}.npy"
    labels, probs = np.empty(n, dtype=np.int64), np.empty((n, c), dtype=np.float32)
    if not path.exists():
        mm = np.lib.format.open_memmap(str(path) + ".tmp.npy", mode="w+", dtype=np.float16, shape=(n, D))
        for s in range(0, n, 1 << 16):
            m = min(1 << 16, n - s)
            mm[s:s + m] = (0.6 * centres[rng.integers(CENTRES, size=m)]
                           + 0.8 * rng.standard_normal((m, D)).astype(np.float32)).astype(np.float16)
        mm.flush()
        del mm
        os.replace(str(path) + ".tmp.npy", path)
    feats = np.load(path, mmap_mode="r")
    for s in range(0, n, 1 << 16):
        f = np.asarray(feats[s:s + (1 << 16)], dtype=np.float64)
        z = f @ w.T + b
        p = np.exp(z - z.max(1, keepdims=True))
        probs[s:s + len(f)] = p / p.sum(1, keepdims=True)
        t = f @ teacher.T + rng.gumbel(size=(len(f), c))
        labels[s:s + len(f)] = t.argmax(1)
    train = FeatureSet(idx=np.arange(n).astype(str), label=labels, pred=probs.argmax(1), probs=probs,
                       features=feats)
    q = (0.6 * centres[rng.integers(CENTRES, size=1000)] + 0.8 * rng.standard_normal((1000, D))).astype(np.float32)
    zq = q @ w.T + b
    pq = np.exp(zq - zq.max(1, keepdims=True))
    pq /= pq.sum(1, keepdims=True)
    queries = FeatureSet(idx=np.array([f"q{i}" for i in range(1000)]), label=pq.argmax(1), pred=pq.argmax(1),
                         probs=pq.astype(np.float32), features=q)
    return train, FinalLayer(w=w, b=b, l2=0.01), queries


def gemm_floor(index: Index, name: str, test_vectors: np.ndarray) -> float:
    """Seconds of the products alone: float32 queries x every float32 block of the training side."""
    src = index.source(name)
    total = 0.0
    for s in range(0, index.n, TRAIN_BLOCK):
        v = src.rows(slice(s, min(s + TRAIN_BLOCK, index.n))).vectors
        t0 = time.perf_counter()
        test_vectors @ v.T
        total += time.perf_counter() - t0
    return total


def bench_size(folder: Path, n: int, c: int, n_queries: int, k: int, kinds) -> None:
    t0 = time.perf_counter()
    train, layer, queries = synthetic(folder, n, c)
    queries = queries.subset(slice(0, n_queries))
    print(f"\n== {n:,} training rows, {c} classes, d = {D} (data {time.perf_counter() - t0:.1f} s)")
    t0 = time.perf_counter()
    methods = {m: get_method(m).fit(train, layer, embed=False) for m in METHODS}
    fit_s = time.perf_counter() - t0
    out = folder / f"index-{n}-{c}"
    t0 = time.perf_counter()
    with PeakAnon() as mem:
        build_index(out, train, methods, {"synthetic": f"{n}x{D}, {c} classes"}, dtype="float16", progress=False)
    print(f"fit {fit_s:.1f} s; index build (float16) {time.perf_counter() - t0:.1f} s, peak RssAnon {mem.peak:.0f} MB")
    index = Index(out)
    mapped = sum((out / s["file"]).stat().st_size for e in index.manifest["methods"].values() for s in e["shards"])
    print(f"memory-mapped training sides: {mapped / 2 ** 20:.0f} MB")
    print(f"{'method':8s} {'dim':>5s} {'exact s':>8s} {'floor s':>8s} {'x floor':>8s} {'peak MB':>8s} {'start MB':>8s}")
    exact = {}
    for name in METHODS:
        m = index.method(name)
        floor = gemm_floor(index, name, m.test_side(queries).vectors)
        release_freed_memory()
        with PeakAnon() as mem:
            t0 = time.perf_counter()
            exact[name] = index.search([name], queries, k)[name]["top"], time.perf_counter() - t0
        exact_s = exact[name][1]
        print(f"{name:8s} {index.manifest['methods'][name]['shards'][0]['dim']:5d} {exact_s:8.2f} {floor:8.2f} "
              f"{exact_s / floor:8.2f} {mem.peak:8.0f} {mem.start:8.0f}")
    for kind in kinds:
        t0 = time.perf_counter()
        with PeakAnon() as mem:
            build_index(out, train, methods, {"synthetic": f"{n}x{D}, {c} classes"}, dtype="float16", ann=kind,
                        ann_k=10, queries=queries.subset(slice(0, 200)), progress=False)
        print(f"\n{kind}: built in {time.perf_counter() - t0:.1f} s, peak RssAnon {mem.peak:.0f} MB")
        index = Index(out)
        print(f"{'method':8s} {'FAISS MB':>9s} {'recall@10':>10s} {'nprobe':>11s} {'open s':>7s} {'cold s/q':>9s} "
              f"{'ANN s/q':>9s} {'exact s/q':>9s} {'speed-up':>8s}")
        for name in METHODS:
            e = index.manifest["methods"][name]["ann"]
            size = sum((out / p["file"]).stat().st_size for p in e["parts"]) / 2 ** 20
            t0 = time.perf_counter()
            index.ann_search([name], queries.subset(slice(0, 1)), 10)      # reads the FAISS index
            open_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            approx = index.ann_search([name], queries, 10)[name]["top"]
            cold_s = (time.perf_counter() - t0) / len(queries)    # candidates' rows read from disk
            t0 = time.perf_counter()
            again = index.ann_search([name], queries, 10)[name]["top"]
            ann_s = (time.perf_counter() - t0) / len(queries)     # ... and from the page cache
            assert np.array_equal(again[0], approx[0])
            close_ann()
            recall = np.mean([len(set(a) & set(b[:10])) / 10 for a, b in zip(approx[0], exact[name][0][0])])
            per_q = exact[name][1] / len(queries)
            lists = f"{e['breadth']}/{max(p['nlist'] for p in e['parts'])}"
            print(f"{name:8s} {size:9.0f} {recall:10.3f} {lists:>11s} {open_s:7.1f} {cold_s:9.5f} {ann_s:9.5f} "
                  f"{per_q:9.5f} {per_q / ann_s:8.1f}")
    sample = train.subset(slice(0, min(n, 20000)))
    same = folder / f"sample-{n}-{c}"
    fitted = {m: get_method(m).fit(sample, layer, embed=False) for m in METHODS}
    build_index(same, sample, fitted, {"synthetic": "sample"}, dtype="float32", progress=False, overwrite=True)
    got = Index(same).search(list(METHODS), queries, k)
    for name, m in fitted.items():
        m.embed_all(sample)
        dense = m.score(queries)
        want = top_k(dense, k)
        ok = np.array_equal(got[name]["top"][0], want[0]) and np.array_equal(got[name]["top"][1], want[1])
        print(f"{name}: exact top-{k} from a float32 index of {len(sample):,} rows == top_k(dense scores): {ok}")
    shutil.rmtree(same)


def bench_ray(run_path: str, workers: int, k: int) -> None:
    from instattr.attribution import attribute_run
    from instattr.distributed import RayBackend
    from instattr.store import Run
    print(f"\n== Ray ({workers} local workers) against local: attribute --top-k {k} on {run_path}")
    times, results = {}, {}
    for backend in ("local", "ray"):
        copy = Path(f"/tmp/instattr-scale-{backend}")
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(run_path, copy, ignore=shutil.ignore_patterns("scores", "cache", "results"))
        run = Run.load(copy)
        t0 = time.perf_counter()
        attribute_run(run, ",".join(METHODS), top_k=k, bottom_k=k,
                      backend=RayBackend(workers=workers) if backend == "ray" else None,
                      progress=False, log=lambda *a: None)
        times[backend] = time.perf_counter() - t0
        results[backend] = {(m, b): run.top_k(m, None, b) for m in METHODS for b in (False, True)}
    same = all(np.array_equal(results["local"][key][f], results["ray"][key][f])
               for key in results["local"] for f in ("train_pos", "score"))
    n = len(Run.load(run_path).features("train"))
    print(f"{n:,} training rows: local {times['local']:.1f} s, ray {times['ray']:.1f} s "
          f"(incl. Ray start); bit-identical top-k and bottom-k: {same}")
    bench_ray_encode(Run.load(run_path), workers)


def bench_ray_layered(run_path: str, workers: int, k: int, limit_train, limit_test) -> None:
    """``attribute --top-k`` of the layered methods (default options), local against Ray: the
    per-example projected gradients on actors, the curvature reduced here."""
    from instattr.attribution import attribute_run
    from instattr.distributed import RayBackend
    from instattr.store import Run
    names = ("gd-top", "if-top")
    print(f"\n== Ray ({workers} local workers) against local: attribute --top-k {k} of {', '.join(names)} on "
          f"{run_path} (--limit-train {limit_train}, --limit-test {limit_test})")
    times, results, fits = {}, {}, {}
    for backend in ("local", "ray"):
        copy = Path(f"/tmp/instattr-scale-layered-{backend}")
        shutil.rmtree(copy, ignore_errors=True)       # no cache: both compute the hidden states and gradients
        shutil.copytree(run_path, copy, ignore=shutil.ignore_patterns("scores", "cache", "results"))
        run = Run.load(copy)
        ray_backend = RayBackend(workers=workers) if backend == "ray" else None
        t0 = time.perf_counter()
        fits[backend] = attribute_run(run, ",".join(names), top_k=k, bottom_k=k, backend=ray_backend,
                                      limit_train=limit_train, limit_test=limit_test, progress=False,
                                      log=lambda *a: None)
        times[backend] = time.perf_counter() - t0
        results[backend] = {(m, b): run.top_k(m, None, b) for m in names for b in (False, True)}
        if ray_backend is not None:
            ray_backend.close()
    same = all(np.array_equal(results["local"][key][f], results["ray"][key][f])
               for key in results["local"] for f in ("train_pos", "score"))
    print(f"local {times['local']:.1f} s (fits {', '.join(f'{m} {s:.1f}' for m, s in fits['local'].items())}), "
          f"ray {times['ray']:.1f} s (fits {', '.join(f'{m} {s:.1f}' for m, s in fits['ray'].items())}; Ray "
          f"already started, actors not); bit-identical top-k and bottom-k: {same}")


def bench_ray_encode(run, workers: int) -> None:
    """`train --backend ray`'s encoding of the run's training texts against this process's."""
    from instattr.distributed import RayBackend
    from instattr.encoders import Encoder, encode_request
    ex = run.examples("train")
    texts, second, _ = encode_request([e.document for e in ex], [e.query for e in ex] if run.manifest.data.is_pair else None,
                                      run.manifest.pair_mode)
    encoder = Encoder(run.manifest.sbert.path or None, run.manifest.sbert.pooling, run.manifest.sbert.max_length)
    t0 = time.perf_counter()
    local = encoder.encode(texts, second, progress=False)
    t_local = time.perf_counter() - t0
    t0 = time.perf_counter()
    (by_ray,) = RayBackend(workers=workers).encode_groups(encoder, [(texts, second)])
    t_ray = time.perf_counter() - t0
    print(f"encode {len(texts):,} texts ({run.manifest.sbert.name}): local {t_local:.1f} s, ray "
          f"{t_ray:.1f} s ({workers} workers, Ray already started); bit-identical: {np.array_equal(local, by_ray)}, "
          f"max |diff| {np.abs(local - by_ray).max():.2g}")


def bench_ray_import(model: str, data: str, limit: int, workers: int) -> None:
    """`import --backend ray` against a local import of a Hugging Face checkpoint: every split's
    features, probabilities and sentence embeddings, bit for bit, and both times."""
    from instattr.distributed import RayBackend
    from instattr.pipeline import ImportConfig, import_run
    os.environ["INSTATTR_CACHE"] = "off"            # both imports encode (no cached sentence embeddings)
    print(f"\n== import {model} on {data} (--limit-train {limit}): local against Ray ({workers} local workers)")
    cfg = ImportConfig(model=model, data=data, limit_train=limit)
    import ray
    started = "Ray already started" if ray.is_initialized() else "incl. Ray start"
    runs, times = {}, {}
    for backend in ("local", "ray"):
        out = Path(f"/tmp/instattr-scale-import-{backend}")
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        runs[backend] = import_run(cfg, out, progress=False,
                                   backend=RayBackend(workers=workers) if backend == "ray" else None)
        times[backend] = time.perf_counter() - t0
    rows = {s: len(runs["local"].features(s)) for s in runs["local"].splits}
    same = all(np.array_equal(getattr(runs["local"].features(s), f), getattr(runs["ray"].features(s), f))
               for s in rows for f in ("features", "probs"))
    print(f"rows {rows}: local {times['local']:.1f} s, ray {times['ray']:.1f} s ({started}); "
          f"features and probabilities bit-identical: {same}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="*", default=[100000], help="training-set sizes (none: Ray only)")
    ap.add_argument("--classes", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--dir", default="/tmp/instattr-scale")
    ap.add_argument("--hans", help="a trained hans run, for Ray against local")
    ap.add_argument("--layered", help="a trained run: gd-top and if-top, local against Ray")
    ap.add_argument("--layered-limit", type=int, nargs=2, default=[None, None], metavar=("TRAIN", "TEST"),
                    help="--limit-train and --limit-test of --layered")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-ann", action="store_true")
    ap.add_argument("--ann-kind", nargs="+", default=["ivf"], choices=["ivf", "ivf-sq8", "hnsw"],
                    help="FAISS indexes to build and measure, one after the other")
    ap.add_argument("--import-model", help="a Hugging Face checkpoint folder: import it locally and with Ray")
    ap.add_argument("--import-data", default="sst2")
    ap.add_argument("--import-limit", type=int, default=2000, help="--limit-train of both imports")
    args = ap.parse_args(argv)
    print(f"scale bench: block {Grid().test_rows} x {Grid().train_rows}; {os.cpu_count()} CPUs")
    for n in args.rows:
        for c in args.classes:
            bench_size(Path(args.dir), n, c, args.queries, args.k, [] if args.no_ann else args.ann_kind)
    if args.hans:
        bench_ray(args.hans, args.workers, args.k)
    if args.layered:
        from instattr.distributed import connect
        connect(workers=args.workers)
        bench_ray_layered(args.layered, args.workers, args.k, *args.layered_limit)
    if args.import_model:
        bench_ray_import(args.import_model, args.import_data, args.import_limit, args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())

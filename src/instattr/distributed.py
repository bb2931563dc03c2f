"""The Ray backend (optional: ``pip install 'instattr[ray]'``): models, training sides and score blocks on a cluster.

- Texts: ``train --backend ray`` encodes, and ``import --backend ray`` classifies (a Hugging Face
  checkpoint's final-layer inputs and probabilities) and encodes, with a Ray Data ``map_batches``
  over batch numbers run by a pool of actors (:class:`EncodeWorker`, :class:`ClassifyWorker`),
  each loading the model once from a folder every node sees (a GPU each when the driver's device
  is CUDA). The driver tokenizes and cuts the length-sorted batches the local path would cut, so
  the arrays are the local ones.
- Per-example gradients of the layered methods (gd-top, gc-top, if-top, rif-top, tracin-top
  with the default projected ``ihvp``): the length-sorted batches the local path cuts, spread over
  a pool of actors (:class:`GradientActor`) that the backend keeps while it lives, since a method
  asks for the training rows, then every block of test rows (each a new Ray Data pool would start
  new processes: about 10 s here). Each actor rebuilds the run's tracked model and projector once
  (:class:`~instattr.layers.attributors.GradientSource`; the run folder must be one every node
  sees) and returns projected gradients and Gauss-Newton factors; the driver reduces the curvature
  (if-top, rif-top) and keeps the training side.
- A language model's gradient passes (:class:`instattr.lm.WindowBatches`): a pool of
  :class:`BatchActor`, each holding the work (the projector with its model, the tokenized
  windows) once from the object store, runs the batches the local pass cuts; the driver gathers
  them (and EK-FAC's covariance sums, in arrival order).
- Training sides: a Ray Data ``map_batches`` over the shards of an index, run by a pool of actors
  (:class:`ShardWriter`), each holding the fitted methods and the training rows once (a GPU each
  where the cluster has them); each actor writes its shards into the index folder, which must be
  on storage every node sees (a shared filesystem), and returns their checksums. Training sides
  made in fit (the layered methods') are written by the driver, shard by shard as they arrive.
- Scores: one Ray task per shard computes the exact top-k of every test row against that shard
  with the one scorer (:func:`instattr.methods.scoring.score_top_k`); the driver merges the
  per-shard results (:func:`~instattr.methods.scoring.merge_shards`).

Blocks, arithmetic and tie-breaking are those of the local backend, so results are bit-identical.
``attribute --backend ray`` first writes a float32 index of the run's training sides under
``RUN/cache/`` (resumable: finished shards are recorded in order as they arrive), then scores
from it. ``address``: a running cluster (``ray start --head`` on one machine, ``ray start --address
HEAD:6379`` on the others, then ``--address HEAD:6379`` or ``auto``); without it a local Ray with
``workers`` CPUs is started.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .errors import InstattrError
from .methods.scoring import Grid, Member, merge_shards, score_top_k


def ray_module():
    try:
        import ray
    except ImportError:
        raise InstattrError("--backend ray needs Ray: pip install 'instattr[ray]'") from None
    return ray


def connect(address: Optional[str] = None, workers: Optional[int] = None):
    """The Ray module, initialised: joins ``address`` or starts a local Ray (``workers`` CPUs)."""
    ray = ray_module()
    if not ray.is_initialized():
        kwargs = {"address": address} if address else {"num_cpus": workers or None, "runtime_env": local_env()}
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, **kwargs)
    return ray


def local_env() -> dict:
    """A local Ray's workers import the instattr this driver runs (a checkout on PYTHONPATH too)
    and start with its thread counts (:func:`_driver_threads`), so the actors and tasks, which ask
    for those counts, can use the workers Ray starts ahead for the job."""
    import os
    src = str(Path(__file__).resolve().parent.parent)          # the folder holding this instattr
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)
    return {"env_vars": {"PYTHONPATH": path, **_driver_threads()["env_vars"]}}


def _pool_size(ray, workers: Optional[int]) -> int:
    return int(workers or max(1, int(ray.cluster_resources().get("CPU", 1))))


def _resolved(x):
    """An actor's constructor argument: Ray hands some object refs over unresolved."""
    ray = ray_module()
    return ray.get(x) if isinstance(x, ray.ObjectRef) else x


class ShardWriter:
    """A Ray Data actor: writes the shards of an index's :class:`~instattr.index.build.ShardJob`
    (its training rows and methods sent once) for the batches it is given."""

    def __init__(self, job):
        self.job = _resolved(job)

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        return {"shard": np.asarray(batch["shard"]),
                "entries": np.asarray([json.dumps(self.job.write(int(i))) for i in batch["shard"]])}


class EncodeWorker:
    """A Ray Data actor: one copy of the encoder; pads and encodes the batches it is given."""

    def __init__(self, path: str, pooling: str, max_length: int, ids, types, batches, device: str,
                 autocast: bool):
        from .encoders import Encoder
        self.encoder = Encoder(path, pooling, max_length, device=device, autocast=autocast)
        self.encoder.model.eval()
        self.ids, self.types, self.batches = _resolved(ids), _resolved(types), _resolved(batches)

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        import torch
        pos, vecs = [], []
        for j in batch["batch"]:
            rows = self.batches[int(j)]
            padded = self.encoder.pad(self.ids, self.types, rows)
            with torch.inference_mode():
                vecs.append(self.encoder.forward_pooled(padded).float().cpu().numpy())
            pos.append(np.asarray(rows, dtype=np.int64))
        return {"pos": np.concatenate(pos), "vec": np.concatenate(vecs)}


class ClassifyWorker:
    """A Ray Data actor: one copy of a Hugging Face classifier; pads the batches it is given (as
    :class:`~instattr.models.rows.Rows` pads them here) and returns its final layer's inputs and
    its probabilities."""

    def __init__(self, path: str, label_names, is_pair: bool, max_length: int, final_layer: str, sides, pad_id: int,
                 batches, device: str):
        from .models.hf import HFClassifier
        from .models.rows import Rows
        self.classifier = HFClassifier(path, label_names, is_pair, 0.0, max_length, final_layer, device=device)
        self.rows = Rows(_resolved(sides), pad_id)
        self.batches = _resolved(batches)

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        pos, feats, probs, differs = [], [], [], []
        for j in batch["batch"]:
            rows = self.batches[int(j)]
            f, p = self.classifier.forward_batch(self.rows.batch(rows, self.classifier.device))
            pos.append(np.asarray(rows, dtype=np.int64))
            feats.append(f)
            probs.append(p)
            differs.append(self.classifier.last_differs)
        return {"pos": np.concatenate(pos), "feat": np.concatenate(feats), "prob": np.concatenate(probs),
                "differs": np.concatenate(differs)}


class GradientActor:
    """A Ray actor kept for a backend's lifetime: the run's classifier and projector, built once from
    a :class:`~instattr.layers.attributors.GradientSource`; :meth:`prepare` takes one call's rows,
    then :meth:`gradients` computes one of its batches."""

    def __init__(self, source):
        self.source = source
        self.classifier, self.projector = source.build()

    def prepare(self, rows, labels: np.ndarray, batches: Sequence[np.ndarray], factors: bool,
                query: bool = False) -> None:
        """Take one call's rows (a :class:`~instattr.models.rows.RowIds`: tokenized here, from the
        run's dataset), labels and batches."""
        import torch
        self.rows = self.classifier.rows(rows)
        self.labels, self.batches = torch.as_tensor(labels), batches
        self.factors, self.query = bool(factors), bool(query)

    def gradients(self, j: int):
        """(positions, gradients, factors or None, final-layer inputs) of batch ``j``."""
        rows = self.batches[j]
        g, f, x = self.projector.gradients(self.rows.batch(rows), self.labels[rows], self.factors, self.query)
        return rows, g.numpy(), None if f is None else f.numpy(), x.float().numpy()


class BatchActor:
    """A Ray actor holding one piece of batched work (e.g. :class:`instattr.lm.WindowBatches`: a
    projector with its model and the windows) and running its batches."""

    def __init__(self, work):
        self.work = _resolved(work)

    def run(self, j: int):
        return self.work(j)


def _cut(encoder, groups: Sequence[Tuple[Sequence[str], Optional[Sequence[str]]]]):
    """Every group tokenized and cut into the length-sorted batches ``encoder.batches`` would cut:
    (ids, token types or None, batches of positions into ids, where each group starts)."""
    from .encoders import length_batches
    ids, types, batches, starts = [], [], [], [0]
    for texts, queries in groups:
        if len(texts):
            gi, gt = encoder.tokenize(texts, queries)
            if (gt is None) != (types is None) and ids:
                raise InstattrError("--backend ray: the tokenizer gave token types for some texts and not others")
            batches += [np.asarray(b) + starts[-1] for b in length_batches([len(x) for x in gi], encoder.batch_size)]
            ids += list(gi)
            types = None if gt is None else (types or []) + list(gt)
        starts.append(starts[-1] + len(texts))
    return ids, types, batches, starts


SHARED_ARGS = ("ids", "types", "sides", "batches")   # constructor arguments put in the object store once


def _pool_map(worker, n_batches: int, device: str, kwargs: dict, progress: bool, address: Optional[str],
              workers: Optional[int]):
    """Batch numbers ``0..n_batches-1`` through a pool of ``worker`` actors (Ray Data
    ``map_batches``), on the driver's device type (one GPU per actor for CUDA): the output batches."""
    connect(address, workers)
    import ray
    import ray.data
    _quiet_ray_data(ray, progress)
    size = max(1, min(_pool_size(ray, workers), n_batches))
    if device == "cuda":
        size = min(size, int(ray.cluster_resources().get("GPU", 0)))
        if size < 1:
            raise InstattrError("--backend ray: the model runs on CUDA here but the Ray cluster has no GPU; "
                                "pass --device cpu to run on its CPUs")
    ds = ray.data.from_items([{"batch": j} for j in range(n_batches)])
    done = ds.map_batches(worker, batch_size=1, batch_format="numpy", num_gpus=1 if device == "cuda" else 0,
                          compute=ray.data.ActorPoolStrategy(size=size), runtime_env=_driver_threads(),
                          fn_constructor_kwargs={k: ray.put(v) if k in SHARED_ARGS else v for k, v in kwargs.items()})
    return done.iter_batches(batch_format="numpy", batch_size=None)


@contextmanager
def _one_line(what: str):
    """A Ray failure (a lost node whose work Ray could not place again, a worker's own error) as a
    one-line error; what was recorded before it is kept, so the same command resumes after it."""
    ray_module()                                   # a one-line error when Ray is not installed
    from ray.exceptions import RayError
    try:
        yield
    except RayError as e:
        raise InstattrError(f"--backend ray: {what} stopped: {_root_cause(e)}; run the same command again to "
                            "resume") from None


def _root_cause(error) -> str:
    """The last line of a Ray error that names an exception (the worker's own error), else its first line."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    named = [ln for ln in lines if ln.split(":", 1)[0].split(".")[-1].endswith(("Error", "Exception"))]
    return named[-1] if named else (lines[0] if lines else type(error).__name__)


def _driver_threads() -> dict:
    """The runtime environment of every actor and task: this process's thread counts. Ray starts
    workers with ``OMP_NUM_THREADS=1``, and the thread count a process starts with changes float32
    results in the last bit on some CPUs (torch's MKL in a transformer; numpy's OpenBLAS in a
    GEMM on an AMD EPYC). Ray merges it into the job's environment (``local_env``)."""
    import torch
    from threadpoolctl import threadpool_info
    env = {"OMP_NUM_THREADS": str(torch.get_num_threads())}
    for api, var in (("openblas", "OPENBLAS_NUM_THREADS"), ("mkl", "MKL_NUM_THREADS")):   # numpy's BLAS
        counts = [p["num_threads"] for p in threadpool_info() if p.get("internal_api") == api]
        if counts:
            env[var] = str(max(counts))
    return {"env_vars": env}


def ray_encode_groups(encoder, groups: Sequence[Tuple[Sequence[str], Optional[Sequence[str]]]],
                      progress: bool = False, address: Optional[str] = None,
                      workers: Optional[int] = None) -> List[np.ndarray]:
    """``encoder.encode(texts, queries)`` of each group, by one pool of Ray actors that each load
    the encoder from ``encoder.path`` (a folder every node sees). The driver tokenizes and cuts
    each group into the length-sorted batches the local encoder would cut; the actors pad and
    encode them on the device type the driver's encoder uses (a GPU each when that is CUDA), with
    its precision. One (n, hidden) float32 array per group, in the order of its texts."""
    if not encoder.path or not Path(encoder.path).is_dir():
        raise InstattrError(f"--backend ray: the encoder must be a local folder its workers can load, "
                            f"not {encoder.name!r}")
    ids, types, batches, starts = _cut(encoder, groups)
    out = np.zeros((starts[-1], encoder.hidden_size), dtype=np.float32)
    seen = 0
    if batches:
        kwargs = {"path": str(encoder.path), "pooling": encoder.pooling, "max_length": encoder.max_length,
                  "ids": ids, "types": types, "batches": batches, "device": encoder.device.type,
                  "autocast": encoder.autocast}
        for part in _pool_map(EncodeWorker, len(batches), encoder.device.type, kwargs, progress, address, workers):
            out[part["pos"]] = part["vec"]
            seen += len(part["pos"])
    if seen != starts[-1]:
        raise InstattrError(f"--backend ray: the workers encoded {seen} of {starts[-1]} texts")
    return [out[a:b] for a, b in zip(starts[:-1], starts[1:])]


def ray_classify_groups(classifier, groups: Sequence[Tuple[Sequence[str], Optional[Sequence[str]]]],
                        progress: bool = False, address: Optional[str] = None,
                        workers: Optional[int] = None) -> List[Tuple[np.ndarray, np.ndarray]]:
    """``classifier.forward_texts(documents, queries)`` of each group (an
    :class:`~instattr.models.hf.HFClassifier`), by one pool of Ray actors that each load the
    checkpoint folder (one every node sees), in the batches this process would cut: (final
    layer's inputs, probabilities) per group, in the order of its texts. Rows where a decoder's own
    pooling picked another token are added to ``classifier.own_pooling_differs``."""
    if not Path(classifier.path).is_dir():
        raise InstattrError(f"--backend ray: the model must be a local folder its workers can load, "
                            f"not {classifier.path!r}")
    parts = [classifier.tokenize(texts, queries) for texts, queries in groups]
    starts = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(int)
    sides, batches = [], []
    for p, a in zip(parts, starts):
        batches += [b + a for b in p.order(classifier.batch_size)]
    for s in range(len(parts[0].sides) if parts else 0):
        ids = [x for p in parts for x in p.sides[s][0]]
        typed = any(p.sides[s][1] is not None for p in parts)      # an empty group has no token types
        types = [x for p in parts for x in (p.sides[s][1] or [])] if typed else None
        sides.append((ids, types))
    feats = np.zeros((starts[-1], classifier.final_module().in_features), dtype=np.float32)
    probs = np.zeros((starts[-1], classifier.n_classes), dtype=np.float32)
    seen = 0
    if batches:
        device = classifier.device.type
        kwargs = {"path": classifier.path, "label_names": list(classifier.label_names),
                  "is_pair": classifier.pair_mode is not None, "max_length": classifier.max_length,
                  "final_layer": classifier.final_layer_name, "sides": sides, "pad_id": parts[0].pad_id,
                  "batches": batches, "device": device}
        for part in _pool_map(ClassifyWorker, len(batches), device, kwargs, progress, address, workers):
            feats[part["pos"]], probs[part["pos"]] = part["feat"], part["prob"]
            classifier.own_pooling_differs += int(np.sum(part["differs"]))   # as if classified here
            seen += len(part["pos"])
    if seen != starts[-1]:
        raise InstattrError(f"--backend ray: the workers classified {seen} of {starts[-1]} texts")
    return [(feats[a:b], probs[a:b]) for a, b in zip(starts[:-1], starts[1:])]


def _quiet_ray_data(ray, progress: bool) -> None:
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = bool(progress)
    if not progress:                      # --quiet: no Ray Data progress lines either
        import logging
        logging.getLogger("ray.data").setLevel(logging.WARNING)


def ray_build_shards(job, todo: Sequence[int], address: Optional[str] = None, workers: Optional[int] = None,
                     progress: bool = False) -> Iterator[Tuple[int, Dict[str, dict]]]:
    """Write shards ``todo`` of an index's :class:`~instattr.index.build.ShardJob` (every method
    that lacks them) with a pool of Ray actors; yields (shard, its manifest entries) as each shard
    is written, in whatever order the actors finish them."""
    from dataclasses import replace
    in_fit = replace(job, methods={n: m for n, m in job.methods.items() if not m.streams_train})
    no_side = [n for n, m in in_fit.methods.items() if m.fitted_train_side() is None]
    if no_side:
        raise InstattrError(f"--backend ray: {', '.join(no_side)} keep no training side (each block of scores is "
                            "computed whole, e.g. ihvp lissa or explicit); use the local backend")

    def with_in_fit(i: int, entries: Dict[str, dict]):   # sides made in fit: written here, from memory
        return i, {**entries, **in_fit.write(i)}

    streamed = replace(job, methods={n: m for n, m in job.methods.items() if m.streams_train})
    if not streamed.methods:
        for i in todo:
            yield with_in_fit(i, {})
        return
    connect(address, workers)
    import ray
    import ray.data
    _quiet_ray_data(ray, progress)
    size = max(1, min(_pool_size(ray, workers), len(todo)))
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= size else 0
    ds = ray.data.from_items([{"shard": int(i)} for i in todo])
    out = ds.map_batches(ShardWriter, batch_size=1, batch_format="numpy", num_gpus=gpus,
                         compute=ray.data.ActorPoolStrategy(size=size), runtime_env=_driver_threads(),
                         fn_constructor_kwargs={"job": ray.put(streamed)})
    for r in out.iter_rows():
        yield with_in_fit(int(r["shard"]), json.loads(str(r["entries"])))


def _shard_top_k(root: str, names: List[str], sides, rows_of, test_rows: int, n_test: int, k: int, bottom_k: int,
                 train_range):
    """A Ray task: the exact top-k of every test row against one shard (columns stay global)."""
    from .index.search import Index
    from .methods.sides import FINISHES
    index = Index(root)
    members = [Member(n, test=lambda rows, n=n: sides[n][rows_of[rows.start]], train=index.source(n),
                      finish=FINISHES[index.manifest["methods"][n]["finish"]]) for n in names]
    return score_top_k(members, n_test, k, bottom_k, Grid(test_rows, index.train_rows), train_range=train_range)


def ray_search(root, names: Sequence[str], methods: Dict[str, object], test, k: int, bottom_k: int = 0,
               grid: Optional[Grid] = None, address: Optional[str] = None, workers: Optional[int] = None):
    """Exact top-k of ``test`` from the index at ``root``: one Ray task per shard, merged here."""
    from .index.search import Index
    ray = connect(address, workers)
    index = Index(root)
    grid = Grid((grid or Grid()).test_rows, index.train_rows)
    blocks = grid.test_blocks(len(test))
    sides = {n: [methods[n].test_side(test.subset(b)) for b in blocks] for n in names}
    rows_of = {b.start: j for j, b in enumerate(blocks)}
    task = ray.remote(_shard_top_k).options(runtime_env=_driver_threads())
    sides_ref = ray.put(sides)
    ranges = [(s, min(s + index.shard_rows, index.n)) for s in range(0, index.n, index.shard_rows)]
    parts = ray.get([task.remote(str(root), list(names), sides_ref, rows_of, grid.test_rows, len(test), k,
                                 bottom_k, r) for r in ranges])
    out = {}
    for n in names:
        out[n] = {"top": merge_shards([p[n]["top"] for p in parts], k, True)}
        if bottom_k:
            out[n]["bottom"] = merge_shards([p[n]["bottom"] for p in parts], bottom_k, False)
    return out


def ray_top_k(run, fitted: Dict[str, object], test, train, k: int, bottom_k: int, grid: Grid,
              backend: "RayBackend", progress: bool = False):
    """``attribute --top-k --backend ray``: a float32 index of the training sides under RUN/cache
    (built by ``backend``'s actors, resumable), then per-shard top-k tasks."""
    from .index.build import build_index, run_digest
    from .methods.sides import digest
    source = {"run": str(run.path.resolve()), "run_sha256": run_digest(run), "split": "train",
              "rows": digest(np.asarray([str(i) for i in train.idx]))}
    spec = {"methods": {n: m.config() for n, m in fitted.items()}, "source": source, "rows": grid.train_rows}
    key = digest(np.frombuffer(json.dumps(spec, sort_keys=True, default=str).encode(), dtype=np.uint8))
    root = run.path / "cache" / f"ray-index-{key}"
    build_index(root, train, fitted, source, dtype="float32", train_rows=grid.train_rows, progress=progress,
                backend=backend, overwrite=False)
    return ray_search(root, list(fitted), fitted, test, k, bottom_k, grid, backend.address, backend.workers)


class RayBackend:
    """``--backend ray`` as a strategy object (the protocol of :mod:`instattr.backend`): commands
    take it instead of the local backend and call these, never importing this module."""

    name = "ray"
    dense = False                 # writes top-k results only
    embeds_in_fit = False         # training sides are written by ShardWriter actors
    runs_everything = False       # fine-tuning stays in one process: refused here

    def __init__(self, address: Optional[str] = None, workers: Optional[int] = None):
        if workers is not None and int(workers) < 1:
            raise InstattrError(f"--workers must be positive, got {workers}")
        self.address, self.workers = address, workers
        self._actors: Dict[object, list] = {}      # GradientSource -> its GradientActor handles

    def top_k(self, run, fitted, test, train, k: int, bottom_k: int, grid: Grid, progress: bool = False):
        """Each method's top-k (and bottom-k) of ``test`` against ``train``: {name: {"top": .., "bottom": ..}}.
        Shards written before a failure are kept: the same command resumes after them."""
        with _one_line("attribute"):
            return ray_top_k(run, fitted, test, train, k, bottom_k, grid, self, progress)

    def encode_groups(self, encoder, groups, progress: bool = False) -> List[np.ndarray]:
        """``encoder.encode(texts, queries)`` of each group on one pool of actors, one encoder each."""
        return ray_encode_groups(encoder, groups, progress, self.address, self.workers)

    def classify_groups(self, classifier, groups, progress: bool = False):
        """``classifier.forward_texts(documents, queries)`` of each group on one pool of actors."""
        return ray_classify_groups(classifier, groups, progress, self.address, self.workers)

    def gradient_batches(self, projector, source, fs, rows, labels, batches, factors: bool, query: bool = False):
        """Yield (positions, gradients, factors or None, final-layer inputs) for ``batches``
        (positions into ``fs``, padded as the local path pads them), from this backend's pool of
        :class:`GradientActor` for ``source``, in whatever order they finish; without a ``source``
        (a classifier no worker can rebuild) here. A worker that fails (e.g. cannot read the run
        folder) stops the pool and raises a one-line error."""
        if source is None:
            from .backend import LOCAL
            yield from LOCAL.gradient_batches(projector, None, fs, rows, labels, batches, factors, query)
            return
        if not len(batches):
            return
        ray = connect(self.address, self.workers)
        from ray.exceptions import RayError
        from ray.util import ActorPool

        from .models.rows import RowIds
        try:
            actors = self._gradient_actors(ray, source)
            ids = RowIds.of(fs)                 # the rows' identity, not their feature arrays
            refs = [ray.put(x) for x in (ids, np.asarray(labels), list(batches))]
            ray.get([a.prepare.remote(*refs, bool(factors), bool(query)) for a in actors])   # before their batches
            for rows, g, f, x in ActorPool(actors).map_unordered(lambda a, j: a.gradients.remote(j),
                                                                 range(len(batches))):
                yield np.array(rows), np.array(g), None if f is None else np.array(f), x   # writable copies
        except RayError as e:
            self._stop(source)
            raise InstattrError(f"--backend ray: the gradient workers for {source.run} failed: "
                                f"{_root_cause(e)}") from None

    def map_batches(self, work):
        """``work(j)`` for each of its batches on a pool of :class:`BatchActor` (each holding ``work``
        once, spread over the nodes; a GPU each when ``work.device`` is CUDA), in whatever order
        they finish. A worker that fails stops the pool and raises a one-line error."""
        if not len(work):
            return
        ray = connect(self.address, self.workers)
        from ray.exceptions import RayError
        from ray.util import ActorPool
        size = max(1, min(_pool_size(ray, self.workers), len(work)))
        placing = {"num_cpus": 0, "scheduling_strategy": "SPREAD"}
        if str(getattr(work, "device", "cpu")).startswith("cuda"):
            size = min(size, int(ray.cluster_resources().get("GPU", 0)))
            if size < 1:
                raise InstattrError("--backend ray: the model runs on CUDA here but the Ray cluster has no GPU; "
                                    "pass --device cpu to run on its CPUs")
            placing = {"num_cpus": 0, "num_gpus": 1}
        actor = ray.remote(BatchActor).options(runtime_env=_driver_threads(), **placing)
        ref = ray.put(work)
        actors = [actor.remote(ref) for _ in range(size)]
        try:
            yield from ActorPool(actors).map_unordered(lambda a, j: a.run.remote(j), range(len(work)))
        except RayError as e:
            raise InstattrError(f"--backend ray: a batch worker failed: {_root_cause(e)}") from None
        finally:
            for a in actors:
                ray.kill(a)

    def _gradient_actors(self, ray, source) -> list:
        """The actors for ``source``, started on first use and kept: a layered method asks for the
        training rows, then each block of test rows (and tracin-top each checkpoint), and starting
        an actor (a process importing torch) takes seconds. On CPUs they reserve no CPU, so idle
        pools (one per tracin-top checkpoint) never block the scoring tasks, and are spread over
        the nodes; on CUDA each reserves a GPU, so only one pool lives at a time."""
        if source not in self._actors:
            size = _pool_size(ray, self.workers)
            if source.device == "cuda":
                self.close()
                size = min(size, int(ray.cluster_resources().get("GPU", 0)))
                if size < 1:
                    raise InstattrError("--backend ray: the model runs on CUDA here but the Ray cluster has no GPU; "
                                        "pass --device cpu to run on its CPUs")
                placing = {"num_cpus": 0, "num_gpus": 1}
            else:
                placing = {"num_cpus": 0, "scheduling_strategy": "SPREAD"}
            actor = ray.remote(GradientActor).options(runtime_env=_driver_threads(), **placing)
            self._actors[source] = [actor.remote(source) for _ in range(size)]
        return self._actors[source]

    def close(self) -> None:
        """Stop this backend's actors (they also stop when it is garbage collected); ``with
        RayBackend(...) as backend:`` closes it on leaving."""
        for source in list(self._actors):
            self._stop(source)

    def __enter__(self) -> "RayBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _stop(self, source) -> None:
        ray = ray_module()
        for a in self._actors.pop(source, ()):
            ray.kill(a)

    def __getstate__(self):
        # a copy (inside a fitted method that ShardWriter actors receive) starts its own actors if it needs any
        return {"address": self.address, "workers": self.workers, "_actors": {}}

    def build_shards(self, job, todo, progress: bool = False):
        """Write the index shards ``todo`` of ``job`` (:class:`instattr.index.build.ShardJob`) with a
        pool of actors; yields (shard, its file entries) as each is written. Gradient actors holding
        GPUs are stopped first, so the writers can have them."""
        for source in [s for s in self._actors if s.device == "cuda"]:
            self._stop(source)
        with _one_line("index build"):
            yield from ray_build_shards(job, todo, self.address, self.workers, progress)

    def search(self, index, names, methods, test, k: int, bottom_k: int = 0):
        """An index's top-k, one task per shard, merged on the driver."""
        with _one_line("query"):
            return ray_search(index.root, names, methods, test, k, bottom_k, address=self.address,
                              workers=self.workers)

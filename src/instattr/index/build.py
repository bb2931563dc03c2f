"""Build an index: each method's training side written in shards, resumable shard by shard.

``build_index(out, train, methods, ...)`` takes fitted methods (``fit(..., embed=False)`` is
enough for the last-layer ones: their training side is computed shard by shard, in the same
blocks as the dense path, so a float32 index reproduces its scores bit for bit).
``build_run_index(run, names, out, ...)`` fits the methods of a run first. A build that is
killed resumes at the first unfinished shard when run again with the same arguments.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from ..arrays import FeatureSet
from ..backend import backend_or_local
from ..methods.scoring import TRAIN_BLOCK, Grid
from ..methods.sides import Side
from ..store import Run, write_json, write_npy, write_npz
from .layout import FORMAT, IndexStoreError, file_entry, read_manifest, sha256, write_manifest

DTYPES = ("float16", "float32")
SHARD_BLOCKS = 16          # default shard: 16 blocks of TRAIN_BLOCK rows (262,144 rows)


def run_digest(run: Run) -> str:
    """Which run an index came from: the sha256 of its run.json."""
    return sha256(run.path / "run.json")


def shard_side(method, train: FeatureSet, rows: slice, train_rows: int = TRAIN_BLOCK) -> Side:
    """The training side of ``rows``, computed in the dense path's blocks of ``train_rows``."""
    if not method.streams_train:
        return method.fitted_train_side().rows(rows)
    blocks = Grid(1, train_rows).train_blocks(len(train), rows.start, rows.stop)
    return Side.gather(((slice(b.start - rows.start, b.stop - rows.start), method.train_side(train.subset(b)))
                        for b in blocks), rows.stop - rows.start)


def write_shard(root: Path, name: str, s: int, side: Side, dtype: str) -> dict:
    """Write shard ``s`` of method ``name``; its manifest entry (files, rows, checksums)."""
    if not np.isfinite(side.vectors).all():
        raise IndexStoreError(f"{name}: training-side values are NaN or infinite in shard {s} (check the run's "
                              "training features)")
    vectors = side.vectors.astype(dtype)
    if not np.isfinite(vectors).all():
        raise IndexStoreError(f"{name}: training-side values overflow {dtype} in shard {s}; use --dtype float32")
    rel = f"{name}/shard-{s:05d}.npy"
    write_npy(root / rel, vectors)
    entry = {**file_entry(root, rel), "rows": len(side), "dim": side.dim}
    cols = [a for a in (side.offset, side.scale) if a is not None]
    entry["aux_columns"] = [c for c, a in (("offset", side.offset), ("scale", side.scale)) if a is not None]
    if cols:
        aux = f"{name}/shard-{s:05d}.aux.npy"
        write_npy(root / aux, np.stack(cols, axis=1).astype(np.float32))
        entry["aux"] = file_entry(root, aux)
    return entry


def _spec(source: dict, n: int, dtype: str, shard_rows: int, train_rows: int, methods: Dict[str, object]) -> dict:
    spec = {"source": source, "n": n, "dtype": dtype, "shard_rows": shard_rows, "train_rows": train_rows,
            "methods": {name: m.config() for name, m in methods.items()}}
    return json.loads(json.dumps(spec, default=str))       # as it reads back from the manifest


def _method_entry(root: Path, name: str, method, options: dict) -> dict:
    """The manifest entry of a method before its shards: state (or refit options), finish."""
    from ..methods.state import StateError, save_state
    entry = {"config": method.config(), "options": options, "finish": method.finish.name, "shards": []}
    try:
        arrays, meta = save_state(method)
    except StateError:
        entry["state"] = None                 # layered methods: refit from the run at query time
        return entry
    write_npz(root / name / "state.npz", **arrays)
    write_json(root / name / "state.json", meta)
    entry["state"] = file_entry(root, f"{name}/state.npz")
    entry["state_meta"] = file_entry(root, f"{name}/state.json")
    return entry


def _resume(root: Path, spec: dict, overwrite: bool) -> Optional[dict]:
    """The manifest of an unfinished (or finished) build with the same spec, if any."""
    if not (root / "index.json").exists():
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise IndexStoreError(f"{root}: exists and is not an index (no index.json); choose another --out")
        return None
    old = read_manifest(root)
    if "methods" not in old:          # killed before its first full manifest: ours, start again
        return None
    if old.get("spec") == spec and not overwrite:
        return old
    if not overwrite:
        raise IndexStoreError(f"{root}: holds an index built with other arguments (run, methods, dtype or shard "
                              "size); add --overwrite to rebuild it")
    return None


def build_index(out, train: FeatureSet, methods: Dict[str, object], source: dict, dtype: str = "float16",
                shard_rows: Optional[int] = None, train_rows: int = TRAIN_BLOCK, ann: Optional[str] = None,
                ann_k: int = 10, ann_target: float = 0.95, queries: Optional[FeatureSet] = None,
                options: Optional[Dict[str, dict]] = None, overwrite: bool = False, progress: bool = True,
                backend=None,
                labels: Optional[np.ndarray] = None) -> dict:
    """Write (or resume) the index at ``out``; returns its manifest. ``source`` records where the
    training rows came from (``{"run": path, "run_sha256": ...}``). ``backend`` (:mod:`instattr.backend`)
    writes the shards."""
    root = Path(out)
    if dtype not in DTYPES:
        raise IndexStoreError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    shard_rows = int(shard_rows or SHARD_BLOCKS * train_rows)
    if shard_rows < 1 or shard_rows % train_rows:
        raise IndexStoreError(f"--shard-rows must be a positive multiple of {train_rows} (the scoring block), "
                              f"got {shard_rows}")
    n = len(train)
    spec = _spec(source, n, dtype, shard_rows, train_rows, methods)
    manifest = _resume(root, spec, overwrite)
    if manifest is None:
        if overwrite and root.exists():
            import shutil
            shutil.rmtree(root)
        root.mkdir(parents=True, exist_ok=True)
        write_manifest(root, {"format": FORMAT, "spec": spec, "complete": False})   # the folder is an index now
        write_npy(root / "ids.npy", np.asarray([str(i) for i in train.idx]))
        write_npy(root / "labels.npy", np.asarray(train.label if labels is None else labels, dtype=np.int64))
        manifest = {"format": FORMAT, "spec": spec, "n": n, "dtype": dtype, "shard_rows": shard_rows,
                    "train_rows": train_rows, "source": source, "complete": False, "created": time.time(),
                    "ids": file_entry(root, "ids.npy"), "labels": file_entry(root, "labels.npy"),
                    "methods": {name: _method_entry(root, name, m, (options or {}).get(name, {}))
                                for name, m in methods.items()}}
        write_manifest(root, manifest)
    shards = [slice(s, min(s + shard_rows, n)) for s in range(0, n, shard_rows)]
    todo = [i for i in range(len(shards)) if any(len(manifest["methods"][m]["shards"]) <= i for m in methods)]
    for name in methods:     # shards written before a kill must be whole (checksums) to be kept
        done = manifest["methods"][name]["shards"]
        for i, entry in enumerate(done):
            if not (root / entry["file"]).exists() or sha256(root / entry["file"]) != entry["sha256"]:
                del done[i:]
                todo = sorted(set(todo) | set(range(i, len(shards))))
                break
    if todo:
        job = ShardJob(root, train, methods, shards, dtype, train_rows,
                       {name: len(manifest["methods"][name]["shards"]) for name in methods})
        arrived, order = {}, iter(todo)
        want = next(order)
        for i, entries in backend_or_local(backend).build_shards(job, todo, progress):
            arrived[i] = entries
            while want is not None and want in arrived:   # record the finished prefix: a kill resumes after it
                for name in methods:
                    if len(manifest["methods"][name]["shards"]) == want:
                        _record(manifest, name, want, arrived[want][name])
                del arrived[want]
                write_manifest(root, manifest)
                want = next(order, None)
        if want is not None:
            raise IndexStoreError(f"{root}: the backend did not write shard {want}")
    if ann:
        from .ann import build_ann, current_ann
        for name, method in methods.items():
            if not current_ann(manifest["methods"][name].get("ann"), ann):
                manifest["methods"][name]["ann"] = build_ann(root, manifest, name, method, train, queries, ann,
                                                             ann_k, ann_target, progress)
                write_manifest(root, manifest)
    manifest["complete"] = True
    write_manifest(root, manifest)
    return manifest


@dataclass
class ShardJob:
    """What writing an index's shards needs (:meth:`instattr.backend.LocalBackend.build_shards` calls
    :meth:`write`; a Ray backend sends the fields to its actors)."""
    root: Path
    train: FeatureSet
    methods: Dict[str, object]
    shards: List[slice]
    dtype: str
    train_rows: int
    recorded: Dict[str, int] = field(default_factory=dict)   # shards each method has whole already

    def write(self, i: int) -> Dict[str, dict]:
        """Shard ``i`` of every method that lacks it (a recorded shard is never rewritten); its
        manifest entries per method."""
        return {name: write_shard(self.root, name, i, shard_side(m, self.train, self.shards[i], self.train_rows),
                                  self.dtype) for name, m in self.methods.items() if self.recorded.get(name, 0) <= i}


def _record(manifest: dict, name: str, i: int, entry: dict) -> None:
    shards = manifest["methods"][name]["shards"]
    if len(shards) != i:
        raise IndexStoreError(f"{name}: shard {i} out of order (have {len(shards)})")
    shards.append(entry)


def build_run_index(run: Run, names: List[str], out, options: Optional[dict] = None, device=None, **kwargs) -> dict:
    """Fit ``names`` on the run's training split and index their training sides at ``out``."""
    from ..attribution import fit_method, method_options, resolve_methods
    names = resolve_methods(names)
    per = method_options(names, options)
    train = run.features("train")
    methods = {n: fit_method(run, n, train, device=device, embed=False, backend=kwargs.get("backend"), **per[n])
               for n in names}
    if kwargs.get("queries") is None and run.eval_split in run.splits:
        ev = run.features(run.eval_split)
        rows = np.sort(np.random.default_rng(0).choice(len(ev), min(len(ev), 200), replace=False))
        kwargs["queries"] = ev.subset(rows)
    source = {"run": str(run.path.resolve()), "run_sha256": run_digest(run), "split": "train"}
    return build_index(out, train, methods, source, options=per, **kwargs)

"""The on-disk layout of an index of training sides, its manifest, checksums and verification.

::

    IDX/index.json                  manifest (written atomically after every finished shard)
        ids.npy  labels.npy         training ids (str) and gold labels (int64), in the run's row order
        {method}/state.npz + .json  the fitted method without its training side (test sides at query time)
        {method}/shard-00000.npy    training-side vectors, rows [0, shard_rows), float16 or float32
        {method}/shard-00000.aux.npy  float32 per-row offset and/or scale columns (when the method has them)
        {method}/ann-KIND-0.faiss   optional FAISS index (KIND ivf or hnsw) of the plain vectors (older: -J)

Every file is listed in the manifest with its sha256; ``verify`` recomputes them. Vectors are
plain ``.npy`` files, so Dask, Spark (through numpy) or any other tool can read them directly.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Dict, List, Optional

from ..errors import InstattrError
from ..store import read_json, write_json

FORMAT = 1
MANIFEST = "index.json"


class IndexStoreError(InstattrError):
    """An index is missing, incomplete, damaged or does not fit the request; one-line message."""


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def file_entry(root: Path, rel: str) -> dict:
    return {"file": rel, "sha256": sha256(Path(root) / rel)}


def read_manifest(root) -> dict:
    root = Path(root)
    if not root.is_dir():
        raise IndexStoreError(f"{root}: no such index (build one with `instattr index build`)")
    path = root / MANIFEST
    if not path.exists():
        raise IndexStoreError(f"{root}: not an index (no {MANIFEST}); build one with `instattr index build`")
    try:
        m = read_json(path)
    except InstattrError as e:
        raise IndexStoreError(str(e)) from None
    if m.get("format") != FORMAT:
        raise IndexStoreError(f"{path}: unknown index format {m.get('format')!r} (this instattr reads {FORMAT})")
    return m


def write_manifest(root, manifest: dict) -> None:
    write_json(Path(root) / MANIFEST, manifest)


def method_files(entry: dict) -> List[dict]:
    """Every file entry of one method: state, shards, aux columns, ANN index."""
    out = [f for f in (entry.get("state"), entry.get("state_meta")) if f]
    for shard in entry.get("shards", []):
        out.append(shard)
        if shard.get("aux"):
            out.append(shard["aux"])
    if entry.get("ann"):
        out += entry["ann"]["parts"]
    return out


def verify(root, methods: Optional[List[str]] = None) -> Dict[str, object]:
    """Recompute every checksum; one-line error naming the first bad or missing file. Returns a
    summary: rows, methods, shards and files checked, and each method's stored ANN recall."""
    root = Path(root)
    m = read_manifest(root)
    if not m.get("complete"):
        done = sum(len(e.get("shards", [])) for e in m.get("methods", {}).values())
        raise IndexStoreError(f"{root}: the build did not finish ({done} shards written); rerun the same "
                              "`instattr index build` to resume it")
    names = methods or list(m["methods"])
    files = [m["ids"], m["labels"]]
    for name in names:
        if name not in m["methods"]:
            raise IndexStoreError(f"{root}: has no method {name!r} (has {', '.join(m['methods'])})")
        files += method_files(m["methods"][name])
    for f in files:
        p = root / f["file"]
        if not p.exists():
            raise IndexStoreError(f"{p}: missing")
        got = sha256(p)
        if got != f["sha256"]:
            raise IndexStoreError(f"{p}: checksum mismatch (sha256 {got[:12]}..., manifest says "
                                  f"{f['sha256'][:12]}...); the file is damaged: rebuild the index")
    return {"rows": m["n"], "methods": names, "files": len(files),
            "shards": sum(len(m["methods"][n]["shards"]) for n in names),
            "ann_recall": {n: m["methods"][n]["ann"].get("recall") for n in names if m["methods"][n].get("ann")}}

"""Query an index: exact top-k over memory-mapped shards (the one scorer), or approximate (FAISS).

``Index(path)`` opens a finished index; ``index.search(names, test, k)`` scores the test rows'
sides against every shard block by block (peak memory: a few blocks, whatever the number of
training rows) and returns, per method, ``{"top": (rows, scores)}`` (and ``"bottom"``); rows are
positions in the index's training order (``index.ids[rows]`` their ids).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..arrays import FeatureSet
from ..methods.scoring import Grid, Member, score_top_k
from ..methods.sides import FINISHES, Side
from ..store import LMRun, Run, read_json
from .layout import IndexStoreError, read_manifest


class ShardSource:
    """A method's training side over an index's shards: ``len`` and ``rows(slice) -> Side``."""

    def __init__(self, root: Path, entry: dict, n: int, shard_rows: int, key: tuple = ()):
        self.n, self.shard_rows, self.key = n, shard_rows, key
        self.columns = entry["shards"][0].get("aux_columns", []) if entry["shards"] else []
        self.shards = []
        for s in entry["shards"]:
            vec = np.load(root / s["file"], mmap_mode="r")
            aux = np.load(root / s["aux"]["file"], mmap_mode="r") if s.get("aux") else None
            self.shards.append((vec, aux))

    def __len__(self) -> int:
        return self.n

    def rows(self, rows: slice) -> Side:
        start, stop = rows.start or 0, self.n if rows.stop is None else rows.stop
        parts = []
        while start < stop:
            s, off = divmod(start, self.shard_rows)
            end = min(stop, (s + 1) * self.shard_rows)
            vec, aux = self.shards[s]
            part = slice(off, off + end - start)
            cols = {c: np.asarray(aux[part, j], dtype=np.float32) for j, c in enumerate(self.columns)}
            parts.append(Side(np.ascontiguousarray(vec[part], dtype=np.float32), cols.get("offset"),
                              cols.get("scale"), self.key))
            start = end
        return parts[0] if len(parts) == 1 else Side.concat(parts)

    def take(self, positions: np.ndarray) -> Side:
        """The rows at sorted ``positions`` (random access into the shards)."""
        positions = np.asarray(positions, dtype=np.int64)
        shard = positions // self.shard_rows
        parts = []
        for s in np.unique(shard):
            local = positions[shard == s] - s * self.shard_rows
            vec, aux = self.shards[int(s)]
            cols = {c: np.asarray(aux[local, j], dtype=np.float32) for j, c in enumerate(self.columns)}
            parts.append(Side(np.ascontiguousarray(vec[local], dtype=np.float32), cols.get("offset"),
                              cols.get("scale"), self.key))
        return Side.concat(parts)


class Index:
    """A finished index on disk (``instattr index build``)."""

    def __init__(self, root, device=None):
        self.root, self.device = Path(root), device       # device: where a refit method's model runs
        self.manifest = read_manifest(self.root)
        if not self.manifest.get("complete"):
            raise IndexStoreError(f"{self.root}: the build did not finish; rerun the same `instattr index build` "
                                  "to resume it")
        self.n, self.shard_rows = int(self.manifest["n"]), int(self.manifest["shard_rows"])
        self.train_rows = int(self.manifest["train_rows"])
        self._methods: Dict[str, object] = {}

    @property
    def names(self) -> List[str]:
        return list(self.manifest["methods"])

    @property
    def ids(self) -> np.ndarray:
        return np.load(self.root / "ids.npy")

    @property
    def labels(self) -> np.ndarray:
        return np.load(self.root / "labels.npy")

    @property
    def is_lm(self) -> bool:
        """Whether it indexes a language-model run (:mod:`instattr.index.language`)."""
        return self.manifest["source"].get("kind") == "lm"

    def run(self) -> Run:
        """The run the index was built from (checked to be unchanged)."""
        src = self.manifest["source"]
        if "run" not in src:
            raise IndexStoreError(f"{self.root}: was built from feature arrays, not a run; it answers "
                                  "search() calls only")
        run = LMRun.load(src["run"]) if self.is_lm else Run.load(src["run"])
        from .build import run_digest
        if run_digest(run) != src.get("run_sha256"):
            raise IndexStoreError(f"{self.root}: its run {run.path} changed since the index was built; rebuild it")
        return run

    def _entry(self, name: str) -> dict:
        if name not in self.manifest["methods"]:
            raise IndexStoreError(f"{self.root}: has no method {name!r} (has {', '.join(self.names)})")
        return self.manifest["methods"][name]

    def method(self, name: str):
        """The fitted method (its test side): from the saved state, or refit from the run."""
        if name not in self._methods and self.is_lm:     # one explainer, its training side kept in the run
            from .language import fit_lm_methods
            entry = self._entry(name)
            self._methods.update(fit_lm_methods(self.run(), self.names, entry.get("options", {}), self.device))
        if name not in self._methods:
            entry = self._entry(name)
            if entry["state"] is not None:
                from ..methods.state import load_state
                with np.load(self.root / entry["state"]["file"], allow_pickle=False) as z:
                    arrays = {k: z[k] for k in z.files}
                method = load_state(arrays, read_json(self.root / entry["state_meta"]["file"]))
                if method.needs == "sentence":          # its test side reads the run's sentence embeddings
                    from ..sentence import sentence_embeddings
                    method.bind(sentence_embeddings(self.run()))
            else:
                from ..attribution import fit_method
                method = fit_method(self.run(), name, device=self.device, **entry.get("options", {}))
            method.n_train_ = self.n
            self._methods[name] = method
        return self._methods[name]

    def source(self, name: str) -> ShardSource:
        """The method's shards. Its product key (which methods share a product) is in its saved
        state; methods refit from the run (the layered ones) share none, so they are not refit here."""
        entry = self._entry(name)
        key = getattr(self.method(name), "key_", ()) if entry["state"] is not None else ()
        return ShardSource(self.root, entry, self.n, self.shard_rows, key)

    def members(self, names: Sequence[str], test: FeatureSet) -> List[Member]:
        out = []
        for name in names:
            method = self.method(name)
            finish = FINISHES[self._entry(name)["finish"]]
            out.append(Member(name, test=lambda rows, m=method: m.test_side(test.subset(rows)),
                              train=self.source(name), finish=finish))
        return out

    def search(self, names: Sequence[str], test: FeatureSet, k: int, bottom_k: int = 0,
               test_rows: Optional[int] = None, progress=None) -> Dict[str, Dict[str, tuple]]:
        """Exact top-k (and bottom-k) of ``test`` for each method in ``names``."""
        grid = Grid(test_rows or Grid().test_rows, self.train_rows)
        return score_top_k(self.members(names, test), len(test), k, bottom_k, grid, progress=progress)

    def ann_search(self, names: Sequence[str], test: FeatureSet, k: int, bottom_k: int = 0,
                   nprobe: Optional[int] = None) -> Dict[str, Dict[str, tuple]]:
        """Approximate top-k from each method's FAISS index, candidates rescored exactly."""
        from .ann import ann_top_k
        out = {}
        for name in names:
            entry = self._entry(name)
            if not entry.get("ann"):
                raise IndexStoreError(f"{self.root}: {name} has no ANN index; build with `instattr index build "
                                      "--ann ivf` (needs faiss-cpu: pip install 'instattr[faiss]')")
            member = self.members([name], test)[0]
            out[name] = {"top": ann_top_k(self.root, entry["ann"], member, len(test), k, True, nprobe)}
            if bottom_k:
                out[name]["bottom"] = ann_top_k(self.root, entry["ann"], member, len(test), bottom_k, False, nprobe)
        return out

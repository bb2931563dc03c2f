"""Rankings of one row, read from whatever a run stores: a test row's supporting and opposing
training examples, and a training row's most supported and most opposed test predictions.

Two sources, per method and split (the dense one wins when both exist):

- dense: ``scores/{method}-{split}.npy`` + ``.json`` (``Run.scores``, ``Run.score_info``), the
  whole (n_test, n_train) matrix; a training row's ranking is its column.
- top-k: ``scores/{method}-{split}.topk.npz`` (arrays ``test_idx`` (n_test,), ``train_idx``,
  ``train_pos``, ``score``, ``rank``, each (n_test, K), best first) and ``.bottomk.npz`` (same keys,
  most opposing first). A training row's ranking is then the test rows whose stored top (or
  bottom) K holds it: exact as far as it goes, and marked ``partial``.

Rows are named by idx, never by position. Nothing here needs torch or a web framework.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..store import Run, RunError
from .errors import NotFound

TOPK_KEYS = ("test_idx", "train_idx", "score")


@dataclass
class Ranking:
    """Ranked rows of the other side: ``supporting`` (highest score first) and ``opposing``
    (lowest first), each a list of (idx, score). ``source`` is "dense" or "topk"; ``partial``
    says a list may miss rows the stored top-k files did not keep (columns read from top-k);
    ``opposing`` is None when nothing about opponents is stored."""
    supporting: List[Tuple[str, float]]
    opposing: Optional[List[Tuple[str, float]]]
    source: str
    partial: bool = False
    depth: Optional[int] = None     # K of the top-k files read, None for dense


@dataclass
class _TopK:
    test_idx: np.ndarray                    # (n_test,) str
    train_idx: np.ndarray                   # (n_test, K) str
    score: np.ndarray                       # (n_test, K) float32, best first
    test_pos: Dict[str, int] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> "_TopK":
        try:
            with np.load(path, allow_pickle=False) as z:
                missing = [k for k in TOPK_KEYS if k not in z]
                if missing:
                    raise RunError(f"{path}: missing arrays {', '.join(missing)}")
                t = cls(*(np.asarray(z[k]) for k in TOPK_KEYS))
        except RunError:
            raise
        except Exception as e:   # truncated or damaged file
            raise RunError(f"{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") \
                from None
        n = len(t.test_idx)
        if t.train_idx.ndim != 2 or t.train_idx.shape != t.score.shape or len(t.train_idx) != n:
            raise RunError(f"{path}: arrays disagree in shape (test_idx {t.test_idx.shape}, train_idx "
                           f"{t.train_idx.shape}, score {t.score.shape})")
        t.train_idx = t.train_idx.astype(str)
        t.test_pos = {str(s): i for i, s in enumerate(t.test_idx)}
        return t

    @property
    def depth(self) -> int:
        return int(self.train_idx.shape[1])

    def row(self, test_idx: str, k: int) -> List[Tuple[str, float]]:
        i = self.test_pos[test_idx]
        return [(str(j), float(s)) for j, s in zip(self.train_idx[i, :k], self.score[i, :k])]

    def column(self, train_idx: str, k: int, largest: bool) -> List[Tuple[str, float]]:
        rows, cols = np.nonzero(self.train_idx == train_idx)
        vals = self.score[rows, cols].astype(np.float64)
        order = np.lexsort((rows, -vals if largest else vals))[:k]     # ties: earlier test row first
        return [(str(self.test_idx[rows[o]]), float(vals[o])) for o in order]


@dataclass
class _Dense:
    scores: np.ndarray                     # (n_test, n_train) float32, memory-mapped
    test_pos: Dict[str, int]
    train_idx: List[str]
    train_pos: Dict[str, int]
    test_idx: List[str]


class Rankings:
    """The rankings a run stores, by method and split; files are opened once and kept."""

    def __init__(self, run: Run):
        self.run = run
        self._dense: Dict[Tuple[str, str], _Dense] = {}
        self._topk: Dict[Tuple[str, str, str], Optional[_TopK]] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ what is stored
    @property
    def folder(self) -> Path:
        return self.run.path / "scores"

    def methods(self, split: str) -> Dict[str, str]:
        """{method: "dense" | "topk"} of everything stored for ``split``, in a stable order
        (the registry's order first, then by name)."""
        found: Dict[str, str] = {}
        if self.folder.is_dir():
            for p in self.folder.glob(f"*-{split}.topk.npz"):
                found[p.name[: -len(f"-{split}.topk.npz")]] = "topk"
            for p in self.folder.glob(f"*-{split}.npy"):
                name = p.name[: -len(f"-{split}.npy")]
                if self.run.has_scores(name, split):
                    found[name] = "dense"
        from ..methods.registry import registered
        order = {n: i for i, n in enumerate(registered())}
        return {m: found[m] for m in sorted(found, key=lambda m: (order.get(m, len(order)), m))}

    def splits(self) -> List[str]:
        """Splits with features that have at least one stored ranking."""
        return [s for s in self.run.splits if self.methods(s)]

    def source(self, method: str, split: str) -> str:
        kind = self.methods(split).get(method)
        if kind is None:
            have = ", ".join(self.methods(split)) or "none"
            raise NotFound(f"no stored scores or top-k results for method {method!r} on split {split!r} "
                           f"(stored for {split}: {have})")
        return kind

    # ------------------------------------------------------------------ readers
    def _dense_of(self, method: str, split: str) -> _Dense:
        key = (method, split)
        with self._lock:
            if key not in self._dense:
                info = self.run.score_info(method, split)
                test_idx = [str(s) for s in info["test_idx"]]
                train_idx = [str(s) for s in info["train_idx"]]
                scores = self.run.scores(method, split)
                if scores.shape != (len(test_idx), len(train_idx)):
                    raise RunError(f"{self.run.score_path(method, split)}: shape {scores.shape} does not match "
                                   f"its sidecar ({len(test_idx)} x {len(train_idx)})")
                self._dense[key] = _Dense(scores, {s: i for i, s in enumerate(test_idx)}, train_idx,
                                          {s: i for i, s in enumerate(train_idx)}, test_idx)
            return self._dense[key]

    def _topk_of(self, method: str, split: str, kind: str) -> Optional[_TopK]:
        key = (method, split, kind)
        with self._lock:
            if key not in self._topk:
                p = self.folder / f"{method}-{split}.{kind}.npz"
                self._topk[key] = _TopK.load(p) if p.exists() else None
            return self._topk[key]

    def test_row(self, method: str, split: str, test_idx: str, k: int) -> Ranking:
        """The ``k`` training examples that support (and oppose) the prediction on row
        ``test_idx`` of ``split`` most, by ``method``."""
        from ..methods.topk import bottom_k, top_k
        test_idx = str(test_idx)
        if self.source(method, split) == "dense":
            d = self._dense_of(method, split)
            if test_idx not in d.test_pos:
                raise NotFound(f"{method} scores on {split} do not cover row {test_idx!r}")
            row = np.asarray(d.scores[d.test_pos[test_idx]], dtype=np.float32)[None]
            sides = [top_k(row, k), bottom_k(row, k)]
            sup, opp = ([(d.train_idx[int(i)], float(v)) for i, v in zip(idx[0], vals[0])] for idx, vals in sides)
            return Ranking(sup, opp, "dense")
        top, bottom = self._topk_of(method, split, "topk"), self._topk_of(method, split, "bottomk")
        if test_idx not in top.test_pos:
            raise NotFound(f"{method} top-k results on {split} do not cover row {test_idx!r}")
        opp = bottom.row(test_idx, k) if bottom is not None and test_idx in bottom.test_pos else None
        return Ranking(top.row(test_idx, k), opp, "topk", depth=top.depth)

    def train_column(self, method: str, split: str, train_idx: str, k: int) -> Ranking:
        """The ``k`` rows of ``split`` whose predictions training example ``train_idx`` supports
        (and opposes) most, by ``method``: the top and bottom of its score column."""
        from ..methods.topk import bottom_k, top_k
        train_idx = str(train_idx)
        if self.source(method, split) == "dense":
            d = self._dense_of(method, split)
            if train_idx not in d.train_pos:
                raise NotFound(f"{method} scores on {split} do not cover training row {train_idx!r}")
            col = np.asarray(d.scores[:, d.train_pos[train_idx]], dtype=np.float32)[None]
            sides = [top_k(col, k), bottom_k(col, k)]
            sup, opp = ([(d.test_idx[int(i)], float(v)) for i, v in zip(idx[0], vals[0])] for idx, vals in sides)
            return Ranking(sup, opp, "dense")
        top, bottom = self._topk_of(method, split, "topk"), self._topk_of(method, split, "bottomk")
        opp = bottom.column(train_idx, k, largest=False) if bottom is not None else None
        return Ranking(top.column(train_idx, k, largest=True), opp, "topk", partial=True, depth=top.depth)

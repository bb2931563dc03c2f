"""The run directory and a ``Run`` to read everything back; the arrays it holds are those of
:mod:`.arrays` (writes are atomic: :mod:`.files`; one writer at a time: :mod:`.runlock`).

Layout (see docs/ARCHITECTURE.md)::

    RUN/run.json  metrics.json  model/head.safetensors  features/{split}.npz
        scores/{method}-{split}.npy + .json  results/{name}.json + .md  figures/*.png  report.html
        scores/{method}-{split}.topk.npz (.bottomk.npz) + .json: only each test row's best K (attribute --top-k)
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

from .arrays import FeatureSet, FinalLayer
from .errors import RunError
from .files import (  # noqa: F401  (part of this module's API: the run directory's writers)
    file_digest,
    npy_shape,
    read_json,
    write_bytes,
    write_json,
    write_npy,
    write_npz,
    write_text,
)
from .runlock import recover_run_folder, remove_stale_temporaries, writing  # noqa: F401


def _read_sidecar(side: Path):
    """(sidecar dict, None), or (None, why it cannot be read)."""
    try:
        info = read_json(side)
    except RunError:
        return None, f"its sidecar {side.name} is unreadable"
    if not isinstance(info, dict):
        return None, f"its sidecar {side.name} is not an object"
    return info, None


def _recorded_file_problem(path: Path, side: Path, info: dict) -> Optional[str]:
    """Whether ``path`` is the file whose size and sha256 its sidecar recorded (the commit point)."""
    if "bytes" in info and path.stat().st_size != info["bytes"]:
        return (f"it has {path.stat().st_size} bytes, {side.name} recorded {info['bytes']} "
                "(a truncated or replaced file)")
    if "sha256" in info and file_digest(path) != info["sha256"]:
        return f"its contents are not those {side.name} recorded (an interrupted or concurrent write)"
    return None


def _score_pair_problem(npy: Path, side: Path) -> Optional[str]:
    """Why a score matrix and its sidecar do not belong together (None when they do)."""
    info, problem = _read_sidecar(side)
    if problem is not None:
        return problem
    if not isinstance(info.get("test_idx"), list) or not isinstance(info.get("train_idx"), list):
        return f"its sidecar {side.name} lacks test_idx/train_idx"
    want = (len(info["test_idx"]), len(info["train_idx"]))
    shape = npy_shape(npy)
    if shape is None:
        return "its header is unreadable (a truncated or damaged file)"
    if shape != want:
        return (f"it holds {' x '.join(map(str, shape))} scores but {side.name} names {want[0]} x {want[1]} "
                "(an interrupted or concurrent write)")
    return _recorded_file_problem(npy, side, info)


def _top_k_pair_problem(npz: Path, side: Path) -> Optional[str]:
    """Why a top-k file and its sidecar do not belong together (None when they do)."""
    info, problem = _read_sidecar(side)
    return problem if problem is not None else _recorded_file_problem(npz, side, info)


# ---------------------------------------------------------------- the run
def write_top_k(path: Path, method: str, split: str, kind: str, test_idx: Sequence[str],
                train_idx: Sequence[str], train_pos: np.ndarray, score: np.ndarray, info: dict,
                allow_missing: bool = False) -> None:
    """A top-k (``kind`` "top") or bottom-k ("bottom") file: ``test_idx`` (n_test,) and
    ``train_idx``/``train_pos``/``score``/``rank`` (n_test, K), best first; the .json sidecar (``info``
    plus method, split, kind, k, n_test, n_train, missing, and the .npz's size and sha256) lands last:
    it is the commit point, as for dense scores. With ``allow_missing`` a row with fewer than K
    candidates (an approximate search) ends in position -1, id "" and score NaN, and ``missing``
    counts them; otherwise every position must be a training row."""
    pos = np.asarray(train_pos, dtype=np.int64)
    score = np.asarray(score, dtype=np.float32)
    ids = np.asarray([str(i) for i in train_idx])
    if pos.ndim != 2 or pos.shape != score.shape or len(pos) != len(test_idx):
        raise RunError(f"{method}: top-k positions {pos.shape} and scores {score.shape} do not match "
                       f"{len(test_idx)} test rows")
    missing = pos < 0
    if pos.size and (pos.max() >= len(ids) or (missing.any() and not allow_missing)):
        raise RunError(f"{method}: top-k positions outside the {len(ids)} training rows")
    k = pos.shape[1]
    names = np.where(missing, "", ids[np.where(missing, 0, pos)]) if pos.size and len(ids) else \
        np.zeros(pos.shape, dtype=ids.dtype)
    write_npz(path, test_idx=np.asarray([str(i) for i in test_idx]), train_idx=names, train_pos=pos,
              score=np.where(missing, np.float32(np.nan), score),
              rank=np.broadcast_to(np.arange(k, dtype=np.int32), pos.shape).copy())
    write_json(path.with_suffix(".json"), {"method": method, "split": split, "kind": kind, "k": k,
                                           "n_test": len(test_idx), "n_train": len(ids),
                                           "missing": int(missing.sum()), **info,
                                           "bytes": path.stat().st_size, "sha256": file_digest(path)})


class Run:
    """A run directory on disk. ``Run.load(path)`` checks it holds a valid manifest.

    The manifest is parsed once (``manifest``); arrays are read on first use and kept; ``memo``
    keeps objects derived from the run (its classifier, layered caches) for its lifetime."""

    def __init__(self, path):
        self.path = Path(path)
        self._manifest = None
        self._features: Dict[str, FeatureSet] = {}
        self._examples: Dict[str, list] = {}
        self._memo: Dict[str, object] = {}

    @classmethod
    def load(cls, path) -> "Run":
        run = cls(path)
        recover_run_folder(run.path)
        if not run.path.is_dir():
            raise RunError(f"{run.path}: no such run directory")
        if not (run.path / "run.json").exists():
            raise RunError(f"{run.path}: not a run (no run.json); make one with `instattr train` or `instattr import`")
        run.manifest  # noqa: B018 - validate now: a bad run.json fails here, in one line
        return run

    def writing(self, what: str = "instattr"):
        """A context holding this run's write lock (see :func:`writing`)."""
        return writing(self.path, what)

    def memo(self, key, make):
        """``make()`` once per run object and key (a classifier, a cache); later calls reuse it."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def memoized(self, key):
        """What :meth:`memo` keeps for ``key``, or None (nothing is made)."""
        return self._memo.get(key)

    # manifest and metrics
    manifest_type = "Manifest"      # the class in :mod:`instattr.manifest` that parses run.json

    @property
    def manifest(self):
        """The typed, validated run.json (:class:`instattr.manifest.Manifest`, or ``LMManifest`` for
        an :class:`LMRun`), read once."""
        if self._manifest is None:
            from .manifest import LMManifest, Manifest, ManifestError
            kind = {"Manifest": Manifest, "LMManifest": LMManifest}[self.manifest_type]
            path = self.path / "run.json"
            try:
                self._manifest = kind.parse(read_json(path), str(path))
            except ManifestError as e:
                raise RunError(str(e)) from None
        return self._manifest

    @property
    def metrics(self) -> dict:
        """metrics.json (accuracies, timings), or {} when there is none."""
        p = self.path / "metrics.json"
        metrics = read_json(p) if p.exists() else {}
        numbers = (int, float, type(None))
        if not isinstance(metrics, dict) or not isinstance(metrics.get("timings", {}), dict) or not all(
                isinstance(v, numbers) for k, v in metrics.items() if k.endswith("_accuracy")) or not all(
                isinstance(v, numbers) for v in metrics.get("timings", {}).values()):
            raise RunError(f"{p}: not a metrics file (a JSON object with accuracies and timings)")
        return metrics

    @property
    def label_names(self) -> list:
        return list(self.manifest.label_names)

    @property
    def eval_split(self) -> str:
        return self.manifest.eval_split

    @property
    def splits(self) -> list:
        return [s for s in ("train", "dev", "test") if (self.path / "features" / f"{s}.npz").exists()]

    # arrays
    def features(self, split: str) -> FeatureSet:
        if split not in self._features:
            self._features[split] = FeatureSet.from_npz(self.path / "features" / f"{split}.npz", split)
        return self._features[split]

    def final_layer(self) -> FinalLayer:
        """The last linear layer (``model/final_layer.safetensors``) and the run's ``l2``."""
        p = self.path / "model" / "final_layer.safetensors"
        if not p.exists():
            raise RunError(f"{p}: missing (was the run trained?)")
        try:
            from safetensors.numpy import load_file
            t = load_file(str(p))
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise RunError(f"{p}: unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        if "weight" not in t:
            raise RunError(f"{p}: has no 'weight'")
        w = t["weight"].astype(np.float64)
        b = t["bias"].astype(np.float64) if "bias" in t else None
        return FinalLayer(w=w, b=b, l2=float(self.manifest.l2))

    def examples(self, split: str) -> list:
        """The dataset examples of ``split`` in the run's stored row order, looked up by ``idx``.

        A run made from a sample of a dataset stores that sample's ids; this is the one place that
        maps them back to texts. A row whose id the dataset no longer has is a one-line error."""
        if split not in self._examples:
            stored = [str(i) for i in self.features(split).idx]
            ds = self.dataset()
            if split not in ds.splits:
                raise RunError(f"{self.path}: the dataset at {ds.root} has no {split!r} split any more")
            by_idx = {e.idx: e for e in ds.splits[split].examples}
            missing = [i for i in stored if i not in by_idx]
            if missing:
                raise RunError(f"{self.path}: {len(missing)} stored {split} rows ({', '.join(missing[:3])}"
                               f"{' ...' if len(missing) > 3 else ''}) are not in the dataset at {ds.root}")
            self._examples[split] = [by_idx[i] for i in stored]
        return self._examples[split]

    # scores
    def score_path(self, method: str, split: str) -> Path:
        return self.path / "scores" / f"{method}-{split}.npy"

    def has_scores(self, method: str, split: str) -> bool:
        """Whether complete scores are stored: the .npy and its .json sidecar both present and matching."""
        return self.score_problem(method, split) is None

    def score_problem(self, method: str, split: str) -> Optional[str]:
        """None when ``method``'s scores on ``split`` are stored whole, else why not ("missing", or how the
        .npy and its sidecar disagree: an interrupted or concurrent write)."""
        return self._pair_problem(self.score_path(method, split), _score_pair_problem)

    def _pair_problem(self, path: Path, check) -> Optional[str]:
        """``check(path, sidecar)``, or "missing"; remembered until either file changes."""
        side = path.with_suffix(".json")
        if not (path.exists() and side.exists()):
            return "missing"
        key = (path.stat().st_mtime_ns, path.stat().st_size, side.stat().st_mtime_ns, side.stat().st_size)
        memo = self._memo.setdefault("checked pairs", {})
        if memo.get(path, (None,))[0] != key:
            memo[path] = (key, check(path, side))
        return memo[path][1]

    def scores(self, method: str, split: Optional[str] = None, mmap: bool = True) -> np.ndarray:
        """The stored (n_test, n_train) float32 score matrix of ``method`` on ``split``."""
        split = split or self.eval_split
        p = self.score_path(method, split)
        problem = self.score_problem(method, split)
        if problem == "missing":
            raise RunError(f"{p}: missing; run `instattr attribute --run {self.path} --methods {method}`")
        if problem is not None:
            raise RunError(f"{p}: {problem}; recompute it with `instattr attribute --run {self.path} "
                           f"--methods {method}`")
        return np.load(p, mmap_mode="r" if mmap else None)

    def score_info(self, method: str, split: Optional[str] = None) -> dict:
        return read_json(self.score_path(method, split or self.eval_split).with_suffix(".json"))

    def save_scores(self, method: str, split: str, scores: np.ndarray, test_idx: Sequence[str],
                    train_idx: Sequence[str], config: dict, seconds: float,
                    diagnostics: Optional[dict] = None) -> None:
        """Write scores, then their sidecar: the sidecar is the commit point. It records the matrix's
        shape, size and sha256, so a .npy from another write (a kill between the two, or a concurrent
        writer) is detected on load (:meth:`score_problem`) and treated as missing."""
        scores = np.ascontiguousarray(scores, dtype=np.float32)
        if scores.shape != (len(test_idx), len(train_idx)):
            raise RunError(f"{method}: scores shape {scores.shape} != ({len(test_idx)}, {len(train_idx)})")
        p = self.score_path(method, split)
        write_npy(p, scores)
        write_json(p.with_suffix(".json"), {"method": method, "split": split, "test_idx": list(map(str, test_idx)),
                                            "train_idx": list(map(str, train_idx)), "config": config,
                                            "seconds": seconds, "diagnostics": diagnostics or {},
                                            "shape": list(scores.shape), "bytes": p.stat().st_size,
                                            "sha256": file_digest(p)})

    # results
    def result_path(self, name: str) -> Path:
        return self.path / "results" / f"{name}.json"

    def result(self, name: str) -> dict:
        return read_json(self.result_path(name))

    def save_result(self, name: str, result: dict, markdown: Optional[str] = None) -> None:
        if markdown is not None:
            write_text(self.path / "results" / f"{name}.md", markdown)
        write_json(self.result_path(name), result)

    def dataset(self):
        """Re-open the dataset this run was made from (kept for the run object's lifetime)."""
        def load():
            from .data import load_dataset
            fields = self.manifest.data.fields
            return load_dataset(self.manifest.data.root, **{f"{k}_field": v for k, v in fields.items() if v})
        return self.memo("dataset", load)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    # top-k results: scores/{method}-{split}.topk.npz (and .bottomk.npz) + .json, for large training sets
    def top_k_path(self, method: str, split: str, bottom: bool = False) -> Path:
        return self.path / "scores" / f"{method}-{split}.{'bottomk' if bottom else 'topk'}.npz"

    def top_k_problem(self, method: str, split: str, bottom: bool = False) -> Optional[str]:
        """None when the top-k (``bottom``: bottom-k) file and its sidecar belong together, else why not
        ("missing", or how they disagree: an interrupted or concurrent write)."""
        return self._pair_problem(self.top_k_path(method, split, bottom), _top_k_pair_problem)

    def has_top_k(self, method: str, split: str, bottom: bool = False) -> bool:
        return self.top_k_problem(method, split, bottom) is None

    def save_top_k(self, method: str, split: str, test_idx: Sequence[str], train_idx: Sequence[str],
                   train_pos: np.ndarray, score: np.ndarray, config: dict, seconds: float, bottom: bool = False,
                   diagnostics: Optional[dict] = None) -> Path:
        """Write each test row's best (``bottom``: most opposing) training rows, best first, to
        :meth:`top_k_path` (:func:`write_top_k`); ``train_pos`` are rows of the run's stored training
        order (``train_idx`` its ids)."""
        p = self.top_k_path(method, split, bottom)
        write_top_k(p, method, split, "bottom" if bottom else "top", test_idx, train_idx, train_pos, score,
                    {"config": config, "seconds": seconds, "diagnostics": diagnostics or {}})
        return p

    def top_k(self, method: str, split: Optional[str] = None, bottom: bool = False) -> dict:
        """A stored top-k (``bottom``: bottom-k) file: arrays test_idx, train_idx, train_pos, score,
        rank, and ``info`` (its sidecar)."""
        p = self.top_k_path(method, split or self.eval_split, bottom)
        problem = self.top_k_problem(method, split or self.eval_split, bottom)
        if problem is not None:
            raise RunError(f"{p}: {problem}; {'' if problem == 'missing' else 're'}compute it with `instattr "
                           f"attribute --run {self.path} --methods {method} --top-k K"
                           f"{' --bottom-k K' if bottom else ''}`")
        try:
            with np.load(p, allow_pickle=False) as z:
                out = {k: z[k] for k in ("test_idx", "train_idx", "train_pos", "score", "rank")}
        except Exception as e:   # damaged: zipfile.BadZipFile, KeyError, OSError, ValueError
            raise RunError(f"{p}: unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") \
                from None
        out["info"] = read_json(p.with_suffix(".json"))
        return out


class LMRun(Run):
    """A language-model run (``run.json`` mode ``lm``)::

        RUN/run.json  metrics.json  data/{split}.jsonl  lm/{split}.npz (idx, nll, tokens)
            scores/{method}-{split}.npy + .json (and .topk.npz)  results/{name}.json + .md

    ``data/`` holds the rows as imported (their ``idx`` a string), ``lm/`` each row's summed NLL over
    its scored tokens under the imported model and their number."""

    manifest_type = "LMManifest"

    @property
    def splits(self) -> list:
        return [s for s in ("train", "dev", "test") if (self.path / "lm" / f"{s}.npz").exists()]

    def rows(self, split: str) -> list:
        """The rows of ``split`` as imported (dicts with ``idx``, and ``text`` or ``prompt`` and ``completion``)."""
        if split not in self._examples:
            from .data import read_documents
            p = self.path / "data" / f"{split}.jsonl"
            if not p.exists():
                raise RunError(f"{p}: missing; the run has {', '.join(self.splits) or 'no split'}")
            self._examples[split] = read_documents(p)
        return self._examples[split]

    def losses(self, split: str) -> Dict[str, np.ndarray]:
        """``idx``, ``nll`` (each row's summed NLL, nats) and ``tokens`` (its scored tokens) of ``split``."""
        p = self.path / "lm" / f"{split}.npz"
        try:
            with np.load(p, allow_pickle=False) as z:
                out = {k: z[k] for k in ("idx", "nll", "tokens")}
        except FileNotFoundError:
            raise RunError(f"{p}: missing; the run has {', '.join(self.splits) or 'no split'}") from None
        except Exception as e:   # damaged: zipfile.BadZipFile, KeyError, OSError, ValueError
            raise RunError(f"{p}: unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") \
                from None
        return out

    def features(self, split: str):
        raise RunError(f"{self.path}: a language-model run has no classifier features")

    def examples(self, split: str) -> list:
        return self.rows(split)


def is_lm_run(path) -> bool:
    """Whether ``path`` holds a language-model run (its run.json says mode ``lm``)."""
    p = Path(path) / "run.json"
    if not p.is_file():
        return False
    try:
        d = read_json(p)
    except RunError:
        return False
    return isinstance(d, dict) and d.get("mode") == "lm"


def open_run(path) -> Run:
    """The run at ``path``: an :class:`LMRun` for a language-model run, else a classifier :class:`Run`."""
    recover_run_folder(Path(path))
    return LMRun.load(path) if is_lm_run(path) else Run.load(path)

"""The run directory: atomic writes, and a `Run` object to read everything back.

Layout (see docs/ARCHITECTURE.md)::

    RUN/run.json  metrics.json  model/head.safetensors  features/{split}.npz
        scores/{method}-{split}.npy + .json  results/{name}.json + .md  figures/*.png  report.html
"""
from __future__ import annotations

from .errors import InstattrError

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

FEATURE_KEYS = ("idx", "label", "pred", "probs", "features", "encoder")


class RunError(InstattrError):
    """A run directory is missing, incomplete or inconsistent; one-line message."""


# ---------------------------------------------------------------- atomic writes
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_bytes(path, data: bytes) -> Path:
    return _atomic(path, lambda f: f.write(data))


def write_text(path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_npy(path, array: np.ndarray) -> Path:
    return _atomic(path, lambda f: np.save(f, array))


def write_npz(path, **arrays) -> Path:
    return _atomic(path, lambda f: np.savez(f, **arrays))


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{path}: not valid JSON ({e})") from None


# ---------------------------------------------------------------- arrays
@dataclass
class FeatureSet:
    """Everything the attributors need about one split, rows in dataset order.

    ``features``: penultimate (pooler) output (n, d); ``encoder``: untuned pooled encoder output
    (n, h) — for siamese pairs [u, v] (n, 2h); ``probs``: softmax of the trained head (n, C).
    """
    idx: np.ndarray
    label: np.ndarray
    pred: np.ndarray
    probs: np.ndarray
    features: np.ndarray
    encoder: np.ndarray
    # new texts only (``featurize``): (documents, queries or None), for methods that rerun the encoder
    texts: Optional[Tuple[List[str], Optional[List[str]]]] = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.idx)

    @property
    def n_classes(self) -> int:
        return self.probs.shape[1]

    def subset(self, rows) -> "FeatureSet":
        """Rows ``rows`` (indices or a boolean mask) of every array (and of ``texts``)."""
        fs = FeatureSet(**{k: getattr(self, k)[rows] for k in FEATURE_KEYS})
        if self.texts is not None:
            pick = [list(np.asarray(t, dtype=object)[rows]) if t is not None else None for t in self.texts]
            fs.texts = (pick[0], pick[1])
        return fs

    def to_npz(self) -> dict:
        return {k: getattr(self, k) for k in FEATURE_KEYS}

    @classmethod
    def from_npz(cls, path) -> "FeatureSet":
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                missing = [k for k in FEATURE_KEYS if k not in z]
                if missing:
                    raise RunError(f"{path}: missing arrays {', '.join(missing)}")
                return cls(**{k: z[k] for k in FEATURE_KEYS})
        except FileNotFoundError:
            raise RunError(f"{path}: missing (was the run trained?)") from None
        except (OSError, ValueError) as e:
            if isinstance(e, RunError):
                raise
            raise RunError(f"{path}: unreadable ({e})") from None


@dataclass(frozen=True)
class HeadState:
    """The trained last linear layer: weight ``w`` (C, d) and its L2 coefficient ``l2``."""
    w: np.ndarray
    l2: float


# ---------------------------------------------------------------- the run
class Run:
    """A run directory on disk. ``Run.load(path)`` checks it holds a trained model."""

    def __init__(self, path):
        self.path = Path(path)

    @classmethod
    def load(cls, path) -> "Run":
        run = cls(path)
        if not run.path.is_dir():
            raise RunError(f"{run.path}: no such run directory")
        if not (run.path / "run.json").exists():
            raise RunError(f"{run.path}: not a run (no run.json); train one with `instattr train`")
        return run

    # manifest and metrics
    @property
    def manifest(self) -> dict:
        return read_json(self.path / "run.json")

    @property
    def metrics(self) -> dict:
        p = self.path / "metrics.json"
        return read_json(p) if p.exists() else {}

    @property
    def label_names(self) -> list:
        return self.manifest["label_names"]

    @property
    def eval_split(self) -> str:
        return self.manifest["eval_split"]

    @property
    def splits(self) -> list:
        return [s for s in ("train", "dev", "test") if (self.path / "features" / f"{s}.npz").exists()]

    # arrays
    def features(self, split: str) -> FeatureSet:
        if not hasattr(self, "_features"):
            self._features: Dict[str, FeatureSet] = {}
        if split not in self._features:
            self._features[split] = FeatureSet.from_npz(self.path / "features" / f"{split}.npz")
        return self._features[split]

    def head_params(self) -> dict:
        """Head weights as float32 torch tensors (dense_w, dense_b, w)."""
        from safetensors.torch import load_file
        p = self.path / "model" / "head.safetensors"
        if not p.exists():
            raise RunError(f"{p}: missing (was the run trained?)")
        return load_file(str(p))

    def head(self) -> HeadState:
        return HeadState(w=self.head_params()["w"].double().numpy(), l2=float(self.manifest["head"]["l2"]))

    # scores
    def score_path(self, method: str, split: str) -> Path:
        return self.path / "scores" / f"{method}-{split}.npy"

    def has_scores(self, method: str, split: str) -> bool:
        return self.score_path(method, split).exists() and self.score_path(method, split).with_suffix(".json").exists()

    def scores(self, method: str, split: Optional[str] = None, mmap: bool = True) -> np.ndarray:
        """The stored (n_test, n_train) float32 score matrix of ``method`` on ``split``."""
        p = self.score_path(method, split or self.eval_split)
        if not p.exists():
            raise RunError(f"{p}: missing; run `instattr attribute --run {self.path} --methods {method}`")
        return np.load(p, mmap_mode="r" if mmap else None)

    def score_info(self, method: str, split: Optional[str] = None) -> dict:
        return read_json(self.score_path(method, split or self.eval_split).with_suffix(".json"))

    def save_scores(self, method: str, split: str, scores: np.ndarray, test_idx: Sequence[str],
                    train_idx: Sequence[str], config: dict, seconds: float,
                    diagnostics: Optional[dict] = None) -> None:
        """Write scores and their sidecar; the .json lands last so a present .json means complete."""
        scores = np.asarray(scores, dtype=np.float32)
        if scores.shape != (len(test_idx), len(train_idx)):
            raise RunError(f"{method}: scores shape {scores.shape} != ({len(test_idx)}, {len(train_idx)})")
        p = self.score_path(method, split)
        write_npy(p, scores)
        write_json(p.with_suffix(".json"), {"method": method, "split": split, "test_idx": list(map(str, test_idx)),
                                            "train_idx": list(map(str, train_idx)), "config": config,
                                            "seconds": seconds, "diagnostics": diagnostics or {}})

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
        """Re-open the dataset this run was trained on (texts for explanations and evaluations)."""
        from .data import load_dataset
        m = self.manifest
        fields = {k: m.get("config", {}).get(k) for k in ("text_field", "query_field", "label_field")}
        return load_dataset(m["data"]["root"], **fields)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

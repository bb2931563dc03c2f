"""The arrays every method works on: rows of a split (:class:`FeatureSet`) and the final linear
layer (:class:`FinalLayer`). No torch; the run directory that stores them is :mod:`.store`."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from .errors import RunError

FEATURE_KEYS = ("idx", "label", "pred", "probs", "features")


@dataclass
class FeatureSet:
    """Everything the attributors need about rows of one split, in the run's stored order.

    ``features``: the input of the classifier's final linear layer (n, d); ``probs``: the
    classifier's softmax (n, C). ``split`` names the run's split the rows come from (their
    identity is ``(split, idx)``); new texts carry ``texts`` instead. (The untuned sentence
    embeddings of the sbert-* baselines are not here: :mod:`instattr.sentence` makes them when
    asked.)
    """
    idx: np.ndarray
    label: np.ndarray
    pred: np.ndarray
    probs: np.ndarray
    features: np.ndarray
    # new texts only (``featurize``): (documents, queries or None), for methods that rerun the encoder
    texts: Optional[Tuple[List[str], Optional[List[str]]]] = field(default=None, repr=False, compare=False)
    split: Optional[str] = field(default=None, compare=False)

    def __len__(self) -> int:
        return len(self.idx)

    @property
    def n_classes(self) -> int:
        return self.probs.shape[1]

    def subset(self, rows) -> "FeatureSet":
        """Rows ``rows`` (indices or a boolean mask) of every array (and of ``texts``)."""
        fs = FeatureSet(**{k: getattr(self, k)[rows] for k in FEATURE_KEYS}, split=self.split)
        if self.texts is not None:
            pick = [list(np.asarray(t, dtype=object)[rows]) if t is not None else None for t in self.texts]
            fs.texts = (pick[0], pick[1])
        return fs

    def replace(self, **arrays) -> "FeatureSet":
        """A copy with some arrays replaced (e.g. features and probs of another model)."""
        from dataclasses import replace
        return replace(self, **arrays)

    def to_npz(self) -> dict:
        return {k: getattr(self, k) for k in FEATURE_KEYS}

    @classmethod
    def from_npz(cls, path, split: Optional[str] = None) -> "FeatureSet":
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                missing = [k for k in FEATURE_KEYS if k not in z]
                if missing:
                    raise RunError(f"{path}: missing arrays {', '.join(missing)}")
                fs = cls(**{k: z[k] for k in FEATURE_KEYS}, split=split)
        except FileNotFoundError:
            raise RunError(f"{path}: missing (was the run trained?)") from None
        except RunError:
            raise
        except Exception as e:   # truncated or damaged: zipfile.BadZipFile, EOFError, OSError, ValueError
            first = str(e).splitlines()[0] if str(e) else ""
            raise RunError(f"{path}: unreadable ({type(e).__name__}: {first})") from None
        n = len(fs.idx)
        bad = [k for k in FEATURE_KEYS if len(getattr(fs, k)) != n]
        if bad or fs.probs.ndim != 2 or fs.features.ndim != 2:
            shapes = ", ".join(f"{k} {getattr(fs, k).shape}" for k in FEATURE_KEYS)
            raise RunError(f"{path}: arrays disagree in shape ({shapes})")
        return fs


@dataclass(frozen=True)
class FinalLayer:
    """The classifier's last linear layer, ``logits = w f + b``: weight ``w`` (C, d), bias ``b``
    (C,) or None, and ``l2``, the L2 coefficient on its parameters that the closed forms use (the
    head's training penalty, or the damping standing in for it on an imported model).

    It is also the smallest model the last-layer methods accept: ``final_layer()`` returns itself,
    as :meth:`instattr.models.Classifier.final_layer` does for a whole classifier."""
    w: np.ndarray
    b: Optional[np.ndarray] = None
    l2: float = 0.0

    def final_layer(self) -> "FinalLayer":
        return self

    @property
    def n_classes(self) -> int:
        return int(self.w.shape[0])

    def augment(self, features: np.ndarray) -> np.ndarray:
        """float64 ``[f, 1]`` when the layer has a bias (so ``w~ f~ = w f + b``), else ``f``."""
        f = np.asarray(features, dtype=np.float64)
        return f if self.b is None else np.concatenate([f, np.ones((len(f), 1))], axis=1)

    def weight(self) -> np.ndarray:
        """float64 ``[w, b]`` (C, d + 1) with a bias, else ``w``: the weight of ``augment``'s rows."""
        w = np.asarray(self.w, dtype=np.float64)
        return w if self.b is None else np.concatenate([w, np.asarray(self.b, dtype=np.float64)[:, None]], axis=1)

    def logits(self, features: np.ndarray) -> np.ndarray:
        """float64 logits of feature rows."""
        return self.augment(features) @ self.weight().T

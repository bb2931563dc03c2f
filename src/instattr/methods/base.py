"""The attributor interface shared by every method.

``Attributor(**options).fit(train, model) -> self`` then ``score(test) -> (n_test, n_train)``
float32, higher = the training example supports the prediction on the test example more.
``train``/``test`` are :class:`instattr.store.FeatureSet`; ``model`` is the classifier, seen only
through the model interface (:mod:`instattr.models`): the last-layer methods need just its
``final_layer()``, so a bare :class:`instattr.store.FinalLayer` serves them; the layered methods
and TracIn need a whole :class:`instattr.models.Classifier`; similarity methods ignore it.

Scores are computed over blocks of test rows (``chunk_size`` rows; ``None`` sizes blocks to
about ``BLOCK_ELEMENTS`` scores), so memory stays bounded however many training examples.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Iterator, Optional, Tuple

import numpy as np

from ..store import FeatureSet, FinalLayer

BLOCK_ELEMENTS = 1 << 24  # ~64 MB of float32 scores per block when chunk_size is None


class NotFittedError(RuntimeError):
    """``score`` was called before ``fit``."""


class Attributor(ABC):
    """Base class: subclasses set ``name`` and implement ``_fit`` and ``_score``.

    ``_score(test, out)`` writes the float32 scores of the rows of ``test`` into ``out``
    (shape (len(test), n_train), C-contiguous), so ``score`` fills its result in place.
    """

    name: str = ""
    needs_model: bool = True           # fit needs a model (at least its final layer)
    needs_classifier: bool = False     # ... the whole classifier (models.Classifier), not a FinalLayer
    # constructor options that the command line's method flags (--layers, --proj-dim, --damping,
    # --ihvp) may set; the paper's methods take none, so those flags never change them
    command_line_options: tuple = ()

    def __init__(self, chunk_size: Optional[int] = None):
        if chunk_size is not None and int(chunk_size) < 1:
            raise ValueError(f"{self.name}: chunk_size must be a positive number of rows")
        self.chunk_size = chunk_size

    def config(self) -> dict:
        """The constructor options (saved next to the scores)."""
        return {k: v for k, v in vars(self).items() if not k.endswith("_") and not k.startswith("_")}

    def diagnostics(self) -> dict:
        """Fitted scalars and small dicts (e.g. rep's ``reconstruction_``), JSON-ready."""
        out = {}
        for k, v in vars(self).items():
            if k.endswith("_") and not k.startswith("_") and isinstance(v, (bool, int, float, str, dict, np.generic)):
                out[k.rstrip("_")] = v.item() if isinstance(v, np.generic) else v
        return out

    def fit(self, train: FeatureSet, model=None) -> "Attributor":
        """Compute the training side from ``train`` and the classifier ``model``."""
        if len(train) == 0:
            raise ValueError(f"{self.name}: no training examples to fit on")
        if self.needs_model and model is None:
            raise ValueError(f"{self.name}: needs the classifier (a FinalLayer or a models.Classifier)")
        for k in [k for k in vars(self) if k.endswith("_")]:  # a refit forgets the last fit
            delattr(self, k)
        self._fit(train, model)
        self.n_train_ = len(train)
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "n_train_"):
            raise NotFittedError(f"{self.name}: call fit(train, model) before score(test)")

    def _rows_per_block(self) -> int:
        return int(self.chunk_size or max(1, BLOCK_ELEMENTS // self.n_train_))

    def score(self, test: FeatureSet) -> np.ndarray:
        """The full (n_test, n_train) float32 score matrix."""
        self._check_fitted()
        out = np.empty((len(test), self.n_train_), dtype=np.float32)
        step = self._rows_per_block()
        for s in range(0, len(test), step):
            rows = slice(s, min(s + step, len(test)))
            self._score(test.subset(rows), out[rows])
        return out

    def score_chunks(self, test: FeatureSet, chunk_size: Optional[int] = None) -> Iterator[Tuple[slice, np.ndarray]]:
        """Yield (row slice, float32 block) over test rows, so memory stays bounded."""
        self._check_fitted()  # here, not lazily on the first block
        step = int(chunk_size or self._rows_per_block())
        return self._blocks(test, step)

    def _blocks(self, test: FeatureSet, step: int) -> Iterator[Tuple[slice, np.ndarray]]:
        for s in range(0, len(test), step):
            rows = slice(s, min(s + step, len(test)))
            block = np.empty((rows.stop - rows.start, self.n_train_), dtype=np.float32)
            self._score(test.subset(rows), block)
            yield rows, block

    def self_scores(self) -> np.ndarray:
        """(n_train,) float64: how much each training example, at its gold label, stands out to this
        method -- its score against itself (self-influence), where that says something; higher = look
        at it first. Only the gradient methods define it (see their docstrings)."""
        raise ValueError(f"{self.name}: no self-score (it is defined for the gradient methods: if, gd, rif, gc, "
                         "tracin and their layered versions)")

    @abstractmethod
    def _fit(self, train: FeatureSet, model) -> None:
        """Compute everything ``score`` needs from the training set."""

    @abstractmethod
    def _score(self, test: FeatureSet, out: np.ndarray) -> None:
        """Write the (len(test), n_train) scores of ``test`` into ``out``."""


def check_width(name: str, what: str, expected: int, got: np.ndarray) -> None:
    """One-line error when test rows do not match the width seen in fit."""
    if got.ndim != 2 or got.shape[1] != expected:
        raise ValueError(f"{name}: test {what} have shape {got.shape}, fitted on width {expected}")


def mean_against_others(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Minus the mean over j != i of <a_i, b_j> (float64): how much each row opposes the others."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    n = len(a)
    if n < 2:
        return np.zeros(n)
    return -(a @ b.sum(0) - np.einsum("ij,ij->i", a, b)) / (n - 1)


def float32_rows(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def final_layer_of(name: str, model) -> Optional[FinalLayer]:
    """The model's final layer (None without a model), checked to be one."""
    if model is None:
        return None
    lin = model.final_layer()
    if not isinstance(lin, FinalLayer):
        raise ValueError(f"{name}: the model's final_layer() must be a FinalLayer, got {type(lin).__name__}")
    return lin

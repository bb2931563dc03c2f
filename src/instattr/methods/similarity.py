"""Representation-similarity baselines: nearest neighbours in a vector space.

``nn-*`` compare the head's penultimate features (``FeatureSet.features``), ``sbert-*`` the
untuned encoder embedding (``FeatureSet.encoder``). Scores: ``euc`` = -||a - b||, ``cos`` =
cosine (0 against a zero vector), ``dot`` = <a, b>. Each is one matrix product per block;
Euclidean distances are taken after centring on the training mean, which leaves them unchanged
but keeps the float32 expansion ||a||^2 + ||b||^2 - 2<a, b> from cancelling.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from ..store import FeatureSet, HeadState
from .base import Attributor, check_width, float32_rows

METRICS = ("euc", "cos", "dot")


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm (zero rows stay zero), float64."""
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


class Similarity(Attributor):
    """Similarity of ``space`` vectors under ``metric``; set by the registered subclasses."""

    needs_head = False
    space: str = "features"
    metric: str = "cos"

    def _prepare(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if self.metric == "cos":
            return unit_rows(x)
        if self.metric == "euc":
            return x - self.center_
        return x

    def _fit(self, train: FeatureSet, head: Optional[HeadState]) -> None:
        x = np.asarray(getattr(train, self.space))
        if x.ndim != 2:
            raise ValueError(f"{self.name}: train {self.space} must be 2-D, got shape {x.shape}")
        self.width_ = x.shape[1]
        if self.metric == "euc":
            self.center_ = x.mean(axis=0, dtype=np.float64)
        z = self._prepare(x)
        self.train_vectors_ = float32_rows(z)
        if self.metric == "euc":
            self.train_sq_norms_ = (z ** 2).sum(axis=1).astype(np.float32)

    def _score(self, test: FeatureSet, out: np.ndarray) -> None:
        x = np.asarray(getattr(test, self.space))
        check_width(self.name, self.space, self.width_, x)
        z = self._prepare(x)
        np.matmul(float32_rows(z), self.train_vectors_.T, out=out)
        if self.metric == "euc":
            out *= -2.0
            out += self.train_sq_norms_[None, :]
            out += (z ** 2).sum(axis=1).astype(np.float32)[:, None]
            np.maximum(out, 0.0, out=out)
            np.sqrt(out, out=out)
            np.negative(out, out=out)

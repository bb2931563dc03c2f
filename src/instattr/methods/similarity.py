"""Representation-similarity baselines: nearest neighbours in a vector space.

``nn-*`` compare the head's penultimate features (``FeatureSet.features``), ``sbert-*`` the
untuned encoder embedding (``FeatureSet.encoder``). Scores: ``euc`` = -||a - b||, ``cos`` =
cosine (0 against a zero vector), ``dot`` = <a, b>. Each is one matrix product per block;
Euclidean distances are taken after centring on the training mean, which leaves them unchanged
but keeps the float32 expansion ||a||^2 + ||b||^2 - 2<a, b> from cancelling.
"""
from __future__ import annotations

import numpy as np

from ..store import FeatureSet
from .base import Attributor, check_width, float32_rows
from .lastlayer import ROW_BLOCK
from .registry import register

METRICS = ("euc", "cos", "dot")


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm (zero rows stay zero), float64."""
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


class Similarity(Attributor):
    """Similarity of ``space`` vectors under ``metric``; set by the registered subclasses."""

    needs_model = False
    space: str = "features"
    metric: str = "cos"

    def _prepare(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if self.metric == "cos":
            return unit_rows(x)
        if self.metric == "euc":
            return x - self.center_
        return x

    def _fit(self, train: FeatureSet, model) -> None:
        x = np.asarray(getattr(train, self.space))
        if x.ndim != 2:
            raise ValueError(f"{self.name}: train {self.space} must be 2-D, got shape {x.shape}")
        self.width_ = x.shape[1]
        if self.metric == "euc":
            self.center_ = x.mean(axis=0, dtype=np.float64)
        self.train_vectors_ = np.empty(x.shape, dtype=np.float32)
        self.train_sq_norms_ = np.empty(len(x), dtype=np.float32)
        for s in range(0, len(x), ROW_BLOCK):                 # float64 temporaries stay small
            z = self._prepare(x[s:s + ROW_BLOCK])
            self.train_vectors_[s:s + ROW_BLOCK] = z
            self.train_sq_norms_[s:s + ROW_BLOCK] = (z ** 2).sum(axis=1)

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


@register("nn-euc")
class FeatureEuclidean(Similarity):
    space, metric = "features", "euc"


@register("nn-cos")
class FeatureCosine(Similarity):
    space, metric = "features", "cos"


@register("nn-dot")
class FeatureDot(Similarity):
    space, metric = "features", "dot"


@register("sbert-euc")
class EncoderEuclidean(Similarity):
    space, metric = "encoder", "euc"


@register("sbert-cos")
class EncoderCosine(Similarity):
    space, metric = "encoder", "cos"


@register("sbert-dot")
class EncoderDot(Similarity):
    space, metric = "encoder", "dot"

"""Representation-similarity baselines: nearest neighbours in a vector space.

``nn-*`` compare the head's penultimate features (``FeatureSet.features``), ``sbert-*`` the
untuned encoder embedding (``FeatureSet.encoder``). Scores: ``euc`` = -||a - b||, ``cos`` =
cosine (0 against a zero vector), ``dot`` = <a, b>.

All three share one product: the vectors centred on the training mean ``m``, ``u = a - m``.
Centring leaves distances unchanged and keeps the float32 expansion ||u||^2 + ||v||^2 - 2<u, v>
from cancelling; the dot product is recovered exactly as ``<u, v> + <u, m> + |m|^2 + <v, m>``
(per-row offsets), the cosine by scaling that with 1/(||a|| ||b||).
"""
from __future__ import annotations

import numpy as np

from ..store import FeatureSet
from .base import Attributor, check_width
from .registry import register
from .sides import INNER_PRODUCT, NEGATIVE_DISTANCE, Side, digest, side

METRICS = ("euc", "cos", "dot")


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm (zero rows stay zero), float64."""
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def inverse_norms(x: np.ndarray) -> np.ndarray:
    """1 / ||x_i|| (0 for a zero row), float64."""
    norm = np.linalg.norm(np.asarray(x, dtype=np.float64), axis=1)
    return np.divide(1.0, norm, out=np.zeros_like(norm), where=norm > 0)


class Similarity(Attributor):
    """Similarity of ``space`` vectors under ``metric``; set by the registered subclasses."""

    needs_model = False
    space: str = "features"
    metric: str = "cos"

    @property
    def finish(self):
        return NEGATIVE_DISTANCE if self.metric == "euc" else INNER_PRODUCT

    def _fit(self, train: FeatureSet, model) -> None:
        x = np.asarray(getattr(train, self.space))
        if x.ndim != 2:
            raise ValueError(f"{self.name}: train {self.space} must be 2-D, got shape {x.shape}")
        self.width_ = x.shape[1]
        self.center_ = x.mean(axis=0, dtype=np.float64)
        self.key_ = ("centered", self.space, digest(self.center_))

    def _side(self, fs: FeatureSet, test: bool) -> Side:
        x = np.asarray(getattr(fs, self.space))
        if test:
            check_width(self.name, self.space, self.width_, x)
        u = side(np.asarray(x, dtype=np.float64) - self.center_).vectors
        key = self.key_
        if self.metric == "euc":
            return Side(u, key=key)
        offset = u.astype(np.float64) @ self.center_ + (self.center_ @ self.center_ if test else 0.0)
        return side(u, offset, inverse_norms(x) if self.metric == "cos" else None, key)

    def _embed_train(self, rows: FeatureSet) -> Side:
        return self._side(rows, test=False)

    def _embed_test(self, rows: FeatureSet) -> Side:
        return self._side(rows, test=True)


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

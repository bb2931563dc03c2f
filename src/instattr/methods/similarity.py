"""Representation-similarity baselines: nearest neighbours in a vector space.

``nn-*`` compare the classifier's features (``FeatureSet.features``, the final layer's input),
``sbert-*`` the untuned sentence encoder's embeddings (the model they are fitted with:
:mod:`instattr.sentence`, which makes them when first asked). Scores: ``euc`` = -||a - b||,
``cos`` = cosine (0 against a zero vector), ``dot`` = <a, b>.

All three share one product: the vectors centred on the training mean ``m``, ``u = a - m``.
Centring leaves distances unchanged and keeps the float32 expansion ||u||^2 + ||v||^2 - 2<u, v>
from cancelling; the dot product is recovered exactly as ``<u, v> + <u, m> + |m|^2 + <v, m>``
(per-row offsets), the cosine by scaling that with 1/(||a|| ||b||).
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from ..arrays import FeatureSet
from .base import Attributor, check_width
from .registry import register
from .shared import once, value_of
from .sides import INNER_PRODUCT, NEGATIVE_DISTANCE, Side, digest, row_sq_sums, side

METRICS = ("euc", "cos", "dot")


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm (zero rows stay zero), float64."""
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def centered_rows(x: np.ndarray, center: np.ndarray) -> np.ndarray:
    """``x - center`` computed in float64 and rounded to float32 (C-contiguous), in one ufunc
    pass: the same bits as ``(float64(x) - center).astype(float32)`` without its float64
    temporary (4x faster on a split)."""
    x = np.asarray(x)
    out = np.empty(x.shape, dtype=np.float32)
    np.subtract(x, center, out=out, dtype=np.float64, casting="same_kind")
    return out


def inverse_norms(x: np.ndarray, transform: Optional[np.ndarray] = None) -> np.ndarray:
    """1 / ||x_i|| (0 for a zero row), float64; with ``transform`` (k x d) the norms of
    ``transform @ x_i`` (:func:`.sides.row_sq_sums`: the same bits as ``np.linalg.norm`` on the
    whole array, several times faster on a split)."""
    norm = np.sqrt(row_sq_sums(x, transform))
    return np.divide(1.0, norm, out=np.zeros_like(norm), where=norm > 0)


def column_mean(x: np.ndarray) -> np.ndarray:
    """The float64 mean row of ``x`` (shared by the methods fitted together, :mod:`.shared`)."""
    return once("mean", (x,), lambda: x.mean(axis=0, dtype=np.float64))


def centered_side_rows(x: np.ndarray, center: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """``u = x - center`` (float32, :func:`centered_rows`) and ``<u, center>`` (float64): the
    vectors and the offset part of every centred side (nn-*, gd, gc, rep), each computed once
    per rows and centre among methods working together (:mod:`.shared`)."""
    key = (x, value_of(center))
    u = once("centered", key, lambda: centered_rows(x, center))
    return u, once("centered-dot-center", key, lambda: u.astype(np.float64) @ center)


def row_inverse_norms(x: np.ndarray, augmented: Optional[np.ndarray] = None) -> np.ndarray:
    """:func:`inverse_norms` of the rows of ``x``, or of ``augmented`` (``x`` with a bias column
    of ones) when given; shared like :func:`column_mean`."""
    rows = x if augmented is None else augmented
    return once("inverse-norms", (x, augmented is not None), lambda: inverse_norms(rows))


class Similarity(Attributor):
    """Similarity of ``space`` vectors under ``metric``; set by the registered subclasses."""

    needs = None
    space: str = "features"
    metric: str = "cos"
    state = ("width_", "center_", "key_")
    diagnosed = ("n_train_", "width_")

    @property
    def finish(self):
        return NEGATIVE_DISTANCE if self.metric == "euc" else INNER_PRODUCT

    def bind(self, model) -> None:
        if self.space == "sentence":
            self.embeddings_ = model

    def vectors(self, fs: FeatureSet) -> np.ndarray:
        """The rows' vectors in this method's space."""
        return np.asarray(fs.features if self.space == "features" else self.embeddings_.of(fs))

    def _fit(self, train: FeatureSet, model) -> None:
        self.bind(model)
        x = self.vectors(train)
        if x.ndim != 2:
            raise ValueError(f"{self.name}: train {self.space} must be 2-D, got shape {x.shape}")
        self.width_ = x.shape[1]
        self.center_ = column_mean(x)
        self.key_ = ("centered", self.space, digest(self.center_))

    def _side(self, fs: FeatureSet, test: bool) -> Side:
        x = self.vectors(fs)
        if test:
            check_width(self.name, self.space, self.width_, x)
        u, uc = centered_side_rows(x, self.center_)
        key = self.key_
        if self.metric == "euc":
            return Side(u, key=key)
        offset = uc + (self.center_ @ self.center_ if test else 0.0)
        return side(u, offset, row_inverse_norms(x) if self.metric == "cos" else None, key)

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
    space, metric, needs = "sentence", "euc", "sentence"


@register("sbert-cos")
class EncoderCosine(Similarity):
    space, metric, needs = "sentence", "cos", "sentence"


@register("sbert-dot")
class EncoderDot(Similarity):
    space, metric, needs = "sentence", "dot", "sentence"

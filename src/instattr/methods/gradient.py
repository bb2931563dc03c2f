"""Gradient methods on the last linear layer: gd, gc, if, rif.

With ``g = e (x) f`` (see :mod:`.lastlayer`), test side at the model's predicted label and
training side at the gold label:

- ``gd``  = <g_t, g_i>                  ``gc``  = cos(g_t, g_i)
- ``if``  = g_t^T H^-1 g_i              ``rif`` = cos(L^-1 g_t, L^-1 g_i), H = L L^T

``if`` is -I_up,loss of Koh & Liang: positive means up-weighting the training example lowers the
test loss. ``rif`` (Barshan et al.) normalises by sqrt(g_t^T H^-1 g_t * g_i^T H^-1 g_i); since
(L^-1 a).(L^-1 b) = a^T H^-1 b this equals cos(H^-1/2 g_t, H^-1/2 g_i). Every method maps each
example to one vector (train side precomputed in ``fit``; ``if`` applies H^-1 to the test side
only) and scores a block with one product.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from ..store import FeatureSet, HeadState
from .base import Attributor, check_width
from .lastlayer import (ROW_BLOCK, class_probs, inverse_cholesky, loss_errors, reduced_gradients,
                        reduced_hessian, sum_zero_basis)
from .registry import register
from .similarity import unit_rows


class LastLayerGradient(Attributor):
    """Base of the gradient family; subclasses choose ``inverse_hessian`` and ``normalized``."""

    inverse_hessian: bool = False   # g_t^T H^-1 g_i instead of g_t^T g_i
    normalized: bool = False        # cosine (in the H^-1 geometry if inverse_hessian)

    def _gradients(self, fs: FeatureSet, labels: np.ndarray) -> np.ndarray:
        p = class_probs(fs.features, fs.probs, self.weight_)
        return reduced_gradients(loss_errors(p, labels), fs.features, self.basis_)

    def _embed(self, g: np.ndarray, test: bool) -> np.ndarray:
        if self.inverse_hessian and self.normalized:    # cosines of L^-1 g on both sides
            g = unit_rows(g @ self.whitener_.T)
        elif self.inverse_hessian and test:             # H^-1 on the (smaller) test side only
            g = g @ self.inverse_
        elif self.normalized:
            g = unit_rows(g)
        return g.astype(np.float32)

    def _fit(self, train: FeatureSet, head: Optional[HeadState]) -> None:
        n, d = train.features.shape
        c = train.probs.shape[1]
        self.weight_ = None if head is None else np.asarray(head.w, dtype=np.float64)
        if self.weight_ is not None and self.weight_.shape != (c, d):
            raise ValueError(f"{self.name}: head weight {self.weight_.shape} does not match "
                             f"{c} classes x {d} features")
        self.width_ = d
        self.basis_ = sum_zero_basis(c)
        if self.inverse_hessian:
            p = class_probs(train.features, train.probs, self.weight_)
            h = reduced_hessian(train.features, p, head.l2, self.basis_, self.damping)
            self.whitener_ = inverse_cholesky(h, self.name)            # L^-1, H = L L^T
            if not self.normalized:
                self.inverse_ = self.whitener_.T @ self.whitener_      # H^-1
        emb = np.empty((n, (c - 1) * d), dtype=np.float32)
        for s in range(0, n, ROW_BLOCK):
            rows = slice(s, min(s + ROW_BLOCK, n))
            emb[rows] = self._embed(self._gradients(train.subset(rows), train.label[rows]), test=False)
        self.train_embedding_ = emb

    def _score(self, test: FeatureSet, out: np.ndarray) -> None:
        check_width(self.name, "features", self.width_, np.asarray(test.features))
        emb = self._embed(self._gradients(test, test.pred), test=True)
        np.matmul(emb, self.train_embedding_.T, out=out)


@register("gd")
class GradientDot(LastLayerGradient):
    """<g_t, g_i> = (e_t . e_i)(f_t . f_i); probabilities from the head when given."""
    needs_head = False


@register("gc")
class GradientCosine(LastLayerGradient):
    """cos(g_t, g_i); 0 when a gradient vanishes."""
    needs_head = False
    normalized = True


class _InverseHessian(LastLayerGradient):
    inverse_hessian = True

    def __init__(self, damping: float = 0.0, chunk_size: Optional[int] = None):
        super().__init__(chunk_size)
        if not damping >= 0:
            raise ValueError(f"{self.name}: damping must be >= 0, got {damping}")
        self.damping = float(damping)


@register("if")
class InfluenceFunction(_InverseHessian):
    """g_t^T (H + damping I)^-1 g_i with the exact Hessian of the head's regularised loss."""


@register("rif")
class RelativeInfluence(_InverseHessian):
    """Influence normalised by both self-influences: cos(H^-1/2 g_t, H^-1/2 g_i)."""
    normalized = True

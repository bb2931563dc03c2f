"""Gradient methods on the last linear layer: gd, gc, if, rif.

With ``g = e (x) f`` (see :mod:`.lastlayer`), test side at the model's predicted label and
training side at the gold label:

- ``gd``  = <g_t, g_i>                  ``gc``  = cos(g_t, g_i)
- ``if``  = g_t^T H^-1 g_i              ``rif`` = cos(L^-1 g_t, L^-1 g_i), H = L L^T

When the final layer has a bias, ``f~ = [f, 1]`` replaces ``f`` throughout (the bias is a
parameter like the weight, and the L2 term covers both).

``if`` is -I_up,loss of Koh & Liang: positive means up-weighting the training example lowers the
test loss. ``rif`` (Barshan et al.) normalises by sqrt(g_t^T H^-1 g_t * g_i^T H^-1 g_i); since
(L^-1 a).(L^-1 b) = a^T H^-1 b this equals cos(H^-1/2 g_t, H^-1/2 g_i). Every method maps each
example to one vector (train side precomputed in ``fit``; ``if`` applies H^-1 to the test side
only) and scores a block with one product.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from ..store import FeatureSet
from .base import Attributor, check_width, final_layer_of, mean_against_others
from .lastlayer import (
    ROW_BLOCK,
    class_probs,
    inverse_cholesky,
    loss_errors,
    reduced_gradients,
    reduced_hessian,
    sum_zero_basis,
)
from .registry import register
from .similarity import unit_rows


class LastLayerGradient(Attributor):
    """Base of the gradient family; subclasses choose ``inverse_hessian`` and ``normalized``."""

    inverse_hessian: bool = False   # g_t^T H^-1 g_i instead of g_t^T g_i
    normalized: bool = False        # cosine (in the H^-1 geometry if inverse_hessian)

    def _gradients(self, fs: FeatureSet, labels: np.ndarray) -> np.ndarray:
        x = self._inputs(fs)
        p = class_probs(x, fs.probs, self.weight_)
        return reduced_gradients(loss_errors(p, labels), x, self.basis_)

    def _inputs(self, fs: FeatureSet) -> np.ndarray:
        """The final layer's input rows: f, or [f, 1] when it has a bias."""
        return np.asarray(fs.features, dtype=np.float64) if self.layer_ is None else self.layer_.augment(fs.features)

    def _embed(self, g: np.ndarray, test: bool) -> np.ndarray:
        if self.inverse_hessian and self.normalized:    # cosines of L^-1 g on both sides
            g = unit_rows(g @ self.whitener_.T)
        elif self.inverse_hessian and test:             # H^-1 on the (smaller) test side only
            g = g @ self.inverse_
        elif self.normalized:
            g = unit_rows(g)
        return g.astype(np.float32)

    def _fit(self, train: FeatureSet, model) -> None:
        n, d = train.features.shape
        c = train.probs.shape[1]
        self.layer_ = final_layer_of(self.name, model)
        self.weight_ = None if self.layer_ is None else self.layer_.weight()
        if self.layer_ is not None and self.layer_.w.shape != (c, d):
            raise ValueError(f"{self.name}: final layer weight {self.layer_.w.shape} does not match "
                             f"{c} classes x {d} features")
        self.width_ = d
        self.basis_ = sum_zero_basis(c)
        d1 = d + (self.layer_ is not None and self.layer_.b is not None)
        if self.inverse_hessian:
            if self.layer_.l2 + self.damping <= 0:
                raise ValueError(f"{self.name}: the final layer has l2 = 0 and no damping was given; the Hessian "
                                 "may be singular, pass --damping > 0")
            x = self._inputs(train)
            p = class_probs(x, train.probs, self.weight_)
            h = reduced_hessian(x, p, self.layer_.l2, self.basis_, self.damping)
            self.whitener_ = inverse_cholesky(h, self.name)            # L^-1, H = L L^T
            if not self.normalized:
                self.inverse_ = self.whitener_.T @ self.whitener_      # H^-1
        emb = np.empty((n, (c - 1) * d1), dtype=np.float32)
        for s in range(0, n, ROW_BLOCK):
            rows = slice(s, min(s + ROW_BLOCK, n))
            emb[rows] = self._embed(self._gradients(train.subset(rows), train.label[rows]), test=False)
        self.train_embedding_ = emb

    def self_scores(self) -> np.ndarray:
        """Self-influence, both sides at the gold label: ``gd`` ||g_i||^2, ``if`` g_i^T H^-1 g_i. The
        cosines (``gc``, ``rif``) score every example 1 against itself, so they give instead minus
        the mean of score(j, i) over the other training examples j (each at its gold label, as a
        test side): an example whose gradient points against the rest of the training set's."""
        self._check_fitted()
        emb = np.asarray(self.train_embedding_, dtype=np.float64)
        if self.normalized:
            return mean_against_others(emb, emb)
        if self.inverse_hessian:
            emb = emb @ self.whitener_.T                   # |L^-1 g|^2 = g^T H^-1 g
        return np.einsum("ij,ij->i", emb, emb)

    def _score(self, test: FeatureSet, out: np.ndarray) -> None:
        check_width(self.name, "features", self.width_, np.asarray(test.features))
        emb = self._embed(self._gradients(test, test.pred), test=True)
        np.matmul(emb, self.train_embedding_.T, out=out)


@register("gd")
class GradientDot(LastLayerGradient):
    """<g_t, g_i> = (e_t . e_i)(f~_t . f~_i); probabilities from the final layer when given."""
    needs_model = False


@register("gc")
class GradientCosine(LastLayerGradient):
    """cos(g_t, g_i); 0 when a gradient vanishes."""
    needs_model = False
    normalized = True


class _InverseHessian(LastLayerGradient):
    inverse_hessian = True
    command_line_options = ("damping",)

    def __init__(self, damping: float = 0.0, chunk_size: Optional[int] = None):
        super().__init__(chunk_size)
        if not damping >= 0:
            raise ValueError(f"{self.name}: damping must be >= 0, got {damping}")
        self.damping = float(damping)


@register("if")
class InfluenceFunction(_InverseHessian):
    """g_t^T (H + damping I)^-1 g_i with the exact Hessian of the final layer's regularised loss."""


@register("rif")
class RelativeInfluence(_InverseHessian):
    """Influence normalised by both self-influences: cos(H^-1/2 g_t, H^-1/2 g_i)."""
    normalized = True

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
only) and scores a block with one product. On binary tasks ``g~ = s f~`` (s = Q^T e a scalar),
so gd, gc (and rep) are the centred-feature product of nn-* with per-row offsets and scales;
if and rif share the product ``(H^-1 g_t) . g_i``, rif scaling it by both self-influences.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from ..arrays import FeatureSet
from .base import Attributor, check_width, final_layer_of, layer_inputs
from .lastlayer import (
    ROW_BLOCK,
    class_probs,
    hessian_whitener,
    kron_rows,
    kron_rows32,
    loss_errors,
    sum_zero_basis,
)
from .registry import register
from .shared import once, value_of
from .sides import NORM_TILE, Side, digest, side
from .similarity import centered_side_rows, column_mean, inverse_norms, row_inverse_norms


class LastLayerGradient(Attributor):
    """Base of the gradient family; subclasses choose ``inverse_hessian`` and ``normalized``."""

    inverse_hessian: bool = False   # g_t^T H^-1 g_i instead of g_t^T g_i
    normalized: bool = False        # cosine (in the H^-1 geometry if inverse_hessian)
    state = ("width_", "basis_", "layer_", "weight_", "center_", "key_", "whitener_", "inverse_")
    diagnosed = ("n_train_", "width_")

    def _gradients(self, fs: FeatureSet, labels: np.ndarray) -> np.ndarray:
        """g~_i = (Q^T e_i) (x) f~_i, float64 (:func:`.lastlayer.reduced_gradients`)."""
        return kron_rows(self._errors(fs, labels), self._inputs(fs))

    def _probs(self, fs: FeatureSet) -> np.ndarray:
        """float64 class probabilities of ``fs`` under the final layer; shared by gd, gc, if and
        rif fitted together (:mod:`.shared`)."""
        return once("probs", (fs.features, fs.probs, value_of(self.weight_)),
                    lambda: class_probs(self._inputs(fs), fs.probs, self.weight_))

    def _errors(self, fs: FeatureSet, labels: np.ndarray) -> np.ndarray:
        """(Q^T e_i) per row (n, C-1), float64, at ``labels``; shared like :meth:`_probs`."""
        return once("errors", (fs.features, fs.probs, labels, value_of(self.weight_)),
                    lambda: loss_errors(self._probs(fs), labels) @ self.basis_)

    def _inputs(self, fs: FeatureSet) -> np.ndarray:
        """The final layer's input rows: f, or [f, 1] when it has a bias."""
        return layer_inputs(self.layer_, fs.features)

    @property
    def _bias(self) -> float:
        return 1.0 if self.layer_ is not None and self.layer_.b is not None else 0.0

    def _fit(self, train: FeatureSet, model) -> None:
        n, d = train.features.shape
        c = train.probs.shape[1]
        self._fitted_on = train                 # the training rows, for self_scores (a reference, not state)
        self.layer_ = final_layer_of(self.name, model)
        self.weight_ = None if self.layer_ is None else self.layer_.weight()
        if self.layer_ is not None and self.layer_.w.shape != (c, d):
            raise ValueError(f"{self.name}: final layer weight {self.layer_.w.shape} does not match "
                             f"{c} classes x {d} features")
        self.width_ = d
        self.basis_ = sum_zero_basis(c)
        state = [self.basis_] + ([] if self.weight_ is None else [self.weight_])
        if self.inverse_hessian:
            if self.layer_.l2 + self.damping <= 0:
                raise ValueError(f"{self.name}: the final layer has l2 = 0 and no damping was given; the Hessian "
                                 "may be singular, pass --damping > 0")
            def blocks():         # (inputs, probabilities) a block of rows at a time
                for s in range(0, n, ROW_BLOCK):
                    part = train.subset(slice(s, s + ROW_BLOCK))
                    yield self._inputs(part), self._probs(part)       # the training side reuses both
            self.whitener_ = hessian_whitener(train.features, blocks, self.weight_, self.layer_.l2, self.basis_,
                                              self.damping, self.name)  # L^-1, H = L L^T
            self.inverse_, digested = once("inverse-hessian", (self.whitener_, value_of(self.weight_)),
                                           lambda: _inverse(self.whitener_, state))
            self.key_ = ("inverse-hessian", digested)
        elif c == 2:     # g = s f~: a scaled, offset product of the centred features (shared with nn-*)
            self.center_ = column_mean(np.asarray(train.features))
            self.key_ = ("centered", "features", digest(self.center_))
        else:
            self.key_ = ("gradients", digest(*state), self._bias)

    def _side(self, fs: FeatureSet, labels: np.ndarray, test: bool) -> Side:
        if test:
            check_width(self.name, "features", self.width_, np.asarray(fs.features))
        if hasattr(self, "center_"):
            return self._centered_side(fs, labels, test)
        key = (fs.features, fs.probs, labels, value_of(self.weight_))
        if test and self.inverse_hessian:              # H^-1 on the (smaller) test side only
            a, q = once("inverse-hessian-gradients", key + (self.key_[1],), lambda: self._ihvp(fs, labels))
            return side(a, scale=inverse_sqrt(q) if self.normalized else None, key=self.key_)
        a, x = self._errors(fs, labels), self._inputs(fs)
        g = once("gradients", key, lambda: kron_rows32(a, x))
        return side(g, scale=self._gradient_inverse_norms(a, x) if self.normalized else None, key=self.key_)

    def _gradient_inverse_norms(self, a: np.ndarray, x: np.ndarray) -> np.ndarray:
        """1 / ||g_i|| (with the inverse Hessian: 1 / ||L^-1 g_i||) of g_i = a_i (x) x_i, from
        float64 gradients formed a tile of rows at a time (never the whole float64 matrix)."""
        w = self.whitener_ if self.inverse_hessian else None
        return np.concatenate([inverse_norms(kron_rows(a[s:s + NORM_TILE], x[s:s + NORM_TILE]), w)
                               for s in range(0, len(x), NORM_TILE)] or [np.zeros(0)])

    def _ihvp(self, fs: FeatureSet, labels: np.ndarray):
        """(H^-1 g_t, g_t^T H^-1 g_t) of test rows, float64."""
        g = self._gradients(fs, labels)
        a = g @ self.inverse_
        return a, (a * g).sum(axis=1)

    def _centered_side(self, fs: FeatureSet, labels: np.ndarray, test: bool) -> Side:
        """Binary tasks: g~ = s f~ with s = Q^T e, so <g_t, g_i> = s_t s_i (<u_t, u_i> + offsets)."""
        s = self._errors(fs, labels)[:, 0]
        if self.normalized:
            s = np.sign(s) * row_inverse_norms(fs.features, self._inputs(fs) if self._bias else None)
        u, uc = centered_side_rows(fs.features, self.center_)
        c = self.center_
        offset = uc + ((c @ c + self._bias) if test else 0.0)
        return side(u, offset, s, self.key_)

    def _embed_train(self, rows: FeatureSet) -> Side:
        return self._side(rows, rows.label, test=False)

    def _embed_test(self, rows: FeatureSet) -> Side:
        return self._side(rows, rows.pred, test=True)

    def self_scores(self) -> np.ndarray:
        """Self-influence, both sides at the gold label: ``gd`` ||g_i||^2, ``if`` g_i^T H^-1 g_i. The
        cosines (``gc``, ``rif``) score every example 1 against itself, so they give instead minus
        the mean of score(j, i) over the other training examples j (each at its gold label, as a
        test side): an example whose gradient points against the rest of the training set's.
        Computed from the closed forms a block of rows at a time, never the n x n matrix."""
        self._check_fitted()
        train, n = getattr(self, "_fitted_on", None), self.n_train_
        if train is None:
            raise ValueError(f"{self.name}: self-scores need the training rows; fit the method on them")

        def rows():
            for s in range(0, n, ROW_BLOCK):
                part = train.subset(slice(s, s + ROW_BLOCK))
                g = self._gradients(part, part.label)
                if self.inverse_hessian:
                    g = g @ self.whitener_.T                  # |L^-1 g|^2 = g^T H^-1 g
                yield g * inverse_norms(g)[:, None] if self.normalized else g
        if not self.normalized:
            return np.concatenate([np.einsum("ij,ij->i", g, g) for g in rows()])
        total = sum(g.sum(axis=0) for g in rows())
        return np.concatenate([-(g @ total - np.einsum("ij,ij->i", g, g)) / max(n - 1, 1) for g in rows()])


def _inverse(whitener: np.ndarray, state: list):
    """H^-1 = W^T W from the whitener W = L^-1, and the digest of it and ``state`` (a key part)."""
    inverse = whitener.T @ whitener
    return inverse, digest(inverse, *state)


def inverse_sqrt(q: np.ndarray) -> np.ndarray:
    """1 / sqrt(q) where q > 0, else 0."""
    q = np.asarray(q, dtype=np.float64)
    return np.divide(1.0, np.sqrt(np.maximum(q, 0.0)), out=np.zeros_like(q), where=q > 0)


@register("gd")
class GradientDot(LastLayerGradient):
    """<g_t, g_i> = (e_t . e_i)(f~_t . f~_i); probabilities from the final layer when given."""
    needs = None


@register("gc")
class GradientCosine(LastLayerGradient):
    """cos(g_t, g_i); 0 when a gradient vanishes."""
    needs = None
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

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

from ..store import FeatureSet
from .base import Attributor, check_width, final_layer_of
from .lastlayer import ROW_BLOCK, class_probs, hessian_whitener, loss_errors, reduced_gradients, sum_zero_basis
from .registry import register
from .sides import Side, digest, side
from .similarity import inverse_norms


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
                    x = self._inputs(part)
                    yield x, class_probs(x, part.probs, self.weight_)
            self.whitener_ = hessian_whitener(train.features, blocks, self.weight_, self.layer_.l2, self.basis_,
                                              self.damping, self.name)  # L^-1, H = L L^T
            self.inverse_ = self.whitener_.T @ self.whitener_          # H^-1
            self.key_ = ("inverse-hessian", digest(self.inverse_, *state))
        elif c == 2:     # g = s f~: a scaled, offset product of the centred features (shared with nn-*)
            self.center_ = np.asarray(train.features).mean(axis=0, dtype=np.float64)
            self.key_ = ("centered", "features", digest(self.center_))
        else:
            self.key_ = ("gradients", digest(*state), self._bias)

    def _side(self, fs: FeatureSet, labels: np.ndarray, test: bool) -> Side:
        if test:
            check_width(self.name, "features", self.width_, np.asarray(fs.features))
        if hasattr(self, "center_"):
            return self._centered_side(fs, labels, test)
        g = self._gradients(fs, labels)
        if not self.inverse_hessian:
            return side(g, scale=inverse_norms(g) if self.normalized else None, key=self.key_)
        if test:                                       # H^-1 on the (smaller) test side only
            a = g @ self.inverse_
            scale = inverse_sqrt((a * g).sum(axis=1)) if self.normalized else None
            return side(a, scale=scale, key=self.key_)
        return side(g, scale=inverse_norms(g @ self.whitener_.T) if self.normalized else None, key=self.key_)

    def _centered_side(self, fs: FeatureSet, labels: np.ndarray, test: bool) -> Side:
        """Binary tasks: g~ = s f~ with s = Q^T e, so <g_t, g_i> = s_t s_i (<u_t, u_i> + offsets)."""
        x = self._inputs(fs)
        s = loss_errors(class_probs(x, fs.probs, self.weight_), labels) @ self.basis_[:, 0]
        if self.normalized:
            s = np.sign(s) * inverse_norms(x)
        u = side(np.asarray(fs.features, dtype=np.float64) - self.center_).vectors
        c = self.center_
        offset = u.astype(np.float64) @ c + ((c @ c + self._bias) if test else 0.0)
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


def inverse_sqrt(q: np.ndarray) -> np.ndarray:
    """1 / sqrt(q) where q > 0, else 0."""
    q = np.asarray(q, dtype=np.float64)
    return np.divide(1.0, np.sqrt(np.maximum(q, 0.0)), out=np.zeros_like(q), where=q > 0)


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

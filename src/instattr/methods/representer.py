"""Representer points (Yeh et al. 2018) for the last linear layer.

At a stationary point W* of ``(1/n) sum_i CE(W f_i, y_i) + lam ||W||^2``,
``W* = sum_i alpha_i f_i^T`` with ``alpha_i = -(1/(2 lam n)) (p*_i - onehot(y_i))``, so every
logit decomposes over training examples: ``W* f_t = sum_i alpha_i <f_i, f_t>``. The score of
training example i for test t is its share of the predicted class's logit,
``alpha_{i,c} <f_i, f_t>`` with c = the model's prediction for t.

The trained head is only near stationarity, so ``fit`` refits W by Newton's method on the fixed
training features (float64, from the final layer's weights) and records how exactly the
decomposition reconstructs the refit logits (``reconstruction_``). A final layer with a bias is
refit as ``[W, b]`` on ``f~ = [f, 1]`` with the L2 term on both (an imported model's ``l2`` is the
damping that stands in for the penalty it was not trained with), so ``f~`` replaces ``f`` above.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from ..arrays import FeatureSet
from .base import Attributor, check_width, final_layer_of, layer_inputs
from .lastlayer import (
    error_features,
    hessian_whitener,
    kron_rows,
    logits_of,
    loss_errors,
    refit,
    softmax,
    sum_zero_basis,
)
from .registry import register
from .sides import Side, digest, side
from .similarity import centered_side_rows, column_mean


@register("rep")
class Representer(Attributor):
    """Representer-point scores; ``tol`` is the gradient norm the refit must reach."""

    state = ("layer_", "weight_", "width_", "basis_", "lam_", "n_fit_", "center_", "key_")
    diagnosed = ("n_train_", "width_", "lam_", "n_fit_", "grad_norm_", "n_iter_", "n_hessians_", "converged_",
                 "reconstruction_", "prediction_agreement_")

    def __init__(self, tol: float = 1e-10, max_iter: int = 100, chunk_size: Optional[int] = None):
        super().__init__(chunk_size)
        if not tol > 0 or int(max_iter) < 1:
            raise ValueError(f"rep: need tol > 0 and max_iter >= 1, got {tol}, {max_iter}")
        self.tol = float(tol)
        self.max_iter = int(max_iter)

    def _fit(self, train: FeatureSet, model) -> None:
        layer = final_layer_of(self.name, model)
        self.layer_ = layer
        d = train.features.shape[1]
        f = layer_inputs(layer, train.features)
        n = len(f)
        w0 = layer.weight()
        if layer.w.shape[1] != d:
            raise ValueError(f"rep: final layer weight {layer.w.shape} does not match {d} features")
        lam = float(layer.l2)
        if lam <= 0:
            raise ValueError("rep: the final layer has l2 = 0; representer points need an L2-regularised layer")
        first = hessian_whitener(train.features, lambda: [(f, softmax(logits_of(f, w0)))], w0, lam,
                                 sum_zero_basis(len(w0)), 0.0, "rep")      # the Hessian at w0, shared with if and rif
        fit = refit(f, train.label, w0, lam, self.tol, self.max_iter, whitener0=first)
        logits = logits_of(f, fit.w)
        p = softmax(logits)
        alpha = -loss_errors(p, train.label) / (2.0 * lam * n)             # (n, C)
        rebuilt = logits_of(f, error_features(alpha, f))                     # sum_i alpha_i <f_i, f_t>
        corr = np.corrcoef(logits.ravel(), rebuilt.ravel())[0, 1] if logits.std() > 0 else 1.0
        self.weight_ = fit.w
        self.alpha_ = alpha
        self.grad_norm_ = fit.grad_norm
        self.n_iter_ = fit.n_iter
        self.n_hessians_ = fit.n_hessians
        self.converged_ = fit.converged
        self.reconstruction_ = {"max_abs_error": float(np.abs(logits - rebuilt).max()),
                                "correlation": float(corr)}
        self.prediction_agreement_ = float((p.argmax(1) == np.asarray(train.pred)).mean())
        self.width_ = d
        # alpha_{i,c} <f_i, f_t> = (Q^T onehot(c) (x) f_t) . (Q^T alpha_i (x) f_i): alpha_i sums to 0
        self.basis_ = sum_zero_basis(alpha.shape[1])
        self.lam_, self.n_fit_ = lam, n
        if len(self.basis_) == 2:  # binary: q_c (Q^T alpha_i) <f~_t, f~_i>, the centred-feature product of nn-*
            self.center_ = column_mean(np.asarray(train.features))
            self.key_ = ("centered", "features", digest(self.center_))
        else:
            self.key_ = ("representer", digest(self.weight_))

    def _alpha(self, fs: FeatureSet) -> np.ndarray:
        """alpha_i = -(p*_i - onehot(y_i)) / (2 lam n) at the refit weight, (rows, C)."""
        p = softmax(logits_of(layer_inputs(self.layer_, fs.features), self.weight_))
        return -loss_errors(p, fs.label) / (2.0 * self.lam_ * self.n_fit_)

    def _side(self, fs: FeatureSet, coef: np.ndarray, test: bool) -> Side:
        if not hasattr(self, "center_"):
            return side(kron_rows(coef, layer_inputs(self.layer_, fs.features)), key=self.key_)
        u, uc = centered_side_rows(fs.features, self.center_)
        c, bias = self.center_, float(self.layer_.b is not None)
        offset = uc + ((c @ c + bias) if test else 0.0)
        return side(u, offset, coef[:, 0], self.key_)

    def _embed_train(self, rows: FeatureSet) -> Side:
        return self._side(rows, self._alpha(rows) @ self.basis_, test=False)

    def _embed_test(self, rows: FeatureSet) -> Side:
        x = np.asarray(rows.features)
        check_width(self.name, "features", self.width_, x)
        pred = np.asarray(rows.pred)
        c = len(self.basis_)
        if len(pred) and (pred.min() < 0 or pred.max() >= c):
            raise ValueError(f"rep: test predictions must lie in [0, {c})")
        return self._side(rows, self.basis_[pred], test=True)

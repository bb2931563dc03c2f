"""Closed-form algebra of the last linear layer ``logits = W f`` (W: C x d, no bias).

Loss ``L(W) = (1/n) sum_i CE(W f_i, y_i) + lam * ||W||^2``. The per-example gradient is
``g_i = e_i (x) f_i`` with ``e_i = p_i - onehot(y_i)``, flattened row-major like ``W.ravel()``,
and the Hessian is ``H = (1/n) sum_i (diag p_i - p_i p_i^T) (x) f_i f_i^T + 2 lam I``.

Every ``e_i`` sums to zero over classes, and ``H`` maps the sum-zero subspace ``S (x) R^d`` and
its complement ``1 (x) R^d`` to themselves (on the complement ``H = 2 lam I``). So with an
orthonormal basis ``Q`` (C x C-1) of ``S``, ``g_a^T H^-1 g_b = g~_a^T H~^-1 g~_b`` exactly, where
``g~ = (Q^T e) (x) f`` and ``H~ = (1/n) sum_i (Q^T A_i Q) (x) f_i f_i^T + 2 lam I`` is
((C-1)d)^2: d x d for binary tasks instead of 2d x 2d.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import scipy.linalg

ROW_BLOCK = 1 << 15  # rows per float64 temporary when streaming over a split


def sum_zero_basis(n_classes: int) -> np.ndarray:
    """Orthonormal (Helmert) basis of {x in R^C : sum(x) = 0}, shape (C, C-1)."""
    if n_classes < 2:
        raise ValueError(f"need at least 2 classes, got {n_classes}")
    q = np.zeros((n_classes, n_classes - 1))
    for k in range(1, n_classes):
        q[:k, k - 1] = 1.0
        q[k, k - 1] = -k
        q[:, k - 1] /= np.sqrt(k * (k + 1))
    return q


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def class_probs(features: np.ndarray, probs: np.ndarray, w: Optional[np.ndarray]) -> np.ndarray:
    """float64 probabilities: softmax(F W^T) recomputed when W is known (stored float32
    probabilities round 1 - p to 0 for confident predictions), else the stored ones."""
    if w is None:
        return np.asarray(probs, dtype=np.float64)
    return softmax(np.asarray(features, dtype=np.float64) @ np.asarray(w, dtype=np.float64).T)


def loss_errors(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """e = p - onehot(labels), the gradient of the cross-entropy w.r.t. the logits (n, C)."""
    labels = np.asarray(labels)
    n, c = probs.shape
    if labels.shape != (n,) or (n and (labels.min() < 0 or labels.max() >= c)):
        raise ValueError(f"labels must be {n} integers in [0, {c}); got shape {labels.shape}")
    e = np.array(probs, dtype=np.float64)
    e[np.arange(n), labels] -= 1.0
    return e


def kron_rows(a: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Row-wise Kronecker products a_i (x) f_i, shape (n, k * d)."""
    return (a[:, :, None] * f[:, None, :]).reshape(len(a), -1)


def reduced_gradients(errors: np.ndarray, features: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """g~_i = (Q^T e_i) (x) f_i in float64; same inner products as the full g_i = e_i (x) f_i."""
    return kron_rows(errors @ basis, np.asarray(features, dtype=np.float64))


def reduced_hessian(features: np.ndarray, probs: np.ndarray, lam: float, basis: np.ndarray,
                    damping: float = 0.0) -> np.ndarray:
    """H~ (float64, ((C-1)d)^2) of the regularised mean loss at probabilities ``probs``."""
    n, d = features.shape
    k = basis.shape[1]
    h = np.zeros((k, d, k, d))
    for s in range(0, n, ROW_BLOCK):
        f = np.asarray(features[s:s + ROW_BLOCK], dtype=np.float64)
        p = np.asarray(probs[s:s + ROW_BLOCK], dtype=np.float64)
        r = p @ basis                                                  # Q^T p_i
        b = np.einsum("ca,ic,cb->iab", basis, p, basis) - r[:, :, None] * r[:, None, :]
        for a in range(k):
            for c in range(a, k):
                blk = f.T @ (f * b[:, a, c, None])
                h[a, :, c, :] += blk
                if c != a:
                    h[c, :, a, :] += blk.T
    h = h.reshape(k * d, k * d) / n
    h = (h + h.T) / 2
    h[np.diag_indices_from(h)] += 2.0 * lam + damping
    return h


def cholesky(h: np.ndarray, what: str) -> np.ndarray:
    """Lower Cholesky factor, or a one-line error saying how to regularise."""
    try:
        return scipy.linalg.cholesky(h, lower=True, check_finite=True)
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError, ValueError):
        raise ValueError(f"{what}: the Hessian is not positive definite (l2 = 0 on rank-deficient "
                         "features?); pass damping > 0") from None


def whiten(chol: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Rows L^-1 g_i, so that (L^-1 g_a).(L^-1 g_b) = g_a^T H^-1 g_b."""
    return scipy.linalg.solve_triangular(chol, g.T, lower=True, check_finite=False).T


# ---------------------------------------------------------------- refit to stationarity
@dataclass
class Refit:
    w: np.ndarray          # (C, d) float64, rows sum to zero
    grad_norm: float       # Frobenius norm of dL/dW at w
    n_iter: int
    converged: bool


def objective(features: np.ndarray, labels: np.ndarray, w: np.ndarray, lam: float) -> float:
    z = features @ w.T
    m = z.max(axis=1, keepdims=True)
    lse = (m[:, 0] + np.log(np.exp(z - m).sum(axis=1)))
    return float((lse - z[np.arange(len(z)), labels]).mean() + lam * (w ** 2).sum())


def refit(features: np.ndarray, labels: np.ndarray, w0: np.ndarray, lam: float,
          tol: float = 1e-10, max_iter: int = 50) -> Refit:
    """Damped Newton on the regularised mean loss in float64, from ``w0``, until ||grad|| <= tol.

    Works in the sum-zero coordinates V = Q^T W: the class-mean row of W changes no probability
    and its optimum is 0, so W = Q V throughout and the Newton system is ((C-1)d)^2.
    """
    if lam <= 0:
        raise ValueError("refitting to stationarity needs l2 > 0 (the loss has no minimiser otherwise)")
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    n = len(f)
    q = sum_zero_basis(w0.shape[0])
    v = q.T @ np.asarray(w0, dtype=np.float64)
    eps = np.finfo(np.float64).eps
    grad_norm, it = np.inf, 0
    for it in range(max_iter + 1):
        w = q @ v
        p = softmax(f @ w.T)
        grad = (loss_errors(p, y) @ q).T @ f / n + 2.0 * lam * v      # = Q^T dL/dW, same norm
        grad_norm = float(np.linalg.norm(grad))
        if grad_norm <= tol or it == max_iter:
            break
        chol = cholesky(reduced_hessian(f, p, lam, q), "refit")
        step = scipy.linalg.cho_solve((chol, True), grad.ravel()).reshape(v.shape)
        f0, slope, t = objective(f, y, w, lam), float((grad * step).sum()), 1.0
        while t > 1e-12:
            f1 = objective(f, y, q @ (v - t * step), lam)
            if f1 <= f0 - 1e-4 * t * slope or f1 - f0 <= 64 * eps * abs(f0):
                break
            t /= 2
        v = v - t * step
    converged = grad_norm <= tol
    if not converged:
        warnings.warn(f"refit stopped after {it} Newton steps at gradient norm {grad_norm:.2e} "
                      f"(tol {tol:.0e})", RuntimeWarning, stacklevel=3)
    return Refit(w=q @ v, grad_norm=grad_norm, n_iter=it, converged=converged)

"""Closed-form algebra of the last linear layer ``logits = W f`` (W: C x d).

A layer with a bias is the same algebra on ``f~ = [f, 1]`` and ``W~ = [W, b]``
(:meth:`instattr.store.FinalLayer.augment`): every function here takes the rows it is given.

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
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..errors import InstattrError

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover - optional; only speed depends on it
    threadpool_limits = None

ROW_BLOCK = 1 << 15  # rows per float64 temporary when streaming over a split


def sum_zero_basis(n_classes: int) -> np.ndarray:
    """Orthonormal (Helmert) basis of {x in R^C : sum(x) = 0}, shape (C, C-1)."""
    if n_classes < 2:
        raise InstattrError(f"need at least 2 classes, got {n_classes}")
    q = np.zeros((n_classes, n_classes - 1))
    for k in range(1, n_classes):
        q[:k, k - 1] = 1.0
        q[k, k - 1] = -k
        q[:, k - 1] /= np.sqrt(k * (k + 1))
    return q


def logits_of(features: np.ndarray, w: np.ndarray) -> np.ndarray:
    """F W^T for a thin W (C x d). einsum's own loop: multi-threaded BLAS on a product this
    thin is no faster, and on a busy machine it can be 100x slower waiting on its threads."""
    return np.einsum("id,cd->ic", features, w)


def error_features(errors: np.ndarray, features: np.ndarray) -> np.ndarray:
    """E^T F (C x d), the data part of dL/dW times n; einsum for the same reason."""
    return np.einsum("ic,id->cd", errors, features)


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
    return softmax(logits_of(np.asarray(features, dtype=np.float64), np.asarray(w, dtype=np.float64)))


def loss_errors(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """e = p - onehot(labels), the gradient of the cross-entropy w.r.t. the logits (n, C)."""
    labels = np.asarray(labels, dtype=np.int64)
    n, c = probs.shape
    if labels.shape != (n,) or (n and (labels.min() < 0 or labels.max() >= c)):
        raise InstattrError(f"labels must be {n} integers in [0, {c}); got shape {labels.shape}")
    e = np.array(probs, dtype=np.float64)
    e[np.arange(n), labels] -= 1.0
    return e


def kron_rows(a: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Row-wise Kronecker products a_i (x) f_i, shape (n, k * d)."""
    return (a[:, :, None] * f[:, None, :]).reshape(len(a), -1)


def kron_rows32(a: np.ndarray, f: np.ndarray) -> np.ndarray:
    """``kron_rows(a, f)`` computed in float64 and rounded to float32 in one ufunc pass (the
    same bits, without the float64 array)."""
    n, k, d = len(a), a.shape[1], f.shape[1]
    out = np.empty((n, k * d), dtype=np.float32)
    np.multiply(a[:, :, None], f[:, None, :], out=out.reshape(n, k, d), dtype=np.float64, casting="same_kind")
    return out


def reduced_gradients(errors: np.ndarray, features: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """g~_i = (Q^T e_i) (x) f_i in float64; same inner products as the full g_i = e_i (x) f_i."""
    return kron_rows(errors @ basis, np.asarray(features, dtype=np.float64))


def reduced_hessian(features: np.ndarray, probs: np.ndarray, lam: float, basis: np.ndarray,
                    damping: float = 0.0, blocks=None) -> np.ndarray:
    """H~ (float64, ((C-1)d)^2) of the regularised mean loss at probabilities ``probs``.
    ``blocks``: an iterable of (features, probs) row blocks used instead of the two arrays, so a
    training set that does not fit in memory as float64 streams through."""
    if blocks is None:
        blocks = ((features[s:s + ROW_BLOCK], probs[s:s + ROW_BLOCK]) for s in range(0, len(features), ROW_BLOCK))
    k = basis.shape[1]
    h, n = None, 0
    for f, p in blocks:
        f = np.asarray(f, dtype=np.float64)
        p = np.asarray(p, dtype=np.float64)
        if h is None:
            d = f.shape[1]
            h = np.zeros((k, d, k, d))
        n += len(f)
        r = p @ basis                                                  # Q^T p_i
        b = np.einsum("ca,ic,cb->iab", basis, p, basis) - r[:, :, None] * r[:, None, :]
        for a in range(k):
            x = f * np.sqrt(np.maximum(b[:, a, a], 0.0))[:, None]    # B_i is PSD: b_aa >= 0
            h[a, :, a, :] += x.T @ x                                   # symmetric product (syrk)
            for c in range(a + 1, k):
                blk = f.T @ (f * b[:, a, c, None])
                h[a, :, c, :] += blk
                h[c, :, a, :] += blk.T
    h = h.reshape(k * d, k * d) / n
    h = (h + h.T) / 2
    h[np.diag_indices_from(h)] += 2.0 * lam + damping
    return h


def serial_lapack():
    """One BLAS thread for small factorisations: multi-threaded LAPACK on a (C-1)d matrix gains
    nothing and, on a busy machine, waits on descheduled threads (1 s instead of 20 ms)."""
    return threadpool_limits(1, user_api="blas") if threadpool_limits else nullcontext()


def inverse_cholesky(h: np.ndarray, what: str) -> np.ndarray:
    """L^-1 for H = L L^T, or a one-line error saying how to regularise. Rows L^-1 g then have
    (L^-1 g_a).(L^-1 g_b) = g_a^T H^-1 g_b. (numpy.linalg only: scipy.linalg would bring a
    second BLAS thread pool competing with numpy's.)"""
    with serial_lapack():
        try:
            chol = np.linalg.cholesky(h)
        except np.linalg.LinAlgError:
            raise InstattrError(f"{what}: the Hessian is not positive definite (l2 = 0 on rank-deficient "
                                "features?); pass damping > 0") from None
        return lower_inverse(chol)


def lower_inverse(lower: np.ndarray) -> np.ndarray:
    """The inverse of a lower-triangular matrix, by halves: [[A, 0], [B, C]]^-1 =
    [[A^-1, 0], [-C^-1 B A^-1, C^-1]], a third of the work of a general solve against I."""
    n = len(lower)
    if n <= 64:
        return np.tril(np.linalg.solve(lower, np.eye(n)))     # the solve pivots: zeros above, exactly
    k = n // 2
    a, c = lower_inverse(lower[:k, :k]), lower_inverse(lower[k:, k:])
    out = np.zeros_like(lower)
    out[:k, :k], out[k:, k:] = a, c
    out[k:, :k] = -(c @ (lower[k:, :k] @ a))
    return out


# ---------------------------------------------------------------- refit to stationarity
@dataclass
class Refit:
    w: np.ndarray          # (C, d) float64, rows sum to zero
    grad_norm: float       # Frobenius norm of dL/dW at w
    n_iter: int            # steps taken
    n_hessians: int        # Hessians built (a Hessian is reused while it keeps paying)
    converged: bool


def full_logits(reduced: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Logits (n, C) from reduced logits F V^T (n, C-1), V = Q^T W: F W^T = (F V^T) Q^T."""
    return np.einsum("ik,ck->ic", reduced, basis)


def objective(logits: np.ndarray, labels: np.ndarray, v: np.ndarray, lam: float) -> float:
    """Regularised mean loss from the logits; ||W||^2 = ||V||^2 as Q has orthonormal columns."""
    m = logits.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))
    return float((lse - logits[np.arange(len(logits)), labels]).mean() + lam * (v ** 2).sum())


def refit(features: np.ndarray, labels: np.ndarray, w0: np.ndarray, lam: float,
          tol: float = 1e-10, max_iter: int = 100, whitener0: Optional[np.ndarray] = None) -> Refit:
    """Damped Newton on the regularised mean loss in float64, from ``w0``, until ||grad|| <= tol.

    Works in the sum-zero coordinates V = Q^T W: the class-mean row of W changes no probability
    and its optimum is 0, so W = Q V throughout and the Newton system is ((C-1)d)^2. A Hessian
    is rebuilt only when the last step cut the gradient norm by less than 4x or needed a line
    search; steps in between are cheap (two thin products), so a head trained near the optimum
    converges after one or two Hessians. The logits are linear in V, so a step costs two passes
    over the features (the gradient, and the step's logits ``F S^T``; the line search then only
    combines them). ``whitener0``: L^-1 of the Hessian at ``w0``, when known.
    """
    if lam <= 0:
        raise InstattrError("refitting to stationarity needs l2 > 0 (the loss has no minimiser otherwise)")
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    n = len(f)
    q = sum_zero_basis(w0.shape[0])
    v = q.T @ np.asarray(w0, dtype=np.float64)
    r = logits_of(f, v)                      # reduced logits F V^T (n, C-1); the logits are R Q^T
    obj = objective(full_logits(r, q), y, v, lam)
    eps = np.finfo(np.float64).eps
    whitener, last, n_hess, grad_norm, it = whitener0, np.inf, 0, np.inf, 0
    for it in range(max_iter + 1):
        p = softmax(full_logits(r, q))
        grad = error_features(loss_errors(p, y) @ q, f) / n + 2.0 * lam * v   # = Q^T dL/dW, same norm
        grad_norm = float(np.linalg.norm(grad))
        if grad_norm <= tol or it == max_iter:
            break
        if whitener is None or grad_norm > 0.25 * last:
            whitener = inverse_cholesky(reduced_hessian(f, p, lam, q), "refit")
            n_hess += 1
        step = (whitener.T @ (whitener @ grad.ravel())).reshape(v.shape)
        dr = logits_of(f, step)              # the logits are linear in V: one product per step
        slope, t = float((grad * step).sum()), 1.0
        while True:                                          # Armijo backtracking
            v1, r1 = v - t * step, r - t * dr
            obj1 = objective(full_logits(r1, q), y, v1, lam)
            if obj1 <= obj - 1e-4 * t * slope or obj1 - obj <= 64 * eps * abs(obj) or t < 1e-12:
                break
            t /= 2
        if t < 1:
            whitener = None
        v, r, obj, last = v1, r1, obj1, grad_norm
    converged = grad_norm <= tol
    if not converged:
        warnings.warn(f"refit stopped after {it} steps at gradient norm {grad_norm:.2e} "
                      f"(tol {tol:.0e})", RuntimeWarning, stacklevel=3)
    return Refit(w=q @ v, grad_norm=grad_norm, n_iter=it, n_hessians=n_hess, converged=converged)


# ---------------------------------------------------------------- one Hessian for if, rif and rep
_WHITENERS: list = []     # [(features array, weight bytes, l2 + damping, L^-1)], the last one kept


def hessian_whitener(features: np.ndarray, blocks, weight: Optional[np.ndarray], lam: float, basis: np.ndarray,
                     damping: float, what: str) -> np.ndarray:
    """L^-1 of the reduced Hessian at the layer's weights, for the rows whose stored ``features``
    array is given; ``blocks()`` yields their (inputs, probabilities) row blocks. The last one is
    kept, so if, rif and rep on the same training set build it once."""
    key = (None if weight is None else np.asarray(weight).tobytes(), float(lam), float(damping), len(basis))
    for feats, k, w in _WHITENERS:
        if feats is features and k == key:
            return w
    w = inverse_cholesky(reduced_hessian(None, None, lam, basis, damping, blocks=blocks()), what)
    _WHITENERS[:] = [(features, key, w)]
    return w

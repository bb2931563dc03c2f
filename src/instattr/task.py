"""What is attributed: the task seam between a model's outputs and every gradient method.

After kronfluence's ``Task`` (``compute_train_loss``, ``compute_measurement``, tracked modules) and
TRAK's model-output functions. A task defines, from the outputs of one batch, per example:

- ``scalars(out)`` (B, R): R functions of the parameters whose gradients the hooks sketch
  (:mod:`instattr.layers.projection`); every gradient below is a combination of theirs;
- ``train_coefficients(out, labels)`` (B, R): the training loss's gradient is
  ``sum_r c_r * grad scalars_r`` (the training side, at the gold labels);
- ``query_coefficients(out, labels)`` (B, R): the same for the query's loss ``-measurement``
  (the test side, at the predicted labels), so that ``score = g_query^T H^-1 g_train`` is positive
  when up-weighting the training example raises the query's measurement;
- ``curvature_roots(out)`` (B, S, R): rows ``A_i`` with the Gauss-Newton Hessian
  ``(1/n) sum_i J_i^T A_i^T A_i J_i``, ``J_i`` the Jacobian of the scalars;
- ``loss(out, labels)`` / ``measurement(out, labels)`` (B,): the plain values (brute force, LiSSA).

:class:`ClassificationTask`: softmax cross-entropy over C classes. Its scalars are the reduced
logits ``Q^T z`` (Q: an orthonormal basis of the sum-zero directions, :func:`sum_zero_basis`; a
softmax ignores the all-ones direction), so one Jacobian of C-1 rows gives the training gradient,
the query gradient and the exact Gauss-Newton factors: ``dL/dz = p - onehot(y)``, and the logit
Hessian ``diag p - p p^T = Q R R^T Q^T`` (:func:`gauss_newton_roots`). The measurement is
``log p(label)`` (the loss at the predicted label, the paper's and the score convention's), or
with ``measurement="margin"`` the margin ``z_y - logsumexp_{c != y} z_c`` (kronfluence's choice for
classifiers: it does not saturate when p(y) is near 1).
"""
from __future__ import annotations

import torch

from .errors import InstattrError
from .methods.lastlayer import sum_zero_basis

MEASUREMENTS = ("loss", "margin")


def gauss_newton_roots(probs: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """R_i (B, C-1, C-1) with R_i R_i^T = Q^T (diag p_i - p_i p_i^T) Q (the reduced logit Hessian)."""
    a = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
    b = basis.T @ a @ basis
    w, v = torch.linalg.eigh(b)
    return v * w.clamp_min(0).sqrt()[:, None, :]


class ClassificationTask:
    """Softmax cross-entropy over ``n_classes`` (see the module docstring)."""

    def __init__(self, n_classes: int, measurement: str = "loss"):
        if measurement not in MEASUREMENTS:
            raise InstattrError(f"measurement must be one of {', '.join(MEASUREMENTS)}, got {measurement!r}")
        self.n_classes, self.measurement_kind = int(n_classes), measurement
        self._basis = torch.as_tensor(sum_zero_basis(self.n_classes), dtype=torch.float64)

    @property
    def n_scalars(self) -> int:
        return self.n_classes - 1

    def basis(self, like: torch.Tensor) -> torch.Tensor:
        """Q (C, C-1) in ``like``'s dtype and device."""
        return self._basis.to(like.device, like.dtype)

    def scalars(self, out) -> torch.Tensor:
        return out.logits @ self.basis(out.logits)

    def _probs(self, out) -> torch.Tensor:
        return torch.softmax(out.logits.detach().double(), -1)

    def train_coefficients(self, out, labels: torch.Tensor) -> torch.Tensor:
        """Q^T (p - onehot(y)): the cross-entropy gradient in the reduced logit directions."""
        e = self._probs(out).clone()
        e[torch.arange(len(e)), labels.long().to(e.device)] -= 1.0
        return e @ self.basis(e)

    def query_coefficients(self, out, labels: torch.Tensor) -> torch.Tensor:
        """The gradient of ``-measurement`` at ``labels`` in the reduced logit directions."""
        if self.measurement_kind == "loss":
            return self.train_coefficients(out, labels)
        z = out.logits.detach().double()
        y = labels.long().to(z.device)
        rows = torch.arange(len(z))
        others = z.clone()
        others[rows, y] = -torch.inf
        d = -torch.softmax(others, -1)          # d margin / d z: +1 at y, -softmax over the others
        d[rows, y] = 1.0
        return -d @ self.basis(d)

    def curvature_roots(self, out) -> torch.Tensor:
        """R_i^T (B, C-1, C-1): Q^T (diag p - p p^T) Q = R R^T (:func:`gauss_newton_roots`)."""
        p = self._probs(out)
        return gauss_newton_roots(p, self.basis(p)).transpose(1, 2)

    def loss(self, out, labels: torch.Tensor) -> torch.Tensor:
        """Per-example cross-entropy at ``labels`` (B,)."""
        return torch.nn.functional.cross_entropy(out.logits, labels.long().to(out.logits.device), reduction="none")

    def measurement(self, out, labels: torch.Tensor) -> torch.Tensor:
        """log p(label), or the margin (B,)."""
        y = labels.long().to(out.logits.device)
        rows = torch.arange(len(y), device=y.device)
        if self.measurement_kind == "loss":
            return -self.loss(out, y)
        z = out.logits
        mask = torch.zeros_like(z, dtype=torch.bool)
        mask[rows, y] = True
        return z[rows, y] - torch.logsumexp(z.masked_fill(mask, -torch.inf), -1)

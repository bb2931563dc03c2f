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

``n_scalars`` is R and ``n_roots`` S.

:class:`ClassificationTask`: softmax cross-entropy over C classes. Its scalars are the reduced
logits ``Q^T z`` (Q: an orthonormal basis of the sum-zero directions, :func:`sum_zero_basis`; a
softmax ignores the all-ones direction), so one Jacobian of C-1 rows gives the training gradient,
the query gradient and the exact Gauss-Newton factors: ``dL/dz = p - onehot(y)``, and the logit
Hessian ``diag p - p p^T = Q R R^T Q^T`` (:func:`gauss_newton_roots`). The measurement is
``log p(label)`` (the loss at the predicted label, the paper's and the score convention's), or
with ``measurement="margin"`` the margin ``z_y - logsumexp_{c != y} z_c`` (kronfluence's choice for
classifiers: it does not saturate when p(y) is near 1).

:class:`LanguageModelTask`: next-token cross-entropy summed over a row's scored tokens
(:mod:`instattr.models.causal`; a document's every token after the first, a prompt's completion
only). Its labels are in the batch (the scored next tokens), so ``labels`` is unused. The scalars
are the summed NLL ``L`` and, ``samples`` times, the summed NLL ``L~_s`` at tokens drawn from the
model's own next-token distribution at the scored positions. The training gradient is ``grad L``; the
measurement is the completion's log-probability ``-L``, so the query side is ``grad L`` too. The
Gauss-Newton Hessian is estimated by Monte Carlo: for each position ``E[grad l~ grad l~^T] =
J^T (diag p - p p^T) J`` (the softmax cross-entropy's Fisher equals its GGN), and draws at
different positions are independent with mean-zero gradients, so ``E[grad L~ grad L~^T]`` is the
row's GGN summed over its positions; the roots are ``e_s / sqrt(samples)``. The draws are seeded
by ``seed`` and a window's scored tokens and their positions, so a window gets the same draws in
any batch (two windows alike in those get the same draws). With ``empirical=True`` the factor is
``grad L`` itself, at the observed tokens (the empirical Fisher ``(1/n) sum_i grad L_i grad L_i^T``,
which equals the GGN only where the model's predictions match the data): nothing is drawn, the
one scalar is ``L``, and a training pass needs one backward pass instead of ``1 + samples``.

:class:`CompletionMargin` is a language model's query measured by its completion's summed
per-token margin ``sum_t (z_{y_t} - logsumexp_{v != y_t} z_v)`` instead of its log-probability
(a token's log-odds, which does not saturate once p(y_t) nears 1): one scalar, minus that sum.
"""
from __future__ import annotations

import zlib

import torch

from .errors import InstattrError
from .methods.lastlayer import sum_zero_basis

MEASUREMENTS = ("loss", "margin")
IGNORE = -100          # a language model's target where no token is scored


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

    @property
    def n_roots(self) -> int:
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


class LanguageModelTask:
    """Summed next-token cross-entropy over scored tokens (see the module docstring)."""

    def __init__(self, samples: int = 1, seed: int = 0, draw: bool = True, empirical: bool = False):
        if int(samples) < 1:
            raise InstattrError(f"samples must be a positive integer, got {samples}")
        self.samples, self.seed, self.empirical = int(samples), int(seed), bool(empirical)
        self.draw = bool(draw) and not self.empirical

    def loss_only(self) -> "LanguageModelTask":
        """The same task without the drawn scalars (R = 1): when no curvature is needed, one
        backward pass instead of 1 + samples."""
        return self if self.empirical else LanguageModelTask(self.samples, self.seed, draw=False)

    @property
    def n_scalars(self) -> int:
        return 1 + self.samples * self.draw

    @property
    def n_roots(self) -> int:
        return 1 if self.empirical else self.samples

    @property
    def has_roots(self) -> bool:
        """Whether :meth:`scalars` carries what :meth:`curvature_roots` combines: the drawn scalars (not
        after :meth:`loss_only`), or the loss itself for the empirical Fisher."""
        return self.draw or self.empirical

    def _nll(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(B,) the NLL summed over the positions whose target is not ignored."""
        keep = targets != IGNORE
        logp = torch.log_softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, -1)
        picked = logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        return -(picked * keep).sum(-1)

    def draws(self, out) -> torch.Tensor:
        """(samples, B, T) tokens drawn from the model's next-token distribution at the scored
        positions (IGNORE elsewhere), seeded by the row's scored tokens."""
        targets = out.targets.detach().cpu()
        drawn = torch.full((self.samples, *targets.shape), IGNORE, dtype=torch.long)
        for b in range(len(targets)):
            pos = torch.nonzero(targets[b] != IGNORE).squeeze(-1)
            probs = torch.softmax(out.logits[b, pos.to(out.logits.device)].detach().double().cpu(), -1)
            key = torch.cat([pos, targets[b, pos]]).numpy().tobytes()
            g = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:".encode() + key))
            u = torch.rand((len(pos), self.samples), generator=g, dtype=torch.float64)    # by the inverse CDF:
            cdf = probs.cumsum(-1)                                                       # one uniform per draw
            picked = torch.searchsorted(cdf, u * cdf[:, -1:]).clamp_max(probs.shape[-1] - 1)
            drawn[:, b, pos] = picked.T
        return drawn.to(out.targets.device)

    def scalars(self, out) -> torch.Tensor:
        nll = [self._nll(out.logits, out.targets)]
        if self.draw:
            nll += [self._nll(out.logits, d) for d in self.draws(out)]
        return torch.stack(nll, -1)

    def _unit(self, out, r: int) -> torch.Tensor:
        e = torch.zeros(len(out.targets), self.n_scalars, dtype=torch.float64)
        e[:, r] = 1.0
        return e

    def train_coefficients(self, out, labels=None) -> torch.Tensor:
        """The gradient of the summed NLL: scalar 0."""
        return self._unit(out, 0)

    def query_coefficients(self, out, labels=None) -> torch.Tensor:
        """The gradient of minus the completion's log-probability: the summed NLL again."""
        return self._unit(out, 0)

    def curvature_roots(self, out) -> torch.Tensor:
        """(B, samples, 1 + samples): row s picks the drawn NLL s, scaled by 1/sqrt(samples); empirical:
        (B, 1, 1), the NLL itself."""
        if self.empirical:
            return torch.ones(len(out.targets), 1, 1, dtype=torch.float64)
        roots = torch.zeros(len(out.targets), self.samples, self.n_scalars, dtype=torch.float64)
        roots[:, torch.arange(self.samples), 1 + torch.arange(self.samples)] = self.samples ** -0.5
        return roots

    def loss(self, out, labels=None) -> torch.Tensor:
        """(B,) the summed NLL of the scored tokens."""
        return self._nll(out.logits, out.targets)

    def measurement(self, out, labels=None) -> torch.Tensor:
        """(B,) the scored tokens' summed log-probability."""
        return -self.loss(out)


class CompletionMargin(LanguageModelTask):
    """A query's measurement as its completion's summed per-token margin (module docstring): R = 1,
    the scalar is minus the margin, so the query side ``grad(-margin)`` keeps the score convention."""

    def __init__(self):
        super().__init__(draw=False)

    def loss_only(self) -> "CompletionMargin":
        return self

    def margins(self, out) -> torch.Tensor:
        """(B,) the summed margin of the scored tokens."""
        z = out.logits.float() if out.logits.dtype in (torch.float16, torch.bfloat16) else out.logits
        keep = out.targets != IGNORE
        y = out.targets.clamp_min(0)
        picked = z.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        rest = torch.logsumexp(z.scatter(-1, y.unsqueeze(-1), -torch.inf), -1)
        return ((picked - rest) * keep).sum(-1)

    def scalars(self, out) -> torch.Tensor:
        return -self.margins(out).unsqueeze(-1)

    def measurement(self, out, labels=None) -> torch.Tensor:
        return self.margins(out)

"""Inverse-Hessian-vector products, three ways behind one interface.

Every solver is ``Solver(options).fit(curvature) -> self`` and then ``solve(V) -> (H + damping M)^-1 V``
for rows V (m, dim) and ``quadratic(V)``, the row-wise ``v^T H^-1 v`` (``rif`` divides by its square
root); :class:`ExplicitHessian` and the primal :class:`GaussNewton` also ``whiten(V) = L^-1 V`` with
``H = L L^T`` (so ``whiten(a) . whiten(b) = a^T H^-1 b``). A
:class:`Curvature` says what a problem offers; each solver takes what it needs:

- :class:`LiSSA` (Agarwal et al. 2017, as Koh & Liang's and the paper's code run it): minibatch
  Hessian-vector products of the regularised training loss and the recursion
  ``h <- v + (1 - damping) h - H_batch h / scale``, ``depth`` steps, averaged over ``repeats``, the
  result divided by ``scale``. Its fixed point is ``(H + damping * scale * I)^-1 v``: the paper's
  per-step ``damping`` is a Hessian damping of ``damping * scale``. It converges when ``scale``
  exceeds the largest eigenvalue of ``H + damping * scale * I`` and that matrix is positive definite.
- :class:`ExplicitHessian`: the full Hessian of the regularised full-batch loss by autograd, plus
  ``damping * I``, Cholesky-factored. Tiny models only (dim^2 numbers).
- :class:`GaussNewton`: ``(1/n) sum_i F_i^T F_i`` from per-example Gauss-Newton factors (rows) +
  the regulariser's curvature + ``damping * I``. In projected coordinates the identity stays the
  identity: the projections are scaled so that E[P^T P] = I, so ``damping * I`` there estimates
  the full space's damping (measured in bench/layers.py: against the exact unprojected influence
  it agrees better than the subspace metric ``P P^T = (d/k) I``, which inflates the damping d/k-fold).
  Full, or block-diagonal over the curvature's groups (one per tracked layer, one for the head).
  The full matrix is solved in whichever form is smaller: the primal (dim x dim Cholesky) or, when
  there are fewer factor rows r than dimensions, the dual by Woodbury,
  ``(Lambda + F^T F / n)^-1 = Lambda^-1 - Lambda^-1 F^T (n I + F Lambda^-1 F^T)^-1 F Lambda^-1``
  (r x r Cholesky; Lambda = damping + regulariser, block-diagonal), so a projection can be as large
  as memory for the factors allows.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, List, Optional

import numpy as np
import torch

from ..errors import InstattrError

HESSIAN_STRUCTURES = ("auto", "full", "block")
FORMS = ("auto", "primal", "dual")
MAX_FULL_DIM = 20480  # "auto": one full matrix while min(dim, factor rows) is at most this, blocks above


@dataclass
class Curvature:
    """What a problem offers the solvers (each field optional; a solver names what it lacks)."""
    dim: int
    n: int
    hvp: Optional[Callable[[torch.Tensor, np.ndarray], torch.Tensor]] = None  # (V, rows) -> batch HVPs
    hessian: Optional[Callable[[], torch.Tensor]] = None       # full regularised Hessian (dim, dim)
    factors: Optional[torch.Tensor] = None                     # (rows, dim) Gauss-Newton factors
    blocks: Optional[List[slice]] = None                       # contiguous per-module slices
    regulariser: Optional[List[Optional[torch.Tensor]]] = None # per block: the penalty's curvature
    groups: Optional[List[slice]] = None                       # the block-diagonal Hessian's blocks


def _need(curvature: Curvature, what: str, solver: str):
    value = getattr(curvature, what)
    if value is None:
        raise InstattrError(f"{solver} needs the curvature's {what}")
    return value


def _cholesky(h: torch.Tensor, what: str) -> torch.Tensor:
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        low = float(torch.linalg.eigvalsh(h)[0])
        raise InstattrError(f"{what}: the damped Hessian is not positive definite (smallest eigenvalue "
                            f"{low:.3g}); increase damping")
    return chol


class InverseHVP(ABC):
    """Base: ``fit(curvature) -> self``; ``solve(V)``; ``whiten(V)`` where the solver can."""

    name = ""

    @abstractmethod
    def fit(self, curvature: Curvature) -> "InverseHVP":
        """Prepare to solve against ``curvature``."""

    @abstractmethod
    def solve(self, vectors: torch.Tensor) -> torch.Tensor:
        """The damped inverse Hessian (each solver's damping, see its docstring) applied to each row."""

    def quadratic(self, vectors: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
        """Row-wise ``v^T H^-1 v`` (float64), ``chunk`` rows at a time."""
        v = torch.as_tensor(vectors)
        out = torch.empty(len(v), dtype=torch.float64)
        for a in range(0, len(v), chunk):
            part = v[a:a + chunk]
            out[a:a + chunk] = (self.solve(part).double() * part.double()).sum(1)
        return out

    def whiten(self, vectors: torch.Tensor) -> torch.Tensor:
        raise InstattrError(f"{self.name} gives H^-1 v only, not H^-1/2 v; use the explicit or "
                            "Gauss-Newton solver for relative influence")


class _Factored(InverseHVP):
    """Solvers holding Cholesky factors of diagonal blocks (a single block = full)."""

    def _set(self, blocks: List[slice], chols: List[torch.Tensor], dim: int) -> None:
        self.blocks_, self.chols_, self.dim_ = blocks, chols, dim

    def _check(self, v: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "chols_"):
            raise RuntimeError(f"{self.name}: call fit before solve")
        v = torch.as_tensor(v)
        if v.dim() != 2 or v.shape[1] != self.dim_:
            raise InstattrError(f"{self.name}: vectors must be (m, {self.dim_}), got {tuple(v.shape)}")
        return v

    def solve(self, vectors):
        v = self._check(vectors)
        out = torch.empty_like(v)
        for s, chol in zip(self.blocks_, self.chols_):
            out[:, s] = torch.cholesky_solve(v[:, s].T.to(chol.dtype), chol).T.to(v.dtype)
        return out

    def whiten(self, vectors):
        v = self._check(vectors)
        out = torch.empty_like(v)
        for s, chol in zip(self.blocks_, self.chols_):
            out[:, s] = torch.linalg.solve_triangular(chol, v[:, s].T.to(chol.dtype), upper=False).T.to(v.dtype)
        return out


class ExplicitHessian(_Factored):
    """The autograd Hessian of the regularised full-batch loss plus ``damping * I``."""

    name = "explicit"

    def __init__(self, damping: float = 0.0):
        if not damping >= 0:
            raise InstattrError(f"damping must be >= 0, got {damping}")
        self.damping = float(damping)

    def fit(self, curvature: Curvature) -> "ExplicitHessian":
        h = _need(curvature, "hessian", self.name)().double()
        h = (h + h.T) / 2
        h.diagonal().add_(self.damping)
        self.hessian_ = h
        self._set([slice(0, curvature.dim)], [_cholesky(h, self.name)], curvature.dim)
        return self


class GaussNewton(_Factored):
    """Gauss-Newton (from per-example factors) + regulariser + damping, full or block-diagonal.

    ``form`` picks how the full matrix is solved: ``primal`` (dim x dim), ``dual`` (Woodbury over
    the factor rows; needs damping > 0 or a regulariser on every block, and gives no ``whiten``) or
    ``auto`` (the smaller of the two)."""

    name = "gauss-newton"

    def __init__(self, damping: float = 0.0, structure: str = "auto", max_full_dim: int = MAX_FULL_DIM,
                 chunk: int = 1024, form: str = "auto"):
        if not damping >= 0:
            raise InstattrError(f"damping must be >= 0, got {damping}")
        if structure not in HESSIAN_STRUCTURES:
            raise InstattrError(f"hessian must be one of {', '.join(HESSIAN_STRUCTURES)}, got {structure!r}")
        if form not in FORMS:
            raise InstattrError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
        self.damping, self.structure, self.form = float(damping), structure, form
        self.max_full_dim, self.chunk = int(max_full_dim), int(chunk)

    def fit(self, curvature: Curvature) -> "GaussNewton":
        f = _need(curvature, "factors", self.name)
        blocks = curvature.blocks or [slice(0, curvature.dim)]
        reg = curvature.regulariser or [None] * len(blocks)
        rows = len(f)
        full = self.structure == "full" or (self.structure == "auto"
                                            and min(curvature.dim, rows) <= self.max_full_dim)
        dual = full and (self.form == "dual" or (self.form == "auto" and rows < curvature.dim))
        if dual and self.damping == 0 and any(r is None for r in reg):
            if self.form == "dual":
                raise InstattrError(f"{self.name}: the dual form needs damping > 0")
            dual = False
        self.full_, self.dual_ = full, dual
        if dual:
            return self._fit_dual(curvature, f, blocks, reg)
        groups = [slice(0, curvature.dim)] if full else (curvature.groups or blocks)
        chols = []
        for g in groups:
            h = torch.zeros(g.stop - g.start, g.stop - g.start, dtype=torch.float64)
            for a in range(0, len(f), self.chunk):        # products in the factors' dtype, sums in float64
                part = f[a:a + self.chunk, g]
                h += (part.T @ part).double()
            h /= curvature.n
            for s, r in zip(blocks, reg):                  # regulariser blocks that fall inside g
                if r is not None and s.start >= g.start and s.stop <= g.stop:
                    i = slice(s.start - g.start, s.stop - g.start)
                    h[i, i] += r.double()
            h += self.damping * torch.eye(len(h), dtype=torch.float64)
            h = (h + h.T) / 2
            chols.append(_cholesky(h, self.name))
        self._set(groups, chols, curvature.dim)
        return self

    # ------------------------------------------------------------------ dual (Woodbury) form
    def _fit_dual(self, curvature: Curvature, f: torch.Tensor, blocks, reg) -> "GaussNewton":
        self.dim_, self.factors_ = curvature.dim, f
        self.lambda_inv_ = []             # (slice, inverse of damping I + R) per regularised block
        for s, r in zip(blocks, reg):
            if r is not None:
                lam = r.double() + self.damping * torch.eye(s.stop - s.start, dtype=torch.float64)
                self.lambda_inv_.append((s, torch.cholesky_inverse(_cholesky((lam + lam.T) / 2, self.name))))
        rows = len(f)
        k = torch.zeros(rows, rows, dtype=torch.float64)
        c = self.chunk
        for a in range(0, rows, c):                       # F Lambda^-1 F^T in float64, upper blocks
            left = self._lambda_inv(f[a:a + c].double())
            for b in range(a, rows, c):
                k[a:a + c, b:b + c] = left @ f[b:b + c].double().T
                if b > a:
                    k[b:b + c, a:a + c] = k[a:a + c, b:b + c].T   # exactly symmetric: no copy to symmetrise
        k.diagonal().add_(float(curvature.n))
        self.inner_ = _cholesky(k, self.name)
        return self

    def _lambda_inv(self, v: torch.Tensor) -> torch.Tensor:
        """Lambda^-1 v for rows v (float64): 1/damping, dense on the regularised blocks."""
        out = v / self.damping if self.damping > 0 else v.clone()
        for s, inv in self.lambda_inv_:
            out[:, s] = v[:, s] @ inv
        return out

    def _factors_times(self, w: torch.Tensor) -> torch.Tensor:
        """F w^T (rows, m) in float64, the factors converted ``chunk`` rows at a time."""
        f, c = self.factors_, self.chunk
        return torch.cat([f[a:a + c].double() @ w.T for a in range(0, len(f), c)])

    def solve(self, vectors):
        if not getattr(self, "dual_", False):
            return super().solve(vectors)
        v = torch.as_tensor(vectors)
        if v.dim() != 2 or v.shape[1] != self.dim_:
            raise InstattrError(f"{self.name}: vectors must be (m, {self.dim_}), got {tuple(v.shape)}")
        w = self._lambda_inv(v.double())
        f, c = self.factors_, self.chunk
        coef = torch.cholesky_solve(self._factors_times(w), self.inner_)   # M^-1 F Lambda^-1 v
        back = torch.zeros_like(w)
        for a in range(0, len(f), c):
            back += coef[a:a + c].T @ f[a:a + c].double()
        return (w - self._lambda_inv(back)).to(v.dtype)

    def quadratic(self, vectors, chunk: int = 2048):
        """Row-wise v^T H^-1 v; the dual form needs only u = F Lambda^-1 v, not H^-1 v itself."""
        if not getattr(self, "dual_", False):
            return super().quadratic(vectors, chunk)
        v = torch.as_tensor(vectors)
        out = torch.empty(len(v), dtype=torch.float64)
        for a in range(0, len(v), chunk):
            part = v[a:a + chunk].double()
            w = self._lambda_inv(part)
            u = self._factors_times(w)
            out[a:a + chunk] = (w * part).sum(1) - (u * torch.cholesky_solve(u, self.inner_)).sum(0)
        return out

    def whiten(self, vectors):
        if getattr(self, "dual_", False):
            raise InstattrError(f"{self.name}: the dual form gives H^-1 v, not H^-1/2 v; use solve and quadratic")
        return super().whiten(vectors)


class LiSSA(InverseHVP):
    """The stochastic recursion of Agarwal et al. as Koh & Liang's code (and the paper) ran it."""

    name = "lissa"

    def __init__(self, damping: float = 0.0, scale: float = 1e4, depth: int = 1000, repeats: int = 1,
                 batch_size: int = 8, seed: int = 0, tol: Optional[float] = None,
                 callback: Optional[Callable[[int, int, torch.Tensor], None]] = None):
        if not damping >= 0 or not scale > 0 or int(depth) < 1 or int(repeats) < 1 or int(batch_size) < 1:
            raise InstattrError("LiSSA needs damping >= 0, scale > 0 and depth, repeats, batch_size >= 1")
        self.damping, self.scale = float(damping), float(scale)
        self.depth, self.repeats, self.batch_size = int(depth), int(repeats), int(batch_size)
        self.seed, self.tol = int(seed), tol
        self.callback = callback   # callback(repeat, step, current estimate of (H + damping*scale)^-1 v)

    def fit(self, curvature: Curvature) -> "LiSSA":
        _need(curvature, "hvp", self.name)
        self.curvature_ = curvature
        return self

    def solve(self, vectors):
        if not hasattr(self, "curvature_"):
            raise RuntimeError("lissa: call fit before solve")
        v = torch.as_tensor(vectors)
        n, bs = self.curvature_.n, min(self.batch_size, self.curvature_.n)
        total = torch.zeros_like(v)
        self.steps_, self.last_change_ = [], []
        for r in range(self.repeats):
            g = torch.Generator().manual_seed(self.seed + r)
            perm, pos = torch.randperm(n, generator=g).numpy(), 0
            h = v.clone()
            change = float("inf")
            for step in range(1, self.depth + 1):
                if pos >= n:
                    perm, pos = torch.randperm(n, generator=g).numpy(), 0
                rows = perm[pos:pos + bs]
                pos += bs
                new = v + (1 - self.damping) * h - self.curvature_.hvp(h, rows) / self.scale
                if not torch.isfinite(new).all():
                    raise InstattrError("lissa diverged: raise scale above the largest Hessian eigenvalue, "
                                        "or damping so that H + damping*scale*I is positive definite")
                change = float((new - h).norm() / new.norm().clamp_min(1e-300))
                h = new
                if self.callback is not None:
                    self.callback(r, step, h / self.scale)
                if self.tol is not None and change < self.tol:
                    break
            self.steps_.append(step)
            self.last_change_.append(change)
            total += h / self.scale
        return total / self.repeats

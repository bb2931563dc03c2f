"""EK-FAC in the sketch space: the Gauss-Newton Hessian per tracked module in a Kronecker eigenbasis.

For a linear module the projected per-example gradient is a matrix ``G = sum_t s_t a_t^T``
(k_out x k_in; :mod:`instattr.layers.projection`'s Kronecker blocks, ``a_t = P_in x~_t`` the
projected input, ``s_t = P_out delta_t`` the projected output gradient). K-FAC (Martens & Grosse
2015) approximates the module's Gauss-Newton block by ``S (x) A`` with ``A = E[a a^T]`` over
tokens and ``S = E[s s^T]`` over tokens and the task's Gauss-Newton roots (a language model's
drawn tokens). EK-FAC (George et al. 2018; Grosse et al. 2023 for influence) keeps K-FAC's
eigenbasis ``Q_S (x) Q_A`` and refits the eigenvalues there, exactly for the sampled curvature:

    Lambda = (1/n) sum_{i, s} (Q_S^T G_is Q_A)^2          (elementwise, k_out x k_in)
    (H + lambda I)^-1 g  =  Q_S [ (Q_S^T G_g Q_A) / (Lambda + lambda) ] Q_A^T

with ``G_is`` row i's Gauss-Newton factor s as a matrix (the same factors the projected
Gauss-Newton solver uses, ``H = (1/n) F^T F``). The modules are independent blocks. The
eigenvalues' sum is ``trace(H)`` of that Gauss-Newton Hessian (a rotation keeps squared norms),
so a damping relative to the mean eigenvalue means the same for both. The scaling of A and S is
irrelevant: only their eigenvectors are used.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from ..errors import InstattrError

CHUNK = 4096      # factor rows rotated at a time while the eigenvalues are fitted


class EKFAC:
    """``solve(V)`` = ``(H + damping I)^-1 V`` row-wise and ``quadratic(V)`` = ``v^T (H + damping I)^-1 v``
    for H the eigenvalue-corrected K-FAC of the tracked modules (see the module docstring)."""

    full_ = False
    name = "ekfac"

    def __init__(self, damping: float):
        if not damping > 0:
            raise InstattrError(f"EK-FAC: damping must be > 0, got {damping}")
        self.damping = float(damping)
        self.blocks_: List[Tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def fit(self, blocks: Sequence[slice], covariances: Sequence[Tuple[torch.Tensor, torch.Tensor, int]],
            factors: torch.Tensor, n: int) -> "EKFAC":
        """``blocks``: each module's slice of the projected vector, laid out (k_out, k_in) row-major;
        ``covariances``: per module (sum a a^T, sum s s^T, tokens); ``factors`` (rows, dim): the
        Gauss-Newton factors; ``n``: the number of training rows."""
        if len(blocks) != len(covariances):
            raise InstattrError(f"EK-FAC: {len(blocks)} blocks but {len(covariances)} covariance pairs")
        for sl, (a, s, _) in zip(blocks, covariances):
            k_in, k_out = a.shape[0], s.shape[0]
            if k_in * k_out != sl.stop - sl.start:
                raise InstattrError(f"EK-FAC: a block of {sl.stop - sl.start} numbers is not {k_out} x {k_in}")
            q_a = torch.linalg.eigh(a.double())[1]
            q_s = torch.linalg.eigh(s.double())[1]
            lam = torch.zeros(k_out, k_in, dtype=torch.float64)
            s_t, a_t = q_s.T.to(factors.dtype), q_a.to(factors.dtype)      # rotated in the factors' precision
            for f in factors.split(CHUNK):
                lam += (s_t @ f[:, sl].reshape(-1, k_out, k_in) @ a_t).pow(2).sum(0, dtype=torch.float64)
            self.blocks_.append((sl, q_s, q_a, lam / n))
        return self

    @property
    def mean_eigenvalue(self) -> float:
        """``trace(H) / dim``."""
        total = sum(float(lam.sum()) for *_, lam in self.blocks_)
        return total / sum(lam.numel() for *_, lam in self.blocks_)

    def _rotated(self, v: torch.Tensor):
        for sl, q_s, q_a, lam in self.blocks_:
            k_out, k_in = lam.shape
            yield sl, q_s, q_a, lam, q_s.T @ v[:, sl].double().reshape(-1, k_out, k_in) @ q_a

    def solve(self, v: torch.Tensor) -> torch.Tensor:
        """(m, dim) float64: ``(H + damping I)^-1 v`` for each row."""
        out = torch.zeros(v.shape, dtype=torch.float64)
        for sl, q_s, q_a, lam, r in self._rotated(v):
            out[:, sl] = (q_s @ (r / (lam + self.damping)) @ q_a.T).reshape(len(v), -1)
        return out

    def quadratic(self, v: torch.Tensor) -> torch.Tensor:
        """(m,) float64: ``v^T (H + damping I)^-1 v`` for each row."""
        out = torch.zeros(len(v), dtype=torch.float64)
        for *_, lam, r in self._rotated(v):
            out += (r.pow(2) / (lam + self.damping)).sum((1, 2))
        return out

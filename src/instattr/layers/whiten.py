"""TrackStar's whitening: the inverse square root of a gradient autocorrelation, block by block.

TrackStar (Chang et al. 2024, "Scalable Influence and Fact Tracing for Large Language Model
Pretraining") scores ``cos(W g_q, W g_i)`` with ``g`` a row's optimizer-normalised projected
gradient and ``W = R^-1/2``, R the gradients' autocorrelation, block-diagonal over the tracked
modules (one block per module's projected slice):

    R_train = (1/n) sum_i g_i g_i^T       (the training rows)
    R_query = (1/m) sum_q g_q g_q^T       (a set of the task's queries)
    R = lam R_query + (1 - lam) R_train

Mixing in the queries' autocorrelation downweights the directions that many queries share (a
task's template, "X was born in"), so that what is particular to one query decides its matches.
``lam`` follows the paper's rule (its §A.1.3): pool every block's eigenvalues, sort those of
R_query and of R_train separately (descending), and choose lam so that the two curves cross at
component k, ``lam sigma_query[k] = (1 - lam) sigma_train[k]``, i.e.
``lam = sigma_train[k] / (sigma_query[k] + sigma_train[k])``: the queries' top k directions are
the ones weighed down. Without queries, R = R_train.

Each block is damped relatively, ``R_b + c mean(eig R_b) I`` (``mean(eig) = trace / size``), the
damping that :mod:`instattr.layers.ihvp`'s solvers use. The scores depend on W only through
``W g_q . W g_i = g_q^T (R + damping)^-1 g_i`` (before unit normalisation, an influence with the
autocorrelation, an empirical Fisher, as its Hessian), so any W with ``W^T W = (R + damping)^-1``
gives the same cosines; :class:`Whitener` takes ``W = L^-1`` with ``R + damping = L L^T`` its
Cholesky factor (float64), which costs a fraction of an eigendecomposition. The mixing needs only
eigenvalues: those of ``G^T G / rows`` are those of the smaller ``G G^T / rows`` (and zeros).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from ..errors import InstattrError

MAX_BLOCK = 8192     # a block's Cholesky factor and eigenvalues are cubic in its size


def _check(grads: torch.Tensor, blocks: Sequence[slice]) -> torch.Tensor:
    if len(grads) == 0:
        raise InstattrError("autocorrelation: no gradients")
    for b in blocks:
        if b.stop - b.start > MAX_BLOCK:
            raise InstattrError(f"autocorrelation: a block of {b.stop - b.start} numbers is above {MAX_BLOCK}; "
                                "project the gradients (a smaller proj_dim) or leave the whitening out")
    return grads.double()


def autocorrelations(grads: torch.Tensor, blocks: Sequence[slice]) -> List[torch.Tensor]:
    """Per block, ``(1/rows) G_b^T G_b`` in float64 for ``grads`` (rows, dim)."""
    g = _check(grads, blocks)
    return [g[:, b].T @ g[:, b] / len(g) for b in blocks]


def spectrum(grads: torch.Tensor, blocks: Sequence[slice],
             autocorrelation: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
    """The pooled eigenvalues of every block's ``(1/rows) G_b^T G_b``, sorted descending (each from
    whichever of ``G_b^T G_b`` (``autocorrelation`` when given) and ``G_b G_b^T`` is smaller; the
    missing ones are zeros)."""
    g = _check(grads, blocks)
    out = []
    for i, b in enumerate(blocks):
        x = g[:, b]
        if len(x) < x.shape[1]:
            small = x @ x.T / len(x)
        else:
            small = autocorrelation[i] if autocorrelation is not None else x.T @ x / len(x)
        values = torch.linalg.eigvalsh(small).clamp_min(0)
        out.append(torch.cat([values, values.new_zeros(max(x.shape[1] - len(values), 0))]))
    return torch.sort(torch.cat(out), descending=True).values


def mixing(query: torch.Tensor, train: torch.Tensor, components: int) -> float:
    """TrackStar's ``lam`` (module docstring) from the pooled sorted spectra of R_query and R_train
    (:func:`spectrum`): where ``lam R_query``'s and ``(1 - lam) R_train``'s cross at component
    ``components`` (1-based, capped at the dimension)."""
    if not isinstance(components, int) or components < 1:
        raise InstattrError(f"whitening: components must be a positive integer, got {components!r}")
    k = min(components, len(query)) - 1
    total = float(query[k] + train[k])
    return 0.5 if total <= 0 else float(train[k]) / total


class Whitener:
    """A ``W`` with ``W^T W = (R + damping)^-1`` per block (module docstring: ``L^-1``, L the
    Cholesky factor); call it on rows (m, dim)."""

    def __init__(self, blocks: Sequence[slice], autocorrelation: Sequence[torch.Tensor], damping: float):
        if not damping > 0:
            raise InstattrError(f"whitening: damping must be > 0, got {damping!r}")
        self.blocks, self.factors = list(blocks), []
        for r in autocorrelation:
            r = (r + r.T) / 2
            shift = damping * max(float(torch.diagonal(r).mean()), 1e-300)
            self.factors.append(torch.linalg.cholesky(r + shift * torch.eye(len(r), dtype=r.dtype)))

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        rows = rows.double()
        out = torch.empty_like(rows)
        for b, lower in zip(self.blocks, self.factors):        # L^-1 x for each row x
            out[:, b] = torch.linalg.solve_triangular(lower, rows[:, b].T, upper=False).T
        return out

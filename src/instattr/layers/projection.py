"""Per-example projected gradients of tracked linear modules, from hooks in the model's own forward.

For a linear module with inputs ``x_t`` and output-gradients ``delta_t`` at tokens t, one example's
weight gradient is ``sum_t delta_t x~_t^T`` (``x~ = [x, 1]`` folds the bias in; GPT-2's ``Conv1D``
stores the same matrix transposed). Projecting the two sides separately with seeded matrices
``P_out`` (k_out x d_out) and ``P_in`` (k_in x d_in+1) gives

    P_out G P_in^T = sum_t (P_out delta_t)(P_in x~_t)^T        (k_out x k_in per example)

which is ``(P_out (x) P_in) vec(G)`` computed without ever forming G (LoGra's Kronecker sketch;
the default ``khatri-rao`` sketch below keeps the same two side projections and combines them
row by row). A forward hook on each tracked module stores ``P_in x~_t`` and keeps its output;
after the forward pass, ``torch.autograd.grad`` of each of the task's scalars
(:mod:`instattr.task`) with respect to those outputs gives the ``delta_t``. Only the tracked
modules' weights require gradients while it runs, so the backward pass goes down to the lowest
tracked module and no further, and the parameters' own gradients are never computed. The model
runs its real forward with its own masks, positions, rotary embeddings and norms; a module
called twice in one forward (the encoder of a siamese pair) contributes both calls.

The final layer (the module whose output is the logits) is kept exact in the task's output basis
when one is given (a classifier's sum-zero class basis Q: its gradients ``e (x) f`` have ``e``
summing to zero, so ``Q^T e (x) f`` has the same inner products, and the L2 term acts on it as
``2 lambda I``).

Projections (``kind``), all scaled so that E[P^T P] = I (inner products are unbiased):

- ``khatri-rao`` (default): k^2 independent rank-one sketches per linear module, entry r being
  ``sum_t (p_r . delta_t)(q_r . x~_t) / k`` with Rademacher vectors p_r, q_r: the row-wise
  (Khatri-Rao) product of the two side projections instead of their Kronecker product. It still
  projects the two sides separately and never forms G, and costs k^2 d (not k d) multiply-adds per
  side of width d and token. Its entries carry independent noise, while the k^2 entries of a
  Kronecker block share 2k random vectors: against the exact influence (bench/layers.py ``ggn``)
  a Kronecker sketch agrees about as well as a Khatri-Rao one with 4x fewer numbers.
- ``orthogonal``: LoGra's Kronecker ``P_out G P_in^T``, each side orthonormal rows of a random
  subspace scaled by sqrt(d/k); at k = d an exact rotation, which reproduces the unprojected
  influence exactly.
- ``gaussian``: the same Kronecker with N(0, 1/k) entries, as TRAK and LoGra.

``dim=None`` keeps every block exact.

K-FAC's two factors in the sketch space (:meth:`GradientProjector.collect_covariances`): for a
Kronecker block (``orthogonal``, ``gaussian`` or exact) the projected gradient is
``sum_t s_t a_t^T`` with ``a_t = P_in x~_t`` and ``s_t = P_out delta_t``, so while they are
collected each call also adds ``sum_t a_t a_t^T`` over the batch's real tokens (its attention mask)
and ``sum_t s_t s_t^T`` over the task's Gauss-Newton roots (a language model's drawn tokens) to
per-module sums (:mod:`instattr.layers.ekfac` takes their eigenvectors).
"""
from __future__ import annotations

import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..errors import InstattrError
from ..models.modules import Tracked, linear_shape

KINDS = ("khatri-rao", "orthogonal", "gaussian")


def projection_matrix(k: int, d: int, kind: str, seed: int, tag: str, dtype: torch.dtype) -> torch.Tensor:
    """A seeded (k, d) projection; the stream depends only on (seed, tag, k, d, kind)."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{tag}:{k}:{d}:{kind}".encode()))
    if kind == "rademacher":
        return (torch.randint(0, 2, (k, d), generator=g, dtype=torch.float64) * 2 - 1).to(dtype)
    if kind == "gaussian":
        return (torch.randn(k, d, generator=g, dtype=torch.float64) / np.sqrt(k)).to(dtype)
    if kind == "orthogonal":
        q, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
        return (q.T * np.sqrt(d / k)).to(dtype)
    raise InstattrError(f"projection must be one of {', '.join(KINDS)}, got {kind!r}")


@dataclass
class Block:
    """One tracked module's slice of the projected gradient."""
    name: str
    module: nn.Module
    group: str                         # "block{i}" or "head": the Hessian's diagonal blocks
    dim: int
    bias: bool
    p_out: Optional[torch.Tensor] = None   # (k_out, d_out); None = identity
    p_in: Optional[torch.Tensor] = None    # (k_in, d_in [+1]); None = identity
    rank_one: bool = False                 # p_out, p_in (R, d) give R entries p_r G q_r
    exact: bool = False                    # the final layer, exact in the task's output basis
    inputs: list = field(default_factory=list, repr=False)
    outputs: list = field(default_factory=list, repr=False)
    shared: list = field(default_factory=list, repr=False)     # per call: not one row per example
    out_scale: Optional[torch.Tensor] = None   # (d_out,) and (d_in [+1],): the gradient is multiplied
    in_scale: Optional[torch.Tensor] = None    # elementwise by their outer product (see scale)


def _weights(module: nn.Module) -> List[torch.Tensor]:
    return [p for _, p in module.named_parameters(recurse=False)]


@contextmanager
def tracking(module: nn.Module, tracked: Sequence[nn.Module]):
    """While inside: only the ``tracked`` modules' own parameters require gradients (so their
    outputs carry a graph down to the lowest of them), restored on leaving."""
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        for m in tracked:
            for p in _weights(m):
                p.requires_grad_(True)
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


class GradientProjector:
    """Projected per-example Jacobians of a task's scalars over tracked modules of ``module``.

    ``project(batch)`` returns ``(out, J)``: the forward pass's output (``out.logits``,
    ``out.features``) and J (B, R, dim), row r of J_i the projected gradient of the task's scalar r
    of example i. Blocks are laid out as tracked (block by block, the head last). ``exact_basis`` (C, R), when
    given, keeps the module ``final`` exact in that output basis.
    """

    def __init__(self, module: nn.Module, tracked: Sequence[Tracked], task, dim: Optional[int], seed: int = 0,
                 kind: str = "khatri-rao", final: Optional[str] = None, exact_basis: Optional[torch.Tensor] = None):
        if dim is not None and int(dim) < 1:
            raise InstattrError(f"proj_dim must be a positive integer or None, got {dim}")
        if kind not in KINDS:
            raise InstattrError(f"projection must be one of {', '.join(KINDS)}, got {kind!r}")
        if not tracked:
            raise InstattrError(f"{type(module).__name__}: no module is tracked (--layers 0 and no head, or --modules "
                                "matched none)")
        self.module, self.task = module, task
        self.k, self.seed, self.kind = None if dim is None else int(dim), int(seed), kind
        first = next(iter(module.parameters()))
        self.dtype, self.device = first.dtype, first.device
        self.blocks: List[Block] = []
        for t in tracked:
            mod = module.get_submodule(t.name)
            exact = None if t.name != final or exact_basis is None else exact_basis.T.to(self.device, self.dtype)
            self.blocks.append(self._block(t, mod, exact))
        self.offsets = np.cumsum([0] + [b.dim for b in self.blocks])
        self._covariances: Optional[Dict[str, list]] = None      # collect_covariances(): name -> [A, S, tokens]

    def _block(self, t: Tracked, mod: nn.Module, exact: Optional[torch.Tensor]) -> Block:
        d_in, d_out, bias = linear_shape(mod)
        d_in += bias
        if exact is not None:          # the final layer: exact, in the task's output basis
            return Block(t.name, mod, t.group, exact.shape[0] * d_in, bias, p_out=exact.contiguous(), exact=True)
        if self.k is None:
            return Block(t.name, mod, t.group, d_out * d_in, bias)
        if self.kind == "khatri-rao":    # R rank-one sketches, each side scaled by R^-1/4
            r = min(self.k ** 2, d_out * d_in)
            scale = r ** -0.25
            return Block(t.name, mod, t.group, r, bias, rank_one=True,
                         p_out=self._matrix(r, d_out, "rademacher", t.name + ":out") * scale,
                         p_in=self._matrix(r, d_in, "rademacher", t.name + ":in") * scale)
        k_out, k_in = min(self.k, d_out), min(self.k, d_in)
        return Block(t.name, mod, t.group, k_out * k_in, bias,
                     p_out=self._matrix(k_out, d_out, self.kind, t.name + ":out"),
                     p_in=self._matrix(k_in, d_in, self.kind, t.name + ":in"))

    def scale(self, scales: Dict[str, Tuple[torch.Tensor, torch.Tensor]]) -> "GradientProjector":
        """Multiply each named module's weight gradient ``G`` (d_out x d_in [+1], the bias a last
        column) elementwise by ``a b^T`` before it is projected, for ``scales[name] = (a, b)``:
        ``a`` scales the output gradients and ``b`` the inputs, so the sketch still never forms G
        (a factored normaliser, e.g. an optimizer's second moments, :func:`instattr.lm.adam_scales`)."""
        for b in self.blocks:
            if b.name in scales:
                a, c = scales[b.name]
                b.out_scale, b.in_scale = a.to(self.device, self.dtype), c.to(self.device, self.dtype)
        return self

    def collect_covariances(self) -> "GradientProjector":
        """From now on every :meth:`project` adds its tokens' ``a a^T`` and its Gauss-Newton roots'
        ``s s^T`` per module (see the module docstring); :meth:`covariances` returns the sums.
        Kronecker blocks only: the Khatri-Rao sketch has no two factors."""
        rank_one = [b.name for b in self.blocks if b.rank_one or b.exact]
        if rank_one:
            raise InstattrError(f"{rank_one[0]}: the {self.kind} sketch has no Kronecker factors; EK-FAC needs "
                                "--projection orthogonal or gaussian (or --proj-dim 0)")
        self._covariances = {b.name: [0.0, 0.0, 0] for b in self.blocks}
        return self

    @property
    def collecting(self) -> bool:
        return self._covariances is not None

    def covariances(self, restart: bool = False) -> List[Tuple[torch.Tensor, torch.Tensor, int]]:
        """Per block, (sum of a a^T (k_in, k_in), sum of s s^T (k_out, k_out), tokens) collected so far,
        float64 on the CPU; collecting stops (``restart``: goes on from zero, and a block no token
        reached gives zeros)."""
        if self._covariances is None:
            raise InstattrError("covariances: collect_covariances() was not called")
        out = []
        for b in self.blocks:
            a, g, t = self._covariances[b.name]
            if t == 0 and not restart:
                raise InstattrError(f"{b.name}: no token reached it while covariances were collected")
            out.append((torch.as_tensor(a).cpu(), torch.as_tensor(g).cpu(), int(t)))
        self._covariances = {b.name: [0.0, 0.0, 0] for b in self.blocks} if restart else None
        return out

    def add_covariances(self, sums: List[Tuple[torch.Tensor, torch.Tensor, int]]) -> None:
        """Add sums :meth:`covariances` gave elsewhere (a worker's batch) to those collected here."""
        for b, (a, g, t) in zip(self.blocks, sums):
            acc = self._covariances[b.name]
            acc[0], acc[1], acc[2] = acc[0] + a, acc[1] + g, acc[2] + t

    def _out_side(self, block: Block, g: torch.Tensor) -> torch.Tensor:
        """Output gradients (B, T, d_out) scaled and projected: ``P_out delta_t``."""
        if g.dim() == 2:
            g = g[:, None]
        if block.out_scale is not None:
            g = g * block.out_scale
        return g if block.p_out is None else g @ block.p_out.T

    def _add_covariances(self, out, task, batch: Dict[str, torch.Tensor], kept: Dict[tuple, dict]) -> None:
        """Add this batch's token sums (``kept[(block, call)][scalar]``: its projected output gradients)."""
        roots = task.curvature_roots(out).to(self.dtype)                     # (B, S, R)
        mask = batch.get("attention_mask")
        for (i, c), per in kept.items():
            b = self.blocks[i]
            x = b.inputs[c]                                                  # (B, T, k_in)
            m = mask.to(x.device, x.dtype)[..., None] if mask is not None and mask.shape == x.shape[:2] else \
                torch.ones_like(x[..., :1])
            g = torch.stack([per.get(r, torch.zeros_like(next(iter(per.values())))) for r in range(roots.shape[2])], 1)
            s = torch.einsum("bsr,brto->bsto", roots.to(g.device), g)
            acc = self._covariances[b.name]                                  # float64, on the CPU
            acc[0] = acc[0] + torch.einsum("bti,btj->ij", x * m, x).double().cpu()
            acc[1] = acc[1] + torch.einsum("bsto,bstp->op", s, s).double().cpu()
            acc[2] += int(m.sum())

    def _matrix(self, k: int, d: int, kind: str, tag: str) -> torch.Tensor:
        return projection_matrix(k, d, kind, self.seed, tag, self.dtype).to(self.device)

    @property
    def dim(self) -> int:
        return int(self.offsets[-1])

    def groups(self) -> Dict[str, slice]:
        """Contiguous slices of the projected vector per Hessian block (tracked block or head)."""
        out: Dict[str, List[int]] = {}
        for b, a, z in zip(self.blocks, self.offsets[:-1], self.offsets[1:]):
            out.setdefault(b.group, []).extend([int(a), int(z)])
        return {g: slice(min(v), max(v)) for g, v in out.items()}

    def block_slices(self) -> List[slice]:
        return [slice(int(a), int(z)) for a, z in zip(self.offsets[:-1], self.offsets[1:])]

    # ------------------------------------------------------------------ hooks
    def _hook(self, block: Block, batch_size: int):
        def hook(mod, inputs, output):
            x = inputs[0].detach()
            shared = x.shape[0] != batch_size      # e.g. (positions, d): rows that are no example's own
            if x.dim() == 2:          # (B, d) per example; a shared (rows, d) input is one "example" of rows
                x = x[None] if shared else x[:, None]
            if block.bias:
                x = torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)
            if block.in_scale is not None:
                x = x * block.in_scale
            block.inputs.append(x if block.p_in is None else x @ block.p_in.T)
            block.outputs.append(output)
            block.shared.append(shared)
        return hook

    def _contribution(self, block: Block, call: int, g: torch.Tensor, row: Optional[int] = None) -> torch.Tensor:
        """The call's projected weight gradient for every row of the batch (``row``: for that row
        alone, from the gradient of its scalar only)."""
        x = block.inputs[call]
        if block.shared[call]:                     # one set of rows, whatever the example
            g = g.reshape(1, -1, g.shape[-1])
        elif row is not None:
            x, g = x[row:row + 1], (g[:, None] if g.dim() == 2 else g)[row:row + 1]
        return self._combine(block, x, self._out_side(block, g))

    @staticmethod
    def _combine(block: Block, x: torch.Tensor, gp: torch.Tensor) -> torch.Tensor:
        """Per row, the sketch of ``sum_t gp_t x_t^T`` (Khatri-Rao entries or the Kronecker block)."""
        if block.rank_one:
            return (gp * x).sum(1)
        return torch.einsum("bto,bti->boi", gp, x).reshape(len(gp), -1)

    def project(self, batch: Dict[str, torch.Tensor], task=None) -> Tuple[object, torch.Tensor]:
        """The forward pass's output and J (B, R, dim), R the scalars of ``task`` (default: the
        projector's). A tracked module called on something that
        is not one row per example (DeBERTa's relative position embeddings go through its query and
        key projections) gets one gradient for the whole batch, so then each example's scalars are
        differentiated on their own (B * R backward passes instead of R)."""
        module = self.module
        n = len(next(iter(batch.values())))
        handles = [b.module.register_forward_hook(self._hook(b, n)) for b in self.blocks]
        try:
            with tracking(module, [b.module for b in self.blocks]), torch.enable_grad():
                out = module(**{k: v.to(self.device) for k, v in batch.items()})
                scalars = (task or self.task).scalars(out)
                calls = [(i, c, o) for i, b in enumerate(self.blocks) for c, o in enumerate(b.outputs)]
                outputs = [o for _, _, o in calls]
                r = scalars.shape[1]
                rows = torch.zeros(len(scalars), r, self.dim, dtype=scalars.dtype, device=scalars.device)
                apart = any(s for b in self.blocks for s in b.shared)
                collect = self._covariances is not None and getattr(task or self.task, "n_roots", 0) > 0 and \
                    getattr(task or self.task, "has_roots", r > 1)
                if collect and apart:
                    raise InstattrError("EK-FAC: a tracked module is called on rows shared by the batch; use the "
                                        "projected Gauss-Newton Hessian")
                kept: Dict[tuple, dict] = {}
                targets = [(None, k) for k in range(r)] if not apart else [(j, k) for j in range(n) for k in range(r)]
                for t, (j, k) in enumerate(targets):
                    value = scalars[:, k].sum() if j is None else scalars[j, k]
                    grads = torch.autograd.grad(value, outputs, retain_graph=t < len(targets) - 1, allow_unused=True)
                    for (i, c, _), g in zip(calls, grads):
                        if g is not None:
                            b, a = self.blocks[i], int(self.offsets[i])
                            if j is None:
                                gp = self._out_side(b, g.detach())
                                if collect:
                                    kept.setdefault((i, c), {})[k] = gp
                                rows[:, k, a:a + b.dim] += self._combine(b, b.inputs[c], gp)
                            else:
                                rows[j, k, a:a + b.dim] += self._contribution(b, c, g.detach(), j)[0]
                if collect:
                    self._add_covariances(out, task or self.task, batch, kept)
        finally:
            for h in handles:
                h.remove()
            for b in self.blocks:
                b.inputs, b.outputs, b.shared = [], [], []
        return _detached(out), rows

    def gradients(self, batch: Dict[str, torch.Tensor], labels: torch.Tensor, factors: bool, query: bool = False):
        """One padded batch's projected gradients (B, dim) -- of the training loss at ``labels``,
        or with ``query`` of minus the measurement there -- its Gauss-Newton factors (B, S, dim)
        or None, and the recomputed final-layer inputs (B, d), on the CPU in the module's dtype."""
        out, jac = self.project(batch)
        task = self.task
        coef = task.query_coefficients(out, labels) if query else task.train_coefficients(out, labels)
        jac = jac.cpu()
        grads = torch.einsum("br,brd->bd", coef.cpu().to(self.dtype), jac)
        facs = torch.einsum("bsr,brd->bsd", task.curvature_roots(out).cpu().to(self.dtype), jac) if factors else None
        return grads, facs, out.features.cpu()


def _detached(out):
    """The forward pass's output with its tensors cut from the graph."""
    from dataclasses import fields, replace
    return replace(out, **{f.name: getattr(out, f.name).detach() for f in fields(out)
                           if isinstance(getattr(out, f.name), torch.Tensor)})

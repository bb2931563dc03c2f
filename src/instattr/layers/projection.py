"""Per-example projected gradients through each layer's outer-product structure (LoGra-style).

For an ``nn.Linear`` with inputs ``x_t`` and output-gradients ``delta_t`` at tokens t, one example's
weight gradient is ``sum_t delta_t x~_t^T`` (``x~ = [x, 1]`` folds the bias in). Projecting the two
sides separately with seeded matrices ``P_out`` (k_out x d_out) and ``P_in`` (k_in x d_in+1) gives

    P_out G P_in^T = sum_t (P_out delta_t)(P_in x~_t)^T        (k_out x k_in per example)

which is ``(P_out (x) P_in) vec(G)`` computed without ever forming G (LoGra's Kronecker sketch;
the default ``khatri-rao`` sketch below keeps the same two side projections and combines them
row by row). Forward hooks store
``P_in x~_t``, tensor hooks on the module outputs receive ``delta_t``. A LayerNorm's gradient
(``sum_t delta_t * xhat_t`` for the scale, ``sum_t delta_t`` for the shift) is formed exactly
(2 x hidden numbers) and projected by one dense matrix. The head's last linear layer is kept
exact in the sum-zero class basis Q (its gradients ``e (x) f`` have ``e`` summing to zero, so
``Q^T e (x) f`` has the same inner products, and the L2 term acts on it as ``2 lambda I``).

Projections (``kind``), all scaled so that E[P^T P] = I (inner products are unbiased):

- ``khatri-rao`` (default): k^2 independent rank-one sketches per linear layer, entry r being
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

``dim=None`` keeps every block exact. LayerNorm gradients get one dense sketch of k^2 numbers.
Only the (C-1) reduced logit directions are back-propagated; the parameters' own gradients are
never computed (the backward pass runs to the inputs only).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ..errors import InstattrError
from ..methods.lastlayer import sum_zero_basis
from ..models.tracked import TrackedModel

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


def _dense_kind(kind: str) -> str:
    """The distribution of the dense (LayerNorm) sketches for a projection kind."""
    return "gaussian" if kind == "gaussian" else "orthogonal"


@dataclass
class Block:
    """One module's slice of the projected gradient."""
    name: str
    kind: str                          # "linear" or "layernorm"
    module: nn.Module
    group: str                         # "layer{i}" or "head": the Hessian's diagonal blocks
    params: List[str]
    dim: int
    p_out: Optional[torch.Tensor] = None   # linear: (k_out, d_out); None = identity
    p_in: Optional[torch.Tensor] = None    # linear: (k_in, d_in [+1]); None = identity
    p: Optional[torch.Tensor] = None       # layernorm: (k, n_params); None = identity
    rank_one: bool = False                 # linear: p_out, p_in (R, d) give R entries p_r G q_r
    inputs: list = field(default_factory=list, repr=False)
    acc: Optional[torch.Tensor] = field(default=None, repr=False)


class GradientProjector:
    """Projected per-example Jacobians of the reduced logits of a :class:`TrackedModel`.

    ``project(batch)`` returns ``(logits (B, C), features (B, d), J (B, C-1, dim))``; row k of J_i
    is the projected gradient of ``Q[:, k] . logits_i``. Blocks are laid out in module order.
    """

    def __init__(self, model: TrackedModel, dim: Optional[int], seed: int = 0, kind: str = "khatri-rao"):
        if dim is not None and int(dim) < 1:
            raise InstattrError(f"proj_dim must be a positive integer or None, got {dim}")
        if kind not in KINDS:
            raise InstattrError(f"projection must be one of {', '.join(KINDS)}, got {kind!r}")
        self.model, self.k, self.seed, self.kind = model, None if dim is None else int(dim), int(seed), kind
        dtype = model.dtype
        self.device = model.device
        self.basis = torch.as_tensor(sum_zero_basis(model.n_classes), dtype=dtype, device=self.device)   # (C, C-1)
        self.blocks: List[Block] = []
        covered = set()
        for name, mod in model.named_modules():
            own = [n for n, _ in mod.named_parameters(recurse=False)]
            if not own:
                continue
            full = [f"{name}.{n}" for n in own]
            covered.update(full)
            group = model.layer_of(full[0])
            if isinstance(mod, nn.Linear):
                self.blocks.append(self._linear(name, mod, group, full, dtype))
            elif isinstance(mod, nn.LayerNorm):
                n = sum(p.numel() for p in mod.parameters(recurse=False))
                k = n if self.k is None else min(self.k ** 2, n)
                p = None if self.k is None else self._matrix(k, n, _dense_kind(kind), name, dtype)
                self.blocks.append(Block(name, "layernorm", mod, group, full, k, p=p))
            else:
                raise InstattrError(f"layered methods project nn.Linear and nn.LayerNorm parameters; "
                                    f"{name} is a {type(mod).__name__} with parameters")
        missing = set(model.parameter_names()) - covered
        if missing:
            raise InstattrError(f"parameters without a projection block: {sorted(missing)[:3]}")
        self.offsets = np.cumsum([0] + [b.dim for b in self.blocks])

    def _linear(self, name: str, mod: nn.Linear, group: str, params: List[str], dtype) -> Block:
        d_out, d_in = mod.out_features, mod.in_features + (mod.bias is not None)
        if mod is self.model.final:   # exact, in the sum-zero basis of the classes
            return Block(name, "linear", mod, group, params, (d_out - 1) * d_in, p_out=self.basis.T.contiguous())
        if self.k is None:
            return Block(name, "linear", mod, group, params, d_out * d_in)
        if self.kind == "khatri-rao":    # R rank-one sketches, each side scaled by R^-1/4
            r = min(self.k ** 2, d_out * d_in)
            scale = r ** -0.25
            return Block(name, "linear", mod, group, params, r, rank_one=True,
                         p_out=self._matrix(r, d_out, "rademacher", name + ":out", dtype) * scale,
                         p_in=self._matrix(r, d_in, "rademacher", name + ":in", dtype) * scale)
        k_out, k_in = min(self.k, d_out), min(self.k, d_in)
        return Block(name, "linear", mod, group, params, k_out * k_in,
                     p_out=self._matrix(k_out, d_out, self.kind, name + ":out", dtype),
                     p_in=self._matrix(k_in, d_in, self.kind, name + ":in", dtype))

    def _matrix(self, k: int, d: int, kind: str, tag: str, dtype) -> torch.Tensor:
        return projection_matrix(k, d, kind, self.seed, tag, dtype).to(self.device)

    @property
    def dim(self) -> int:
        return int(self.offsets[-1])

    def groups(self) -> Dict[str, slice]:
        """Contiguous slices of the projected vector per Hessian block (tracked layer or head)."""
        out: Dict[str, List[int]] = {}
        for b, a, z in zip(self.blocks, self.offsets[:-1], self.offsets[1:]):
            out.setdefault(b.group, []).extend([int(a), int(z)])
        return {g: slice(min(v), max(v)) for g, v in out.items()}

    # ------------------------------------------------------------------ hooks
    def _forward_hook(self, block: Block):
        def hook(mod, inputs, output):
            x = inputs[0].detach()
            if x.dim() == 2:
                x = x[:, None]
            if block.kind == "linear":
                if mod.bias is not None:
                    x = torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)
                stored = x if block.p_in is None else x @ block.p_in.T
            else:
                stored = torch.nn.functional.layer_norm(x, mod.normalized_shape, eps=mod.eps)
            call = len(block.inputs)
            block.inputs.append(stored)
            if output.requires_grad:
                output.register_hook(lambda g, b=block, c=call: self._backward(b, c, g))
        return hook

    def _backward(self, block: Block, call: int, g: torch.Tensor) -> None:
        g = g.detach()
        if g.dim() == 2:
            g = g[:, None]
        x = block.inputs[call]
        if block.kind == "linear":
            gp = g if block.p_out is None else g @ block.p_out.T
            if block.rank_one:
                contrib = (gp * x).sum(1)
            else:
                contrib = torch.einsum("bto,bti->boi", gp, x).reshape(len(g), -1)
        else:
            parts = [(g * x).sum(1)] if block.module.weight is not None else []
            if block.module.bias is not None:
                parts.append(g.sum(1))
            contrib = torch.cat(parts, dim=-1)
            if block.p is not None:
                contrib = contrib @ block.p.T
        block.acc = contrib if block.acc is None else block.acc + contrib

    def project(self, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        model = self.model
        handles = [b.module.register_forward_hook(self._forward_hook(b)) for b in self.blocks]
        flags = [p.requires_grad for p in model.parameters()]
        features: List[torch.Tensor] = []
        handles.append(model.final.register_forward_hook(lambda m, i, o: features.append(i[0].detach())))
        try:
            for p in model.parameters():
                p.requires_grad_(False)
            inputs = [batch[k].detach().to(model.device).requires_grad_(True) for k in ("h", "h2") if k in batch]
            kwargs = dict(batch)
            kwargs["h"] = inputs[0]
            if len(inputs) > 1:
                kwargs["h2"] = inputs[1]
            with torch.enable_grad():
                logits = model(**kwargs)
                reduced = logits @ self.basis
                r = reduced.shape[1]
                rows = torch.zeros(len(logits), r, self.dim, dtype=logits.dtype, device=logits.device)
                for k in range(r):
                    for b in self.blocks:
                        b.acc = None
                    torch.autograd.grad(reduced[:, k].sum(), inputs, retain_graph=k < r - 1, allow_unused=True)
                    for b, a, z in zip(self.blocks, self.offsets[:-1], self.offsets[1:]):
                        if b.acc is not None:
                            rows[:, k, a:z] = b.acc
        finally:
            for h in handles:
                h.remove()
            for p, f in zip(model.parameters(), flags):
                p.requires_grad_(f)
            for b in self.blocks:
                b.inputs, b.acc = [], None
        return logits.detach(), features[0], rows

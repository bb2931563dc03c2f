"""Exact gradients over the tracked modules' parameters: per example, Hessian-vector products and
small Hessians (the unprojected ``ihvp="lissa"`` and ``"explicit"`` paths, and tests).

The model runs its own forward (:meth:`instattr.models.Classifier.module`) with only the tracked
parameters requiring gradients. Per-example gradients are one backward pass per example (each
example alone, so padding never enters); the regularised (mini)batch loss is the task's mean loss
plus ``l2 * ||p||^2`` over the final layer's parameters when the final layer is tracked. Double
backward runs through eager attention (:func:`eager`): fused attention kernels may not support it.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from ..models.modules import Tracked
from .projection import tracking

Batch = Dict[str, torch.Tensor]


class FlatParameters:
    """The tracked modules' own parameters as one flat vector (``names`` in module order)."""

    def __init__(self, module: nn.Module, tracked: Sequence[Tracked], final: Optional[str] = None):
        self.module = module
        self.modules = [module.get_submodule(t.name) for t in tracked]
        self.names: List[str] = []
        self.params: List[torch.Tensor] = []
        for t, m in zip(tracked, self.modules):
            for n, p in m.named_parameters(recurse=False):
                self.names.append(f"{t.name}.{n}")
                self.params.append(p)
        self.penalized = [p for t, m in zip(tracked, self.modules) if t.name == final for p in m.parameters()]
        self.sizes = [p.numel() for p in self.params]

    @property
    def dim(self) -> int:
        return int(sum(self.sizes))

    def flatten(self, tensors) -> torch.Tensor:
        return torch.cat([t.reshape(-1) for t in tensors])

    def on_device(self, batch: Batch, labels: torch.Tensor):
        """``batch`` and ``labels`` moved to the device of the tracked parameters."""
        device = self.params[0].device
        return {k: v.to(device) for k, v in batch.items()}, labels.to(device)


@contextmanager
def eager(module: nn.Module):
    """Eager attention for every config inside ``module`` while inside (double backward)."""
    configs, seen = [], set()
    for sub in module.modules():
        cfg = getattr(sub, "config", None)
        if cfg is not None and id(cfg) not in seen and hasattr(cfg, "_attn_implementation"):
            seen.add(id(cfg))
            configs.append((cfg, cfg._attn_implementation))
    try:
        for cfg, _ in configs:
            cfg._attn_implementation = "eager"
        yield
    finally:
        for cfg, was in configs:
            cfg._attn_implementation = was


def alone(batch: Batch, i: int) -> Batch:
    """Row ``i`` of a right-padded batch, its padding cut off (each side by its own attention mask)."""
    out = {}
    for k, v in batch.items():
        side = k[-1] if k[-1].isdigit() else ""
        mask = batch.get("attention_mask" + side)
        row = v[i:i + 1]
        out[k] = row[:, :int(mask[i].sum())] if mask is not None and row.dim() == 2 else row
    return out


def regularised_loss(task, flat: FlatParameters, batch: Batch, labels: torch.Tensor, l2: float) -> torch.Tensor:
    """Mean task loss over the batch plus ``l2 * ||p||^2`` on the tracked final layer."""
    batch, labels = flat.on_device(batch, labels)
    out = flat.module(**batch)
    loss = task.loss(out, labels).mean()
    if flat.penalized:
        loss = loss + l2 * sum((p ** 2).sum() for p in flat.penalized)
    return loss


def per_example_grads(task, flat: FlatParameters, batch: Batch, labels: torch.Tensor,
                      query: bool = False) -> torch.Tensor:
    """(B, dim): the gradient of each example's loss (``query``: of minus its measurement)."""
    rows = []
    batch, labels = flat.on_device(batch, labels)
    n = len(next(iter(batch.values())))
    with tracking(flat.module, flat.modules), torch.enable_grad():
        for i in range(n):
            out = flat.module(**alone(batch, i))
            y = labels[i:i + 1]
            value = -task.measurement(out, y).sum() if query else task.loss(out, y).sum()
            rows.append(flat.flatten(torch.autograd.grad(value, flat.params)))
    return torch.stack(rows)


def hvp(task, flat: FlatParameters, batch: Batch, labels: torch.Tensor, vectors: torch.Tensor,
        l2: float) -> torch.Tensor:
    """(m, dim) Hessian-vector products of the regularised batch loss: one forward, one
    differentiable backward, then one double-backward per vector (Pearlmutter)."""
    with tracking(flat.module, flat.modules), eager(flat.module), torch.enable_grad():
        loss = regularised_loss(task, flat, batch, labels, l2)
        g = flat.flatten(torch.autograd.grad(loss, flat.params, create_graph=True))
        out = torch.empty(len(vectors), flat.dim, dtype=g.dtype, device=g.device)
        for i, v in enumerate(vectors):
            h = torch.autograd.grad(g, flat.params, v.to(g.device, g.dtype), retain_graph=i < len(vectors) - 1)
            out[i] = flat.flatten(h)
    return out.cpu()


def batch_hessian(task, flat: FlatParameters, batch: Batch, labels: torch.Tensor, l2: float) -> torch.Tensor:
    """(dim, dim) Hessian of the regularised batch loss, one double-backward row at a time (tiny models)."""
    return hvp(task, flat, batch, labels, torch.eye(flat.dim, dtype=flat.params[0].dtype), l2)

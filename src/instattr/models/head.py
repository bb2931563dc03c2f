"""instattr's classifier head, defined once, and its trainer of many heads at once.

Head: pooler (dense d_in -> d, tanh) -> linear d -> C without bias. Loss: mean cross-entropy plus
``l2 * ||W||^2`` on the linear weight only. Siamese sentence pairs enter as ``[u, v, |u-v|, u*v]``
(:func:`pair_input` on stored arrays, :func:`pair_combine` on tensors).

The head exists in two equal forms, one per use, both here and tested equal: the functional
:func:`features`/:func:`logits` over a parameter dict (with an optional leading axis of m heads,
which the batched trainer needs), and :class:`HeadModule`, an ``nn.Module`` with ``pooler`` and
``classifier`` linears (which the layered methods hook).

The trainer trains *many* heads at once — a batched weight tensor, one head per row of a mask
over the training set — so remove-and-retrain and random baselines cost one pass instead of
hundreds. All heads share the initialisation and the order of minibatches; a masked-out example
simply contributes nothing.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class HeadConfig:
    """Hyper-parameters of the head and its training (saved in run.json)."""
    l2: float = 0.01
    lr: float = 2e-4
    epochs: int = 3
    batch_size: int = 16
    hidden: Optional[int] = None  # pooler width; None: train_run uses the encoder's width, train_heads d_in
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self) -> None:
        """One-line errors for values no head can be trained with."""
        from ..errors import InstattrError
        if not self.l2 > 0:
            raise InstattrError(f"--l2 must be > 0 (the closed forms invert the L2-regularised Hessian), got {self.l2}")
        if not self.lr > 0:
            raise InstattrError(f"--lr must be > 0, got {self.lr}")
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise InstattrError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.hidden is not None and int(self.hidden) < 1:
            raise InstattrError(f"hidden must be at least 1, got {self.hidden}")


Params = Dict[str, torch.Tensor]  # "dense_w" (d, d_in), "dense_b" (d,), "w" (C, d); batched: leading m
PARAM_NAMES = ("dense_w", "dense_b", "w")


def init_params(d_in: int, d: int, n_classes: int, seed: int, dtype=torch.float32) -> Params:
    """nn.Linear's default uniform initialisation, from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    a, b = 1.0 / np.sqrt(d_in), 1.0 / np.sqrt(d)
    return {
        "dense_w": (torch.rand(d, d_in, generator=g, dtype=torch.float64) * 2 - 1).mul(a).to(dtype),
        "dense_b": (torch.rand(d, generator=g, dtype=torch.float64) * 2 - 1).mul(a).to(dtype),
        "w": (torch.rand(n_classes, d, generator=g, dtype=torch.float64) * 2 - 1).mul(b).to(dtype),
    }


def features(params: Params, x: torch.Tensor) -> torch.Tensor:
    """Penultimate features tanh(x W1^T + b1); params may carry a leading head axis."""
    w1 = params["dense_w"]
    if w1.dim() == 3:  # m heads: one (b, d_in) x (d_in, m*d) product, far faster than m small ones
        m, d, d_in = w1.shape
        h = (x @ w1.reshape(m * d, d_in).T).view(-1, m, d).transpose(0, 1)
        return torch.tanh(h + params["dense_b"][:, None])
    return torch.tanh(x @ params["dense_w"].T + params["dense_b"])


def logits(params: Params, x: torch.Tensor) -> torch.Tensor:
    """Class scores (n, C), or (m, n, C) for batched params."""
    f = features(params, x)
    if params["w"].dim() == 3:
        return torch.einsum("mbd,mcd->mbc", f, params["w"])
    return f @ params["w"].T


def loss(params: Params, x: torch.Tensor, y: torch.Tensor, l2: float) -> torch.Tensor:
    """Mean cross-entropy plus ``l2 * ||W||^2`` (unbatched params)."""
    return torch.nn.functional.cross_entropy(logits(params, x), y) + l2 * (params["w"] ** 2).sum()


class HeadModule(nn.Module):
    """The head as a module: ``classifier(tanh(pooler(x)))``, parameters named for hooks."""

    def __init__(self, params: Params):
        super().__init__()
        d, d_in = params["dense_w"].shape
        self.pooler = nn.Linear(d_in, d)
        self.classifier = nn.Linear(d, params["w"].shape[0], bias=False)
        self.load(params)

    def load(self, params: Params) -> None:
        """Copy head weights (``dense_w``, ``dense_b``, ``w``) in place."""
        with torch.no_grad():
            pairs = ((self.pooler.weight, "dense_w"), (self.pooler.bias, "dense_b"), (self.classifier.weight, "w"))
            for p, key in pairs:
                src = torch.as_tensor(params[key])
                if src.shape != p.shape:
                    raise ValueError(f"head {key} has shape {tuple(src.shape)}, expected {tuple(p.shape)}")
                p.copy_(src.to(p.dtype))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.pooler(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@dataclass
class TrainResult:
    params: Params                      # batched (m, ...) when trained with masks, else unbatched
    checkpoints: List[Params]           # per-epoch snapshots (unbatched training only)
    checkpoint_lrs: List[float]
    seconds: float


def train_heads(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, n_classes: int,
                config: HeadConfig, masks: Optional[np.ndarray | torch.Tensor] = None,
                init: Optional[Params] = None, dtype=torch.float32, checkpoints: bool = False,
                progress: bool = False, desc: str = "train", device="cpu") -> TrainResult:
    """Train one head (``masks`` None) or one head per mask row, all in one batched pass.

    Every head starts from ``init`` (default: ``init_params`` with ``config.seed``) and sees the
    same seeded minibatch order; a head's loss in a batch is the mean over its kept examples.
    Returned parameters are on the CPU whatever ``device`` trained them.
    """
    import time

    from tqdm.auto import tqdm
    t0 = time.perf_counter()
    device = torch.device(device)
    x = torch.as_tensor(x, dtype=dtype).to(device)
    y = torch.as_tensor(np.asarray(y), dtype=torch.long).to(device)
    n, d_in = x.shape
    if n == 0:
        raise ValueError("no training examples")
    d = config.hidden or d_in
    single = masks is None
    m = torch.ones(1, n, dtype=dtype) if single else torch.as_tensor(masks, dtype=dtype)
    m = m.to(device)
    heads = m.shape[0]
    base = init or init_params(d_in, d, n_classes, config.seed, dtype)
    params = {k: v.detach().to(device, dtype).unsqueeze(0).repeat(heads, *[1] * v.dim()).requires_grad_(True)
              for k, v in base.items()}
    opt = _adam(list(params.values()), config.lr)
    g = torch.Generator().manual_seed(config.seed + 1)
    snaps, lrs = [], []
    steps = config.epochs * ((n + config.batch_size - 1) // config.batch_size)
    with tqdm(total=steps, desc=desc, disable=not progress, leave=False) as bar:
        for _ in range(config.epochs):
            perm = torch.randperm(n, generator=g).to(device)
            for s in range(0, n, config.batch_size):
                b = perm[s:s + config.batch_size]
                mb = m[:, b]                                      # (m, B)
                out = logits(params, x[b])                        # (m, B, C)
                ce = torch.nn.functional.cross_entropy(out.reshape(-1, n_classes), y[b].repeat(heads),
                                                       reduction="none").view(heads, -1)
                per_head = (ce * mb).sum(1) / mb.sum(1).clamp_min(1.0)
                reg = config.l2 * (params["w"] ** 2).sum((1, 2))
                opt.zero_grad(set_to_none=True)
                (per_head + reg).sum().backward()
                opt.step()
                bar.update(1)
            if checkpoints and single:
                snaps.append({k: v.detach()[0].cpu().clone() for k, v in params.items()})
                lrs.append(config.lr)
    out = {k: v.detach().cpu() for k, v in params.items()}
    if single:
        out = {k: v[0] for k, v in out.items()}
    return TrainResult(out, snaps, lrs, time.perf_counter() - t0)


def _adam(params, lr):
    """Adam; the fused kernel where this torch has it (2x faster for many small steps)."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr)


@torch.no_grad()
def predict(params: Params, x: np.ndarray | torch.Tensor, batch: int = 8192):
    """(features, probs) as float32 numpy arrays for unbatched params."""
    x = torch.as_tensor(x, dtype=params["w"].dtype)
    feats, probs = [], []
    for s in range(0, len(x), batch):
        f = features(params, x[s:s + batch])
        feats.append(f)
        probs.append(torch.softmax(f @ params["w"].T, -1))
    c, d = params["w"].shape
    if not feats:
        return np.zeros((0, d), np.float32), np.zeros((0, c), np.float32)
    return torch.cat(feats).float().numpy(), torch.cat(probs).float().numpy()


def pair_input(encoded: np.ndarray, pair_mode: Optional[str]) -> np.ndarray:
    """Head input from the stored encoder array: siamese [u, v] -> [u, v, |u-v|, u*v]."""
    if pair_mode != "siamese":
        return encoded
    h = encoded.shape[1] // 2
    u, v = encoded[:, :h], encoded[:, h:]
    return np.concatenate([u, v, np.abs(u - v), u * v], axis=1)


def pair_combine(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``[u, v, |u-v|, u*v]`` of two pooled tensors (the torch twin of :func:`pair_input`)."""
    return torch.cat([u, v, (u - v).abs(), u * v], dim=-1)

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


ADAM_BETAS = (0.9, 0.999)               # torch.optim.Adam's defaults, as the trainer always used
ADAM_EPS = 1e-8
GROUP_BYTES = 8 << 20                   # a group's weights, gradients and Adam moments stay in cache
GPU_GROUP_BYTES = 1 << 30               # on a GPU: big groups, so that each kernel has work enough


def batch_order(n: int, config: HeadConfig) -> List[torch.Tensor]:
    """The minibatches every head sees: per epoch a seeded permutation cut into batch_size pieces."""
    g = torch.Generator().manual_seed(config.seed + 1)
    out = []
    for _ in range(config.epochs):
        perm = torch.randperm(n, generator=g)
        out += [perm[s:s + config.batch_size] for s in range(0, n, config.batch_size)]
    return out


def group_size(d_in: int, d: int, n_classes: int, dtype=torch.float32, budget: int = GROUP_BYTES) -> int:
    """Heads trained together: as many as keep parameters, gradients and both moments in ``budget``."""
    per_head = 4 * (d * d_in + d + n_classes * d) * torch.finfo(dtype).bits // 8
    return max(1, budget // per_head)


def train_heads(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, n_classes: int,
                config: HeadConfig, masks: Optional[np.ndarray | torch.Tensor] = None,
                init: Optional[Params] = None, dtype=torch.float32, checkpoints: bool = False,
                progress: bool = False, desc: str = "train", device="cpu",
                group: Optional[int] = None) -> TrainResult:
    """Train one head (``masks`` None) or one head per mask row.

    Every head starts from ``init`` (default: ``init_params`` with ``config.seed``) and sees the
    same seeded minibatch order (:func:`batch_order`); a head's loss in a batch is the mean
    cross-entropy over its kept examples plus ``l2 * ||W||^2``, minimised by Adam (lr
    ``config.lr``, torch's default betas and eps). ``y`` is (n,), or (m, n) to give each head its
    own labels. Returned parameters are on the CPU whatever ``device`` trained them.

    Heads are independent, so they are trained ``group`` at a time (default :func:`group_size`)
    through every step, with a hand-written forward and backward: a group's weights, gradients
    and Adam moments stay in cache for the whole run instead of streaming through memory at every
    step, the pooler's gradient is one GEMM over the group, and Adam is one fused kernel.
    """
    import time

    from tqdm.auto import tqdm
    t0 = time.perf_counter()
    device = torch.device(device)
    x = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).to(device, dtype).contiguous()
    n, d_in = x.shape
    if n == 0:
        raise ValueError("no training examples")
    single = masks is None
    keep = None if single else torch.as_tensor(np.asarray(masks) if not torch.is_tensor(masks) else masks)
    heads = 1 if single else keep.shape[0]
    if keep is not None and keep.shape != (heads, n):
        raise ValueError(f"masks must be (heads, {n}), got {tuple(keep.shape)}")
    y = torch.as_tensor(np.asarray(y) if not torch.is_tensor(y) else y, dtype=torch.long).to(device)
    if y.shape not in ((n,), (heads, n)):
        raise ValueError(f"labels must be ({n},) or ({heads}, {n}), got {tuple(y.shape)}")
    d = config.hidden or d_in
    base = {k: v.detach().to(device, dtype) for k, v in (init or init_params(d_in, d, n_classes, config.seed,
                                                                                  dtype)).items()}
    batches = [b.to(device) for b in batch_order(n, config)]
    per_epoch = -(-n // config.batch_size)
    if group is None:      # cache-sized groups, at least one per worker thread
        group = min(group_size(d_in, d, n_classes, dtype, GPU_GROUP_BYTES if device.type == "cuda" else GROUP_BYTES),
                    -(-heads // max(1, torch.get_num_threads())))
    size = max(1, int(group))
    out = {k: torch.empty((heads,) + v.shape, dtype=dtype) for k, v in base.items()}
    snaps: List[Params] = []
    bar = tqdm(total=len(batches) * heads, desc=desc, disable=not progress, leave=False, unit="head-step")

    def train_group(rows: slice) -> None:
        g = rows.stop - rows.start
        state = _Group(base, g, config, n_classes)
        weights = None if keep is None else keep[rows].to(device, dtype)
        if weights is not None and bool((weights == 1).all()):
            weights = None                                   # all kept: the mean is a plain 1/B
        labels = y if y.dim() == 1 else y[rows]
        for s, b in enumerate(batches):
            state.step(x.index_select(0, b), labels[..., b], None if weights is None else weights[:, b])
            if checkpoints and single and (s + 1) % per_epoch == 0:
                snaps.append({k: v[0].detach().cpu().clone() for k, v in state.params().items()})
            if s % 64 == 63:
                bar.update(64 * g)
        for k, v in state.params().items():
            out[k][rows] = v.cpu()
        bar.update(len(batches) % 64 * g)

    groups = [slice(a, min(a + size, heads)) for a in range(0, heads, size)]
    with bar:
        _run_groups(train_group, groups, device)
    if single:
        out = {k: v[0] for k, v in out.items()}
    lrs = [config.lr] * len(snaps)
    return TrainResult(out, snaps, lrs, time.perf_counter() - t0)


def _run_groups(train_group, groups: List[slice], device: torch.device) -> None:
    """Train the groups; on the CPU each on one core, by as many threads as torch would use (a
    step's products are small: split across cores they gain little and, on a busy machine, every
    one waits for the slowest core), restoring torch's thread setting after."""
    if device.type != "cpu":
        for rows in groups:
            train_group(rows)
        return
    from concurrent.futures import ThreadPoolExecutor
    threads = torch.get_num_threads()
    workers = min(threads, len(groups))
    torch.set_num_threads(1)
    try:
        if workers == 1:
            for rows in groups:
                train_group(rows)
        else:
            with ThreadPoolExecutor(workers) as pool:
                for done in [pool.submit(train_group, rows) for rows in groups]:
                    done.result()
    finally:
        torch.set_num_threads(threads)


class _Group:
    """The parameters, gradients and Adam moments of ``g`` heads, and one training step of them.

    Layout: the pooler weight of all heads is one (g*d, d_in) matrix, so the pooler's forward is
    one ``x W1^T`` and its gradient one ``dH^T x``; the final layers are (g, C, d) batches."""

    def __init__(self, base: Params, g: int, config: HeadConfig, n_classes: int):
        d, d_in = base["dense_w"].shape
        self.g, self.d, self.c, self.l2, self.lr = g, d, n_classes, float(config.l2), float(config.lr)
        self.w1 = base["dense_w"].repeat(g, 1).contiguous()              # (g*d, d_in)
        self.b1 = base["dense_b"].repeat(g).contiguous()                 # (g*d,)
        self.w2 = base["w"].unsqueeze(0).repeat(g, 1, 1).contiguous()    # (g, C, d)
        self.tensors = [self.w1, self.b1, self.w2]
        self.grads = [torch.zeros_like(t) for t in self.tensors]
        self.m = [torch.zeros_like(t) for t in self.tensors]
        self.v = [torch.zeros_like(t) for t in self.tensors]
        self.count = torch.zeros((), dtype=torch.float32, device=self.w1.device)
        self.fused = _fused_adam_available(self.w1)

    def params(self) -> Params:
        return {"dense_w": self.w1.view(self.g, self.d, -1), "dense_b": self.b1.view(self.g, self.d), "w": self.w2}

    def step(self, xb: torch.Tensor, yb: torch.Tensor, kept: Optional[torch.Tensor]) -> None:
        """One Adam step on a minibatch ``xb`` with labels ``yb`` ((B,) or (g, B)) and keep-weights
        ``kept`` ((g, B); None: every example kept)."""
        g, d, bsz = self.g, self.d, len(xb)
        f = torch.tanh(torch.addmm(self.b1, xb, self.w1.t()))             # (B, g*d)
        f3 = f.view(bsz, g, d).transpose(0, 1)                            # (g, B, d)
        e = torch.softmax(torch.bmm(f3, self.w2.transpose(1, 2)), -1)     # p: (g, B, C)
        e.sub_(torch.nn.functional.one_hot(yb, self.c).to(e.dtype))       # p - onehot(y)
        if kept is None:
            e.div_(bsz)                                                   # mean over the batch
        else:
            e.mul_((kept / kept.sum(1, keepdim=True).clamp_min(1.0)).unsqueeze(-1))
        gw1, gb1, gw2 = self.grads
        torch.baddbmm(self.w2, e.transpose(1, 2), f3, beta=2.0 * self.l2, out=gw2)   # dW2 + 2 l2 W2
        dh = torch.bmm(e, self.w2).transpose(0, 1).mul_(1.0 - f.view(bsz, g, d) ** 2).reshape(bsz, g * d)
        torch.mm(dh.t(), xb, out=gw1)                                      # the pooler: one GEMM
        torch.sum(dh, 0, out=gb1)
        self.count += 1
        if self.fused:
            torch._fused_adam_(self.tensors, self.grads, self.m, self.v, [], [self.count] * 3, lr=self.lr,
                               beta1=ADAM_BETAS[0], beta2=ADAM_BETAS[1], weight_decay=0.0, eps=ADAM_EPS,
                               amsgrad=False, maximize=False)
        else:
            _adam_step(self.tensors, self.grads, self.m, self.v, int(self.count), self.lr)


def _fused_adam_available(t: torch.Tensor) -> bool:
    """Whether this torch has the fused Adam kernel for ``t``'s device and dtype."""
    if not hasattr(torch, "_fused_adam_"):
        return False
    try:
        p, g, m, v = (torch.zeros(1, dtype=t.dtype, device=t.device) for _ in range(4))
        torch._fused_adam_([p], [g], [m], [v], [], [torch.zeros((), device=t.device)], lr=1e-3, beta1=0.9,
                           beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)
        return True
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _adam_step(params, grads, m, v, step: int, lr: float) -> None:
    """torch.optim.Adam's update (no weight decay), for a torch without the fused kernel."""
    b1, b2 = ADAM_BETAS
    torch._foreach_lerp_(m, grads, 1 - b1)
    torch._foreach_mul_(v, b2)
    torch._foreach_addcmul_(v, grads, grads, 1 - b2)
    bc1, bc2 = 1 - b1 ** step, 1 - b2 ** step
    denom = torch._foreach_sqrt(v)
    torch._foreach_div_(denom, bc2 ** 0.5)
    torch._foreach_add_(denom, ADAM_EPS)
    torch._foreach_addcdiv_(params, m, denom, -lr / bc1)


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

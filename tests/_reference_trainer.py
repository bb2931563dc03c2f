"""The batched head trainer as it was before the hand-written one (autograd over all heads at
once, torch.optim.Adam): the reference that tests and bench/trainer.py compare the trainer with."""
from __future__ import annotations

import numpy as np
import torch

from instattr.models.head import init_params, logits


def old_train_heads(x, y, n_classes, config, masks=None, dtype=torch.float32):
    """Parameters (batched when ``masks`` is given) trained exactly as the old ``train_heads`` did."""
    x = torch.as_tensor(np.asarray(x), dtype=dtype)
    y = torch.as_tensor(np.asarray(y), dtype=torch.long)
    n, d_in = x.shape
    d = config.hidden or d_in
    single = masks is None
    m = torch.ones(1, n, dtype=dtype) if single else torch.as_tensor(np.asarray(masks), dtype=dtype)
    heads = m.shape[0]
    base = init_params(d_in, d, n_classes, config.seed, dtype)
    params = {k: v.unsqueeze(0).repeat(heads, *[1] * v.dim()).requires_grad_(True) for k, v in base.items()}
    try:
        opt = torch.optim.Adam(list(params.values()), lr=config.lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        opt = torch.optim.Adam(list(params.values()), lr=config.lr)
    g = torch.Generator().manual_seed(config.seed + 1)
    for _ in range(config.epochs):
        perm = torch.randperm(n, generator=g)
        for s in range(0, n, config.batch_size):
            b = perm[s:s + config.batch_size]
            mb = m[:, b]
            out = logits(params, x[b])
            ce = torch.nn.functional.cross_entropy(out.reshape(-1, n_classes), y[b].repeat(heads),
                                                   reduction="none").view(heads, -1)
            per_head = (ce * mb).sum(1) / mb.sum(1).clamp_min(1.0)
            reg = config.l2 * (params["w"] ** 2).sum((1, 2))
            opt.zero_grad(set_to_none=True)
            (per_head + reg).sum().backward()
            opt.step()
    out = {k: v.detach() for k, v in params.items()}
    return {k: v[0] for k, v in out.items()} if single else out

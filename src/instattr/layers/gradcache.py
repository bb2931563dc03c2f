"""Projected training gradients (and Gauss-Newton factors), cached on disk per configuration.

Computing them is the whole cost of fitting a layered method (minutes on SST-2); the four methods
gd-top, gc-top, if-top and rif-top need the same arrays, and ``explain`` needs them again for each
new text. ``RUN/cache/grads-{key}.npz`` holds them, ``key`` a digest of everything they depend on:
the model's weights, the tracked modules, the task, the projection options, the dtype and the
training rows. Unprojected gradients (``proj_dim`` None) are never cached (gigabytes).
"""
from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path
from typing import Callable, Tuple

import numpy as np
import torch

from ..arrays import FeatureSet
from ..store import write_npz

GRADCACHE_FORMAT = 2
MAX_CACHE_BYTES = 4 << 30   # larger arrays are recomputed rather than written (MNLI at k = 32: 2.9 GB)


def weights_digest(module: torch.nn.Module) -> str:
    """Digest of a module's weights, hashed once per module until a tensor is replaced or changed in
    place (its storage or autograd version counter moves): a large decoder is not copied to the CPU
    on every fit."""
    state = sorted(module.state_dict().items())
    stamp = tuple((name, t.data_ptr(), t._version) for name, t in state)
    kept = getattr(module, "_instattr_weights", None)
    if kept is None or kept[0] != stamp:
        h = hashlib.sha1()
        for name, t in state:
            h.update(name.encode())
            h.update(str(t.dtype).encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())   # bf16 too
        kept = (stamp, h.hexdigest())
        object.__setattr__(module, "_instattr_weights", kept)    # not a submodule, parameter or buffer
    return kept[1]


def cache_key(projector, train: FeatureSet, dtype: str, options: dict) -> str:
    """Digest of the model's weights, the tracked modules, the task, the options, the dtype and the
    training rows."""
    spec = {"format": GRADCACHE_FORMAT, "dtype": str(dtype), "tracked": [b.name for b in projector.blocks],
            "task": [type(projector.task).__name__, getattr(projector.task, "measurement_kind", "")], **options}
    h = hashlib.sha1(json.dumps(spec, sort_keys=True).encode())
    h.update(weights_digest(projector.module).encode())
    h.update("\x00".join(map(str, train.idx)).encode())
    h.update(np.asarray(train.label, dtype=np.int64).tobytes())
    return h.hexdigest()[:20]


def cached_train_gradients(classifier, projector, train: FeatureSet, dtype: str,
                           options: dict, compute: Callable[[], Tuple[torch.Tensor, torch.Tensor]]):
    """(gradients, factors, reused): ``compute()``'s pair, read from / written to ``RUN/cache`` when
    the classifier has a run; ``reused`` says it was not computed now (so a fit's seconds leave that
    cost out)."""
    if classifier.run is None or options.get("proj_dim") is None:
        return (*compute(), False)
    key = cache_key(projector, train, dtype, options)
    memo = classifier.run.memo("gradient caches", dict)
    if key in memo:
        return (*memo[key], True)
    path = Path(classifier.cache_dir) / f"grads-{key}.npz"
    out = None
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                out = (torch.from_numpy(z["grads"]), torch.from_numpy(z["factors"]))
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            out = None   # unreadable: recompute and rewrite
    reused = out is not None
    if out is None:
        out = compute()
        if sum(t.numel() * t.element_size() for t in out) <= MAX_CACHE_BYTES:
            write_npz(path, grads=out[0].numpy(), factors=out[1].numpy())
    memo[key] = out
    return (*out, reused)

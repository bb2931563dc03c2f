"""Scope ``top-K``: retrain or re-initialise the classifier's top K transformer blocks and everything
above them (its pooler or classification head, the final layer), in a copy of the model run through
its own forward pass (:meth:`instattr.models.Classifier.module`).

"Everything above" is every module outside the blocks that the forward pass first calls after the
lowest chosen block starts (:func:`instattr.models.modules.call_order`): a pooler, a head, a final
norm; never the embeddings.

- Re-initialising (the randomized test) resets every module of that part that has
  ``reset_parameters`` (linear layers, norms) from a seeded generator, then recomputes the
  features and probabilities of the rows.
- Retraining (remove-and-retrain) continues training that part from the classifier's own weights
  on each mask's kept rows (AdamW, seeded minibatches, cross-entropy plus the final layer's L2
  term; dropout off); "before" is the same procedure on every row. One model per mask: minutes
  per mask on a CPU for MiniLM's top block, so use it with a small ``--n-test`` or on a GPU.
"""
from __future__ import annotations

import copy
import re
from typing import List, Optional, Tuple

import numpy as np
import torch

from ..arrays import FeatureSet, FinalLayer
from ..models.base import linear_to_final_layer
from ..models.modules import call_order, find_blocks
from ..store import RunError

PATTERN = re.compile(r"top-(\d+)$")


def blocks_of(scope: str) -> Optional[int]:
    """K for ``top-K``, else None."""
    m = PATTERN.match(scope or "")
    return int(m.group(1)) if m else None


def top_part(classifier, k: int) -> Tuple[torch.nn.Module, List[torch.nn.Module]]:
    """(a copy of the classifier's module, the modules of its top ``k`` blocks and everything above)."""
    module = copy.deepcopy(classifier.module())
    path, blocks = find_blocks(module)
    n = len(blocks)
    if not 1 <= k <= n:
        raise RunError(f"--scope top-{k}: the model has {n} transformer blocks; choose top-1 .. top-{n}")
    probe = classifier.tokenize(["a b"], ["a b"] if classifier.is_pair else None).batch([0], classifier.device)
    order = call_order(module, lambda: module(**probe))
    lowest = f"{path}.{n - k}"
    top = [f"{path}.{i}" for i in range(n - k, n)]
    chosen = [m for name, m in module.named_modules()
              if any(name == t or name.startswith(t + ".") for t in top)
              or (not (name == path or name.startswith(path + ".")) and order.get(name, -1) > order[lowest])]
    return module, chosen


@torch.no_grad()
def forward_rows(classifier, module, fs: FeatureSet, batch_size: int = 64) -> Tuple[np.ndarray, np.ndarray]:
    """(features, probs) float32 of the rows of ``fs`` through ``module`` (a copy of the classifier's)."""
    rows = classifier.rows(fs)
    feats = probs = None
    for pos in rows.order(batch_size):
        out = module(**rows.batch(pos, classifier.device))
        if feats is None:
            feats = np.zeros((len(fs), out.features.shape[1]), dtype=np.float32)
            probs = np.zeros((len(fs), out.logits.shape[1]), dtype=np.float32)
        feats[pos] = out.features.float().cpu().numpy()
        probs[pos] = torch.softmax(out.logits.double(), -1).float().cpu().numpy()
    return feats, probs


def random_top(classifier, k: int, train: FeatureSet, test: FeatureSet, seed: int
               ) -> Tuple[FeatureSet, FeatureSet, FinalLayer]:
    """(train, test, final layer) with the top ``k`` blocks and everything above re-initialised."""
    module, part = top_part(classifier, k)
    torch.manual_seed(seed)
    for m in part:
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()

    def refeature(fs: FeatureSet) -> FeatureSet:
        feats, probs = forward_rows(classifier, module, fs)
        return fs.replace(features=feats, probs=probs, pred=probs.argmax(1))
    final = module.get_submodule(classifier.final_name)
    return refeature(train), refeature(test), linear_to_final_layer(final, classifier.final_layer().l2)


def retrain_top(classifier, k: int, train: FeatureSet, test: FeatureSet, masks: np.ndarray, epochs: int = 1,
                lr: float = 1e-4, batch_size: int = 32, seed: int = 0, progress: bool = False
                ) -> Tuple[np.ndarray, np.ndarray]:
    """(after, before), each (m, n_test, C): test probabilities after training the top part on
    each mask's kept rows, and after the same on every row. Identical masks are trained once."""
    from tqdm.auto import tqdm
    masks = np.asarray(masks, dtype=bool)
    uniq, inverse = np.unique(masks, axis=0, return_inverse=True)
    inverse = np.asarray(inverse).reshape(-1)
    top_part(classifier, k)                       # checks k before any training
    rows = classifier.rows(train)
    labels = torch.as_tensor(np.asarray(train.label))
    l2 = classifier.final_layer().l2

    def trained_probs(keep: np.ndarray) -> np.ndarray:
        module, part = top_part(classifier, k)
        params = [p for m in part for p in m.parameters(recurse=False)]
        for p in module.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        final = module.get_submodule(classifier.final_name)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        g = torch.Generator().manual_seed(seed)
        kept = np.flatnonzero(keep)
        with torch.enable_grad():
            for _ in range(epochs):
                order = kept[torch.randperm(len(kept), generator=g).numpy()]
                for s in range(0, len(order), batch_size):
                    pos = order[s:s + batch_size]
                    out = module(**rows.batch(pos, classifier.device))
                    loss = torch.nn.functional.cross_entropy(out.logits, labels[pos].to(out.logits.device))
                    loss = loss + l2 * sum((p ** 2).sum() for p in final.parameters())
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
        return forward_rows(classifier, module, test)[1].astype(np.float64)

    before = trained_probs(np.ones(len(train), dtype=bool))
    after_u = np.stack([trained_probs(keep) for keep in tqdm(uniq, desc=f"retrain top-{k} for {len(uniq)} masks",
                                                             disable=not progress, unit="model")])
    after = after_u[inverse]
    return after, np.broadcast_to(before, after.shape)

"""Scope ``top-K``: retrain or re-initialise the classifier's top K transformer blocks and everything
above them (its pooler or classification head, the final layer), run from the hidden states cached
below them (:mod:`instattr.layers.cache`), so the frozen bottom never runs again.

- Re-initialising (the randomized test) resets every module of the tracked part that has
  ``reset_parameters`` (linear layers, LayerNorms) from a seeded generator, then recomputes the
  features and probabilities of the rows.
- Retraining (remove-and-retrain) continues training the tracked part from the classifier's own
  weights on each mask's kept rows (AdamW, seeded minibatches, cross-entropy plus the final layer's
  L2 term); "before" is the same procedure on every row. One model per mask: minutes per mask on a
  CPU for MiniLM's top block, so use it with a small ``--n-test`` or on a GPU.
"""
from __future__ import annotations

import re
from typing import Optional, Tuple

import numpy as np
import torch

from ..models.base import linear_to_final_layer
from ..store import FeatureSet, FinalLayer, RunError

PATTERN = re.compile(r"top-(\d+)$")


def blocks_of(scope: str) -> Optional[int]:
    """K for ``top-K``, else None."""
    m = PATTERN.match(scope or "")
    return int(m.group(1)) if m else None


def tracked_for(classifier, k: int, device=None):
    """(tracked model over the top ``k`` blocks, its first block)."""
    n = classifier.n_layers
    if not 1 <= k <= n:
        raise RunError(f"--scope top-{k}: the model has {n} transformer blocks; choose top-1 .. top-{n}")
    start = n - k
    return classifier.tracked(start, "float32"), start


@torch.no_grad()
def forward_rows(classifier, model, fs: FeatureSet, start: int, batch_size: int = 64) -> Tuple[np.ndarray, np.ndarray]:
    """(features, probs) float32 of the rows of ``fs`` through ``model`` from their cached hidden states."""
    from ..layers.cache import Examples
    feats = np.zeros((len(fs), model.final.in_features), dtype=np.float32)
    probs = np.zeros((len(fs), model.n_classes), dtype=np.float32)
    seen = []
    handle = model.final.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    try:
        for pos, batch in Examples(classifier, fs, start).batches(batch_size, torch.float32):
            seen.clear()
            logits = model(**batch)
            feats[pos] = seen[-1].float().cpu().numpy()
            probs[pos] = torch.softmax(logits.double(), -1).float().cpu().numpy()
    finally:
        handle.remove()
    return feats, probs


def random_top(classifier, k: int, train: FeatureSet, test: FeatureSet, seed: int
               ) -> Tuple[FeatureSet, FeatureSet, FinalLayer]:
    """(train, test, final layer) with the top ``k`` blocks and everything above re-initialised."""
    model, start = tracked_for(classifier, k)
    torch.manual_seed(seed)
    for module in model.modules():
        if module is not model and hasattr(module, "reset_parameters"):
            module.reset_parameters()

    def refeature(fs: FeatureSet) -> FeatureSet:
        feats, probs = forward_rows(classifier, model, fs, start)
        return fs.replace(features=feats, probs=probs, pred=probs.argmax(1))
    return refeature(train), refeature(test), linear_to_final_layer(model.final, classifier.final_layer().l2)


def retrain_top(classifier, k: int, train: FeatureSet, test: FeatureSet, masks: np.ndarray, epochs: int = 1,
                lr: float = 1e-4, batch_size: int = 32, seed: int = 0, progress: bool = False
                ) -> Tuple[np.ndarray, np.ndarray]:
    """(after, before), each (m, n_test, C): test probabilities after training the tracked part on
    each mask's kept rows, and after the same on every row. Identical masks are trained once."""
    from tqdm.auto import tqdm

    from ..layers.cache import Examples
    masks = np.asarray(masks, dtype=bool)
    uniq, inverse = np.unique(masks, axis=0, return_inverse=True)
    inverse = np.asarray(inverse).reshape(-1)
    _, start = tracked_for(classifier, k)
    examples = Examples(classifier, train, start)
    labels = torch.as_tensor(np.asarray(train.label))

    def trained_probs(keep: np.ndarray) -> np.ndarray:
        model, _ = tracked_for(classifier, k)
        model.train()
        for module in model.modules():          # deterministic: no dropout
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        g = torch.Generator().manual_seed(seed)
        rows = np.flatnonzero(keep)
        for _ in range(epochs):
            order = rows[torch.randperm(len(rows), generator=g).numpy()]
            for s in range(0, len(order), batch_size):
                pos = order[s:s + batch_size]
                loss = torch.nn.functional.cross_entropy(model(**examples.batch(pos, torch.float32)),
                                                         labels[pos].to(model.device)) + model.penalty()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        model.eval()
        return forward_rows(classifier, model, test, start)[1].astype(np.float64)

    before = trained_probs(np.ones(len(train), dtype=bool))
    after_u = np.stack([trained_probs(keep) for keep in tqdm(uniq, desc=f"retrain top-{k} for {len(uniq)} masks",
                                                             disable=not progress, unit="model")])
    after = after_u[inverse]
    return after, np.broadcast_to(before, after.shape)

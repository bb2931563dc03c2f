"""Finetune mode: encoder and head trained together (for GPUs, or small limits on a CPU)."""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch

from .data import Split
from .encoders import Encoder
from .model import HeadConfig, init_params, logits

def _pair_vector(encoder: Encoder, docs, queries, pair_mode: Optional[str]) -> torch.Tensor:
    """Differentiable head input for a list of examples."""
    def pooled(texts, second=None):
        args = (list(texts), list(second)) if second is not None else (list(texts),)
        batch = encoder.tokenizer(*args, truncation=True, max_length=encoder.max_length, padding=True,
                                  return_tensors="pt")
        return encoder.forward_pooled(dict(batch))
    if pair_mode is None:
        return pooled(docs)
    if pair_mode == "cross":
        return pooled(docs, queries)
    u, v = pooled(docs), pooled(queries)
    return torch.cat([u, v, (u - v).abs(), u * v], dim=1)


def _inputs(encoder: Encoder, split: Split, pair_mode, batch_size: int = 64) -> np.ndarray:
    encoder.model.eval()
    out = []
    with torch.inference_mode():
        for s in range(0, len(split), batch_size):
            ex = split.examples[s:s + batch_size]
            out.append(_pair_vector(encoder, [e.document for e in ex],
                                    [e.query for e in ex] if pair_mode else None, pair_mode).float())
    return torch.cat(out).numpy()


def finetune(encoder: Encoder, splits: Dict[str, Split], pair_mode, n_classes: int, head: HeadConfig,
             lr: float, epochs: int, progress: bool = True):
    """Train encoder + head (AdamW, seeded batch order); returns (head params, head inputs per split)."""
    from tqdm.auto import tqdm
    train = splits["train"]
    d_in = encoder.hidden_size * (4 if pair_mode == "siamese" else 1)
    params = {k: v.clone().requires_grad_(True)
              for k, v in init_params(d_in, head.hidden or encoder.hidden_size, n_classes, head.seed).items()}
    opt = torch.optim.AdamW([{"params": encoder.model.parameters(), "lr": lr},
                             {"params": list(params.values()), "lr": head.lr}], weight_decay=0.0)
    g = torch.Generator().manual_seed(head.seed + 1)
    y = torch.as_tensor(train.labels)
    encoder.model.train()
    steps = epochs * ((len(train) + head.batch_size - 1) // head.batch_size)
    with tqdm(total=steps, desc="finetune", disable=not progress, leave=False) as bar:
        for _ in range(epochs):
            for b in torch.randperm(len(train), generator=g).split(head.batch_size):
                ex = [train.examples[i] for i in b.tolist()]
                x = _pair_vector(encoder, [e.document for e in ex], [e.query for e in ex] if pair_mode else None,
                                 pair_mode)
                loss = torch.nn.functional.cross_entropy(logits(params, x), y[b]) + head.l2 * (params["w"] ** 2).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bar.update(1)
    encoder.model.eval()
    inputs = {name: _inputs(encoder, s, pair_mode) for name, s in splits.items()}
    return {k: v.detach() for k, v in params.items()}, inputs


def tuned_inputs(run, split: Split, pair_mode) -> np.ndarray:
    """Head inputs for new examples through a finetuned run's saved encoder."""
    if getattr(run, "_tuned_encoder", None) is None:
        e = run.manifest["encoder"]
        run._tuned_encoder = Encoder(str(run.path / "model" / "encoder"), e["pooling"], e["max_length"])
    return _inputs(run._tuned_encoder, split, pair_mode)

"""Finetune mode: a Hugging Face sequence classifier trained end to end from the encoder.

``AutoModelForSequenceClassification`` on the encoder's folder (for MiniLM: BERT's first-token
pooler, dropout and a linear layer with bias), AdamW with seeded minibatches, the base model at
``lr`` and everything above it at ``head_lr``, cross-entropy plus ``l2 * ||p||^2`` over the final
layer's weight and bias — the penalty the closed forms then use exactly. The result is a standard
checkpoint (``save_pretrained``) that any transformers code loads; instattr then reads it as it
reads an imported model.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence

import torch

from ..errors import InstattrError


@dataclass(frozen=True)
class FinetuneConfig:
    """Hyper-parameters of fine-tuning (saved in run.json)."""
    lr: float = 2e-5          # the base model (embeddings, transformer blocks, BERT's pooler)
    head_lr: float = 2e-4     # the layers above it
    epochs: int = 1
    batch_size: int = 16
    l2: float = 0.01          # on the final layer's weight and bias
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self) -> None:
        for name in ("lr", "head_lr", "l2"):
            if not getattr(self, name) > 0:
                raise InstattrError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise InstattrError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")


def new_classifier(encoder_path: str, label_names: Sequence[str], seed: int):
    """(tokenizer, model): a sequence classifier on the encoder, its new layers seeded."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    torch.manual_seed(seed)
    try:
        tok = AutoTokenizer.from_pretrained(encoder_path)
        model = AutoModelForSequenceClassification.from_pretrained(
            encoder_path, num_labels=len(label_names), id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)})
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InstattrError(f"{encoder_path}: could not build a sequence classifier ({msg})") from None
    return tok, model


def finetune(tok, model, documents: List[str], queries: Optional[List[str]], labels: Sequence[int],
             config: FinetuneConfig, max_length: int, final_layer: str, device="cpu", progress: bool = True):
    """Train ``model`` in place on the examples; returns it in eval mode."""
    from tqdm.auto import tqdm
    device = torch.device(device)
    model.to(device).train()
    base = set(id(p) for p in model.base_model.parameters())
    top = [p for p in model.parameters() if id(p) not in base]
    opt = torch.optim.AdamW([{"params": list(model.base_model.parameters()), "lr": config.lr},
                             {"params": top, "lr": config.head_lr}], weight_decay=0.0)
    final = model.get_submodule(final_layer)
    y = torch.as_tensor(list(labels), dtype=torch.long)
    g = torch.Generator().manual_seed(config.seed + 1)
    n = len(documents)
    steps = config.epochs * ((n + config.batch_size - 1) // config.batch_size)
    with tqdm(total=steps, desc="finetune", disable=not progress, leave=False) as bar:
        for _ in range(config.epochs):
            for b in torch.randperm(n, generator=g).split(config.batch_size):
                rows = b.tolist()
                args = ([documents[i] for i in rows],) + (([queries[i] for i in rows],) if queries is not None else ())
                batch = tok(*args, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
                out = model(**{k: v.to(device) for k, v in batch.items()})
                loss = torch.nn.functional.cross_entropy(out.logits, y[b].to(device))
                loss = loss + config.l2 * sum((p ** 2).sum() for p in final.parameters())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bar.update(1)
    return model.eval()

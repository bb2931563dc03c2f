"""The tracked part of a classifier: its top k transformer blocks and everything above them.

``TrackedModel(h, m[, h2, m2]) -> logits`` runs from the hidden states that enter the lowest
tracked block (``h``: (B, T, hidden), ``m``: (B, T) attention mask; ``h2, m2`` the second sentence
of a siamese pair), so the frozen bottom of the network is never re-run (see
:mod:`instattr.layers.cache`). Each classifier (:mod:`instattr.models`) supplies its blocks and a
``top`` module from the last hidden states to logits; the gradient and curvature code sees only a
module with parameters, a final linear layer and a penalty, never a tokenizer (kronfluence's
"task" idea).

``final`` is the classifier's last ``nn.Linear``, whose input is the run's ``features``; the L2
term of the loss, ``l2 * sum ||p||^2``, sits on its parameters only (weight, and bias if any).
"""
from __future__ import annotations

import copy
from typing import List, Optional, Sequence

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "float64": torch.float64}
DEFAULT_LAYERS = 3


def resolve_dtype(name) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a BERT-style base model (BERT, MiniLM, RoBERTa, XLM-R, ELECTRA:
    ``encoder.layer``; DistilBERT: ``transformer.layer``)."""
    for path in ("encoder.layer", "transformer.layer"):
        try:
            blocks = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(blocks, nn.ModuleList):
            return blocks
    from ..errors import InstattrError
    raise InstattrError(f"layered methods need a BERT-style encoder (encoder.layer or transformer.layer); "
                        f"{type(model).__name__} has neither")


def first_tracked_layer(n_layers: int, layers: Optional[int]) -> int:
    """Index of the lowest tracked block; ``layers=None`` tracks the top 3 (all, if fewer)."""
    if layers is None:
        return max(0, n_layers - DEFAULT_LAYERS)
    if not 0 <= int(layers) <= n_layers:
        from ..errors import InstattrError
        raise InstattrError(f"--layers must be between 0 and {n_layers} for this {n_layers}-layer encoder, "
                            f"got {layers}")
    return n_layers - int(layers)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, T) 0/1 mask -> (B, 1, 1, T) additive attention mask (0 kept, dtype-min masked)."""
    return (1.0 - mask.to(dtype))[:, None, None, :] * torch.finfo(dtype).min


def eager_copy(module: nn.Module) -> nn.Module:
    """A deep copy using the plain (eager) attention, which supports vmap and double backward."""
    module = copy.deepcopy(module)
    seen = set()
    for sub in module.modules():
        cfg = getattr(sub, "config", None)
        if cfg is not None and id(cfg) not in seen and hasattr(cfg, "_attn_implementation"):
            seen.add(id(cfg))
            cfg._attn_implementation = "eager"
    return module


class TrackedModel(nn.Module):
    """Tracked blocks (``layers.{i}``), then ``top`` (pooling and head) up to the logits."""

    def __init__(self, blocks: Sequence[nn.Module], top: nn.Module, final: str, l2: float,
                 pair_mode: Optional[str] = None):
        super().__init__()
        self.layers = nn.ModuleList(blocks)
        self.top = top
        self.final_name = "top." + final
        self.l2 = float(l2)
        self.pair_mode = pair_mode
        if not isinstance(self.final, nn.Linear):
            raise ValueError(f"{self.final_name} is a {type(self.final).__name__}, not nn.Linear")

    @property
    def final(self) -> nn.Linear:
        """The last linear layer (its input: the features; its output: the logits)."""
        return self.get_submodule(self.final_name)

    @property
    def n_classes(self) -> int:
        return self.final.out_features

    @property
    def dtype(self) -> torch.dtype:
        return self.final.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.final.weight.device

    def penalized(self) -> List[str]:
        """Names of the parameters under the L2 term (the final layer's)."""
        return [f"{self.final_name}.{n}" for n, _ in self.final.named_parameters()]

    def penalty(self) -> torch.Tensor:
        """``l2 * sum ||p||^2`` over the final layer's parameters."""
        return self.l2 * sum((p ** 2).sum() for p in self.final.parameters())

    def encode(self, h: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, T, hidden) after the tracked blocks."""
        h, m = h.to(self.device), m.to(self.device)
        ext = additive_mask(m, h.dtype)
        for layer in self.layers:
            out = layer(h, ext)
            h = out[0] if isinstance(out, tuple) else out
        return h

    def forward(self, h, m, h2=None, m2=None) -> torch.Tensor:
        """Logits from the hidden states entering the tracked blocks (moved to the model's device)."""
        if self.pair_mode == "siamese":
            return self.top(self.encode(h, m), m.to(self.device), self.encode(h2, m2), m2.to(self.device))
        return self.top(self.encode(h, m), m.to(self.device))

    def features(self, h, m, h2=None, m2=None) -> torch.Tensor:
        """The final layer's input for a batch."""
        seen: List[torch.Tensor] = []
        handle = self.final.register_forward_hook(lambda mod, i, o: seen.append(i[0]))
        try:
            self(h, m, h2, m2)
        finally:
            handle.remove()
        return seen[0]

    def parameter_names(self) -> List[str]:
        return [n for n, _ in self.named_parameters()]

    def layer_of(self, name: str) -> str:
        """The block a parameter belongs to: ``layer{i}`` (tracked block i) or ``head``."""
        if name.startswith("layers."):
            return "layer" + name.split(".")[1]
        return "head"


def finish(model: TrackedModel, dtype) -> TrackedModel:
    """``model`` in ``dtype``, eval mode, every parameter requiring gradients."""
    model = model.to(resolve_dtype(dtype)).eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return model

"""The tracked part of a run's classifier: the top k encoder layers, pooling and the head.

``TrackedModel(h, m[, h2, m2]) -> logits`` runs from the hidden states that enter the lowest
tracked layer (``h``: (B, T, hidden), ``m``: (B, T) attention mask; ``h2, m2`` the second sentence
of a siamese pair), so a frozen encoder bottom is never re-run (see :mod:`.cache`). Everything
model-specific lives here (kronfluence's "task" idea): the gradient and curvature modules see a
module with parameters and a loss, never a tokenizer.

Parameters of the head are named ``pooler.{weight,bias}`` (the run's ``dense_w``, ``dense_b``) and
``classifier.weight`` (the run's ``w``); the L2 term of the training loss sits on the latter only.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..encoders import Encoder, pool
from ..errors import InstattrError
from ..store import Run, RunError

L2_PARAMETER = "classifier.weight"
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_dtype(name) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a BERT-style encoder (BERT, RoBERTa, MiniLM, ELECTRA, XLM-R)."""
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList):
        raise InstattrError(f"layered methods need a BERT-style encoder (model.encoder.layer); "
                            f"{type(model).__name__} has none")
    return layers


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, T) 0/1 mask -> (B, 1, 1, T) additive attention mask (0 kept, dtype-min masked)."""
    return (1.0 - mask.to(dtype))[:, None, None, :] * torch.finfo(dtype).min


class TrackedModel(nn.Module):
    """Top encoder layers (copied, eager attention) + pooling + pooler (dense, tanh) + linear."""

    def __init__(self, layers: Sequence[nn.Module], pooling: str, head: Dict[str, torch.Tensor],
                 pair_mode: Optional[str] = None):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.pooling = pooling
        self.pair_mode = pair_mode
        d, d_in = head["dense_w"].shape
        c = head["w"].shape[0]
        self.pooler = nn.Linear(d_in, d)
        self.classifier = nn.Linear(d, c, bias=False)
        self.set_head(head)

    @property
    def n_classes(self) -> int:
        return self.classifier.out_features

    @property
    def dtype(self) -> torch.dtype:
        return self.classifier.weight.dtype

    def set_head(self, head: Dict[str, torch.Tensor]) -> None:
        """Load head weights (``dense_w``, ``dense_b``, ``w``) in place."""
        with torch.no_grad():
            for name, key in (("pooler.weight", "dense_w"), ("pooler.bias", "dense_b"), ("classifier.weight", "w")):
                p = self.get_parameter(name)
                src = torch.as_tensor(np.asarray(head[key]) if not torch.is_tensor(head[key]) else head[key])
                if src.shape != p.shape:
                    raise RunError(f"head {key} has shape {tuple(src.shape)}, expected {tuple(p.shape)}")
                p.copy_(src.to(p.dtype))

    def encode(self, h: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Pooled output of the tracked layers for one side (B, hidden)."""
        ext = additive_mask(m, h.dtype)
        for layer in self.layers:
            out = layer(h, ext)
            h = out[0] if isinstance(out, tuple) else out
        return pool(h, m, self.pooling)

    def head_input(self, h, m, h2=None, m2=None) -> torch.Tensor:
        u = self.encode(h, m)
        if self.pair_mode != "siamese":
            return u
        v = self.encode(h2, m2)
        return torch.cat([u, v, (u - v).abs(), u * v], dim=-1)

    def features(self, h, m, h2=None, m2=None) -> torch.Tensor:
        return torch.tanh(self.pooler(self.head_input(h, m, h2, m2)))

    def forward(self, h, m, h2=None, m2=None) -> torch.Tensor:
        return self.classifier(self.features(h, m, h2, m2))

    def parameter_names(self) -> List[str]:
        return [n for n, _ in self.named_parameters()]

    def layer_of(self, name: str) -> str:
        """The block a parameter belongs to: ``layer{i}`` (tracked layer i) or ``head``."""
        if name.startswith("layers."):
            return "layer" + name.split(".")[1]
        return "head"


def run_encoder_for(run: Run) -> Encoder:
    """The encoder whose hidden states the run's head saw: the untuned one in head mode, the
    saved tuned one in finetune mode (loaded once per Run object)."""
    m = run.manifest
    if m.get("mode", "head") == "finetune":
        if getattr(run, "_tuned_encoder", None) is None:
            path = Path(run.path) / "model" / "encoder"
            if not path.is_dir():
                raise RunError(f"{path}: missing (finetune runs save their encoder there)")
            e = m["encoder"]
            run._tuned_encoder = Encoder(str(path), e["pooling"], e["max_length"])
        return run._tuned_encoder
    from ..pipeline import run_encoder
    return run_encoder(run)


def encoder_key(run: Run) -> str:
    """Which encoder weights a cache was made with (the folder they were loaded from)."""
    if run.manifest.get("mode", "head") == "finetune":
        return str((Path(run.path) / "model" / "encoder").resolve())
    return str(run.manifest["encoder"]["path"])


DEFAULT_LAYERS = 3


def first_tracked_layer(encoder: Encoder, layers: Optional[int]) -> int:
    """Index of the lowest tracked layer; ``layers=None`` tracks the top 3 (all, if fewer)."""
    n = len(encoder_layers(encoder.model))
    if layers is None:
        return max(0, n - DEFAULT_LAYERS)
    if not 0 <= int(layers) <= n:
        raise InstattrError(f"--layers must be between 0 and {n} for this {n}-layer encoder, got {layers}")
    return n - int(layers)


def _eager(module: nn.Module) -> nn.Module:
    """Use the plain (eager) attention: it supports vmap and double backward everywhere."""
    seen = set()
    for sub in module.modules():
        cfg = getattr(sub, "config", None)
        if cfg is not None and id(cfg) not in seen and hasattr(cfg, "_attn_implementation"):
            seen.add(id(cfg))
            cfg._attn_implementation = "eager"
    return module


def tracked_model(run: Run, layers: Optional[int], head: Optional[Dict[str, torch.Tensor]] = None,
                  dtype="float32") -> Tuple[TrackedModel, int]:
    """(model, first tracked layer index) for a run; ``head`` defaults to the run's final head."""
    dtype = resolve_dtype(dtype)
    encoder = run_encoder_for(run)
    start = first_tracked_layer(encoder, layers)
    blocks = [_eager(copy.deepcopy(b)) for b in encoder_layers(encoder.model)[start:]]
    params = head if head is not None else run.head_params()
    model = TrackedModel(blocks, encoder.pooling, params, run.manifest.get("pair_mode"))
    model = model.to(dtype).eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return model, start


def checkpoints(run: Run) -> Tuple[List[Dict[str, torch.Tensor]], List[float]]:
    """The per-epoch head snapshots saved by training (``model/checkpoints.safetensors``) and
    their learning rates."""
    from safetensors import safe_open
    path = Path(run.path) / "model" / "checkpoints.safetensors"
    if not path.exists():
        raise RunError(f"{path}: missing; TracIn needs the head checkpoints that `instattr train` "
                       "saves in head mode (retrain the run)")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    lrs = [float(x) for x in meta.get("lrs", "").split(",") if x.strip()]
    snaps: Dict[int, Dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, epoch = key.rpartition(".")
        if not epoch.isdigit():
            raise RunError(f"{path}: unexpected key {key!r} (want param.epoch)")
        snaps.setdefault(int(epoch), {})[name] = value
    heads = [snaps[i] for i in sorted(snaps)]
    if not heads or len(lrs) != len(heads) or any(set(h) != {"dense_w", "dense_b", "w"} for h in heads):
        raise RunError(f"{path}: {len(heads)} checkpoints but {len(lrs)} learning rates, or incomplete heads")
    return heads, lrs

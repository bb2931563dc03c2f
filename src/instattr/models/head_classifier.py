"""Head mode: a frozen sentence encoder, pooling, and instattr's head (:mod:`.head`) on top.

The encoder's pooled output of every row is stored (``RUN/sbert/{split}.npz``: in head mode the
encoder *is* the sbert-* baselines' sentence encoder, :mod:`instattr.sentence`), so the head's
input is derived from it (:func:`~.head.pair_input`) and nothing is re-encoded to retrain or
re-initialise the head. Siamese pairs run each sentence through the encoder on its own.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ..arrays import FeatureSet, FinalLayer
from ..encoders import Encoder, encode_texts, pool
from ..store import Run, RunError
from .base import Classifier, Output
from .head import HeadModule, Params, pair_combine, pair_input, predict
from .rows import Rows, tokenize


class HeadForward(nn.Module):
    """The encoder's forward, pooling, the siamese combination of a pair, and the head."""

    def __init__(self, encoder: nn.Module, pooling: str, head: HeadModule, siamese: bool):
        super().__init__()
        self.encoder, self.pooling, self.head, self.siamese = encoder, pooling, head, siamese

    def _pooled(self, input_ids, attention_mask, token_type_ids=None):
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        return pool(self.encoder(**kwargs).last_hidden_state, attention_mask, self.pooling)

    def forward(self, input_ids, attention_mask, token_type_ids=None, input_ids2=None, attention_mask2=None,
                token_type_ids2=None) -> Output:
        x = self._pooled(input_ids, attention_mask, token_type_ids)
        if self.siamese:
            x = pair_combine(x, self._pooled(input_ids2, attention_mask2, token_type_ids2))
        features = self.head.features(x)
        return Output(logits=self.head.classifier(features), features=features)


class HeadClassifier(Classifier):
    """A frozen encoder (loaded on first use) plus a head with parameters ``params``."""

    kind = "head"

    def __init__(self, encoder_spec: dict, params: Params, l2: float, label_names, pair_mode: Optional[str],
                 run: Optional[Run] = None, device=None, history: Optional[List[Tuple[Params, float]]] = None,
                 encoder: Optional[Encoder] = None):
        super().__init__(label_names, pair_mode, run, device)
        self.encoder_spec = dict(encoder_spec)     # name, path, pooling, max_length
        self.params = {k: torch.as_tensor(v).float() for k, v in params.items()}
        self.l2 = float(l2)
        self.history = history
        self._encoder = encoder
        self._module: Optional[HeadForward] = None

    def final_layer(self) -> FinalLayer:
        return FinalLayer(w=self.params["w"].double().numpy(), b=None, l2=self.l2)

    def _shares_sentence_encoder(self) -> bool:
        """Whether the run's sentence encoder (sbert-*) is this head's encoder, as head mode makes it:
        then one Encoder and one memo of new texts' embeddings serve both."""
        if self.run is None or self.run.manifest.mode != "head":
            return False
        s, e = self.run.manifest.sbert, self.encoder_spec
        return (s.path or s.name, s.pooling, s.max_length) == (e["path"] or e["name"], e["pooling"], e["max_length"])

    def encoder(self) -> Encoder:
        """The frozen encoder (tokenizer, transformer, pooling)."""
        if self._encoder is None:
            if self._shares_sentence_encoder():
                from ..sentence import sentence_embeddings
                self._encoder = sentence_embeddings(self.run, self.device).encoder()
            else:
                e = self.encoder_spec
                self._encoder = Encoder(e["path"], e["pooling"], e["max_length"], device=self.device)
        return self._encoder

    def module(self) -> HeadForward:
        if self._module is None:
            enc = self.encoder()
            model = enc.model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            head = HeadModule(self.params).to(self.device)
            for p in head.parameters():
                p.requires_grad_(False)
            self._module = HeadForward(model, enc.pooling, head, self.pair_mode == "siamese")
        return self._module

    @property
    def final_name(self) -> str:
        return "head.classifier"

    def tokenize(self, documents, queries=None) -> Rows:
        enc = self.encoder()
        return tokenize(enc.tokenizer, enc.max_length, documents, queries, siamese=self.pair_mode == "siamese")

    # ------------------------------------------------------------------ texts -> arrays
    def forward_texts(self, documents, queries, progress: bool = False, desc: str = "classify"):
        """Through the encoder's pooled output (as training computed it), then the head."""
        return predict(self.params, pair_input(self.embed(documents, queries, progress), self.pair_mode))

    def embed(self, documents, queries, progress: bool = False) -> np.ndarray:
        """The encoder's pooled output of texts (``[u, v]`` for siamese pairs)."""
        if self._shares_sentence_encoder():       # kept for the sbert-* methods that score the same texts
            from ..sentence import sentence_embeddings
            return sentence_embeddings(self.run, self.device).encode(documents, queries, progress)
        return encode_texts(self.encoder(), documents, queries, self.pair_mode, progress, cache=False)

    def recompute(self, fs: FeatureSet, progress: bool = False):
        """The head on the stored encoder output of the rows (new texts: encoded now)."""
        if fs.texts is not None or self.run is None:
            return self.forward_texts(*self.texts(fs), progress)
        from ..sentence import sentence_embeddings
        return predict(self.params, pair_input(sentence_embeddings(self.run, self.device).of(fs), self.pair_mode))

    def fingerprint(self) -> str:
        return str(self.encoder_spec["path"])

    # ------------------------------------------------------------------ history, retraining
    def checkpoints(self) -> List[Tuple[Classifier, float]]:
        if not self.history:
            where = self.run.path / "model" / "checkpoints.safetensors" if self.run is not None else "the head"
            raise RunError(f"{where}: missing; TracIn needs the head checkpoints that `instattr train` saves "
                           "in head mode (train the run again)")
        return [(HeadClassifier(self.encoder_spec, p, self.l2, self.label_names, self.pair_mode, self.run,
                                self.device, encoder=self._encoder), lr) for p, lr in self.history]

    def with_params(self, params: Params, history: Optional[List[Tuple[Params, float]]] = None) -> "HeadClassifier":
        """The same encoder and run with another head (e.g. one retrained on other labels) and its
        per-epoch ``history`` (checkpoints and learning rates; none: no TracIn)."""
        return HeadClassifier(self.encoder_spec, params, self.l2, self.label_names, self.pair_mode, self.run,
                              self.device, history or None, encoder=self._encoder)

    def retrain_scopes(self):
        return ("head", "final")


def read_checkpoints(path) -> List[Tuple[Dict[str, torch.Tensor], float]]:
    """The per-epoch head snapshots ``model/checkpoints.safetensors`` and their learning rates."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise RunError(f"{path}: unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
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
    if any(not np.isfinite(lr) or lr < 0 for lr in lrs):
        raise RunError(f"{path}: checkpoint learning rates must be finite and >= 0, got {lrs}")
    return list(zip(heads, lrs))

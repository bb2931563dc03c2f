"""The untuned sentence encoder's embeddings (the sbert-* baselines' vectors), made when asked.

The paper's "sentence-BERT" baseline compares examples by the pooled output of an untuned
sentence encoder (``run.json: sbert``, default all-MiniLM-L6-v2): ``u`` for single texts, ``[u, v]``
for sentence pairs (each sentence encoded on its own). They are computed when an ``sbert-*``
method, ``knn-sbert`` or the report first asks, and kept in ``RUN/sbert/{split}.npz`` (``idx``,
``vectors``, written atomically; a file whose ``idx`` is not the split's is made again). Head mode
writes them when it trains: there they are also the head's input. Runs made before that file
existed kept them as ``features/{split}.npz:encoder``, which is read as it is.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Dict, Optional

import numpy as np

from .arrays import FeatureSet
from .store import Run, RunError, write_npz

KEPT_TEXTS = 200_000     # new texts whose embeddings are kept (about 300 MB at 384 floats)


def sbert_path(run: Run, split: str):
    return run.path / "sbert" / f"{split}.npz"


def save_sentence_embeddings(folder, split: str, idx, vectors: np.ndarray) -> None:
    """Write a split's embeddings (``folder`` is the run directory, or the one being built)."""
    from pathlib import Path
    write_npz(Path(folder) / "sbert" / f"{split}.npz", idx=np.asarray([str(i) for i in idx]),
              vectors=np.ascontiguousarray(vectors, dtype=np.float32))


class SentenceEmbeddings:
    """The run's sentence-encoder embeddings of any rows: ``of(fs)`` (n, h) float32 for rows of a
    split (by idx) or new texts (``fs.texts``). The encoder is loaded only when something must be
    encoded. One per run object: :func:`sentence_embeddings`. Without a run (``run=None``: rows
    in memory that carry their texts) it encodes with ``encoder`` (a path or name; default
    all-MiniLM-L6-v2)."""

    def __init__(self, run: Optional[Run], device=None, progress: bool = False, encoder: Optional[str] = None):
        self.run, self.device, self.progress = run, device, progress
        self.spec = run.manifest.sbert if run is not None else None
        self.name = encoder
        # head mode: the head's own input, encoded as it was trained (its pair mode, float32)
        self.head = run is not None and run.manifest.mode == "head"
        self._splits: Dict[str, np.ndarray] = {}
        self._positions: Dict[str, Dict[str, int]] = {}
        self._encoder = None
        self._texts: "OrderedDict[tuple, np.ndarray]" = OrderedDict()   # (text, query) -> embedding
        self._lock = threading.Lock()

    def encoder(self):
        """The untuned sentence encoder (:class:`~instattr.encoders.Encoder`; bf16 autocast on CUDA,
        except in head mode, whose head reads float32 embeddings)."""
        with self._lock:
            if self._encoder is None:
                from .encoders import Encoder
                e, autocast = self.spec, not self.head
                self._encoder = (Encoder(e.path or e.name, e.pooling, e.max_length, device=self.device,
                                         autocast=autocast)
                                 if e is not None else Encoder(self.name, device=self.device, autocast=autocast))
            return self._encoder

    def encode(self, documents, queries=None, progress: Optional[bool] = None) -> np.ndarray:
        """Embeddings of texts: ``u``, or ``[u, v]`` for pairs (a head-mode run: as its head reads
        them). Texts encoded before are not encoded again (the last ``KEPT_TEXTS``): the methods,
        and in head mode the classifier, that score the same new texts, a chunk at a time or
        whole, encode each once."""
        from .encoders import encode_texts
        documents = list(documents)
        queries = None if queries is None else list(queries)
        mode = None if queries is None else (self.run.manifest.pair_mode if self.head else "siamese")
        keys = list(zip(documents, queries)) if queries is not None else [(d, None) for d in documents]
        with self._lock:
            missing = list(dict.fromkeys(k for k in keys if k not in self._texts))
        if missing:
            fresh = encode_texts(self.encoder(), [d for d, _ in missing],
                                 None if queries is None else [q for _, q in missing], mode,
                                 self.progress if progress is None else progress, cache=True, desc="sentence encoder")
            with self._lock:
                for k, v in zip(missing, fresh):
                    self._texts[k] = v
        if not keys:
            return np.zeros((0, self.encoder().hidden_size * (2 if mode == "siamese" else 1)), np.float32)
        with self._lock:
            out = np.stack([self._texts[k] for k in keys])
            for k in keys:
                self._texts.move_to_end(k)
            while len(self._texts) > KEPT_TEXTS:
                self._texts.popitem(last=False)
        return out

    def split(self, name: str) -> np.ndarray:
        """Every row of split ``name``, in the run's stored order (made and saved on first use)."""
        if name not in self._splits:
            self._splits[name] = self._load(name)
        return self._splits[name]

    def _load(self, name: str) -> np.ndarray:
        idx = np.asarray([str(i) for i in self.run.features(name).idx])
        path = sbert_path(self.run, name)
        for source, key in ((path, "vectors"), (self.run.path / "features" / f"{name}.npz", "encoder")):
            if source.exists():
                try:
                    with np.load(source, allow_pickle=False) as z:
                        if key in z.files and (key == "encoder" or np.array_equal(z["idx"], idx)):
                            return np.asarray(z[key], dtype=np.float32)
                except Exception:       # damaged (truncated, BadZipFile): made again below
                    pass
        examples = self.run.examples(name)
        queries = [e.query for e in examples] if self.run.manifest.is_pair else None
        vectors = self.encode([e.document for e in examples], queries)
        try:
            save_sentence_embeddings(self.run.path, name, idx, vectors)
        except (OSError, RunError):     # a read-only run still answers
            pass
        return vectors

    def of(self, fs: FeatureSet) -> np.ndarray:
        """Embeddings of the rows of ``fs``: new texts are encoded, a split's rows looked up by idx."""
        if fs.texts is not None:
            return self.encode(*fs.texts)
        if fs.split is None or self.run is None:
            raise RunError("sentence embeddings are made for rows of a run's splits or new texts; these rows are "
                           "neither")
        whole = self.split(fs.split)
        if fs.split not in self._positions:
            self._positions[fs.split] = {str(i): p for p, i in enumerate(self.run.features(fs.split).idx)}
        where = self._positions[fs.split]
        try:
            rows = np.fromiter((where[str(i)] for i in fs.idx), dtype=np.int64, count=len(fs))
        except KeyError as e:
            raise RunError(f"{self.run.path}: {fs.split} row {e.args[0]} is not in the run") from None
        if len(rows) == len(whole) and np.array_equal(rows, np.arange(len(whole))):
            return whole
        return whole[rows]


def sentence_embeddings(run: Run, device=None) -> SentenceEmbeddings:
    """The run's :class:`SentenceEmbeddings` (one per run object)."""
    from .device import resolve_device
    device = resolve_device(device)
    return run.memo(("sentence embeddings", str(device)), lambda: SentenceEmbeddings(run, device))


class StoredEmbeddings:
    """Sentence embeddings given as arrays (tests, notebooks): rows looked up by their ``idx``."""

    def __init__(self, idx, vectors: np.ndarray):
        self.where = {str(i): p for p, i in enumerate(idx)}
        self.vectors = np.asarray(vectors, dtype=np.float32)
        if len(self.where) != len(self.vectors):
            raise RunError(f"{len(self.where)} distinct ids for {len(self.vectors)} embeddings")

    def of(self, fs: FeatureSet) -> np.ndarray:
        try:
            return self.vectors[[self.where[str(i)] for i in fs.idx]]
        except KeyError as e:
            raise RunError(f"no sentence embedding for row {e.args[0]}") from None

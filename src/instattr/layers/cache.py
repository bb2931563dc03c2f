"""Hidden states entering the lowest tracked layer, cached on disk so the frozen bottom runs once.

``RUN/cache/hidden-{split}-from{start}.npz`` holds, for every example of the split, the hidden
states that enter encoder layer ``start`` (float32, padding removed) and which token sequences
make up each example: one (single texts, cross-encoded pairs) or two (siamese pairs: premise and
hypothesis, each through the tracked layers on its own). Identical sequences are stored once. A
sequence's attention mask is all ones over its stored tokens (the tokenizer pads on the right), so
``offsets`` are the masks; padded batches rebuild them. The file is written atomically and reused
while its manifest (encoder folder, layer, max length, pair mode, the split's idx) matches.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..store import FeatureSet, Run, RunError, write_npz
from .network import encoder_key, encoder_layers, first_tracked_layer, run_encoder_for

CACHE_FORMAT = 1
NEW = "<new texts>"  # the in-memory "split" of texts that are not rows of the run
Batch = Dict[str, torch.Tensor]  # h, m (and h2, m2 for siamese pairs), padded, in model dtype


def _digest(idx: Sequence[str]) -> str:
    return hashlib.sha1("\x00".join(map(str, idx)).encode("utf-8")).hexdigest()


@dataclass
class HiddenCache:
    """Cached hidden states of one split: ``states`` (tokens, hidden) float32, ``offsets``
    (n_sequences + 1,), ``sequences`` (n_examples, sides) indices into the sequence list."""
    states: np.ndarray
    offsets: np.ndarray
    sequences: np.ndarray
    idx: np.ndarray

    @property
    def sides(self) -> int:
        return self.sequences.shape[1]

    def lengths(self, rows: np.ndarray) -> np.ndarray:
        """Longest sequence of each example (tokens)."""
        seq = self.sequences[rows]
        return (self.offsets[seq + 1] - self.offsets[seq]).max(axis=1)

    def batch(self, rows: np.ndarray, dtype: torch.dtype) -> Batch:
        """Right-padded tensors for examples ``rows`` (their order kept)."""
        out = {}
        for side, (hk, mk) in enumerate((("h", "m"), ("h2", "m2"))[:self.sides]):
            seq = self.sequences[rows, side]
            starts, stops = self.offsets[seq], self.offsets[seq + 1]
            t = int((stops - starts).max()) if len(seq) else 0
            h = np.zeros((len(seq), t, self.states.shape[1]), dtype=np.float32)
            m = np.zeros((len(seq), t), dtype=np.float32)
            for i, (a, b) in enumerate(zip(starts, stops)):
                h[i, :b - a] = self.states[a:b]
                m[i, :b - a] = 1.0
            out[hk] = torch.from_numpy(h).to(dtype)
            out[mk] = torch.from_numpy(m).to(dtype)
        return out


def cache_path(run: Run, split: str, start: int) -> Path:
    return Path(run.path) / "cache" / f"hidden-{split}-from{start}.npz"


def _manifest(run: Run, split: str, start: int, idx: Sequence[str]) -> dict:
    m = run.manifest
    return {"format": CACHE_FORMAT, "encoder": encoder_key(run), "start": int(start),
            "max_length": int(m["encoder"]["max_length"]), "pair_mode": m.get("pair_mode"),
            "split": split, "n": len(idx), "idx_sha1": _digest(idx)}


def _split_texts(run: Run, split: str, idx: Sequence[str]) -> Tuple[List[str], Optional[List[str]]]:
    examples = run.dataset().splits.get(split)
    if examples is None or len(examples.examples) < len(idx):
        raise RunError(f"{run.path}: the dataset on disk has no {split!r} split matching the run")
    ex = examples.examples[:len(idx)]
    if [e.idx for e in ex] != [str(i) for i in idx]:
        raise RunError(f"{run.path}: the dataset's {split!r} rows no longer match the run's stored idx")
    docs = [e.document for e in ex]
    queries = [e.query for e in ex] if run.manifest.get("data", {}).get("is_pair") else None
    return docs, queries


@torch.inference_mode()
def _encode_states(encoder, start: int, texts: List[str], second: Optional[List[str]], progress: Optional[bool],
                   desc: str) -> Tuple[np.ndarray, np.ndarray]:
    """Hidden states entering layer ``start`` of each sequence, padding removed: (states, offsets)."""
    from tqdm.auto import tqdm
    n = len(texts)
    per_seq: List[Optional[np.ndarray]] = [None] * n
    model = encoder.model
    model.eval()
    n_layers = len(encoder_layers(model))
    import sys
    show = sys.stderr.isatty() if progress is None else progress
    with tqdm(total=n, desc=desc, unit="seq", disable=not show, leave=False) as bar:
        for pos, batch in encoder.batches(texts, second):
            mask = batch["attention_mask"]
            if not bool((mask[:, :-1] >= mask[:, 1:]).all()):
                raise RunError("layered methods need right-padded batches; the tokenizer pads on the left")
            out = model(**batch, output_hidden_states=True)
            hs = out.hidden_states
            if len(hs) != n_layers + 1:
                raise RunError(f"the encoder returned {len(hs)} hidden states for {n_layers} layers")
            h = hs[start].float().numpy()
            for j, p in enumerate(pos):
                per_seq[p] = h[j, :int(mask[j].sum())]
            bar.update(len(pos))
    lengths = np.array([len(s) for s in per_seq], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    states = np.concatenate(per_seq, axis=0) if n else np.zeros((0, encoder.hidden_size), np.float32)
    return np.ascontiguousarray(states, dtype=np.float32), offsets


def build_cache(run: Run, split: str, start: int, progress: Optional[bool] = False) -> HiddenCache:
    """Run the encoder bottom over a split and return its cache (not saved)."""
    idx = [str(i) for i in run.features(split).idx]
    docs, queries = _split_texts(run, split, idx)
    return cache_of_texts(run, idx, docs, queries, start, progress, f"cache {split} (layers < {start})")


def cache_of_texts(run: Run, idx: Sequence[str], docs: Sequence[str], queries: Optional[Sequence[str]],
                   start: int, progress: Optional[bool] = False, desc: str = "encode") -> HiddenCache:
    """The cache (in memory) of any texts, e.g. new ones to explain, under the run's pair mode."""
    docs = list(docs)
    queries = None if queries is None else list(queries)
    pair_mode = run.manifest.get("pair_mode")
    if queries is None:
        keys = [(d,) for d in docs]
        rows = [[k] for k in keys]
    elif pair_mode == "cross":
        keys = list(zip(docs, queries))
        rows = [[k] for k in keys]
    else:  # siamese: premise and hypothesis are separate sequences
        keys = [(d,) for d in docs] + [(q,) for q in queries]
        rows = [[(d,), (q,)] for d, q in zip(docs, queries)]
    unique = list(dict.fromkeys(keys))
    position = {k: i for i, k in enumerate(unique)}
    first = [k[0] for k in unique]
    second = [k[1] for k in unique] if pair_mode == "cross" and queries is not None else None
    states, offsets = _encode_states(run_encoder_for(run), start, first, second, progress, desc)
    sequences = np.array([[position[k] for k in r] for r in rows], dtype=np.int64).reshape(len(idx), -1)
    return HiddenCache(states=states, offsets=offsets, sequences=sequences, idx=np.asarray(idx))


def load_cache(run: Run, split: str, start: int, progress: Optional[bool] = False) -> HiddenCache:
    """The split's cache: read from ``RUN/cache`` when it matches the run, else built and saved."""
    memo = run.__dict__.setdefault("_hidden_caches", {})
    if (split, start) in memo:
        return memo[(split, start)]
    idx = [str(i) for i in run.features(split).idx]
    want = _manifest(run, split, start, idx)
    path = cache_path(run, split, start)
    cache = None
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                if json.loads(str(z["manifest"])) == want:
                    cache = HiddenCache(states=z["states"], offsets=z["offsets"], sequences=z["sequences"],
                                        idx=z["idx"])
        except (OSError, ValueError, KeyError):
            cache = None  # unreadable or stale: rebuild below
    if cache is None:
        cache = build_cache(run, split, start, progress)
        write_npz(path, states=cache.states, offsets=cache.offsets, sequences=cache.sequences,
                  idx=cache.idx, manifest=np.array(json.dumps(want)))
    memo[(split, start)] = cache
    return cache


class Examples:
    """The rows of a FeatureSet located in the run's split caches, batched by length. New texts
    (a FeatureSet from ``featurize``, which carries its ``texts``) are run through the encoder
    bottom once, in memory."""

    def __init__(self, run: Run, fs: FeatureSet, layers: Optional[int], progress: Optional[bool] = False):
        self.start = first_tracked_layer(run_encoder_for(run), layers)
        if fs.texts is not None:
            idx = [str(i) for i in fs.idx]
            self.split = np.array([NEW] * len(fs))
            self.row = np.arange(len(fs), dtype=np.int64)
            self.caches = {NEW: cache_of_texts(run, idx, fs.texts[0], fs.texts[1], self.start, progress,
                                               f"encode {len(fs)} new texts (layers < {self.start})")}
            return
        where: Dict[str, Tuple[str, int]] = {}
        for split in run.splits:
            for row, i in enumerate(run.features(split).idx):
                where.setdefault(str(i), (split, row))
        missing = [str(i) for i in fs.idx if str(i) not in where]
        if missing:
            raise RunError(f"{run.path}: examples {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} "
                           "are not rows of the run's splits; layered methods score the run's own examples "
                           "(their texts are needed to run the tracked layers)")
        self.split = np.array([where[str(i)][0] for i in fs.idx])
        self.row = np.array([where[str(i)][1] for i in fs.idx], dtype=np.int64)
        self.caches = {s: load_cache(run, s, self.start, progress) for s in np.unique(self.split)}

    def __len__(self) -> int:
        return len(self.row)

    def lengths(self) -> np.ndarray:
        out = np.zeros(len(self), dtype=np.int64)
        for s, cache in self.caches.items():
            sel = self.split == s
            out[sel] = cache.lengths(self.row[sel])
        return out

    def batch(self, positions: np.ndarray, dtype: torch.dtype) -> Batch:
        """One padded batch of the examples at ``positions`` (all from one split), order kept."""
        positions = np.asarray(positions)
        splits = np.unique(self.split[positions])
        if len(splits) != 1:
            raise ValueError("a batch must hold examples of one split")
        return self.caches[splits[0]].batch(self.row[positions], dtype)

    def batches(self, batch_size: int, dtype: torch.dtype, positions: Optional[np.ndarray] = None
                ) -> Iterator[Tuple[np.ndarray, Batch]]:
        """(positions, padded batch) over ``positions`` (default all), longest first, one split
        per batch."""
        positions = np.arange(len(self)) if positions is None else np.asarray(positions)
        lengths = self.lengths()[positions]
        order = positions[np.argsort(-lengths, kind="stable")]
        for s, cache in self.caches.items():
            mine = order[self.split[order] == s]
            for a in range(0, len(mine), int(batch_size)):
                pos = mine[a:a + int(batch_size)]
                yield pos, cache.batch(self.row[pos], dtype)

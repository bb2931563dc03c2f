"""Hidden states entering the lowest tracked block, cached on disk so the frozen bottom runs once.

``RUN/cache/hidden-{split}-from{start}.npz`` holds, for every example of the split, the hidden
states that enter encoder layer ``start`` (float32, padding removed) and which token sequences
make up each example: one (single texts, cross-encoded pairs) or two (siamese pairs: premise and
hypothesis, each through the tracked layers on its own). Identical sequences are stored once. A
sequence's attention mask is all ones over its stored tokens (the tokenizer pads on the right), so
``offsets`` are the masks; padded batches rebuild them. The file is written atomically and reused
while its manifest (the classifier's fingerprint, block, max length, pair mode, the split's idx)
matches. Texts come from the classifier (:meth:`instattr.models.Classifier.texts`): a run's rows
by their idx, never by position.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..models.tracked import transformer_blocks
from ..store import FeatureSet, RunError, write_npz

CACHE_FORMAT = 2
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


def cache_path(classifier, split: str, start: int) -> Optional[Path]:
    """``RUN/cache/hidden-{split}-from{start}.npz``, or None for a classifier without a run."""
    folder = classifier.cache_dir
    return None if folder is None else folder / f"hidden-{split}-from{start}.npz"


def _manifest(classifier, split: str, start: int, idx: Sequence[str]) -> dict:
    return {"format": CACHE_FORMAT, "encoder": classifier.fingerprint(), "start": int(start),
            "max_length": int(classifier.encoder().max_length), "pair_mode": classifier.pair_mode,
            "split": split, "n": len(idx), "idx_sha1": _digest(idx)}


@torch.inference_mode()
def _encode_states(encoder, start: int, texts: List[str], second: Optional[List[str]], progress: Optional[bool],
                   desc: str) -> Tuple[np.ndarray, np.ndarray]:
    """Hidden states entering block ``start`` of each sequence, padding removed: (states, offsets)."""
    import sys

    from tqdm.auto import tqdm
    n = len(texts)
    per_seq: List[Optional[np.ndarray]] = [None] * n
    model = encoder.model
    model.eval()
    n_layers = len(transformer_blocks(model))
    show = sys.stderr.isatty() if progress is None else progress
    with tqdm(total=n, desc=desc, unit="seq", disable=not show, leave=False) as bar:
        for pos, batch in encoder.batches(texts, second):
            mask = batch["attention_mask"]
            if not bool((mask[:, :-1] >= mask[:, 1:]).all()):
                raise RunError("layered methods need right-padded batches; the tokenizer pads on the left")
            out = model(**{k: v.to(encoder.device) for k, v in batch.items()}, output_hidden_states=True)
            hs = out.hidden_states
            if len(hs) != n_layers + 1:
                raise RunError(f"the encoder returned {len(hs)} hidden states for {n_layers} layers")
            h = hs[start].float().cpu().numpy()
            for j, p in enumerate(pos):
                per_seq[p] = h[j, :int(mask[j].sum())]
            bar.update(len(pos))
    lengths = np.array([len(s) for s in per_seq], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    states = np.concatenate(per_seq, axis=0) if n else np.zeros((0, encoder.hidden_size), np.float32)
    return np.ascontiguousarray(states, dtype=np.float32), offsets


def cache_of_texts(classifier, idx: Sequence[str], docs: Sequence[str], queries: Optional[Sequence[str]],
                   start: int, progress: Optional[bool] = False, desc: str = "encode") -> HiddenCache:
    """The cache (in memory) of any texts, e.g. new ones to explain, under the classifier's pair mode."""
    docs = list(docs)
    queries = None if queries is None else list(queries)
    pair_mode = classifier.pair_mode
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
    states, offsets = _encode_states(classifier.encoder(), start, first, second, progress, desc)
    sequences = np.array([[position[k] for k in r] for r in rows], dtype=np.int64).reshape(len(idx), -1)
    return HiddenCache(states=states, offsets=offsets, sequences=sequences, idx=np.asarray(idx))


def build_cache(classifier, split: str, start: int, progress: Optional[bool] = False) -> HiddenCache:
    """Run the encoder bottom over a split of the classifier's run (texts looked up by idx)."""
    fs = classifier.run.features(split)
    docs, queries = classifier.texts(fs)
    return cache_of_texts(classifier, [str(i) for i in fs.idx], docs, queries, start, progress,
                          f"cache {split} (layers < {start})")


def load_cache(classifier, split: str, start: int, progress: Optional[bool] = False) -> HiddenCache:
    """A split's cache: read from ``RUN/cache`` when it matches the run, else built and saved."""
    def load():
        idx = [str(i) for i in classifier.run.features(split).idx]
        want = _manifest(classifier, split, start, idx)
        path = cache_path(classifier, split, start)
        if path is not None and path.exists():
            try:
                with np.load(path, allow_pickle=False) as z:
                    if json.loads(str(z["manifest"])) == want:
                        return HiddenCache(states=z["states"], offsets=z["offsets"], sequences=z["sequences"],
                                           idx=z["idx"])
            except Exception:   # unreadable (truncated, BadZipFile) or stale: rebuild below
                pass
        cache = build_cache(classifier, split, start, progress)
        if path is not None:
            write_npz(path, states=cache.states, offsets=cache.offsets, sequences=cache.sequences,
                      idx=cache.idx, manifest=np.array(json.dumps(want)))
        return cache
    return classifier.run.memo(("hidden", classifier.fingerprint(), split, start), load)


@dataclass(frozen=True)
class RowIds:
    """Rows of a run's split by identity: all :class:`Examples` reads of a FeatureSet of them
    (what a worker is sent instead of the rows' feature arrays)."""
    split: str
    idx: np.ndarray
    texts = None                     # not new texts

    def __len__(self) -> int:
        return len(self.idx)

    @classmethod
    def of(cls, fs: FeatureSet) -> "RowIds":
        return cls(fs.split, np.asarray(fs.idx))


class Examples:
    """The rows of a FeatureSet located in their split's cache (by idx), batched by length. New
    texts (a FeatureSet from ``featurize``, which carries its ``texts``) are run through the
    encoder bottom once, in memory."""

    def __init__(self, classifier, fs: Union[FeatureSet, RowIds], start: int, progress: Optional[bool] = False):
        self.start = start
        idx = [str(i) for i in fs.idx]
        if fs.texts is not None:
            self.split = NEW
            self.row = np.arange(len(fs), dtype=np.int64)
            self.cache = cache_of_texts(classifier, idx, fs.texts[0], fs.texts[1], start, progress,
                                        f"encode {len(fs)} new texts (layers < {start})")
            return
        if fs.split is None or classifier.run is None:
            raise RunError("layered methods score rows of a run's splits or new texts; these rows are neither")
        self.split = fs.split
        self.cache = load_cache(classifier, fs.split, start, progress)
        where = {str(i): r for r, i in enumerate(self.cache.idx)}
        missing = [i for i in idx if i not in where]
        if missing:
            raise RunError(f"{classifier.run.path}: {fs.split} rows {', '.join(missing[:3])} are not in the run")
        self.row = np.array([where[i] for i in idx], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.row)

    def lengths(self) -> np.ndarray:
        return self.cache.lengths(self.row)

    def batch(self, positions: np.ndarray, dtype: torch.dtype) -> Batch:
        """One padded batch of the examples at ``positions``, order kept."""
        return self.cache.batch(self.row[np.asarray(positions)], dtype)

    def order(self, batch_size: int, positions: Optional[np.ndarray] = None) -> List[np.ndarray]:
        """The positions of each batch :meth:`batches` pads: ``positions`` (default all) sorted
        longest first, cut every ``batch_size``."""
        positions = np.arange(len(self)) if positions is None else np.asarray(positions)
        order = positions[np.argsort(-self.lengths()[positions], kind="stable")]
        return [order[a:a + int(batch_size)] for a in range(0, len(order), int(batch_size))]

    def batches(self, batch_size: int, dtype: torch.dtype, positions: Optional[np.ndarray] = None
                ) -> Iterator[Tuple[np.ndarray, Batch]]:
        """(positions, padded batch) over ``positions`` (default all), longest first."""
        for pos in self.order(batch_size, positions):
            yield pos, self.cache.batch(self.row[pos], dtype)

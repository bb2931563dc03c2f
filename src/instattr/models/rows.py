"""Tokenized examples, padded on the right into batches the model's own forward reads.

Every batch instattr builds is right-padded, whatever side the tokenizer pads on: a token never
moves, so a decoder's positions and causal mask are those of the example alone, and the last
attended token (what a decoder classifier pools) is found from the attention mask, not from the
pad token's id. Results are then the same under a tokenizer that pads on the left, on the right,
or with its EOS token as padding.

A row has one *side* (a text, or a cross-encoded pair) or two (siamese pairs in head mode: the
premise and the hypothesis each through the encoder); the second side's keys end in ``2``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

Side = tuple  # (ids: list of token-id lists, types: list of token-type lists or None)


@dataclass(frozen=True)
class RowIds:
    """Rows of a run's split by identity, ``(split, idx)``: what a worker in another process is sent
    instead of the rows' arrays (it tokenizes them from the run's dataset)."""
    split: str
    idx: np.ndarray
    texts = None                     # not new texts

    def __len__(self) -> int:
        return len(self.idx)

    @classmethod
    def of(cls, fs) -> "RowIds":
        return cls(fs.split, np.asarray(fs.idx))


class Rows:
    """Token ids of ``n`` examples (one or two sides each); ``batch(positions)`` pads them."""

    def __init__(self, sides: Sequence[Side], pad_id: int = 0):
        self.sides = [(list(ids), None if types is None else list(types)) for ids, types in sides]
        self.pad_id = int(pad_id)
        n = {len(ids) for ids, _ in self.sides}
        if len(n) != 1:
            raise ValueError(f"the sides of these rows have different lengths: {sorted(n)}")
        self.n = n.pop()

    def __len__(self) -> int:
        return self.n

    def lengths(self) -> np.ndarray:
        """Tokens of each example's longest side."""
        return np.max([[len(x) for x in ids] for ids, _ in self.sides], axis=0).astype(np.int64) \
            if self.n else np.zeros(0, dtype=np.int64)

    def subset(self, positions) -> "Rows":
        pos = np.asarray(positions, dtype=np.int64)
        return Rows([([ids[i] for i in pos], None if types is None else [types[i] for i in pos])
                     for ids, types in self.sides], self.pad_id)

    def order(self, batch_size: int, positions: Optional[np.ndarray] = None) -> List[np.ndarray]:
        """The positions of each batch: ``positions`` (default all) sorted longest first (stable),
        cut every ``batch_size``."""
        positions = np.arange(self.n) if positions is None else np.asarray(positions, dtype=np.int64)
        order = positions[np.argsort(-self.lengths()[positions], kind="stable")]
        return [order[a:a + int(batch_size)] for a in range(0, len(order), int(batch_size))]

    def batch(self, positions, device=None) -> Dict[str, torch.Tensor]:
        """The right-padded batch of the examples at ``positions`` (their order kept)."""
        out: Dict[str, torch.Tensor] = {}
        pos = np.asarray(positions, dtype=np.int64)
        for s, (ids, types) in enumerate(self.sides):
            suffix = "" if s == 0 else str(s + 1)
            seqs = [ids[i] for i in pos]
            t = max((len(x) for x in seqs), default=0)
            input_ids = torch.full((len(seqs), t), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(seqs), t), dtype=torch.long)
            for j, x in enumerate(seqs):
                input_ids[j, :len(x)] = torch.as_tensor(x, dtype=torch.long)
                mask[j, :len(x)] = 1
            out["input_ids" + suffix], out["attention_mask" + suffix] = input_ids, mask
            if types is not None:
                tt = torch.zeros((len(seqs), t), dtype=torch.long)
                for j, i in enumerate(pos):
                    tt[j, :len(types[i])] = torch.as_tensor(types[i], dtype=torch.long)
                out["token_type_ids" + suffix] = tt
        if device is not None:
            out = {k: v.to(device) for k, v in out.items()}
        return out


def last_attended(mask: torch.Tensor) -> torch.Tensor:
    """(B,) position of each row's last token whose attention mask is 1 (0 for an empty row)."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (positions * (mask > 0)).argmax(-1)


def tokenize(tokenizer, max_length: int, documents: Sequence[str], queries: Optional[Sequence[str]] = None,
             siamese: bool = False) -> Rows:
    """Rows of texts through ``tokenizer`` (truncated to ``max_length``): one side (a text, or a
    pair through the tokenizer's pair input), or with ``siamese`` two sides (each sentence alone)."""
    def one(texts, pair=None):
        if not len(texts):
            return [], None
        args = (list(texts), list(pair)) if pair is not None else (list(texts),)
        enc = tokenizer(*args, truncation=True, max_length=int(max_length))
        return enc["input_ids"], enc.get("token_type_ids")

    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    if queries is not None and siamese:
        return Rows([one(documents), one(queries)], pad)
    return Rows([one(documents, queries)], pad)

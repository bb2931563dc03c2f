"""Causal language models: the forward pass the language-model task reads, and rows as token windows.

A training row is a *document* (``text``: every token after the first is scored) or a *prompt and
completion* (only the completion's tokens are scored, as in instruction tuning); a query is a
prompt and a completion. The prompt is tokenized with the tokenizer's special tokens (a Llama's
BOS), the completion without, and the two are joined, so the scored tokens are exactly the
completion's own tokenization.

With ``chat`` a prompt is rendered by the tokenizer's chat template as one user turn and the
opening of the assistant's (:func:`prompt_ids`); documents are unchanged.

A row longer than ``length`` tokens is cut into windows of ``length`` tokens starting every
``stride`` tokens; each window scores the scored tokens that no earlier window scored, with the
overlap as context (the strided perplexity of Hugging Face's guide). Every token is scored in
exactly one window, so a row's loss is the sum of its windows' losses and its gradient the sum of
theirs (:func:`instattr.lm.row_sums`).

:class:`CausalForward` runs the model's own forward (its masks, positions, rotary embeddings and
norms) on right-padded windows and returns :class:`LMOutput`: per position the logits of the next
token, and the next token where it is scored (``-100`` elsewhere).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..errors import InstattrError
from ..task import IGNORE


@dataclass
class LMOutput:
    logits: torch.Tensor       # (B, T, V): position t's prediction of the token at t + 1
    targets: torch.Tensor      # (B, T): that token where it is scored, IGNORE elsewhere


class CausalForward(nn.Module):
    """A causal LM's forward on right-padded windows with their targets (see the module docstring)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, targets) -> LMOutput:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return LMOutput(out.logits, targets.to(out.logits.device))


@dataclass
class Window:
    row: int                   # the row (document or query) it belongs to
    start: int                 # the position of its first token in the row
    ids: List[int]
    targets: List[int]         # targets[t]: the token at t + 1 where it is scored, IGNORE elsewhere


def prompt_ids(tokenizer, prompt: str, chat: bool = False) -> List[int]:
    """A prompt's tokens: with the tokenizer's special tokens, or (``chat``) rendered by its chat
    template as one user turn followed by the assistant's turn opening (the template writes any
    special tokens itself)."""
    if not chat:
        return list(tokenizer(prompt)["input_ids"])
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def token_row(tokenizer, row: dict, where: str, chat: bool = False) -> Tuple[List[int], List[bool]]:
    """(ids, scored): a document's or a prompt and completion's tokens, and which are scored
    (``chat``: the prompt through the tokenizer's chat template, :func:`prompt_ids`)."""
    if "prompt" in row or "completion" in row:
        if not isinstance(row.get("prompt"), str) or not isinstance(row.get("completion"), str):
            raise InstattrError(f"{where}: a row with a prompt needs both 'prompt' and 'completion' as text")
        prompt = prompt_ids(tokenizer, row["prompt"], chat)
        completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
        if not completion:
            raise InstattrError(f"{where}: the completion has no tokens")
        return list(prompt) + list(completion), [False] * len(prompt) + [True] * len(completion)
    if not isinstance(row.get("text"), str):
        raise InstattrError(f"{where}: a row needs 'text', or 'prompt' and 'completion'")
    ids = list(tokenizer(row["text"])["input_ids"])
    return ids, [False] + [True] * (len(ids) - 1)


def windows(ids: Sequence[int], scored: Sequence[bool], length: int, stride: int, row: int = 0) -> List[Window]:
    """The windows of one row (see the module docstring); windows that score nothing are left out."""
    if length < 2 or not 1 <= stride <= length - 1:
        raise InstattrError(f"windows need length >= 2 and 1 <= stride < length, got length {length}, "
                            f"stride {stride}")
    out: List[Window] = []
    done = 0                     # tokens before this one are scored already (or never)
    start = 0
    while True:
        end = min(start + length, len(ids))
        chunk = list(ids[start:end])
        targets = [IGNORE] * len(chunk)
        for j in range(max(start + 1, done), end):
            if scored[j]:
                targets[j - start - 1] = int(ids[j])
        done = end
        if any(t != IGNORE for t in targets):
            out.append(Window(row, start, chunk, targets))
        if end >= len(ids):
            return out
        start += stride


class Windows:
    """Rows cut into windows, batched right-padded for :class:`CausalForward`."""

    def __init__(self, tokenizer, rows: Sequence[dict], length: int, stride: Optional[int] = None,
                 where: str = "rows", chat: bool = False):
        self.n_rows = len(rows)
        try:
            length, stride = int(length), length // 2 if stride is None else int(stride)
        except (TypeError, ValueError):
            raise InstattrError(f"{where}: max_length and stride must be integers, got {length!r}, {stride!r}") \
                from None
        self.items: List[Window] = []
        for i, r in enumerate(rows):
            ids, scored = token_row(tokenizer, r, f"{where}: row {i}", chat)
            if scored and scored[0]:
                raise InstattrError(f"{where}: row {i}: the completion's first token has no context to be predicted "
                                    "from (an empty prompt and a tokenizer that adds no BOS); give a prompt")
            if not any(scored):
                raise InstattrError(f"{where}: row {i} has no token to score (one token only)")
            self.items.extend(windows(ids, scored, int(length), stride, i))
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (tokenizer.eos_token_id or 0))

    def __len__(self) -> int:
        return len(self.items)

    @property
    def rows(self) -> np.ndarray:
        """(windows,) the row of each window."""
        return np.array([w.row for w in self.items], dtype=np.int64)

    def order(self, batch_size: int) -> List[np.ndarray]:
        """Window positions in batches of similar length (longest first)."""
        if int(batch_size) < 1:
            raise InstattrError(f"batch_size must be a positive integer, got {batch_size}")
        by = np.argsort([-len(w.ids) for w in self.items], kind="stable")
        return [by[i:i + batch_size] for i in range(0, len(by), batch_size)]

    def batch(self, positions, device=None) -> Dict[str, torch.Tensor]:
        chosen = [self.items[int(p)] for p in positions]
        width = max(len(w.ids) for w in chosen)
        ids = torch.full((len(chosen), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(chosen), width), dtype=torch.long)
        targets = torch.full((len(chosen), width), IGNORE, dtype=torch.long)
        for b, w in enumerate(chosen):
            ids[b, :len(w.ids)] = torch.tensor(w.ids)
            mask[b, :len(w.ids)] = 1
            targets[b, :len(w.ids)] = torch.tensor(w.targets)
        batch = {"input_ids": ids, "attention_mask": mask, "targets": targets}
        return {k: v.to(device) for k, v in batch.items()} if device is not None else batch

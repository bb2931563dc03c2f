"""Where the heavy loops run: the backend protocol and its local implementation.

A backend is a strategy object (after TRAK's): commands take one (``--backend ray`` gives a
:class:`instattr.distributed.RayBackend`, nothing gives :data:`LOCAL`) and call its methods, so no
code branches on which backend it has. What a backend does, each in the blocks and batches this
process would cut, so that every backend gives the same bits:

- ``encode_groups(encoder, groups)``: pooled embeddings of groups of texts (head mode's encoding);
- ``classify_groups(classifier, groups)``: a Hugging Face classifier's features and probabilities;
- ``gradient_batches(projector, source, fs, rows, labels, batches, factors, query)``: the layered
  methods' projected gradients, batch by batch (``source`` and ``fs`` let a worker elsewhere
  rebuild the projector and the rows; ``projector`` and ``rows`` are this process's);
- ``map_batches(work)``: ``work(j)`` for each of ``len(work)`` batches, any order elsewhere (a
  language model's gradient pass, :class:`instattr.lm.WindowBatches`: picklable, results carry
  their positions);
- ``build_shards(job, todo)``: an index's shards (``job.write(i)`` writes shard i here);
- ``top_k(run, fitted, test, train, k, bottom_k, grid)``: each method's streamed top-k;
- ``search(index, names, methods, test, k, bottom_k)``: an index's exact top-k.

``dense`` says whether the backend can write whole score matrices, ``embeds_in_fit`` whether
training sides are computed when a method is fitted (locally) or by the backend's shard writers.
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np


class LocalBackend:
    """Everything in this process."""

    name = "local"
    dense = True                  # attribute may write dense score matrices
    embeds_in_fit = True          # training sides are computed when the methods are fitted
    runs_everything = True        # fine-tuning and the other single-process steps run here

    def encode_groups(self, encoder, groups, progress: bool = False) -> List[np.ndarray]:
        """``encoder.encode(texts, queries)`` of each group."""
        return [encoder.encode(texts, queries, progress=progress) for texts, queries in groups]

    def classify_groups(self, classifier, groups, progress: bool = False) -> List[Tuple[np.ndarray, np.ndarray]]:
        """``classifier.forward_texts(documents, queries)`` of each group."""
        return [classifier.forward_texts(list(docs), None if queries is None else list(queries), progress,
                                         desc=f"classify {i + 1}/{len(groups)}") for i, (docs, queries) in
                enumerate(groups)]

    def gradient_batches(self, projector, source, fs, rows, labels, batches, factors: bool, query: bool = False
                         ) -> Iterator[tuple]:
        """(positions, gradients, factors or None, final-layer inputs) of each batch, in order."""
        import torch
        labels = torch.as_tensor(np.asarray(labels))
        for pos in batches:
            yield (pos, *projector.gradients(rows.batch(pos), labels[pos], factors, query))

    def map_batches(self, work) -> Iterator[object]:
        """``work(j)`` for each of its ``len(work)`` batches, in order."""
        for j in range(len(work)):
            yield work(j)

    def build_shards(self, job, todo: Sequence[int], progress: bool = False) -> Iterator[Tuple[int, Dict[str, dict]]]:
        """Write shards ``todo`` one after the other; yields (shard, its entries per method)."""
        from tqdm.auto import tqdm
        for i in tqdm(todo, desc=f"index {len(job.shards)} shards", disable=not progress, leave=False):
            yield i, job.write(i)

    def top_k(self, run, fitted, test, train, k: int, bottom_k: int, grid, progress: bool = False):
        """Each method's top-k (and bottom-k) of ``test``: {name: {"top": .., "bottom": ..}}."""
        from tqdm.auto import tqdm

        from .methods.scoring import score_top_k
        members = [fitted[n].member(test) for n in fitted]
        blocks = len(grid.test_blocks(len(test))) * len(train)
        with tqdm(total=blocks, desc=f"top-{k}", unit="row", disable=not progress, leave=False) as bar:
            return score_top_k(members, len(test), k, bottom_k, grid, progress=bar.update)

    def search(self, index, names, methods, test, k: int, bottom_k: int = 0):
        """An index's exact top-k, block by block here."""
        return index.search(names, test, k, bottom_k)

    def close(self) -> None:
        """Nothing to stop."""

    def __enter__(self) -> "LocalBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


LOCAL = LocalBackend()


def backend_or_local(backend: Optional[object]):
    """``backend``, or :data:`LOCAL` for None."""
    return LOCAL if backend is None else backend

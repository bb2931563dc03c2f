"""The model interface: what a trained text classifier is to instattr.

After kronfluence's ``Task`` and TRAK's model-output functions, one object owns everything
model-specific, so that attribution methods and evaluations never look inside a model:

- ``final_layer()``: the last linear layer (weight, bias, L2), whose input is the run's features;
- ``module()``: the classifier as one ``nn.Module`` running its *own* forward pass from a batch of
  token ids (``forward(**batch) -> Output``: pooled logits and the final layer's input);
  ``tokenize(texts)`` and ``rows(fs)`` make those batches (:mod:`.rows`, always right-padded);
- ``tracked(layers, modules)``: which of its linear modules the layered methods track
  (:mod:`.modules`), and ``task()``: what is attributed (:mod:`instattr.task`: the training loss,
  the query's measurement, the curvature);
- ``featurize(texts)`` / ``recompute(fs)``: features and probabilities of new texts or of stored rows
  (TracIn asks each checkpoint);
- ``checkpoints()``: earlier states of the classifier with their learning rates (TracIn).

Two implementations: :class:`~instattr.models.head_classifier.HeadClassifier` (a frozen encoder
plus instattr's head) and :class:`~instattr.models.hf.HFClassifier` (any Hugging Face sequence
classifier, encoder or decoder, full or a PEFT adapter). A classifier may be bound to a run
(``run``), which is where the texts of its stored rows live.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..arrays import FeatureSet, FinalLayer
from ..errors import InstattrError
from ..store import Run, RunError
from .modules import Tracked, find_blocks, track_by_probe
from .rows import RowIds, Rows

Texts = Tuple[List[str], Optional[List[str]]]
BATCH_SIZE = 64


@dataclass
class Output:
    """What a classifier's forward pass gives instattr: ``logits`` (B, C) and ``features`` (B, d), the
    final linear layer's input, at one vector per row; a Hugging Face model's own logits (``own``)
    and whether its head ran on every token (``token_wise``: instattr pooled the last attended one)."""
    logits: torch.Tensor
    features: torch.Tensor
    own: Optional[torch.Tensor] = None
    token_wise: bool = False


def linear_to_final_layer(linear, l2: float) -> FinalLayer:
    """The weight and bias of a torch ``nn.Linear`` as a float64 :class:`FinalLayer` with penalty ``l2``."""
    b = None if linear.bias is None else linear.bias.detach().double().cpu().numpy()
    return FinalLayer(w=linear.weight.detach().double().cpu().numpy(), b=b, l2=l2)


class Classifier(ABC):
    """Base of the classifiers; see the module docstring for what each method promises."""

    kind: str = ""
    batch_size: int = BATCH_SIZE
    prefix: str = ""                   # what :meth:`module` puts before the names of the user's model

    def __init__(self, label_names: Sequence[str], pair_mode: Optional[str], run: Optional[Run] = None,
                 device=None):
        from ..device import resolve_device
        self.label_names = list(label_names)
        self.pair_mode = pair_mode
        self.run = run
        self.device = resolve_device(device)

    @property
    def n_classes(self) -> int:
        return len(self.label_names)

    @property
    def is_pair(self) -> bool:
        return self.pair_mode is not None

    # ------------------------------------------------------------------ the model
    @abstractmethod
    def final_layer(self) -> FinalLayer:
        """The last linear layer and the L2 coefficient the closed forms use."""

    @abstractmethod
    def module(self) -> torch.nn.Module:
        """The classifier's own forward pass as a module: ``module(**batch) -> Output``."""

    @property
    @abstractmethod
    def final_name(self) -> str:
        """The final linear layer's name inside :meth:`module`."""

    @abstractmethod
    def tokenize(self, documents: Sequence[str], queries: Optional[Sequence[str]] = None) -> Rows:
        """Token ids of texts, as this classifier reads them."""

    def trainable(self) -> Optional[List[str]]:
        """Names of the parameters a PEFT adapter trains (None: not an adapter)."""
        return None

    def task(self, measurement: str = "loss"):
        """What is attributed (:class:`instattr.task.ClassificationTask`)."""
        from ..task import ClassificationTask
        return ClassificationTask(self.n_classes, measurement)

    def tracked(self, layers: Optional[int] = None, modules: Optional[Sequence[str]] = None) -> List[Tracked]:
        """The linear modules the layered methods track (:func:`instattr.models.modules.track`):
        ``modules`` (glob patterns over the model's own module names), else an adapter's trainable
        ones, else the top ``layers`` blocks and the head. Names are those inside :meth:`module`."""
        probe = self.tokenize(["a b"], ["a b"] if self.is_pair else None).batch([0], self.device)
        return track_by_probe(self.module(), probe, layers, modules, None if modules else self.trainable(),
                              self.prefix)

    @property
    def n_layers(self) -> int:
        """How many transformer blocks the classifier has."""
        return len(find_blocks(self.module())[1])

    @abstractmethod
    def fingerprint(self) -> str:
        """Which weights the classifier has (cache keys)."""

    # ------------------------------------------------------------------ texts -> arrays
    def featurize(self, documents: Sequence[str], queries: Optional[Sequence[str]] = None,
                  labels: Optional[Sequence[int]] = None, progress: bool = False) -> FeatureSet:
        """New texts through the classifier (label = prediction unless given); the FeatureSet
        carries the texts, for methods that rerun the model."""
        documents = list(documents)
        queries = self.check_texts(documents, queries)
        feats, probs = self.forward_texts(documents, queries, progress)
        pred = probs.argmax(1).astype(np.int64)
        return FeatureSet(idx=np.array([f"new_{i}" for i in range(len(documents))]),
                          label=pred if labels is None else np.asarray(labels, dtype=np.int64), pred=pred,
                          probs=probs, features=feats, texts=(documents, queries))

    def check_texts(self, documents: Sequence[str], queries: Optional[Sequence[str]]) -> Optional[List[str]]:
        """Pairs need a query per text, single texts none; empty texts are refused."""
        where = f"{self.run.path}: " if self.run is not None else ""
        if self.is_pair and queries is None:
            raise InstattrError(f"{where}this classifier reads sentence pairs; give a --query")
        if not self.is_pair and queries is not None:
            raise InstattrError(f"{where}this classifier reads single texts; --query does not apply")
        if queries is not None and len(queries) != len(documents):
            raise InstattrError(f"{len(documents)} texts but {len(queries)} queries")
        for i, t in enumerate(list(documents) + list(queries or [])):
            if not isinstance(t, str) or not t.strip():
                raise InstattrError(f"text {i + 1} is empty; there is nothing to classify")
        return None if queries is None else list(queries)

    def forward_rows(self, rows: Rows, progress: bool = False, desc: str = "classify"
                     ) -> Tuple[np.ndarray, np.ndarray]:
        """(final layer's inputs, probabilities), float32, of tokenized rows, in length-sorted
        batches of ``batch_size`` (:meth:`forward_batch` each)."""
        from tqdm.auto import tqdm
        n = len(rows)
        feats = np.zeros((n, self.final_layer().w.shape[1]), dtype=np.float32)
        probs = np.zeros((n, self.n_classes), dtype=np.float32)
        with tqdm(total=n, desc=desc, unit="ex", disable=not progress, leave=False) as bar:
            for pos in rows.order(self.batch_size):
                feats[pos], probs[pos] = self.forward_batch(rows.batch(pos, self.device))
                bar.update(len(pos))
        return feats, probs

    @torch.inference_mode()
    def forward_batch(self, batch: dict) -> Tuple[np.ndarray, np.ndarray]:
        """(final layer's input, probabilities), float32, of one padded batch."""
        out = self.module()(**batch)
        return out.features.float().cpu().numpy(), torch.softmax(out.logits.float(), -1).cpu().numpy()

    def forward_texts(self, documents: List[str], queries: Optional[List[str]], progress: bool = False,
                      desc: str = "classify") -> Tuple[np.ndarray, np.ndarray]:
        """(features, probs) float32 of texts."""
        return self.forward_rows(self.tokenize(documents, queries), progress, desc)

    def recompute(self, fs: FeatureSet, progress: bool = False) -> Tuple[np.ndarray, np.ndarray]:
        """This classifier's (features, probs) for the rows of ``fs`` (stored rows or new texts)."""
        return self.forward_rows(self.rows(fs), progress)

    def texts(self, fs) -> Texts:
        """(documents, queries) of the rows of ``fs``: its own texts, or the bound run's by idx."""
        if fs.texts is not None:
            return fs.texts
        if self.run is None or fs.split is None:
            raise RunError(f"{fs.split or 'rows'}: these rows carry no texts, and the {self.kind or 'model'} "
                           "classifier has no run to look them up in")
        examples = {e.idx: e for e in self.run.examples(fs.split)}
        try:
            rows = [examples[str(i)] for i in fs.idx]
        except KeyError as e:
            raise RunError(f"{self.run.path}: {fs.split} row {e.args[0]} is not in the run's dataset") from None
        return [e.document for e in rows], ([e.query for e in rows] if self.is_pair else None)

    def rows(self, fs) -> Rows:
        """The tokenized rows of ``fs`` (a FeatureSet, or anything with ``idx``, ``split`` and
        ``texts``): new texts tokenized now, a split's rows from its tokenization (made once per
        run) by idx."""
        if fs.texts is not None or self.run is None or fs.split is None:
            return self.tokenize(*self.texts(fs))
        split = fs.split

        def whole():
            idx = [str(i) for i in self.run.features(split).idx]
            docs, queries = self.texts(RowIds(split, np.asarray(idx)))
            return self.tokenize(docs, queries), {i: p for p, i in enumerate(idx)}
        rows, where = self.run.memo(("rows", self.fingerprint(), split), whole)
        try:
            positions = [where[str(i)] for i in fs.idx]
        except KeyError as e:
            raise RunError(f"{self.run.path}: {split} row {e.args[0]} is not in the run") from None
        if positions == list(range(len(rows))):
            return rows
        return rows.subset(positions)

    # ------------------------------------------------------------------ training history
    def checkpoints(self) -> List[Tuple["Classifier", float]]:
        """Earlier states of this classifier and the learning rate after each (TracIn)."""
        raise RunError(f"{type(self).__name__} has no saved checkpoints")

    # ------------------------------------------------------------------ retraining
    def retrain_scopes(self) -> Tuple[str, ...]:
        """What remove-and-retrain can retrain (first = default): ``head``, ``final``."""
        return ("final",)

    @property
    def cache_dir(self):
        """Where on-disk caches go (``RUN/cache``), or None for a classifier without a run."""
        return None if self.run is None else self.run.path / "cache"

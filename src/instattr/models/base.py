"""The model interface: what a trained text classifier is to instattr.

After kronfluence's ``Task`` and TRAK's model-output functions, one object owns everything
model-specific, so that attribution methods and evaluations never look inside a model:

- ``final_layer()``: the last linear layer (weight, bias, L2), whose input is the run's features;
- ``featurize(texts)``: features, probabilities and the untuned sentence embedding of new texts;
- ``recompute(fs)``: this classifier's features and probabilities for stored rows (TracIn asks
  each checkpoint for them);
- ``encoder()`` and ``tracked(layers)``: the tokenizer and transformer below the tracked blocks, and
  the top ``layers`` blocks plus everything above them as one module from hidden states to logits;
- ``checkpoints()``: earlier states of the classifier with their learning rates (TracIn).

Two implementations: :class:`~instattr.models.head_classifier.HeadClassifier` (a frozen encoder
plus instattr's head) and :class:`~instattr.models.hf.HFClassifier` (any Hugging Face sequence
classifier: fine-tuned by instattr or imported). A classifier may be bound to a run (``run``),
which is where the texts of its stored rows and its on-disk caches live.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..errors import InstattrError
from ..store import FeatureSet, FinalLayer, Run, RunError

Texts = Tuple[List[str], Optional[List[str]]]


def linear_to_final_layer(linear, l2: float) -> FinalLayer:
    """The weight and bias of a torch ``nn.Linear`` as a float64 :class:`FinalLayer` with penalty ``l2``."""
    b = None if linear.bias is None else linear.bias.detach().double().cpu().numpy()
    return FinalLayer(w=linear.weight.detach().double().cpu().numpy(), b=b, l2=l2)


class Classifier(ABC):
    """Base of the classifiers; see the module docstring for what each method promises."""

    kind: str = ""

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

    # ------------------------------------------------------------------ the last layer
    @abstractmethod
    def final_layer(self) -> FinalLayer:
        """The last linear layer and the L2 coefficient the closed forms use."""

    # ------------------------------------------------------------------ texts -> arrays
    def featurize(self, documents: Sequence[str], queries: Optional[Sequence[str]] = None,
                  labels: Optional[Sequence[int]] = None, progress: bool = False) -> FeatureSet:
        """New texts through the classifier (label = prediction unless given); the FeatureSet
        carries the texts, for methods that rerun the transformer."""
        documents = list(documents)
        queries = self.check_texts(documents, queries)
        feats, probs = self.forward_texts(documents, queries, progress)
        pred = probs.argmax(1).astype(np.int64)
        return FeatureSet(idx=np.array([f"new_{i}" for i in range(len(documents))]),
                          label=pred if labels is None else np.asarray(labels, dtype=np.int64), pred=pred,
                          probs=probs, features=feats, encoder=self.sentence_embeddings(documents, queries, progress),
                          texts=(documents, queries))

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

    @abstractmethod
    def forward_texts(self, documents: List[str], queries: Optional[List[str]],
                      progress: bool = False) -> Tuple[np.ndarray, np.ndarray]:
        """(features, probs) float32 of texts."""

    @abstractmethod
    def sentence_embeddings(self, documents: List[str], queries: Optional[List[str]],
                            progress: bool = False) -> np.ndarray:
        """The untuned sentence encoder's pooled output (``FeatureSet.encoder``) of texts."""

    @abstractmethod
    def recompute(self, fs: FeatureSet, progress: bool = False) -> Tuple[np.ndarray, np.ndarray]:
        """This classifier's (features, probs) for the rows of ``fs`` (stored rows or new texts)."""

    def texts(self, fs: FeatureSet) -> Texts:
        """(documents, queries) of the rows of ``fs``: its own texts, or the bound run's by idx."""
        if fs.texts is not None:
            return fs.texts
        if self.run is None or fs.split is None:
            raise RunError("these rows carry no texts and no run to look them up in")
        examples = {e.idx: e for e in self.run.examples(fs.split)}
        rows = [examples[str(i)] for i in fs.idx]
        return [e.document for e in rows], ([e.query for e in rows] if self.is_pair else None)

    # ------------------------------------------------------------------ the top layers
    @abstractmethod
    def encoder(self):
        """The :class:`~instattr.encoders.Encoder` (tokenizer + base transformer) whose hidden
        states enter the tracked blocks."""

    @property
    @abstractmethod
    def n_layers(self) -> int:
        """How many transformer blocks the classifier has."""

    @abstractmethod
    def tracked(self, start: int, dtype="float32"):
        """A :class:`~instattr.models.tracked.TrackedModel` of blocks ``start..`` and the top."""

    @abstractmethod
    def fingerprint(self) -> str:
        """Which weights the hidden states below the tracked blocks come from (cache keys)."""

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

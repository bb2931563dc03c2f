"""TracIn (Pruthi et al. 2020) on the final layer: sum over saved checkpoints of lr_c * <g_t^c, g_i^c>.

The checkpoints come from the classifier (``model.checkpoints()``, see
:meth:`instattr.models.Classifier.checkpoints`): head mode saves the head after every epoch
(``model/checkpoints.safetensors``, learning rates in its metadata); a Hugging Face model is given
its training checkpoints (``checkpoints``: save_pretrained folders, learning rates from
``checkpoint_lrs`` or each folder's trainer_state.json).

Each checkpoint's gradient is that of ``gd`` at that checkpoint -- its features recomputed
(``recompute``) -- so with one checkpoint equal to the final model and lr 1 it *is* ``gd``. As
everywhere, the test side takes the final model's predicted label and the training side the gold
label. Each example maps to one vector, the checkpoints' gradients scaled by sqrt(lr) and
concatenated, so a block of scores is one matrix product. ``tracin-top`` (:mod:`instattr.layers.tracin`)
does the same over the tracked modules.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ..arrays import FeatureSet
from ..errors import InstattrError
from .base import Attributor, float32_rows
from .lastlayer import class_probs, loss_errors, reduced_gradients, sum_zero_basis
from .registry import register


class History:
    """The checkpoints option shared by both TracIns."""

    def _checkpoints(self, classifier):
        if not hasattr(classifier, "checkpoints"):
            raise InstattrError(f"{self.name}: needs the whole classifier (instattr.models.classifier_for(run)), "
                                f"not {type(classifier).__name__}")
        if self.checkpoints:
            if not hasattr(classifier, "with_checkpoints"):
                raise InstattrError(f"{self.name}: --checkpoints applies to Hugging Face models; this run's "
                                    "head checkpoints were saved by training")
            classifier = classifier.with_checkpoints(self.checkpoints, self.checkpoint_lrs)
        history = classifier.checkpoints()
        self.lrs_ = np.array([lr for _, lr in history], dtype=np.float64)
        return history

    def _history_config(self, cfg: dict) -> dict:
        if hasattr(self, "lrs_"):
            cfg["checkpoint_lrs_used"] = [float(x) for x in self.lrs_]
        return cfg


@register("tracin")
class TracIn(History, Attributor):
    """Sum over checkpoints of lr * <g_t, g_i> on the final linear layer."""

    command_line_options = ("checkpoints", "checkpoint_lrs")
    needs = "classifier"

    def __init__(self, checkpoints: Optional[Sequence[str]] = None, checkpoint_lrs: Optional[Sequence[float]] = None,
                 chunk_size: Optional[int] = None):
        super().__init__(chunk_size)
        self.checkpoints = None if checkpoints is None else [str(c) for c in checkpoints]
        self.checkpoint_lrs = None if checkpoint_lrs is None else [float(x) for x in checkpoint_lrs]

    def config(self) -> dict:
        return self._history_config(super().config())

    def _embed(self, fs: FeatureSet, labels: np.ndarray) -> np.ndarray:
        parts = []
        for (classifier, lr), layer in zip(self.history_, self.layers_):
            feats, probs = classifier.recompute(fs)
            if feats.shape[1] != layer.w.shape[1]:
                raise InstattrError(f"tracin: checkpoint features have width {feats.shape[1]}, its final layer "
                                    f"{layer.w.shape[1]}")
            x = layer.augment(feats)
            p = class_probs(x, probs, layer.weight())
            parts.append(np.sqrt(lr) * reduced_gradients(loss_errors(p, labels), x, self.basis_))
        return float32_rows(np.concatenate(parts, axis=1))

    def _fit(self, train: FeatureSet, model) -> None:
        self.history_ = self._checkpoints(model)
        self.layers_ = [c.final_layer() for c, _ in self.history_]
        self.basis_ = sum_zero_basis(self.layers_[0].n_classes)
        self.train_embedding_ = self._embed(train, train.label)

    def _embed_test(self, test: FeatureSet) -> np.ndarray:
        return self._embed(test, test.pred)

    def self_scores(self) -> np.ndarray:
        """TracIn's self-influence: sum over checkpoints of lr * ||g_i||^2 at the gold label."""
        self._check_fitted()
        emb = np.asarray(self.train_embedding_, dtype=np.float64)
        return np.einsum("ij,ij->i", emb, emb)

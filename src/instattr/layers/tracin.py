"""TracIn (Pruthi et al. 2020): sum over saved checkpoints of lr_c * <g_t^c, g_i^c>.

The checkpoints come from the classifier (:meth:`instattr.models.Classifier.checkpoints`): head
mode saves the head after every epoch (``model/checkpoints.safetensors``, learning rates in its
metadata); a Hugging Face model is given its training checkpoints (``checkpoints``: save_pretrained
folders, learning rates from ``checkpoint_lrs`` or each folder's trainer_state.json).

``tracin`` uses the final linear layer's gradient at each checkpoint -- that checkpoint's features
recomputed (:meth:`~instattr.models.Classifier.recompute`) -- exactly as ``gd`` does at the final
model, so with one checkpoint equal to the final model and lr 1 it *is* ``gd``. ``tracin-top``
does the same with the projected gradients of ``gd-top`` (final layers plus the top ``layers``
blocks). As everywhere, the test side takes the final model's predicted label and the training
side the gold label. Each example maps to one vector, the checkpoints' gradients scaled by
sqrt(lr) and concatenated, so a block of scores is one matrix product.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import InstattrError
from ..methods.base import Attributor, float32_rows
from ..methods.lastlayer import class_probs, loss_errors, reduced_gradients, sum_zero_basis
from ..methods.registry import register
from ..store import FeatureSet
from .attributors import _TopLayers, classifier_of


class _History:
    """The checkpoints option shared by both TracIns."""

    def _checkpoints(self, model):
        classifier = classifier_of(self.name, model)
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
class TracIn(_History, Attributor):
    """Sum over checkpoints of lr * <g_t, g_i> on the final linear layer."""

    command_line_options = ("checkpoints", "checkpoint_lrs")
    needs_classifier = True

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


@register("tracin-top")
class TopTracIn(_History, _TopLayers):
    """Sum over checkpoints of lr * <g_t, g_i> over the final layers and the top ``layers`` blocks."""

    command_line_options = _TopLayers.command_line_options + ("checkpoints", "checkpoint_lrs")

    def __init__(self, layers: Optional[int] = None, proj_dim: Optional[int] = 32, projection: str = "khatri-rao",
                 seed: int = 0, checkpoints: Optional[Sequence[str]] = None,
                 checkpoint_lrs: Optional[Sequence[float]] = None, batch_size: int = 32, dtype: str = "float32",
                 progress: Optional[bool] = None, chunk_size: Optional[int] = None):
        super().__init__(layers, proj_dim, projection, seed, batch_size, dtype, progress, chunk_size)
        self.checkpoints = None if checkpoints is None else [str(c) for c in checkpoints]
        self.checkpoint_lrs = None if checkpoint_lrs is None else [float(x) for x in checkpoint_lrs]

    def config(self) -> dict:
        return self._history_config(super().config())

    def _checkpoint_options(self):
        """The checkpoints as a worker needs them: absolute paths (its working directory is not ours)."""
        return (None if self.checkpoints is None else tuple(str(Path(c).resolve()) for c in self.checkpoints),
                None if self.checkpoint_lrs is None else tuple(self.checkpoint_lrs))

    def _embed_all(self, fs: FeatureSet, labels: np.ndarray, desc: str) -> np.ndarray:
        parts = []
        for c, ((classifier, lr), (model, projector)) in enumerate(zip(self.history_, self.tracked_)):
            grads, _ = self._projected(projector, fs, labels, False, f"{desc} ckpt {c + 1}", check=False,
                                       classifier=classifier, checkpoint=c)
            parts.append(grads * float(np.sqrt(lr)))
        return np.ascontiguousarray(torch.cat(parts, dim=1).float().numpy())

    def _fit(self, train: FeatureSet, model) -> None:
        self.model_ = self._model(model)
        self.history_ = self._checkpoints(model)
        self.tracked_ = []
        for classifier, _ in self.history_:
            tracked = classifier.tracked(self.start_, self.dtype)
            self.tracked_.append((tracked, self._projector(tracked)))
        self.dim_ = sum(p.dim for _, p in self.tracked_)
        self.train_embedding_ = self._embed_all(train, train.label, "tracin-top train")

    def _embed_test(self, test: FeatureSet) -> np.ndarray:
        return self._embed_all(test, test.pred, "tracin-top test")

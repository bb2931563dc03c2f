"""``tracin-top``: TracIn (Pruthi et al. 2020) over the tracked modules.

Sum over saved checkpoints of lr_c * <g_t^c, g_i^c>, each checkpoint's gradients the projected
ones of ``gd-top`` at that checkpoint (the final-layer ``tracin`` is :mod:`instattr.methods.tracin`;
the checkpoints and learning rates come the same way). Each example maps to one vector, the
checkpoints' gradients scaled by sqrt(lr) and concatenated.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..arrays import FeatureSet
from ..methods.registry import register
from ..methods.tracin import History
from .attributors import _TopLayers


@register("tracin-top")
class TopTracIn(History, _TopLayers):
    """Sum over checkpoints of lr * <g_t, g_i> over the tracked modules."""

    command_line_options = _TopLayers.command_line_options + ("checkpoints", "checkpoint_lrs")

    def __init__(self, layers: Optional[int] = None, modules: Optional[Sequence[str]] = None,
                 proj_dim: Optional[int] = 32, projection: str = "khatri-rao", seed: int = 0,
                 measurement: str = "loss", checkpoints: Optional[Sequence[str]] = None,
                 checkpoint_lrs: Optional[Sequence[float]] = None, batch_size: int = 32, dtype: str = "float32",
                 progress: Optional[bool] = None, chunk_size: Optional[int] = None):
        super().__init__(layers, modules, proj_dim, projection, seed, measurement, batch_size, dtype, progress,
                         chunk_size)
        self.checkpoints = None if checkpoints is None else [str(c) for c in checkpoints]
        self.checkpoint_lrs = None if checkpoint_lrs is None else [float(x) for x in checkpoint_lrs]

    def config(self) -> dict:
        return self._history_config(super().config())

    def _checkpoint_options(self):
        """The checkpoints as a worker needs them: absolute paths (its working directory is not ours)."""
        return (None if self.checkpoints is None else tuple(str(Path(c).resolve()) for c in self.checkpoints),
                None if self.checkpoint_lrs is None else tuple(self.checkpoint_lrs))

    def _embed_all(self, fs: FeatureSet, labels: np.ndarray, desc: str, query: bool) -> np.ndarray:
        parts = []
        for c, ((classifier, lr), projector) in enumerate(zip(self.history_, self.projectors_)):
            grads, _ = self._projected(projector, fs, labels, False, f"{desc} ckpt {c + 1}", check=False,
                                       classifier=classifier, checkpoint=c, query=query)
            parts.append(grads * float(np.sqrt(lr)))
        return np.ascontiguousarray(torch.cat(parts, dim=1).float().numpy())

    def _fit(self, train: FeatureSet, model) -> None:
        self._model(model)
        self.history_ = self._checkpoints(model)
        self.projectors_ = [self._projector(classifier) for classifier, _ in self.history_]
        self.dim_ = sum(p.dim for p in self.projectors_)
        self.train_embedding_ = self._embed_all(train, train.label, "tracin-top train", query=False)

    def _embed_test(self, test: FeatureSet) -> np.ndarray:
        return self._embed_all(test, test.pred, "tracin-top test", query=True)

"""TracIn (Pruthi et al. 2020): sum over saved checkpoints of lr_c * <g_t^c, g_i^c>.

Training saves the head after every epoch (``model/checkpoints.safetensors``, learning rates in its
metadata). ``tracin`` uses the last linear layer's gradient at each checkpoint -- the features
recomputed through that checkpoint's pooler -- exactly as ``gd`` does at the final head, so with one
checkpoint equal to the final head and lr 1 it *is* ``gd``. ``tracin-top`` does the same with the
projected gradients of ``gd-top`` (head plus the top ``layers`` encoder layers). As everywhere, the
test side takes the final model's predicted label and the training side the gold label. Each
example maps to one vector, the checkpoints' gradients scaled by sqrt(lr) and concatenated, so a
block of scores is one matrix product.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..methods.base import Attributor, float32_rows
from ..methods.lastlayer import loss_errors, reduced_gradients, softmax, sum_zero_basis
from ..methods.registry import register
from ..model import pair_input
from ..store import FeatureSet, HeadState, RunError
from .attributors import _TopLayers
from .network import checkpoints


def _learning_rates(lrs) -> np.ndarray:
    lrs = np.asarray(lrs, dtype=np.float64)
    if (lrs < 0).any() or not np.isfinite(lrs).all():
        raise RunError(f"checkpoint learning rates must be finite and >= 0, got {lrs.tolist()}")
    return lrs


@register("tracin")
class TracIn(Attributor):
    """Sum over checkpoints of lr * <g_t, g_i> on the last linear layer."""

    needs_head = False

    def __init__(self, run=None, chunk_size: Optional[int] = None):
        super().__init__(chunk_size)
        self.run = run

    def config(self) -> dict:
        cfg = {k: v for k, v in super().config().items() if k != "run"}
        if hasattr(self, "lrs_"):
            cfg["checkpoint_lrs"] = [float(x) for x in self.lrs_]
        return cfg

    def _embed(self, fs: FeatureSet, labels: np.ndarray) -> np.ndarray:
        x = np.asarray(pair_input(fs.encoder, self.pair_mode_), dtype=np.float64)
        if x.shape[1] != self.width_:
            raise ValueError(f"tracin: head input width {x.shape[1]}, checkpoints expect {self.width_}")
        parts = []
        for head, lr in zip(self.heads_, self.lrs_):
            f = np.tanh(x @ head["dense_w"].T + head["dense_b"])
            p = softmax(f @ head["w"].T)
            parts.append(np.sqrt(lr) * reduced_gradients(loss_errors(p, labels), f, self.basis_))
        return float32_rows(np.concatenate(parts, axis=1))

    def _fit(self, train: FeatureSet, head: Optional[HeadState]) -> None:
        if self.run is None:
            raise ValueError("tracin: needs the run (its checkpoints); use attribution.fit_method "
                             "or get_method('tracin', run=run)")
        m = self.run.manifest
        if m.get("mode", "head") != "head":
            raise RunError(f"tracin: {self.run.path} is a {m.get('mode')} run; its head input changed during "
                           "training and only head checkpoints are saved")
        heads, lrs = checkpoints(self.run)
        self.heads_ = [{k: v.double().numpy() for k, v in h.items()} for h in heads]
        self.lrs_ = _learning_rates(lrs)
        self.pair_mode_ = m.get("pair_mode")
        self.width_ = self.heads_[0]["dense_w"].shape[1]
        self.basis_ = sum_zero_basis(self.heads_[0]["w"].shape[0])
        self.train_embedding_ = self._embed(train, train.label)

    def _score(self, test: FeatureSet, out: np.ndarray) -> None:
        np.matmul(self._embed(test, test.pred), self.train_embedding_.T, out=out)


@register("tracin-top")
class TopTracIn(_TopLayers):
    """Sum over checkpoints of lr * <g_t, g_i> over the head and the top ``layers`` encoder layers."""

    def config(self) -> dict:
        cfg = super().config()
        if hasattr(self, "lrs_"):
            cfg["checkpoint_lrs"] = [float(x) for x in self.lrs_]
        return cfg

    def _embed_all(self, fs: FeatureSet, labels: np.ndarray, desc: str) -> np.ndarray:
        parts = []
        for c, (head, lr) in enumerate(zip(self.heads_, self.lrs_)):
            self.model_.set_head(head)
            grads, _ = self._projected(self.projector_, fs, labels, False, f"{desc} ckpt {c + 1}", check=False)
            parts.append(grads * float(np.sqrt(lr)))
        return np.ascontiguousarray(torch.cat(parts, dim=1).float().numpy())

    def _fit(self, train: FeatureSet, head: Optional[HeadState]) -> None:
        if self.run is not None and self.run.manifest.get("mode", "head") != "head":
            raise RunError(f"tracin-top: {self.run.path} is a {self.run.manifest.get('mode')} run; "
                           "only the head's checkpoints are saved, not the encoder's")
        heads, lrs = checkpoints(self.run) if self.run is not None else (None, None)
        self.model_ = self._model(None)
        self.heads_, self.lrs_ = heads, _learning_rates(lrs)
        self.projector_ = self._projector(self.model_)
        self.dim_ = self.projector_.dim * len(heads)
        self.train_embedding_ = self._embed_all(train, train.label, "tracin-top train")

    def _embed_test(self, test: FeatureSet) -> np.ndarray:
        return self._embed_all(test, test.pred, "tracin-top test")

"""Gradient methods over the head plus the top k encoder layers: gd-top, gc-top, if-top, rif-top.

Same definitions and sign convention as the last-layer methods (:mod:`instattr.methods.gradient`):
the test-side gradient at the model's predicted label, the training side at the gold label,

    gd-top = <g_t, g_i>      gc-top = cos(g_t, g_i)
    if-top = g_t^T H^-1 g_i  rif-top = cos(H^-1/2 g_t, H^-1/2 g_i)

over every parameter of the tracked model (``layers`` top transformer layers, the pooler and the
last linear layer), H the Hessian of the regularised training loss (L2 on the last linear weight
only) plus ``damping``. Gradients are projected layer by layer without being formed
(:mod:`.projection`: ``proj_dim`` k gives k^2 numbers per linear layer, ``None`` = exact;
``projection`` khatri-rao by default, or LoGra's Kronecker); ``ihvp`` picks the inverse Hessian:

- ``projected`` (default): the Gauss-Newton Hessian in the projected space (:class:`GaussNewton`,
  solved in its dual form when there are fewer training rows than projected dimensions).
  This is the GGN ``(1/n) sum_i J_i^T (diag p_i - p_i p_i^T) J_i`` -- for softmax cross-entropy the
  *true* Fisher, i.e. the expectation over labels drawn from the model, not the empirical Fisher at
  the gold labels. On the last linear layer it equals the exact Hessian used by ``if``.
- ``lissa``: the paper's LiSSA on exact Hessian-vector products over exact (unprojected)
  gradients; ``damping`` is the Hessian damping here too (LiSSA's per-step damping is
  damping/scale). With the paper's large scale (1e4) and ``lissa_depth`` steps it is far from
  converged -- about ``depth/scale`` times gd-top -- as the paper's was; it converges when
  ``lissa_scale`` exceeds the largest eigenvalue and depth >> scale / (smallest eigenvalue + damping),
  and only if H + damping I is positive definite (over a frozen encoder's layers it often is not).
- ``explicit``: the autograd Hessian over exact gradients (tiny models).

``fit(train, classifier)`` needs the whole classifier (:func:`instattr.models.classifier_for`):
its tracked blocks, and the texts and caches of the rows through the run it is bound to.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

from ..errors import InstattrError
from ..methods.base import Attributor, mean_against_others
from ..methods.registry import register
from ..methods.similarity import unit_rows
from ..models.tracked import first_tracked_layer, resolve_dtype
from ..store import FeatureSet, RunError
from .cache import NEW, Examples
from .gradcache import cached_train_gradients
from .grads import FlatParameters, batch_hessian, hvp, per_example_flat_grads
from .ihvp import HESSIAN_STRUCTURES, Curvature, ExplicitHessian, GaussNewton, LiSSA
from .projection import KINDS, GradientProjector

DEFAULT_PROJ_DIM = 32
DEFAULT_DAMPING = 0.1
IHVPS = ("projected", "lissa", "explicit")
FEATURE_TOLERANCE = 1e-3      # recomputed pooler features vs the run's stored ones
MAX_EMBEDDING_BYTES = 8 << 30  # refuse exact (unprojected) training embeddings beyond this
EXACT_ROWS_PER_BLOCK = 16      # test rows per block on the unprojected (lissa, explicit) path


def _progress(total: int, desc: str, enabled: Optional[bool]):
    """A progress bar on stderr; ``enabled=None`` shows it only when stderr is a terminal."""
    import sys

    from tqdm.auto import tqdm
    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="ex", disable=not enabled, leave=False)


def loss_coefficients(probs: torch.Tensor, labels: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Q^T (p - onehot(y)): the cross-entropy gradient in the reduced logit directions (B, C-1)."""
    e = probs.clone()
    e[torch.arange(len(e)), labels.long()] -= 1.0
    return e @ basis


def gauss_newton_roots(probs: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """R_i (B, C-1, C-1) with R_i R_i^T = Q^T (diag p_i - p_i p_i^T) Q (the reduced logit Hessian)."""
    a = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
    b = basis.T @ a @ basis
    w, v = torch.linalg.eigh(b)
    return v * w.clamp_min(0).sqrt()[:, None, :]


def classifier_of(name: str, model):
    """``model`` if it is a whole classifier (with tracked blocks), else a one-line error."""
    if model is None or not hasattr(model, "tracked"):
        raise InstattrError(f"{name}: needs the whole classifier (instattr.models.classifier_for(run)), "
                            f"not {type(model).__name__}")
    return model


@dataclass(frozen=True)
class GradientSource:
    """What a worker in another process needs to compute the same projected gradients: the run
    (a folder it can read), the device type, the tracked blocks, the dtype, the projection, and
    for tracin-top which checkpoint. :meth:`build` gives the classifier and its projector."""

    run: str
    device: str
    start: int
    dtype: str
    proj_dim: Optional[int]
    seed: int
    projection: str
    checkpoint: Optional[int] = None            # index into classifier.checkpoints()
    checkpoints: Optional[Tuple[str, ...]] = None   # tracin-top's --checkpoints (Hugging Face models)
    checkpoint_lrs: Optional[Tuple[float, ...]] = None

    def build(self):
        """(classifier, projector), as the fitting process made them."""
        from ..models import classifier_for
        from ..store import Run
        classifier = classifier_for(Run(self.run), self.device)
        if self.checkpoint is not None:
            if self.checkpoints:
                classifier = classifier.with_checkpoints(list(self.checkpoints), self.checkpoint_lrs)
            classifier = classifier.checkpoints()[self.checkpoint][0]
        tracked = classifier.tracked(self.start, self.dtype)
        return classifier, GradientProjector(tracked, self.proj_dim, self.seed, self.projection)


def batch_gradients(projector: GradientProjector, batch, labels: torch.Tensor, dtype: torch.dtype,
                    factors: bool):
    """One padded batch's projected loss gradients at ``labels`` (B, dim), its Gauss-Newton factors
    (B, C-1, dim) or None, and the recomputed final-layer inputs (B, d)."""
    logits, feats, jac = (t.cpu() for t in projector.project(batch))
    p = torch.softmax(logits.double(), -1)
    basis = projector.basis.cpu().double()
    grads = torch.einsum("br,brd->bd", loss_coefficients(p, labels, basis).to(dtype), jac)
    facs = torch.einsum("brs,brd->bsd", gauss_newton_roots(p, basis).to(dtype), jac) if factors else None
    return grads, facs, feats


def projected_gradients(classifier, fs: FeatureSet, labels: np.ndarray, projector: GradientProjector,
                        start: int, batch_size: int = 32, dtype="float32", factors: bool = False,
                        check: bool = True, progress: Optional[bool] = False, desc: str = "",
                        what: str = "layers", backend=None, source: Optional[GradientSource] = None):
    """Projected per-example loss gradients of ``fs`` at ``labels`` (n, dim), in ``fs`` order, and
    with ``factors`` the Gauss-Newton factors (n * (C-1), dim): rows F with GGN = (1/n) F^T F.
    ``check`` compares the recomputed final-layer inputs with the run's stored features.
    ``backend`` (e.g. :class:`instattr.distributed.RayBackend`) computes the batches elsewhere from
    ``source``, rows of a run's splits only; new texts are always computed here."""
    dtype = resolve_dtype(dtype)
    examples = Examples(classifier, fs, start, progress)     # builds the split's hidden-state cache once
    n, r, dim = len(fs), projector.model.n_classes - 1, projector.dim
    if n * dim * (1 + r * factors) * torch.finfo(dtype).bits // 8 > MAX_EMBEDDING_BYTES:
        raise InstattrError(f"{what}: {n} x {dim} gradients do not fit in memory; set proj_dim")
    grads = torch.zeros(n, dim, dtype=dtype)
    facs = torch.zeros(n, r, dim, dtype=dtype) if factors else None
    labels = torch.as_tensor(np.asarray(labels))
    order = examples.order(batch_size)
    if backend is not None and source is not None and examples.split != NEW:
        parts = backend.gradient_batches(source, fs, labels.numpy(), order, factors)
    else:
        parts = ((pos, *batch_gradients(projector, examples.batch(pos, dtype), labels[pos], dtype, factors))
                 for pos in order)
    done = 0
    with _progress(n, desc, progress) as bar:
        for pos, g, f, feats in parts:
            if check:
                diff = float(np.abs(np.asarray(feats, dtype=np.float64)
                                    - np.asarray(fs.features[pos], dtype=np.float64)).max())
                if diff > FEATURE_TOLERANCE:
                    raise RunError(f"{what}: the tracked layers do not reproduce the run's stored features "
                                   f"(max difference {diff:.2g}); delete {classifier.cache_dir} if the model changed")
            grads[pos] = torch.as_tensor(g)
            if factors:
                facs[pos] = torch.as_tensor(f)
            done += len(pos)
            bar.update(len(pos))
    if done != n:
        raise InstattrError(f"{what}: gradients came back for {done} of {n} rows")
    return grads, (facs.reshape(n * r, dim) if factors else None)


def gauss_newton_curvature(projector: GradientProjector, factors: torch.Tensor, n: int, l2: float) -> Curvature:
    """The projected problem for :class:`GaussNewton`: factors, the L2 term (2 l2 I on the exact
    last-layer block), one Hessian block per tracked layer + head."""
    blocks = [slice(int(a), int(z)) for a, z in zip(projector.offsets[:-1], projector.offsets[1:])]
    reg = [2.0 * l2 * torch.eye(b.dim, dtype=torch.float64) if b.module is projector.model.final else None
           for b in projector.blocks]
    return Curvature(dim=projector.dim, n=n, factors=factors, blocks=blocks, regulariser=reg,
                     groups=list(projector.groups().values()))


def _over_root(rows: torch.Tensor, quad: torch.Tensor) -> torch.Tensor:
    """rows / sqrt(quad), row by row; rows whose quadratic form is 0 stay 0."""
    root = quad.clamp_min(0).sqrt()
    return rows / torch.where(root > 0, root, torch.ones_like(root)).to(rows.dtype)[:, None]


class _TopLayers(Attributor):
    """Shared machinery; subclasses set ``whitened`` and ``normalized`` (as the last-layer family)."""

    whitened = False
    normalized = False
    needs_classifier = True
    command_line_options = ("layers", "proj_dim", "projection", "damping", "ihvp")

    def __init__(self, layers: Optional[int] = None, proj_dim: Optional[int] = DEFAULT_PROJ_DIM,
                 projection: str = "khatri-rao", seed: int = 0, batch_size: int = 32, dtype: str = "float32",
                 progress: Optional[bool] = None, chunk_size: Optional[int] = None):
        super().__init__(chunk_size)
        if layers is not None and int(layers) < 0:
            raise InstattrError(f"{self.name}: layers must be >= 0 (None: the top 3), got {layers}")
        if proj_dim is not None and int(proj_dim) < 1:
            raise InstattrError(f"{self.name}: proj_dim must be a positive integer or None (exact), got {proj_dim}")
        if projection not in KINDS:
            raise InstattrError(f"{self.name}: projection must be one of {', '.join(KINDS)}, got {projection!r}")
        if int(batch_size) < 1:
            raise InstattrError(f"{self.name}: batch_size must be positive, got {batch_size}")
        resolve_dtype(dtype)
        self.layers = None if layers is None else int(layers)
        self.proj_dim = None if proj_dim is None else int(proj_dim)
        self.projection = projection
        self.seed, self.batch_size, self.dtype = int(seed), int(batch_size), dtype
        self.progress = None if progress is None else bool(progress)

    def config(self) -> dict:
        cfg = {k: v for k, v in super().config().items() if k != "progress"}
        if hasattr(self, "dim_"):
            cfg["gradient_dim"] = int(self.dim_)
            cfg["tracked_layers"] = len(self.model_.layers)
        return cfg

    # ------------------------------------------------------------------ shared steps
    def _model(self, model):
        """The tracked model of the classifier ``model`` (and remember both)."""
        self.classifier_ = classifier_of(self.name, model)
        self.start_ = first_tracked_layer(self.classifier_.n_layers, self.layers)
        self.l2_ = float(self.classifier_.final_layer().l2)
        return self.classifier_.tracked(self.start_, self.dtype)

    def _projected(self, projector: GradientProjector, fs: FeatureSet, labels: np.ndarray, factors: bool,
                   desc: str, check: bool = True, classifier=None, checkpoint: Optional[int] = None):
        classifier = classifier or self.classifier_
        source = None
        if self.backend is not None and self._runs_own_classifier():
            source = GradientSource(str(classifier.run.path.resolve()), classifier.device.type, self.start_,
                                    self.dtype, self.proj_dim, self.seed, self.projection, checkpoint,
                                    *self._checkpoint_options())
        return projected_gradients(classifier, fs, labels, projector, self.start_, self.batch_size, self.dtype,
                                   factors, check, self.progress, desc, self.name, self.backend, source)

    def _checkpoint_options(self):
        return None, None

    def _runs_own_classifier(self) -> bool:
        """Whether the classifier fit on is its run's own (or one of its checkpoints, tracin-top),
        which a worker can rebuild from the run folder; another one (e.g. re-initialised) is not."""
        from ..models import built_classifier
        run = self.classifier_.run
        return run is not None and self.classifier_ is built_classifier(run, self.classifier_.device)

    def _projector(self, model) -> GradientProjector:
        return GradientProjector(model, self.proj_dim, self.seed, self.projection)

    def _normalize(self, emb: torch.Tensor) -> torch.Tensor:
        if not self.normalized:
            return emb
        return torch.as_tensor(unit_rows(emb.double().numpy())).to(emb.dtype)

    def _finish(self, emb: torch.Tensor) -> np.ndarray:
        return np.ascontiguousarray(self._normalize(emb).float().numpy())

    # ------------------------------------------------------------------ projected path
    def _fit(self, train: FeatureSet, model) -> None:
        self.model_ = self._model(model)
        self.projector_ = self._projector(self.model_)
        self.dim_ = self.projector_.dim
        cacheable = self.proj_dim is not None   # the factors are cached too, for the whitened methods
        grads, factors, self.train_gradients_reused_ = cached_train_gradients(
            self.classifier_, self.model_, train, self.dtype,
            {"layers": len(self.model_.layers), "proj_dim": self.proj_dim, "seed": self.seed,
             "projection": self.projection},
            lambda: self._projected(self.projector_, train, train.label, self.whitened or cacheable,
                                    f"{self.name} train"))
        if self.whitened:   # if: H^-1 g_t . g_i; rif: the same over sqrt(g_t^T H^-1 g_t g_i^T H^-1 g_i)
            self.solver_ = self._gauss_newton(self.projector_, factors, len(train))
            if self.normalized:
                grads = _over_root(grads, self.solver_.quadratic(grads))
            self.train_embedding_ = np.ascontiguousarray(grads.float().numpy())
        else:
            self.train_embedding_ = self._finish(grads)

    def _embed_test(self, test: FeatureSet) -> np.ndarray:
        grads, _ = self._projected(self.projector_, test, test.pred, False, f"{self.name} test")
        if not self.whitened:
            return self._finish(grads)
        solved = self.solver_.solve(grads.double())
        if self.normalized:
            solved = _over_root(solved, (solved * grads.double()).sum(1))
        return np.ascontiguousarray(solved.float().numpy())

    def self_scores(self) -> np.ndarray:
        """As the last-layer methods' (:meth:`instattr.methods.gradient.LastLayerGradient.self_scores`)
        over the tracked parameters: gd-top (and tracin-top) ||g_i||^2, if-top g_i^T H^-1 g_i; the
        cosines gc-top and rif-top minus the mean of score(j, i) over the other training examples."""
        self._check_fitted()
        emb = np.asarray(self.train_embedding_, dtype=np.float64)
        if self.whitened:
            if self.normalized:      # rows g_i / sqrt(q_i); the test side of j is H^-1 g_j / sqrt(q_j)
                return mean_against_others(emb, self.solver_.solve(torch.as_tensor(emb)).numpy())
            return self.solver_.quadratic(torch.as_tensor(emb)).numpy()
        if self.normalized:
            return mean_against_others(emb, emb)
        return np.einsum("ij,ij->i", emb, emb)


@register("gd-top")
class TopGradientDot(_TopLayers):
    """<g_t, g_i> over the head and the top ``layers`` encoder layers (projected gradients)."""


@register("gc-top")
class TopGradientCosine(_TopLayers):
    """cos(g_t, g_i) over the head and the top ``layers`` encoder layers."""
    normalized = True


class _TopInfluence(_TopLayers):
    whitened = True

    def __init__(self, layers: Optional[int] = None, proj_dim: Optional[int] = DEFAULT_PROJ_DIM,
                 projection: str = "khatri-rao", seed: int = 0, ihvp: str = "projected",
                 damping: float = DEFAULT_DAMPING, hessian: str = "auto", lissa_scale: float = 1e4,
                 lissa_depth: int = 1000, lissa_repeats: int = 1, lissa_batch_size: int = 8,
                 batch_size: int = 32, dtype: str = "float32", progress: Optional[bool] = None,
                 chunk_size: Optional[int] = None):
        super().__init__(layers, proj_dim, projection, seed, batch_size, dtype, progress, chunk_size)
        if ihvp not in IHVPS:
            raise InstattrError(f"{self.name}: ihvp must be one of {', '.join(IHVPS)}, got {ihvp!r}")
        if not damping >= 0:
            raise InstattrError(f"{self.name}: damping must be >= 0, got {damping}")
        if hessian not in HESSIAN_STRUCTURES:
            raise InstattrError(f"{self.name}: hessian must be one of {', '.join(HESSIAN_STRUCTURES)}, got {hessian!r}")
        if self.normalized and ihvp == "lissa":
            raise InstattrError(f"{self.name}: needs H^-1/2 g for every training example; LiSSA gives H^-1 v "
                                "for one vector at a time -- use ihvp='projected' or 'explicit'")
        self.ihvp, self.damping, self.hessian = ihvp, float(damping), hessian
        self.lissa_scale, self.lissa_depth = float(lissa_scale), int(lissa_depth)
        self.lissa_repeats, self.lissa_batch_size = int(lissa_repeats), int(lissa_batch_size)
        LiSSA(self.damping / self.lissa_scale, self.lissa_scale, self.lissa_depth, self.lissa_repeats,
              self.lissa_batch_size)  # validates the options

    def _gauss_newton(self, projector: GradientProjector, factors: torch.Tensor, n: int) -> GaussNewton:
        return GaussNewton(self.damping, self.hessian).fit(gauss_newton_curvature(projector, factors, n, self.l2_))

    # ------------------------------------------------------------------ exact (unprojected) path
    def _fit(self, train: FeatureSet, model) -> None:
        if self.ihvp == "projected":
            return super()._fit(train, model)
        tracked = self.model_ = self._model(model)
        flat = FlatParameters(tracked)
        self.flat_, self.dim_ = flat, flat.dim
        dtype = resolve_dtype(self.dtype)
        examples = Examples(self.classifier_, train, self.start_, self.progress)
        labels = torch.as_tensor(np.asarray(train.label))
        n = len(train)

        def batch_hvp(vectors, rows):
            return hvp(tracked, flat, examples.batch(rows, dtype), labels[rows], vectors.to(dtype))

        def hessian():   # sum over batches of (batch share) x (regularised batch-loss Hessian)
            h = torch.zeros(flat.dim, flat.dim, dtype=torch.float64)
            for pos, batch in examples.batches(self.batch_size, dtype):
                h += len(pos) / n * batch_hessian(tracked, flat, batch, labels[pos]).double()
            return h

        curvature = Curvature(dim=flat.dim, n=n, hvp=batch_hvp, hessian=hessian)
        if self.ihvp == "explicit":
            self.solver_ = ExplicitHessian(self.damping).fit(curvature)
        else:
            self.solver_ = LiSSA(self.damping / self.lissa_scale, self.lissa_scale, self.lissa_depth,
                                 self.lissa_repeats, self.lissa_batch_size, self.seed).fit(curvature)
        self.train_ = train

    def _exact_grads(self, fs: FeatureSet, labels: np.ndarray, positions=None):
        """Yield (positions, (B, dim) exact per-example gradients) with torch.func."""
        dtype = resolve_dtype(self.dtype)
        examples = Examples(self.classifier_, fs, self.start_, self.progress)
        labels = torch.as_tensor(np.asarray(labels)).to(self.model_.device)
        for pos, batch in examples.batches(self.batch_size, dtype, positions):
            yield pos, per_example_flat_grads(self.model_, self.flat_, batch, labels[pos]).cpu()

    def self_scores(self) -> np.ndarray:
        if self.ihvp == "projected":
            return super().self_scores()
        self._check_fitted()     # exact gradients, a block at a time (tiny models)
        whiten = self.normalized
        rows = []
        for pos, g in self._exact_grads(self.train_, self.train_.label):
            rows.append((pos, self._normalize(self.solver_.whiten(g)).double() if whiten
                         else self.solver_.quadratic(g)))
        if not whiten:
            out = np.empty(self.n_train_)
            for pos, q in rows:
                out[pos] = q.numpy()
            return out
        a = np.empty((self.n_train_, rows[0][1].shape[1]))
        for pos, w in rows:
            a[pos] = w.numpy()
        return mean_against_others(a, a)

    def _score(self, test: FeatureSet, out: np.ndarray) -> None:
        if self.ihvp == "projected":
            return super()._score(test, out)
        g_t = torch.zeros(len(test), self.flat_.dim, dtype=resolve_dtype(self.dtype))
        for pos, g in self._exact_grads(test, test.pred):
            g_t[pos] = g
        left = self._normalize(self.solver_.whiten(g_t) if self.normalized else self.solver_.solve(g_t))
        with _progress(self.n_train_, f"{self.name} train", self.progress) as bar:
            for pos, g in self._exact_grads(self.train_, self.train_.label):
                right = self._normalize(self.solver_.whiten(g)) if self.normalized else g
                out[:, pos] = (left @ right.T).float().numpy()
                bar.update(len(pos))

    def _rows_per_block(self) -> int:
        if self.ihvp == "projected":
            return super()._rows_per_block()
        return int(self.chunk_size or EXACT_ROWS_PER_BLOCK)   # each row holds a full gradient

    def config(self) -> dict:
        cfg = super().config()
        if getattr(self, "solver_", None) is not None and hasattr(self.solver_, "full_"):
            cfg["hessian_resolved"] = "full" if self.solver_.full_ else "block"
            if self.solver_.full_:
                cfg["hessian_form"] = "dual" if self.solver_.dual_ else "primal"
        unused = () if self.ihvp == "lissa" else ("lissa_scale", "lissa_depth", "lissa_repeats", "lissa_batch_size")
        unused += ("proj_dim", "projection", "hessian") if self.ihvp != "projected" else ()
        return {k: v for k, v in cfg.items() if k not in unused}


@register("if-top")
class TopInfluence(_TopInfluence):
    """g_t^T (H + damping)^-1 g_i over the head and the top ``layers`` encoder layers."""


@register("rif-top")
class TopRelativeInfluence(_TopInfluence):
    """cos(H^-1/2 g_t, H^-1/2 g_i) over the head and the top ``layers`` encoder layers."""
    normalized = True

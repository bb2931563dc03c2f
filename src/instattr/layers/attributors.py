"""Gradient methods over tracked modules inside the model: gd-top, gc-top, if-top, rif-top.

Same definitions and sign convention as the last-layer methods (:mod:`instattr.methods.gradient`),
with the gradients those of the task (:mod:`instattr.task`): the training side the gradient of
the training loss at the gold label, the test side that of minus the query's measurement at the
predicted label (for a classifier by default the loss there),

    gd-top = <g_t, g_i>      gc-top = cos(g_t, g_i)
    if-top = g_t^T H^-1 g_i  rif-top = cos(H^-1/2 g_t, H^-1/2 g_i)

over the parameters of the tracked linear modules (:meth:`instattr.models.Classifier.tracked`:
``modules`` glob patterns, else an adapter's trainable ones, else the linear modules of the top
``layers`` blocks and the head), H the Hessian of the regularised training loss (L2 on the final
layer only) plus ``damping``. Gradients are projected module by module without being formed
(:mod:`.projection`: ``proj_dim`` k gives k^2 numbers per linear module, ``None`` = exact;
``projection`` khatri-rao by default, or LoGra's Kronecker); ``ihvp`` picks the inverse Hessian:

- ``projected`` (default): the Gauss-Newton Hessian in the projected space (:class:`GaussNewton`,
  solved in its dual form when there are fewer training rows than projected dimensions).
  This is the GGN ``(1/n) sum_i J_i^T (diag p_i - p_i p_i^T) J_i`` -- for softmax cross-entropy the
  *true* Fisher, i.e. the expectation over labels drawn from the model, not the empirical Fisher at
  the gold labels. On the last linear layer it equals the exact Hessian used by ``if``. Its
  ``hessian="block"`` form is block-diagonal over the tracked blocks and the head: small per-layer
  matrices, which suits LoRA adapters (DataInf's per-layer view).
- ``lissa``: the paper's LiSSA on exact Hessian-vector products over exact (unprojected)
  gradients; ``damping`` is the Hessian damping here too (LiSSA's per-step damping is
  damping/scale). With the paper's large scale (1e4) and ``lissa_depth`` steps it is far from
  converged -- about ``depth/scale`` times gd-top -- as the paper's was; it converges when
  ``lissa_scale`` exceeds the largest eigenvalue and depth >> scale / (smallest eigenvalue + damping),
  and only if H + damping I is positive definite.
- ``explicit``: the autograd Hessian over exact gradients (tiny models).

``fit(train, classifier)`` needs the whole classifier (:func:`instattr.models.classifier_for`):
its own forward pass, and the texts of the rows through the run it is bound to.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from ..arrays import FeatureSet
from ..backend import backend_or_local
from ..errors import InstattrError
from ..methods.base import Attributor, mean_against_others
from ..methods.registry import register
from ..methods.similarity import unit_rows
from ..models.modules import first_tracked_block
from ..task import MEASUREMENTS
from .gradcache import cached_train_gradients
from .grads import FlatParameters, batch_hessian, hvp, per_example_grads
from .ihvp import HESSIAN_STRUCTURES, Curvature, ExplicitHessian, GaussNewton, LiSSA
from .projection import KINDS, GradientProjector

DEFAULT_PROJ_DIM = 32
DEFAULT_DAMPING = 0.1
IHVPS = ("projected", "lissa", "explicit")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
FEATURE_TOLERANCE = 1e-3      # recomputed final-layer inputs vs the run's stored ones
MAX_EMBEDDING_BYTES = 8 << 30  # refuse exact (unprojected) training embeddings beyond this
EXACT_ROWS_PER_BLOCK = 16      # test rows per block on the unprojected (lissa, explicit) path


def resolve_dtype(name) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise InstattrError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _progress(total: int, desc: str, enabled: Optional[bool]):
    """A progress bar on stderr; ``enabled=None`` shows it only when stderr is a terminal."""
    import sys

    from tqdm.auto import tqdm
    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="ex", disable=not enabled, leave=False)


def classifier_of(name: str, model):
    """``model`` if it is a whole classifier (with its own forward pass), else a one-line error."""
    if model is None or not hasattr(model, "module") or not hasattr(model, "tracked"):
        raise InstattrError(f"{name}: needs the whole classifier (instattr.models.classifier_for(run)), "
                            f"not {type(model).__name__}")
    return model


def module_in(classifier, dtype) -> torch.nn.Module:
    """The classifier's module in ``dtype`` (float32: itself; float64: a copy, made once)."""
    dtype = resolve_dtype(dtype)
    module = classifier.module()
    if next(module.parameters()).dtype == dtype:
        return module
    copies = classifier.__dict__.setdefault("_module_copies", {})
    if dtype not in copies:
        copies[dtype] = copy.deepcopy(module).to(dtype).eval()
    return copies[dtype]


@dataclass(frozen=True)
class GradientSource:
    """What a worker in another process needs to compute the same projected gradients: the run
    (a folder it can read), the device type, the tracked modules, the dtype, the projection, the
    measurement, and for tracin-top which checkpoint. :meth:`build` gives the classifier and its
    projector."""

    run: str
    device: str
    layers: Optional[int]
    modules: Optional[Tuple[str, ...]]
    dtype: str
    proj_dim: Optional[int]
    seed: int
    projection: str
    measurement: str = "loss"
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
        tracked = classifier.tracked(self.layers, self.modules)
        return classifier, projector_for(classifier, tracked, self.dtype, self.proj_dim, self.seed, self.projection,
                                         self.measurement)


def projector_for(classifier, tracked, dtype, proj_dim, seed, projection, measurement="loss") -> GradientProjector:
    """The projector of the classifier's task over ``tracked`` (the final layer exact in the class basis)."""
    module = module_in(classifier, dtype)
    task = classifier.task(measurement)
    basis = task.basis(next(module.parameters()))
    return GradientProjector(module, tracked, task, proj_dim, seed, projection, classifier.final_name, basis)


def projected_gradients(classifier, fs: FeatureSet, labels: np.ndarray, projector: GradientProjector,
                        batch_size: int = 32, dtype="float32", factors: bool = False, check: bool = True,
                        progress: Optional[bool] = False, desc: str = "", what: str = "layers", backend=None,
                        source: Optional[GradientSource] = None, query: bool = False):
    """Projected per-example gradients of ``fs`` at ``labels`` (n, dim), in ``fs`` order (``query``:
    of minus the measurement), and with ``factors`` the Gauss-Newton factors (n * S, dim): rows F
    with GGN = (1/n) F^T F. ``check`` compares the recomputed final-layer inputs with the run's
    stored features. The batches run on ``backend`` (:mod:`instattr.backend`; e.g. a
    :class:`instattr.distributed.RayBackend` rebuilds the projector from ``source``), rows of a
    run's splits only: new texts, or a classifier no worker can rebuild (``source`` None), here."""
    dtype = resolve_dtype(dtype)
    rows = classifier.rows(fs)
    n, s, dim = len(fs), projector.task.n_roots, projector.dim
    if dtype != projector.dtype:
        raise InstattrError(f"{what}: the projector runs in {projector.dtype}, not {dtype}")
    if n * dim * (1 + s * factors) * torch.finfo(dtype).bits // 8 > MAX_EMBEDDING_BYTES:
        raise InstattrError(f"{what}: {n} x {dim} gradients do not fit in memory; set proj_dim")
    grads = torch.zeros(n, dim, dtype=dtype)
    facs = torch.zeros(n, s, dim, dtype=dtype) if factors else None
    order = rows.order(batch_size)
    remote = source is not None and fs.texts is None         # a worker elsewhere can rebuild these rows
    parts = backend_or_local(backend if remote else None).gradient_batches(projector, source, fs, rows, labels, order,
                                                                          factors, query)
    done = 0
    # the stored features came from the model in its own dtype: a bf16 or fp16 model's differ more
    native = next(classifier.module().parameters()).dtype
    tolerance = max(FEATURE_TOLERANCE, 16 * torch.finfo(native).eps * float(np.abs(fs.features).max(initial=1.0)))
    with _progress(n, desc, progress) as bar:
        for pos, g, f, feats in parts:
            if check:
                diff = float(np.abs(np.asarray(feats, dtype=np.float64)
                                    - np.asarray(fs.features[pos], dtype=np.float64)).max(initial=0.0))
                if diff > tolerance:
                    where = classifier.run.path if classifier.run is not None else "the model in memory"
                    raise InstattrError(f"{what}: {where}: the model's recomputed features differ from the stored "
                                        f"ones by {diff:.3g}; the rows and the model no longer match")
            grads[pos] = torch.as_tensor(g)
            if factors:
                facs[pos] = torch.as_tensor(f)
            done += len(pos)
            bar.update(len(pos))
    if done != n:
        raise InstattrError(f"{what}: gradients came back for {done} of {n} rows")
    return grads, (facs.reshape(n * s, dim) if factors else None)


def gauss_newton_curvature(projector: GradientProjector, factors: torch.Tensor, n: int, l2: float) -> Curvature:
    """The projected problem for :class:`GaussNewton`: factors, the L2 term (2 l2 I on the exact
    final-layer block), one Hessian block per tracked block + head."""
    reg = [2.0 * l2 * torch.eye(b.dim, dtype=torch.float64) if b.exact else None for b in projector.blocks]
    return Curvature(dim=projector.dim, n=n, factors=factors, blocks=projector.block_slices(), regulariser=reg,
                     groups=list(projector.groups().values()))


def _over_root(rows: torch.Tensor, quad: torch.Tensor) -> torch.Tensor:
    """rows / sqrt(quad), row by row; rows whose quadratic form is 0 stay 0."""
    root = quad.clamp_min(0).sqrt()
    return rows / torch.where(root > 0, root, torch.ones_like(root)).to(rows.dtype)[:, None]


class _TopLayers(Attributor):
    """Shared machinery; subclasses set ``whitened`` and ``normalized`` (as the last-layer family)."""

    whitened = False
    normalized = False
    needs = "classifier"
    diagnosed = ("n_train_", "dim_", "train_gradients_reused_")
    command_line_options = ("layers", "modules", "proj_dim", "projection", "damping", "ihvp", "measurement")

    def __init__(self, layers: Optional[int] = None, modules: Optional[Sequence[str]] = None,
                 proj_dim: Optional[int] = DEFAULT_PROJ_DIM, projection: str = "khatri-rao", seed: int = 0,
                 measurement: str = "loss", batch_size: int = 32, dtype: str = "float32",
                 progress: Optional[bool] = None, chunk_size: Optional[int] = None):
        super().__init__(chunk_size)
        if layers is not None and int(layers) < 0:
            raise InstattrError(f"{self.name}: layers must be >= 0 (None: the top 3), got {layers}")
        if proj_dim is not None and int(proj_dim) < 1:
            raise InstattrError(f"{self.name}: proj_dim must be a positive integer or None (exact), got {proj_dim}")
        if projection not in KINDS:
            raise InstattrError(f"{self.name}: projection must be one of {', '.join(KINDS)}, got {projection!r}")
        if measurement not in MEASUREMENTS:
            raise InstattrError(f"{self.name}: measurement must be one of {', '.join(MEASUREMENTS)}, "
                                f"got {measurement!r}")
        if int(batch_size) < 1:
            raise InstattrError(f"{self.name}: batch_size must be positive, got {batch_size}")
        resolve_dtype(dtype)
        self.layers = None if layers is None else int(layers)
        if isinstance(modules, str):
            modules = [m for m in modules.split(",") if m.strip()]
        self.modules = None if not modules else [str(m).strip() for m in modules]
        self.proj_dim = None if proj_dim is None else int(proj_dim)
        self.projection, self.measurement = projection, measurement
        self.seed, self.batch_size, self.dtype = int(seed), int(batch_size), dtype
        self.progress = None if progress is None else bool(progress)

    def config(self) -> dict:
        cfg = {k: v for k, v in super().config().items() if k != "progress"}     # how it shows, not what it is
        if hasattr(self, "dim_"):
            cfg["gradient_dim"] = int(self.dim_)
            prefix = self.classifier_.prefix
            cfg["tracked_modules"] = [t.name[len(prefix):] if t.name.startswith(prefix) else t.name
                                      for t in self.tracked_]
            if self.modules is None and self.classifier_.trainable() is None:
                cfg["tracked_layers"] = self.classifier_.n_layers - first_tracked_block(self.classifier_.n_layers,
                                                                                        self.layers)
        return cfg

    # ------------------------------------------------------------------ shared steps
    def _model(self, model):
        """Remember the classifier, its tracked modules and L2."""
        self.classifier_ = classifier_of(self.name, model)
        self.tracked_ = self.classifier_.tracked(self.layers, self.modules)
        self.l2_ = float(self.classifier_.final_layer().l2)

    def _projector(self, classifier=None) -> GradientProjector:
        return projector_for(classifier or self.classifier_, self.tracked_, self.dtype, self.proj_dim, self.seed,
                             self.projection, self.measurement)

    def _projected(self, projector: GradientProjector, fs: FeatureSet, labels: np.ndarray, factors: bool,
                   desc: str, check: bool = True, classifier=None, checkpoint: Optional[int] = None,
                   query: bool = False):
        classifier = classifier or self.classifier_
        source = None
        if self._runs_own_classifier():          # a worker elsewhere can rebuild it from the run folder
            source = GradientSource(str(classifier.run.path.resolve()), classifier.device.type, self.layers,
                                    None if self.modules is None else tuple(self.modules), self.dtype, self.proj_dim,
                                    self.seed, self.projection, self.measurement, checkpoint,
                                    *self._checkpoint_options())
        return projected_gradients(classifier, fs, labels, projector, self.batch_size, self.dtype, factors, check,
                                   self.progress, desc, self.name, self.backend, source, query)

    def _checkpoint_options(self):
        return None, None

    def _runs_own_classifier(self) -> bool:
        """Whether the classifier fit on is its run's own (or one of its checkpoints, tracin-top),
        which a worker can rebuild from the run folder; another one (e.g. re-initialised) is not."""
        from ..models import built_classifier
        run = self.classifier_.run
        return run is not None and self.classifier_ is built_classifier(run, self.classifier_.device)

    def _normalize(self, emb: torch.Tensor) -> torch.Tensor:
        if not self.normalized:
            return emb
        return torch.as_tensor(unit_rows(emb.double().numpy())).to(emb.dtype)

    def _finish(self, emb: torch.Tensor) -> np.ndarray:
        return np.ascontiguousarray(self._normalize(emb).float().numpy())

    # ------------------------------------------------------------------ projected path
    def _fit(self, train: FeatureSet, model) -> None:
        self._model(model)
        self.projector_ = self._projector()
        self.dim_ = self.projector_.dim
        cacheable = self.proj_dim is not None   # the factors are cached too, for the whitened methods
        grads, factors, self.train_gradients_reused_ = cached_train_gradients(
            self.classifier_, self.projector_, train, self.dtype,
            {"proj_dim": self.proj_dim, "seed": self.seed, "projection": self.projection},
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
        grads, _ = self._projected(self.projector_, test, test.pred, False, f"{self.name} test", query=True)
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
    """<g_t, g_i> over the tracked modules (projected gradients)."""


@register("gc-top")
class TopGradientCosine(_TopLayers):
    """cos(g_t, g_i) over the tracked modules."""
    normalized = True


class _TopInfluence(_TopLayers):
    whitened = True

    def __init__(self, layers: Optional[int] = None, modules: Optional[Sequence[str]] = None,
                 proj_dim: Optional[int] = DEFAULT_PROJ_DIM, projection: str = "khatri-rao", seed: int = 0,
                 ihvp: str = "projected", damping: float = DEFAULT_DAMPING, hessian: str = "auto",
                 measurement: str = "loss", lissa_scale: float = 1e4, lissa_depth: int = 1000,
                 lissa_repeats: int = 1, lissa_batch_size: int = 8, batch_size: int = 32, dtype: str = "float32",
                 progress: Optional[bool] = None, chunk_size: Optional[int] = None):
        super().__init__(layers, modules, proj_dim, projection, seed, measurement, batch_size, dtype, progress,
                         chunk_size)
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
        self._model(model)
        module = module_in(self.classifier_, self.dtype)
        self.task_ = self.classifier_.task(self.measurement)
        flat = self.flat_ = FlatParameters(module, self.tracked_, self.classifier_.final_name)
        self.dim_ = flat.dim
        rows = self.classifier_.rows(train)
        labels = torch.as_tensor(np.asarray(train.label))
        n = len(train)

        def batch_hvp(vectors, positions):
            return hvp(self.task_, flat, rows.batch(positions), labels[positions], vectors.to(self.dtype_t), self.l2_)

        def hessian():   # sum over batches of (batch share) x (regularised batch-loss Hessian)
            h = torch.zeros(flat.dim, flat.dim, dtype=torch.float64)
            for pos in rows.order(self.batch_size):
                h += len(pos) / n * batch_hessian(self.task_, flat, rows.batch(pos), labels[pos], self.l2_).double()
            return h

        curvature = Curvature(dim=flat.dim, n=n, hvp=batch_hvp, hessian=hessian)
        if self.ihvp == "explicit":
            self.solver_ = ExplicitHessian(self.damping).fit(curvature)
        else:
            self.solver_ = LiSSA(self.damping / self.lissa_scale, self.lissa_scale, self.lissa_depth,
                                 self.lissa_repeats, self.lissa_batch_size, self.seed).fit(curvature)
        self.train_ = train

    @property
    def dtype_t(self) -> torch.dtype:
        return resolve_dtype(self.dtype)

    def _exact_grads(self, fs: FeatureSet, labels: np.ndarray, query: bool = False):
        """Yield (positions, (B, dim) exact per-example gradients)."""
        rows = self.classifier_.rows(fs)
        labels = torch.as_tensor(np.asarray(labels))
        for pos in rows.order(self.batch_size):
            yield pos, per_example_grads(self.task_, self.flat_, rows.batch(pos), labels[pos], query).cpu()

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
        g_t = torch.zeros(len(test), self.flat_.dim, dtype=self.dtype_t)
        for pos, g in self._exact_grads(test, test.pred, query=True):
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
    """g_t^T (H + damping)^-1 g_i over the tracked modules."""


@register("rif-top")
class TopRelativeInfluence(_TopInfluence):
    """cos(H^-1/2 g_t, H^-1/2 g_i) over the tracked modules."""
    normalized = True

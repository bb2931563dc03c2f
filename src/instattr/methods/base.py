"""The attributor interface shared by every method.

``Attributor(**options).fit(train, model) -> self`` then ``score(test) -> (n_test, n_train)``
float32, higher = the training example supports the prediction on the test example more.
``train``/``test`` are :class:`instattr.arrays.FeatureSet`; ``model`` is what the method ``needs``:
``"final_layer"`` (if, rif, rep: a bare :class:`instattr.arrays.FinalLayer`, or anything with
``final_layer()``), ``"classifier"`` (the layered methods and TracIn: a whole
:class:`instattr.models.Classifier`), ``"sentence"`` (sbert-*: the untuned sentence encoder's
embeddings, :mod:`instattr.sentence`), or None (nn-*, and gd/gc, which take a final layer when
given one).

Scores are computed by :mod:`.scoring` over blocks of ``chunk_size`` test rows (default
``TEST_BLOCK``) and ``TRAIN_BLOCK`` training rows; each method is an inner product of a training
side, computed once in ``fit``, and a test side per block (:mod:`.sides`).
"""
from __future__ import annotations

from abc import ABC
from typing import Iterator, Optional, Tuple

import numpy as np

from ..arrays import FeatureSet, FinalLayer
from ..errors import InstattrError
from .scoring import TEST_BLOCK, TRAIN_BLOCK, Grid, Member, dense_row_blocks, finished, score_dense
from .shared import once
from .sides import INNER_PRODUCT, Finish, Side, side


class NotFittedError(RuntimeError):
    """``score`` was called before ``fit``."""


class Attributor(ABC):
    """Base class: subclasses set ``name`` and implement ``_fit`` plus either the two sides of
    the inner product -- ``_embed_train(rows)`` and ``_embed_test(rows)`` returning a
    :class:`~.sides.Side` (or a plain float32 array) -- with ``finish``, or ``_score(test, out)``
    writing whole rows of scores (methods with no stored training side).

    ``fit`` computes the training side once (in blocks of training rows) unless ``embed=False``;
    then :meth:`train_side` gives it for any rows of the training set (an index writes it in
    shards). All scoring goes through :mod:`.scoring`.
    """

    name: str = ""
    needs: Optional[str] = "final_layer"   # what fit's model must be: final_layer, classifier, sentence, None
    # constructor options that the command line's method flags (--layers, --proj-dim, --damping,
    # --ihvp) may set; the paper's methods take none, so those flags never change them
    command_line_options: tuple = ()
    finish: Finish = INNER_PRODUCT     # per-pair step after the inner product (nn-euc: a distance)
    _train_rows: int = TRAIN_BLOCK     # training rows per block (embedding and scoring)
    # Declared fields, never found by reflection: the fitted attributes an index saves so that it can
    # compute test sides (None: the method cannot be saved, an index refits it: :mod:`.state`), and
    # the fitted scalars and small dicts reported beside its scores.
    state: Optional[Tuple[str, ...]] = None
    diagnosed: Tuple[str, ...] = ("n_train_",)

    def __init__(self, chunk_size: Optional[int] = None):
        if chunk_size is not None and int(chunk_size) < 1:
            raise InstattrError(f"{self.name}: chunk_size must be a positive number of rows")
        self.chunk_size = chunk_size

    backend = None                     # set by fit: where per-example work runs (None: here)

    @classmethod
    def options(cls) -> Tuple[str, ...]:
        """The constructor's options, each kept under its own name (the declared configuration)."""
        import inspect
        return tuple(p.name for p in inspect.signature(cls.__init__).parameters.values()
                     if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))

    def config(self) -> dict:
        """The constructor options (saved next to the scores)."""
        return {k: getattr(self, k) for k in self.options()}

    def diagnostics(self) -> dict:
        """The :attr:`diagnosed` fitted values (e.g. rep's ``reconstruction_``), JSON-ready."""
        out = {}
        for k in self.diagnosed:
            v = getattr(self, k, None)
            if v is not None:
                out[k.rstrip("_")] = v.item() if isinstance(v, np.generic) else v
        return out

    def fit(self, train: FeatureSet, model=None, embed: bool = True, backend=None) -> "Attributor":
        """Compute the fitted state from ``train`` and the classifier ``model``, and (``embed``)
        the training side of every row. ``backend`` (None: this process) is where per-example
        work may run from then on: the layered methods' gradients on a
        :class:`~instattr.distributed.RayBackend`'s actors; the other methods ignore it."""
        self.backend = backend
        if len(train) == 0:
            raise InstattrError(f"{self.name}: no training examples to fit on")
        if self.needs is not None and model is None:
            what = {"final_layer": "the classifier (a FinalLayer or a models.Classifier)",
                    "classifier": "the whole classifier (instattr.models.classifier_for(run))",
                    "sentence": "the sentence encoder's embeddings (instattr.sentence.sentence_embeddings(run))"}
            raise InstattrError(f"{self.name}: needs {what.get(self.needs, self.needs)}")
        for k in [k for k in vars(self) if k.endswith("_")]:  # a refit forgets the last fit
            delattr(self, k)
        self._fit(train, model)
        self.n_train_ = len(train)
        if embed and self.streams_train and not hasattr(self, "train_embedding_"):
            self.embed_all(train)
        return self

    # ------------------------------------------------------------------ the two sides
    @property
    def streams_train(self) -> bool:
        """Whether the training side can be computed for any block of rows after fit."""
        return type(self)._embed_train is not Attributor._embed_train

    def _embed_train(self, rows: FeatureSet):
        raise NotImplementedError

    def _embed_test(self, rows: FeatureSet):
        raise NotImplementedError

    def train_side(self, rows: FeatureSet) -> Side:
        """The training side of ``rows`` (rows of the training set, at their gold labels)."""
        self._check_fitted()
        if not self.streams_train:
            raise InstattrError(f"{self.name}: computes its training side in fit only")
        return _as_side(self._embed_train(rows))

    def test_side(self, rows: FeatureSet) -> Side:
        """The test side of ``rows`` (at the model's predicted labels)."""
        self._check_fitted()
        return _as_side(self._embed_test(rows))

    def fitted_train_side(self) -> Optional[Side]:
        """The training side computed in fit (None when the method keeps none)."""
        if hasattr(self, "train_side_"):
            return self.train_side_
        if hasattr(self, "train_embedding_"):
            return _as_side(self.train_embedding_)
        return None

    def embed_all(self, train: FeatureSet, train_rows: Optional[int] = None) -> Side:
        """Compute and keep the training side of every row of ``train`` (the training set fitted on),
        in blocks of ``train_rows`` (the scoring grid's; an index's shards use the same blocks)."""
        if train_rows:
            self._train_rows = int(train_rows)
        blocks = Grid(1, self._train_rows).train_blocks(len(train))
        if len(blocks) == 1:                 # the block's side is the whole: kept, not copied
            self.train_side_ = self.train_side(train.subset(blocks[0]))
        else:
            self.train_side_ = Side.gather(((b, self.train_side(train.subset(b))) for b in blocks), len(train))
        return self.train_side_

    # ------------------------------------------------------------------ scoring
    def _check_fitted(self) -> None:
        if not hasattr(self, "n_train_"):
            raise NotFittedError(f"{self.name}: call fit(train, model) before score(test)")

    def _rows_per_block(self) -> int:
        return int(self.chunk_size or TEST_BLOCK)

    def grid(self, test_rows: Optional[int] = None) -> Grid:
        """The blocks this method scores in (``test_rows`` overrides the test block)."""
        return Grid(int(test_rows or self._rows_per_block()), self._train_rows)

    def member(self, test: FeatureSet) -> Member:
        """This method's part in a scoring pass over ``test`` (:mod:`.scoring`)."""
        self._check_fitted()
        train = self.fitted_train_side()
        if train is None:
            def dense(rows):
                out = np.empty((rows.stop - rows.start, self.n_train_), dtype=np.float32)
                self._score(test.subset(rows), out)
                return out
            return Member(self.name, dense=dense, n_train=self.n_train_)
        return Member(self.name, test=lambda rows: self.test_side(test.subset(rows)), train=train,
                      finish=self.finish)

    def score(self, test: FeatureSet) -> np.ndarray:
        """The full (n_test, n_train) float32 score matrix."""
        return score_dense([self.member(test)], len(test), self.grid())[self.name]

    def score_chunks(self, test: FeatureSet, chunk_size: Optional[int] = None) -> Iterator[Tuple[slice, np.ndarray]]:
        """Yield (row slice, float32 block) over test rows, so memory stays bounded."""
        member = self.member(test)  # checks fitted here, not lazily on the first block
        return ((rows, blocks[self.name]) for rows, blocks in dense_row_blocks([member], len(test),
                                                                                self.grid(chunk_size)))

    def self_scores(self) -> np.ndarray:
        """(n_train,) float64: how much each training example, at its gold label, stands out to this
        method -- its score against itself (self-influence), where that says something; higher = look
        at it first. Only the gradient methods define it (see their docstrings)."""
        raise InstattrError(f"{self.name}: no self-score (it is defined for the gradient methods: if, gd, rif, gc, "
                            "tracin and their layered versions)")

    def bind(self, model) -> None:
        """Attach what the test side needs from the model beyond the fitted state (sbert-*: the
        sentence embeddings); a method loaded from saved state (an index) is bound this way."""

    def _fit(self, train: FeatureSet, model) -> None:
        """Compute everything the two sides need from the training set."""

    def _score(self, test: FeatureSet, out: np.ndarray) -> None:
        """Write the (len(test), n_train) scores of ``test`` into ``out`` (default: the inner product)."""
        tr = self.fitted_train_side()
        ts = self.test_side(test)
        finished(ts.vectors @ tr.vectors.T, ts, tr, self.finish, out)


def _as_side(x) -> Side:
    return x if isinstance(x, Side) else side(x)


def check_width(name: str, what: str, expected: int, got: np.ndarray) -> None:
    """One-line error when test rows do not match the width seen in fit."""
    if got.ndim != 2 or got.shape[1] != expected:
        raise InstattrError(f"{name}: test {what} have shape {got.shape}, fitted on width {expected}")


def mean_against_others(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Minus the mean over j != i of <a_i, b_j> (float64): how much each row opposes the others."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    n = len(a)
    if n < 2:
        return np.zeros(n)
    return -(a @ b.sum(0) - np.einsum("ij,ij->i", a, b)) / (n - 1)


def float32_rows(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def layer_inputs(layer: Optional[FinalLayer], features: np.ndarray) -> np.ndarray:
    """float64 rows the final layer sees: ``layer.augment(features)`` (``[f, 1]`` with a bias),
    or ``f`` without a layer; shared by the methods fitted together (:mod:`.shared`)."""
    return once("layer-inputs", (features, layer is not None and layer.b is not None),
                lambda: np.asarray(features, dtype=np.float64) if layer is None else layer.augment(features))


def final_layer_of(name: str, model) -> Optional[FinalLayer]:
    """The model's final layer (None without a model), checked to be one."""
    if model is None:
        return None
    lin = model.final_layer()
    if not isinstance(lin, FinalLayer):
        raise InstattrError(f"{name}: the model's final_layer() must be a FinalLayer, got {type(lin).__name__}")
    return lin

"""A language-model explainer's methods as scoring methods: what the index, FAISS and Ray read.

A language-model method already is a training side and a query side under one inner product
(:meth:`instattr.lm.LMExplainer.train_sides`, ``query_sides``). :class:`LMMethod` presents each
one as a method whose training side is made in its fit, as a classifier's layered methods are
(``streams_train`` False, ``fitted_train_side()``, ``test_side(rows)``, ``config()``, ``finish``,
``member(test)``), and
:class:`Rows` stands for a list of rows where that code reads a FeatureSet (``len``, ``idx``,
``subset``). So :func:`~instattr.index.build.build_index`, ``Index.search``, the FAISS index and the
Ray backend's shard tasks take a language-model run through their own code. ``bm25`` has no vector
sides (its scores come from its own inverted index) and is not one of them.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Optional, Sequence

import numpy as np

from ..errors import InstattrError
from .scoring import Member
from .sides import INNER_PRODUCT, Side, side

NO_SIDES = ("bm25 has no vector sides to index or send to Ray (its scores come from its own inverted index); "
            "choose among gd, gc, if, rif, trackstar, tracin and nn")


class Rows:
    """Rows of a language-model run (dicts with ``idx``) where the index code reads a FeatureSet:
    ``len``, ``idx``, ``subset(rows)``; ``label`` is -1 (a row has no class)."""

    def __init__(self, rows: Sequence[dict]):
        self.rows = list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def idx(self) -> np.ndarray:
        return np.asarray([str(r["idx"]) for r in self.rows])

    @property
    def label(self) -> np.ndarray:
        return np.full(len(self.rows), -1, dtype=np.int64)

    def subset(self, rows) -> "Rows":
        """The rows at ``rows`` (a slice or positions)."""
        if isinstance(rows, slice):
            return Rows(self.rows[rows])
        return Rows([self.rows[int(i)] for i in np.asarray(rows).ravel()])


class QuerySides:
    """The explainer's query sides, kept per query row (the last ``keep`` rows): the methods of one
    index share one gradient pass over a query, and the blocks that exact and approximate search
    cut the same queries into (FAISS's recall check cuts them twice) never recompute one."""

    def __init__(self, explainer, keep: int = 4096):
        self.explainer, self.keep = explainer, int(keep)
        self._kept: "OrderedDict[tuple, Dict[str, np.ndarray]]" = OrderedDict()

    def __call__(self, rows: Rows) -> Dict[str, np.ndarray]:
        """Per method, (len(rows), D) float64 query sides (bm25: its score rows)."""
        keys = [(str(r.get("idx")), r.get("prompt"), r.get("completion")) for r in rows.rows]
        for k in keys:                                  # kept rows asked again are the newest
            if k in self._kept:
                self._kept.move_to_end(k)
        missing = list(dict.fromkeys(k for k in keys if k not in self._kept))
        if missing:
            first = {k: i for i, k in reversed(list(enumerate(keys)))}
            sides = self.explainer.query_sides([rows.rows[first[k]] for k in missing])[0]
            for j, k in enumerate(missing):
                self._kept[k] = {m: np.asarray(v[j], dtype=np.float64) for m, v in sides.items()}
        out = {m: np.stack([self._kept[k][m] for k in keys]) for m in self._kept[keys[0]]} if keys else {}
        while len(self._kept) > self.keep:
            self._kept.popitem(last=False)
        return out


class LMMethod:
    """One method of a fitted :class:`~instattr.lm.LMExplainer` as an index method: its training
    side made in the fit, its query side of query rows (``prompt``, ``completion``), scores the
    plain inner product of the two (the explainer's own, in float32)."""

    streams_train = False
    finish = INNER_PRODUCT
    needs = "lm"
    state = None              # nothing to save beside the index: refit from the run, whose cache keeps it

    def __init__(self, name: str, explainer, queries: Optional[QuerySides] = None):
        if name == "bm25":
            raise InstattrError(NO_SIDES)
        if name not in explainer.methods:
            raise InstattrError(f"{name}: not fitted by this explainer (has {', '.join(explainer.methods)})")
        self.name, self.explainer = name, explainer
        self.queries = queries or QuerySides(explainer)
        self.key_ = ("lm", name)
        self._train: Optional[Side] = None

    def config(self) -> dict:
        return {"method": self.name, "kind": "lm", **self.explainer.config()}

    def fitted_train_side(self) -> Side:
        """The training rows' side, float32, made once (each shard of an index takes its rows)."""
        if self._train is None:
            self._train = side(self.explainer.train_sides()[self.name].numpy(), key=self.key_)
        return self._train

    def test_side(self, rows: Rows) -> Side:
        return side(self.queries(rows)[self.name])

    def member(self, test: Rows) -> Member:
        """This method as a member of one scoring pass over ``test``."""
        return Member(self.name, test=lambda rows: self.test_side(test.subset(rows)), train=self.fitted_train_side())


def lm_index_methods(explainer, names: Optional[Sequence[str]] = None,
                     shared: Optional[QuerySides] = None) -> Dict[str, LMMethod]:
    """``names`` (default: every fitted method but bm25) of ``explainer`` as index methods sharing
    one query pass (``shared``, or a new one)."""
    shared = shared or QuerySides(explainer)
    names = [m for m in explainer.methods if m != "bm25"] if names is None else list(names)
    return {n: LMMethod(n, explainer, shared) for n in names}

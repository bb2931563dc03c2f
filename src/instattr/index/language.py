"""An index of a language-model run: its explainer's methods (:mod:`instattr.methods.language`)
fitted on the run, their training sides written by :func:`~instattr.index.build.build_index`."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from ..errors import InstattrError
from ..methods.language import NO_SIDES, LMMethod, Rows, lm_index_methods
from ..store import LMRun


def index_names(spec, run: LMRun) -> List[str]:
    """The methods to index: ``spec`` as :func:`instattr.lmrun.lm_methods` reads it (None or
    'all': every method the run can compute), bm25 left out of the default and refused when named."""
    from ..lmrun import lm_methods
    names = lm_methods(spec, run)
    if spec is None or spec in ("all", "paper"):
        return [m for m in names if m != "bm25"]
    if "bm25" in names:
        raise InstattrError(NO_SIDES)
    return names


def fit_lm_methods(run: LMRun, names: Sequence[str], options: Optional[dict] = None, device=None,
                   progress: bool = False, backend=None) -> Dict[str, LMMethod]:
    """The run's explainer fitted for ``names`` (its training side read back from ``RUN/cache``
    when kept, else computed on ``backend``) as index methods."""
    from ..lmrun import explainer_of
    return lm_index_methods(explainer_of(run, list(names), options, device, progress, backend))


def build_lm_index(run: LMRun, names, out, options: Optional[dict] = None, device=None, progress: bool = True,
                   **kwargs) -> dict:
    """Fit ``names`` on the language-model run and index their training sides at ``out``
    (:func:`~instattr.index.build.build_index`'s keyword arguments: dtype, shards, ann, backend)."""
    from ..lmrun import lm_options
    from .build import build_index, run_digest
    names = index_names(names, run)
    opts = lm_options(options)
    methods = fit_lm_methods(run, names, opts, device, progress, kwargs.get("backend"))
    if kwargs.get("queries") is None:       # the ANN's recall is measured on held-out queries
        rows = run.rows(run.eval_split)
        pick = np.sort(np.random.default_rng(0).choice(len(rows), min(len(rows), 200), replace=False))
        kwargs["queries"] = Rows(rows).subset(pick)
    source = {"run": str(run.path.resolve()), "run_sha256": run_digest(run), "split": "train", "kind": "lm"}
    train = Rows(run.rows("train"))
    return build_index(out, train, methods, source, options={n: opts for n in names}, progress=progress,
                       labels=train.label, **kwargs)

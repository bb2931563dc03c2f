"""The paper's evaluations: plain functions over score matrices and the run.

Each ``run_<name>(run, methods=None, seed=0, **options) -> dict`` writes ``results/<name>.json``
and ``.md`` (and figures under ``figures/``) and returns the JSON dict. ``evaluations_for(run)``
lists the ones that apply to a run (``artifacts`` only on hans).
"""
from __future__ import annotations

from typing import Callable, Dict, List

from ..store import Run
from .artifacts import applies as _artifacts_apply
from .artifacts import overlap_rate, run_artifacts
from .correlation import mean_spearman, run_correlation, spearman_rows, top_k_overlap
from .near_train import run_near_train
from .randomized import run_randomized
from .retrain import run_retrain
from .timing import run_timing

EVALUATIONS: Dict[str, Callable[..., dict]] = {
    "correlation": run_correlation,
    "retrain": run_retrain,
    "randomized": run_randomized,
    "artifacts": run_artifacts,
    "near-train": run_near_train,
    "timing": run_timing,
}

APPLIES: Dict[str, Callable[[Run], bool]] = {name: (lambda run: True) for name in EVALUATIONS}
APPLIES["artifacts"] = _artifacts_apply


def evaluations_for(run: Run) -> List[str]:
    """Names of the evaluations that apply to ``run``, in the paper's order."""
    return [name for name in EVALUATIONS if APPLIES[name](run)]


def run_evaluation(name: str, run: Run, **options) -> dict:
    """Run one evaluation by name (the CLI's entry point)."""
    if name not in EVALUATIONS:
        raise ValueError(f"unknown evaluation {name!r}; choose from {', '.join(EVALUATIONS)}")
    with run.writing(f"evaluate {name}"):
        return EVALUATIONS[name](run, **options)


__all__ = ["EVALUATIONS", "APPLIES", "evaluations_for", "run_evaluation", "run_correlation",
           "run_retrain", "run_randomized", "run_artifacts", "run_near_train", "run_timing", "overlap_rate",
           "mean_spearman", "spearman_rows", "top_k_overlap"]

"""The evaluations: plain functions over score matrices and the run, registered by name.

Each ``run_<name>(run, methods=None, seed=0, **options) -> dict`` writes ``results/<name>.json``
and ``.md`` (and figures under ``figures/``) and returns the JSON dict. Each registers itself with
:func:`.registry.evaluation` (title and intro of its report section, whether it applies to a run,
its ``--quick`` options, its command-line flags); the CLI, ``reproduce`` and the report read the
registry, so a new evaluation is one module, imported here.
"""
from __future__ import annotations

from typing import Callable, Dict, List

from ..store import Run
from . import artifacts, correlation, language, lds, mislabel, near_train, randomized, retrain, timing  # noqa: F401
from .artifacts import overlap_rate, run_artifacts
from .correlation import mean_spearman, run_correlation, spearman_rows, top_k_overlap
from .lds import run_lds
from .mislabel import run_mislabel
from .near_train import run_near_train
from .randomized import run_randomized
from .registry import Evaluation, evaluations, get_evaluation
from .retrain import run_retrain
from .timing import run_timing

EVALUATIONS: Dict[str, Callable[..., dict]] = {e.name: e.run for e in evaluations()}
APPLIES: Dict[str, Callable[[Run], bool]] = {e.name: e.takes for e in evaluations()}


def evaluations_for(run: Run) -> List[str]:
    """Names of the evaluations that apply to ``run``, in the report's order."""
    return [e.name for e in evaluations() if e.takes(run)]


def run_evaluation(name: str, run: Run, **options) -> dict:
    """Run one evaluation by name (the CLI's entry point)."""
    ev = get_evaluation(name)
    with run.writing(f"evaluate {name}"):
        return ev.run(run, **options)


__all__ = ["EVALUATIONS", "APPLIES", "Evaluation", "evaluations", "get_evaluation", "evaluations_for",
           "run_evaluation", "run_correlation", "run_retrain", "run_randomized", "run_artifacts", "run_near_train",
           "run_mislabel", "run_lds", "run_timing", "overlap_rate", "mean_spearman", "spearman_rows", "top_k_overlap"]

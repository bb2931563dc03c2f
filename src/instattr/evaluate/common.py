"""What every evaluation shares: method lists, head inputs, score rows, sampling, output files.

Scores come through :class:`instattr.ranking.Ranker`: the run's stored matrices when they cover the
rows asked for, otherwise the method registry (fitted once on the full training set, then scoring
only the rows needed).
"""
from __future__ import annotations

import io
import math
from typing import Iterable, List, Optional, Sequence

import numpy as np

from ..arrays import FeatureSet
from ..ranking import Ranker, TopRows  # noqa: F401  (what the evaluations rank with)
from ..store import Run, RunError, write_bytes


def method_list(methods=None, run: Optional[Run] = None, split: Optional[str] = None) -> List[str]:
    """Method names: ``expand_methods`` of ``methods`` ("all", "a,b" or a list); None = the paper's
    methods, plus, when ``run`` is given, every other method whose scores it stores for ``split``."""
    from ..methods import METHOD_NAMES, expand_methods
    if methods is None:
        return list(METHOD_NAMES) + (stored_extras(run, split) if run is not None else [])
    return list(expand_methods(methods))


def stored_extras(run: Run, split: Optional[str] = None) -> List[str]:
    """Registered methods beyond the paper's (if-top, tracin, ...) whose stored scores cover every
    example of ``split``: evaluations that read scores include them without recomputing anything."""
    from ..methods import METHOD_NAMES
    from ..methods.registry import registered
    split = split or run.eval_split
    test_idx = [str(i) for i in run.features(split).idx]
    train_idx = [str(i) for i in run.features("train").idx]

    def covers(m):
        info = run.score_info(m, split)
        return info.get("test_idx") == test_idx and info.get("train_idx") == train_idx
    return [m for m in registered() if m not in METHOD_NAMES and run.has_scores(m, split) and covers(m)]


SCOPES = ("head", "final", "top-K")


def scope_text(scope: str) -> str:
    """What a scope retrains or re-initialises, in words."""
    from .top_layers import blocks_of
    k = blocks_of(scope)
    if k is not None:
        return f"the top {k} transformer block{'s' if k > 1 else ''} and everything above them"
    return {"head": "instattr's head (pooler and final layer) on the frozen encoder's stored output",
            "final": "the final linear layer (weight and bias) on the stored, frozen features"}[scope]


def resolve_scope(run: Run, scope: Optional[str], what: str) -> str:
    """What ``what`` retrains or re-initialises: ``head`` (head-mode runs; their default),
    ``final`` (the final linear layer on frozen features; the default of every other run) or
    ``top-K`` (the top K transformer blocks and everything above them)."""
    from .top_layers import blocks_of
    default = "head" if run.manifest.mode == "head" else "final"
    scope = scope or default
    if scope not in SCOPES[:2] and blocks_of(scope) is None:
        raise RunError(f"{what}: --scope must be head, final or top-K (K transformer blocks), got {scope!r}")
    if scope == "head" and run.manifest.mode != "head":
        raise RunError(f"{what}: --scope head needs a head-mode run (it retrains instattr's head on the stored "
                       f"encoder output); {run.path} is a {run.manifest.mode} run: use --scope final")
    return scope


def retrain_scope(run: Run, scope: Optional[str], what: str) -> str:
    """:func:`resolve_scope` for evaluations that retrain the model many times through the head
    trainer or the exact refit: ``head`` or ``final`` (``top-K`` is a one-line error)."""
    scope = resolve_scope(run, scope, what)
    if scope not in SCOPES[:2]:
        raise RunError(f"{what}: --scope {scope} is not supported here (it retrains the model once per subset or "
                       "ranking); use head or final")
    return scope


def head_config(run: Run):
    """The run's HeadConfig (head mode)."""
    from ..models.head import HeadConfig
    h = run.manifest.head
    return HeadConfig(l2=h.l2, lr=h.lr, epochs=h.epochs, batch_size=h.batch_size, hidden=h.hidden, seed=h.seed)


def head_input(run: Run, split: str, fs: Optional[FeatureSet] = None) -> np.ndarray:
    """The head's input for ``split`` (head mode): the stored encoder output, pairs combined."""
    from ..models.head import pair_input
    from ..sentence import sentence_embeddings
    fs = fs if fs is not None else run.features(split)
    return pair_input(sentence_embeddings(run).of(fs), run.manifest.pair_mode)


def sample_rows(n_total: int, n: Optional[int], rng: np.random.Generator) -> np.ndarray:
    """``n`` sorted row indices drawn without replacement (all rows when n is None or >= n_total)."""
    if n is None or n >= n_total:
        return np.arange(n_total)
    return np.sort(rng.choice(n_total, size=n, replace=False))


def data_name(run: Run) -> str:
    return run.manifest.data.name


def top_k_mask(scores, k: int) -> np.ndarray:
    """Boolean (n, n_cols) mask of each row's top-k columns (the registry's ``top_k``); ``scores``
    is a score matrix or :class:`TopRows`."""
    if isinstance(scores, TopRows):
        idx = scores.first(k)
    else:
        from ..methods.topk import top_k
        scores = np.asarray(scores)
        idx, _ = top_k(scores, k)
    mask = np.zeros(scores.shape, dtype=bool)
    np.put_along_axis(mask, np.asarray(idx), True, axis=1)
    return mask


# ---------------------------------------------------------------- output
def clean(obj):
    """JSON-safe copy: numpy scalars to Python, NaN/inf to None."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return clean(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return None if not math.isfinite(float(obj)) else float(obj)
    return obj


def fmt(v, digits: int = 3) -> str:
    """A number for a markdown cell ('—' for missing)."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return f"{v:.{digits}f}"


def fmt_paper(v) -> str:
    return "—" if v is None else f"{v:.4g}"


def md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def save_figure(run: Run, name: str, fig) -> str:
    """Write a matplotlib Figure to RUN/figures/NAME.png atomically; returns the relative path."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    write_bytes(run.path / "figures" / f"{name}.png", buf.getvalue())
    return f"figures/{name}.png"


def new_figure(width: float, height: float):
    """A pyplot-free Agg figure (no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def save(run: Run, name: str, result: dict, markdown: str) -> dict:
    result = clean(result)
    run.save_result(name, result, markdown)
    return result

"""Correlation between methods (paper Figures 2, 3, 5, 6): per-test-row Spearman and top-k overlap.

Samples 100 test and 500 training examples (seeded); every method scores the sampled test rows,
restricted to the sampled training columns. Spearman is computed per test row over those columns
(average ranks for ties) and averaged; top-k overlap is |top-k(a) ∩ top-k(b)| / k averaged.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from scipy.stats import rankdata

from ..store import Run
from .common import Ranker, fmt, md_table, method_list, new_figure, sample_rows, save, save_figure, top_k_mask
from .registry import evaluation

# paper Figure 4 and beyond: layered methods against their last-layer versions, TracIn against GD
LAYERED_PAIRS = (("if-top", "if"), ("gd-top", "gd"), ("gc-top", "gc"), ("rif-top", "rif"),
                 ("tracin", "gd"), ("tracin-top", "gd-top"))
CURVE_PAIRS = LAYERED_PAIRS + (("if", "gd"), ("rif", "gc"), ("nn-euc", "nn-cos"), ("if", "rif"),
                               ("gd", "nn-dot"), ("if", "nn-euc"))


def standardized_ranks(scores: np.ndarray) -> np.ndarray:
    """Per-row ranks (ties averaged), centred and scaled to unit norm; NaN rows where constant."""
    r = rankdata(np.asarray(scores, dtype=np.float64), axis=1)
    r -= r.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(r, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 0, r / norm, np.nan)


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each row of ``a`` with the same row of ``b`` (NaN if a row is constant)."""
    if a.shape != b.shape:
        raise ValueError(f"score shapes differ: {a.shape} vs {b.shape}")
    return (standardized_ranks(a) * standardized_ranks(b)).sum(axis=1)


def mean_spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Per-row Spearman averaged over rows with a defined correlation (NaN when none)."""
    rho = spearman_rows(a, b)
    return float(np.nanmean(rho)) if np.isfinite(rho).any() else float("nan")


def top_k_overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Mean over rows of the proportion of common top-k columns."""
    k = min(k, a.shape[1])
    return float((top_k_mask(a, k) & top_k_mask(b, k)).sum(axis=1).mean() / k)


def correlation_tables(scores: Dict[str, np.ndarray], ks: Sequence[int] = (10, 50)) -> dict:
    """Pairwise mean Spearman and top-k overlap matrices over ``scores`` (method -> (n, m))."""
    names = list(scores)
    z = {m: standardized_ranks(scores[m]) for m in names}
    spear = np.full((len(names), len(names)), np.nan)
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            rho = (z[a] * z[b]).sum(axis=1)
            spear[i, j] = np.nanmean(rho) if np.isfinite(rho).any() else np.nan
    n_cols = next(iter(scores.values())).shape[1]
    overlap = {}
    for k in ks:
        kk = min(k, n_cols)
        masks = {m: top_k_mask(scores[m], kk) for m in names}
        overlap[str(k)] = [[float((masks[a] & masks[b]).sum(axis=1).mean() / kk) for b in names] for a in names]
    return {"methods": names, "spearman": spear.tolist(), "top_k_overlap": overlap}


def top_k_curve(scores: Dict[str, np.ndarray], pairs: Iterable[Tuple[str, str]], ks: Sequence[int]) -> dict:
    """Proportion of common top-k as a function of k (k < number of columns) for each available pair."""
    n_cols = next(iter(scores.values())).shape[1]
    ks = sorted({k for k in ks if 0 < k < n_cols}) or [1]
    out = {}
    for a, b in pairs:
        if a in scores and b in scores:
            out[f"{a} vs {b}"] = [top_k_overlap(scores[a], scores[b], k) for k in ks]
    return {"ks": ks, "pairs": out}


def heatmap(run: Run, name: str, methods: List[str], matrix, title: str, vmin: float) -> str:
    m = np.array(matrix, dtype=float)
    fig = new_figure(1.0 + 0.55 * len(methods), 0.6 + 0.5 * len(methods))
    ax = fig.subplots()
    im = ax.imshow(m, cmap="viridis", vmin=vmin, vmax=1.0)
    ax.set_xticks(range(len(methods)), methods, rotation=60, ha="right")
    ax.set_yticks(range(len(methods)), methods)
    for i in range(len(methods)):
        for j in range(len(methods)):
            if np.isfinite(m[i, j]):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if m[i, j] < (vmin + 1) / 2 else "black")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return save_figure(run, name, fig)


def is_layered(pair: str) -> bool:
    """A curve pair ("a vs b") of ``LAYERED_PAIRS``."""
    return tuple(pair.split(" vs ")) in LAYERED_PAIRS


def curve_figure(run: Run, curve: dict, layered: bool = False) -> Optional[str]:
    """Common top-k against k: the last-layer pairs, or (``layered``) paper Figure 4's pairs."""
    pairs = {p: ys for p, ys in curve["pairs"].items() if is_layered(p) == layered}
    if not pairs:
        return None
    fig = new_figure(6, 4)
    ax = fig.subplots()
    if layered:
        ax.set_title("top layers vs last layer (paper Figure 4), TracIn vs GD")
    for label, ys in pairs.items():
        ax.plot(curve["ks"], ys, marker="o", label=label)
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("k")
    ax.set_ylabel("proportion of common top-k")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(run, "correlation_topk_curve" + ("_layers" if layered else ""), fig)


def markdown(result: dict) -> str:
    names = result["methods"]
    out = [f"# Correlation between methods\n\n{result['n_test']} test x {result['n_train']} training "
           "examples (seeded sample). Mean per-test-row Spearman (paper Figures 2-3; the paper printed "
           "these only as heatmaps, so there are no numbers to set beside ours):\n"]
    out.append(md_table(["method"] + names, [[a] + [fmt(v, 2) for v in row]
                                            for a, row in zip(names, result["spearman"])]))
    for k, mat in result["top_k_overlap"].items():
        out.append(f"\nProportion of common top-{k} (paper Figures 5-6):\n")
        out.append(md_table(["method"] + names, [[a] + [fmt(v, 2) for v in row] for a, row in zip(names, mat)]))
    out.append("\nPaper's findings to compare with: IF ~ GD and RIF ~ GC; nearest-neighbour methods only "
               "modestly correlated with gradient methods; sentence-BERT similarity barely correlated "
               "with anything.\n")
    curve = result.get("top_k_curve", {})
    layered = {p: ys for p, ys in curve.get("pairs", {}).items() if is_layered(p)}
    if layered:
        ks = curve["ks"]
        out.append("\n## Top layers and checkpoints (paper Figure 4, Figure 2's layered rows)\n\nMean Spearman and "
                   "proportion of common top-k between each method over the head plus the top transformer "
                   "layers and its last-layer version (the paper: IF over BERT's top five layers against "
                   "linear IF, 'a very high correlation ... in top samples'), and between TracIn (summed "
                   "over training checkpoints) and GD:\n\n")
        names = result["methods"]
        rows = []
        for p, ys in layered.items():
            a, b = p.split(" vs ")
            rho = result["spearman"][names.index(a)][names.index(b)]
            rows.append([p, fmt(rho, 2)] + [fmt(y, 2) for y in ys])
        out.append(md_table(["pair", "Spearman"] + [f"top-{k}" for k in ks], rows))
    return "".join(out)


@evaluation("correlation", 10, "Do the methods agree?",
            "Mean per-test-row Spearman correlation between the methods' scores, and the share of common "
            "top-k training examples (paper Figures 2, 5, 6).",
            quick={"n_test": 50, "n_train": 300}, flags=("--n-test",))
def run_correlation(run: Run, methods=None, seed: int = 0, n_test: int = 100, n_train: int = 500,
                    ks: Sequence[int] = (10, 50), split: Optional[str] = None,
                    curve_ks: Sequence[int] = (1, 2, 5, 10, 20, 50, 100, 200, 500)) -> dict:
    """Pairwise Spearman and top-k overlap on a seeded sample; writes results/correlation.* and heatmaps.

    ``methods`` None: the paper's methods plus every other method whose scores the run stores
    (``instattr attribute --methods if-top`` first puts IF over the top layers in the tables).
    """
    scorer = Ranker(run, split)
    names = method_list(methods, run, scorer.split)
    rng = np.random.default_rng(seed)
    test_rows = sample_rows(len(run.features(scorer.split)), n_test, rng)
    train_cols = sample_rows(len(scorer.train), n_train, rng)
    scores = {m: scorer.rows(m, test_rows)[:, train_cols] for m in names}
    result = correlation_tables(scores, ks)
    result.update(n_test=len(test_rows), n_train=len(train_cols), seed=seed, split=scorer.split,
                  top_k_curve=top_k_curve(scores, CURVE_PAIRS, curve_ks))
    figs = [heatmap(run, "correlation_spearman", names, result["spearman"], "mean Spearman", -1.0)]
    figs += [heatmap(run, f"correlation_top{k}", names, mat, f"common top-{k}", 0.0)
             for k, mat in result["top_k_overlap"].items()]
    curves = [curve_figure(run, result["top_k_curve"], layered) for layered in (False, True)]
    result["figures"] = figs + [c for c in curves if c]
    return save(run, "correlation", result, markdown(result))

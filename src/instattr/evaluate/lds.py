"""The linear datamodeling score (LDS; Park et al. 2023, TRAK).

Draw ``subsets`` random subsets of the training set, each of ``fraction`` of it, and retrain the
run's model on each (``scope``, :func:`~.common.retrain_scope`: ``head`` trains one head per subset
from the same initialisation and batch order, all in batched calls of the head trainer; ``final``
refits the final layer exactly). For each test example t record its margin under each subset S --
the log-odds of the class the run's model predicts for t -- and the method's prediction of it,
sum over i in S of score(t, i). A method's LDS is the Spearman correlation of the two across
subsets, averaged over test examples, with a bootstrap confidence interval over test examples.
Every stored method counts (the layered ones too); random scores are the baseline.
"""
from __future__ import annotations

import time
from typing import Dict, Optional, Tuple

import numpy as np

from ..errors import InstattrError
from ..store import Run
from .common import (
    Ranker,
    fmt,
    head_config,
    head_input,
    md_table,
    method_list,
    new_figure,
    retrain_scope,
    sample_rows,
    save,
    save_figure,
    scope_text,
)
from .correlation import spearman_rows
from .registry import Flag, evaluation


def subset_masks(n: int, m: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """(m, n) keep-masks, each keeping round(fraction * n) rows drawn uniformly without replacement."""
    size = int(round(fraction * n))
    keep = np.zeros((m, n), dtype=bool)
    for j in range(m):
        keep[j, rng.choice(n, size=size, replace=False)] = True
    return keep


def log_odds(probs: np.ndarray, cls: np.ndarray) -> np.ndarray:
    """log p_c - log(1 - p_c) of class ``cls[t]`` for each subset and test row: probs (m, n_test, C)
    -> (n_test, m). ``1 - p_c`` is summed from the other classes, so it does not round to 0."""
    cls = np.asarray(cls)
    chosen = np.arange(probs.shape[2])[None, None, :] == cls[None, :, None]
    p = np.where(chosen, probs, 0.0).sum(2, dtype=np.float64)
    rest = np.where(chosen, 0.0, probs).sum(2, dtype=np.float64)
    tiny = np.finfo(np.float64).tiny
    return (np.log(np.maximum(p, tiny)) - np.log(np.maximum(rest, tiny))).T


def lds_per_example(margins: np.ndarray, scores: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Per test row, the Spearman correlation across subsets of ``margins`` (n_test, m) with the
    summed scores ``scores @ masks.T`` (scores: (n_test, n_train)); NaN where either is constant."""
    predicted = np.asarray(scores, dtype=np.float64) @ np.asarray(masks, dtype=np.float64).T
    return spearman_rows(margins, predicted)


def bootstrap_mean(values: np.ndarray, rng: np.random.Generator, n_boot: int = 1000,
                   level: float = 0.95) -> Tuple[float, float, float]:
    """(mean, low, high): the mean of the finite ``values`` and a percentile bootstrap interval."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(v.mean()), float(lo), float(hi)


def subset_probs(run: Run, scope: str, masks: np.ndarray, rows: np.ndarray, progress: bool, device,
                 chunk_size: int = 50) -> np.ndarray:
    """Probabilities (m, len(rows), C) of the eval-split rows ``rows`` under the model retrained on each mask."""
    from .retrain import refit_probs, retrain_probs
    train, test = run.features("train"), run.features(run.eval_split)
    if scope == "head":
        after, _ = retrain_probs(head_input(run, "train", train), train.label,
                                 head_input(run, run.eval_split, test)[rows], test.n_classes, head_config(run), masks,
                                 chunk_size, progress, run.path / "cache" / "lds-partial.npz", device, before=False)
        return after
    layer = run.final_layer()
    after, _ = refit_probs(layer.augment(train.features), train.label, layer.augment(test.features[rows]),
                           layer.weight(), layer.l2, masks, progress)
    return after


def markdown(result: dict) -> str:
    def row(name, r):
        return [name, fmt(r["lds"]), f"[{fmt(r['low'])}, {fmt(r['high'])}]", str(r["n"])]
    rows = [row(m, r) for m, r in result["methods"].items()] + [row("random scores", result["random"])]
    return ("# Linear datamodeling score (TRAK)\n\n"
            f"{result['subsets']} random subsets of {fmt(result['fraction'] * 100, 0)}% of the {result['n_train']} "
            f"training examples; {scope_text(result['scope'])} retrained on each "
            + ("from the same initialisation and batch order" if result["scope"] == "head" else "exactly")
            + f". For each of {result['n_test']} test examples, the Spearman correlation across subsets between "
            "its margin (log-odds of the class the model predicts) and the method's summed scores over the "
            f"subset, averaged over test examples, with a {int(result['level'] * 100)}% bootstrap interval. "
            "Higher = the method's scores predict what retraining on a subset does; random scores give about 0. "
            f"*n*: test examples with a defined correlation.\n\n"
            + md_table(["method", "LDS", "interval", "n"], rows))


def figure(run: Run, result: dict) -> str:
    names = list(result["methods"]) + ["random scores"]
    rs = [result["methods"][m] for m in result["methods"]] + [result["random"]]
    fig = new_figure(1.5 + 0.55 * len(names), 3.5)
    ax = fig.subplots()
    mid = np.array([r["lds"] if r["lds"] is not None else np.nan for r in rs], dtype=float)
    err = np.array([[m - (r["low"] if r["low"] is not None else np.nan),
                     (r["high"] if r["high"] is not None else np.nan) - m] for m, r in zip(mid, rs)]).T
    ax.bar(names, mid, yerr=err, capsize=3, color=["C0"] * (len(names) - 1) + ["grey"])
    ax.axhline(0, color="black", lw=0.8)
    ax.set_ylabel("LDS (mean Spearman)")
    ax.tick_params(axis="x", rotation=45)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(run, "lds", fig)


@evaluation("lds", 70, "Linear datamodeling score",
            "Retrain on random halves of the training set: does the sum of a method's scores over a subset predict "
            "each test example's margin under it? (TRAK's LDS; random scores give about 0.)",
            quick={"subsets": 50}, kind=("classifier", "language-model"),
            flags=(Flag("--subsets", "subsets", "random training subsets, one retrained model each (default 100; "
                        "24 on a language-model run)", metavar="M"),
                   Flag("--fraction", "fraction", "share of the training set in each subset (default 0.5)",
                        type=float, metavar="F"),
                   "--n-test", "--scope", "--device",
                   Flag("--epochs", "epochs", "language-model runs: passes over each subset (default 20)",
                        metavar="E"),
                   Flag("--lr", "lr", "language-model runs: AdamW's peak learning rate (default 2e-3)",
                        type=float, metavar="LR")))
def run_lds(run: Run, methods=None, seed: int = 0, subsets: Optional[int] = None, fraction: float = 0.5,
            n_test: Optional[int] = None, scope: Optional[str] = None, n_boot: int = 1000, level: float = 0.95,
            progress: bool = True, device=None, epochs: Optional[int] = None, lr: Optional[float] = None) -> dict:
    """LDS of every method (default: the paper's and every stored one) against random scores;
    writes results/lds.* and figures/lds.png. ``n_test``: a seeded sample of test examples (all by default).
    On a language-model run, :func:`instattr.evaluate.language.run_lds_lm` (``epochs``, ``lr``)."""
    from ..device import resolve_device
    from ..store import LMRun
    if isinstance(run, LMRun):
        from .language import run_lds_lm
        if scope is not None:
            raise InstattrError("lds: --scope applies to classifier runs; a language-model run retrains all of it")
        return run_lds_lm(run, methods, seed, 24 if subsets is None else subsets, fraction, n_test,
                          20 if epochs is None else epochs, 2e-3 if lr is None else lr, n_boot=n_boot, level=level,
                          progress=progress, device=device)
    if epochs is not None or lr is not None:
        raise InstattrError("lds: --epochs and --lr apply to language-model runs; a classifier run refits its head")
    subsets = 100 if subsets is None else subsets
    t_all = time.perf_counter()
    if not 0 < fraction < 1:
        raise InstattrError(f"lds: --fraction must be between 0 and 1, got {fraction}")
    if int(subsets) < 2:
        raise InstattrError(f"lds: --subsets must be at least 2 (a correlation across subsets), got {subsets}")
    scope = retrain_scope(run, scope, "lds")
    scorer = Ranker(run)
    names = method_list(methods, run, scorer.split)
    test = run.features(scorer.split)
    rng = np.random.default_rng(seed)
    rows = sample_rows(len(test), n_test, rng)
    n_train = len(scorer.train)
    masks = subset_masks(n_train, int(subsets), fraction, rng)
    seconds: Dict[str, float] = {}
    t = time.perf_counter()
    probs = subset_probs(run, scope, masks, rows, progress, resolve_device(device))
    seconds["retrain"] = time.perf_counter() - t
    margins = log_odds(probs, test.pred[rows])
    boot = np.random.default_rng(seed + 1)
    per_method, per_example = {}, {}
    for m in names:
        t = time.perf_counter()
        rho = lds_per_example(margins, scorer.rows(m, rows), masks)
        mean, lo, hi = bootstrap_mean(rho, boot, n_boot, level)
        per_method[m] = {"lds": mean, "low": lo, "high": hi, "n": int(np.isfinite(rho).sum()),
                         "seconds": time.perf_counter() - t}
        per_example[m] = rho
    random_scores = np.random.default_rng(seed + 2).standard_normal((len(rows), n_train))
    rho = lds_per_example(margins, random_scores, masks)
    mean, lo, hi = bootstrap_mean(rho, boot, n_boot, level)
    seconds["total"] = time.perf_counter() - t_all
    result = {"methods": per_method, "random": {"lds": mean, "low": lo, "high": hi, "n": int(np.isfinite(rho).sum())},
              "subsets": int(subsets), "fraction": float(fraction), "n_train": n_train, "n_test": len(rows),
              "split": scorer.split, "scope": scope, "seed": seed, "level": level, "n_boot": n_boot,
              "test_idx": [str(i) for i in test.idx[rows]], "per_example": per_example,
              "margin_std": float(np.mean(margins.std(1))), "seconds": seconds}
    result["figures"] = [figure(run, result)]
    saved = save(run, "lds", result, markdown(result))
    (run.path / "cache" / "lds-partial.npz").unlink(missing_ok=True)
    return saved

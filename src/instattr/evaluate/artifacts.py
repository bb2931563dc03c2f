"""Annotation artifacts on HANS (paper Table 2).

Targets: test examples with gold non-entailment that the model predicts entailment. For each
method, the mean lexical overlap rate (shared data README: |set(hypothesis) ∩ set(premise)| /
|set(hypothesis)| on lower-cased whitespace tokens) of each target's top-1 and top-10 training
examples. Baseline: for each target, training examples drawn uniformly at random (seeded).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from ..store import Run, RunError
from .common import Ranker, TopRows, fmt, md_table, method_list, save
from .paper import TABLE2_ARTIFACTS
from .registry import evaluation


def overlap_rate(premise: str, hypothesis: str) -> float:
    """Share of the hypothesis's distinct lower-cased tokens that also occur in the premise (0 if empty)."""
    hyp = set(hypothesis.lower().split())
    if not hyp:
        return 0.0
    return len(hyp & set(premise.lower().split())) / len(hyp)


def artifact_targets(label: np.ndarray, pred: np.ndarray, non_entailment: int, entailment: int) -> np.ndarray:
    """Rows with gold ``non_entailment`` predicted ``entailment``."""
    return np.flatnonzero((np.asarray(label) == non_entailment) & (np.asarray(pred) == entailment))


def top_overlap(score_rows, train_overlap: np.ndarray, ks: Sequence[int] = (1, 10)) -> Dict[str, float]:
    """Mean over rows of the mean overlap rate of each row's top-k training examples
    (``score_rows``: a score matrix or :class:`~.common.TopRows`)."""
    from ..methods.topk import top_k
    out = {}
    for k in ks:
        if isinstance(score_rows, TopRows):
            idx = score_rows.first(k)
        else:
            idx, _ = top_k(np.asarray(score_rows), min(k, score_rows.shape[1]))
        out[f"top{k}"] = float(train_overlap[np.asarray(idx)].mean()) if len(score_rows) else float("nan")
    return out


def random_overlap(train_overlap: np.ndarray, n_targets: int, rng: np.random.Generator,
                   ks: Sequence[int] = (1, 10)) -> Dict[str, float]:
    """Same statistic for training examples drawn at random (k distinct per target)."""
    n = len(train_overlap)
    picks = np.stack([rng.choice(n, size=min(max(ks), n), replace=False) for _ in range(max(n_targets, 1))])
    return {f"top{k}": float(train_overlap[picks[:, :k]].mean()) for k in ks}


def label_ids(label_names: Sequence[str]) -> Tuple[int, int]:
    """(non-entailment, entailment) class indices from the run's label names."""
    names = [n.lower() for n in label_names]
    if "entailment" not in names or "non-entailment" not in names:
        raise RunError(f"artifacts needs labels 'non-entailment' and 'entailment' (a hans run); got {label_names}")
    return names.index("non-entailment"), names.index("entailment")


def applies(run: Run) -> bool:
    """Artifacts only make sense on runs trained on the hans data."""
    return run.manifest.data.name.lower() == "hans"


def markdown(result: dict) -> str:
    header = ["method", "ours top-1", "ours top-10", "paper top-1", "paper top-10"]

    def row(m, r):
        p = TABLE2_ARTIFACTS.get(m, {})
        return [m, fmt(r["top1"], 2), fmt(r["top10"], 2), fmt(p.get("top1"), 2), fmt(p.get("top10"), 2)]

    rows = [row("random", result["random"])] + [row(m, r) for m, r in result["methods"].items()]
    return ("# Lexical-overlap artifact on HANS (paper Table 2)\n\nMean premise/hypothesis lexical overlap of "
            f"the top-1 and top-10 training examples for the {result['n_targets']} test examples with gold "
            "non-entailment predicted entailment (their own mean overlap: "
            f"{fmt(result['targets_overlap'], 2)}; all training examples: {fmt(result['train_overlap'], 2)}). "
            "Higher than random = the method surfaces the lexical-overlap artifact. sbert-* = the paper's "
            "sentence-BERT rows, nn-* its Sim rows.\n\n" + md_table(header, rows))


@evaluation("artifacts", 40, "Do the methods surface the HANS lexical-overlap artifact?",
            "For HANS non-entailment examples predicted as entailment, the lexical overlap rate of the "
            "top-ranked training examples (paper Table 2). Random training examples give about 0.40.",
            applies=applies)
def run_artifacts(run: Run, methods=None, seed: int = 0, split: Optional[str] = None) -> dict:
    """Lexical overlap of the top training examples for mispredicted HANS examples; writes results/artifacts.*."""
    scorer = Ranker(run, split)
    names = method_list(methods, run, scorer.split)
    test = run.features(scorer.split)
    non_ent, ent = label_ids(run.label_names)
    if not run.manifest.is_pair:
        raise RunError(f"{run.path}: artifacts needs sentence pairs (premise, hypothesis)")
    train_overlap = np.array([overlap_rate(e.document, e.query or "") for e in run.examples("train")])
    test_ex = run.examples(scorer.split)
    targets = artifact_targets(test.label, test.pred, non_ent, ent)
    result = {"methods": {}, "n_targets": int(len(targets)), "seed": seed, "split": scorer.split,
              "train_overlap": float(train_overlap.mean()),
              "targets_overlap": float(np.mean([overlap_rate(test_ex[t].document, test_ex[t].query or "")
                                                for t in targets])) if len(targets) else float("nan")}
    result["random"] = random_overlap(train_overlap, len(targets), np.random.default_rng(seed))
    for m in names:
        result["methods"][m] = (top_overlap(scorer.top(m, targets, 10), train_overlap) if len(targets)
                                else {"top1": float("nan"), "top10": float("nan")})
    return save(run, "artifacts", result, markdown(result))

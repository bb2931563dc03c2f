"""One or a few headline numbers per evaluation, each beside the paper's (overview page).

Every evaluation's full table stays in ``results/{name}.md``; these rows pick what a reader looks
at first. A result whose layout a function does not know gets no headline rows, never an error.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

from ..evaluate.common import fmt
from ..evaluate.paper import (
    TABLE1_RANDOMIZED,
    TABLE1_RETRAIN,
    TABLE2_ARTIFACTS,
    TABLE3_4_NEAR_TRAIN,
    paper_columns,
    timing_bound,
)

Row = Dict[str, str]   # {"measure", "ours", "paper"}


def _sci(v) -> str:
    return "—" if v is None else f"{v:.2g} s"


def _correlation(r: dict, col: str) -> List[Row]:
    names = r["methods"]
    found = {"high (Figure 2)": [("if", "gd"), ("rif", "gc")],
             "modest (Figure 2)": [("nn-cos", "gc")],
             "near zero (Figure 2)": [("sbert-cos", "if")]}
    rows = []
    for paper, pairs in found.items():
        for a, b in pairs:
            if a in names and b in names:
                rows.append({"measure": f"mean Spearman, {a} ~ {b}",
                             "ours": fmt(r["spearman"][names.index(a)][names.index(b)], 2), "paper": paper})
    return rows


def _retrain(r: dict, col: str) -> List[Row]:
    paper = TABLE1_RETRAIN.get(col, {})
    rows = []
    for k in map(str, r["ks"]):
        best = min(r["methods"], key=lambda m: r["methods"][m][k])
        rows.append({"measure": f"Δ prob. after removing top-{k}: strongest, {best}",
                     "ours": fmt(r["methods"][best][k]), "paper": fmt(paper.get(best, {}).get(k))})
        rows.append({"measure": f"Δ prob. after removing {k} at random",
                     "ours": fmt(r["random"][k]["mean"]), "paper": fmt(paper.get("random", {}).get(k))})
    return rows


def _randomized(r: dict, col: str) -> List[Row]:
    paper = TABLE1_RANDOMIZED.get(col, {})
    return [{"measure": f"Spearman, trained vs random model: {m}", "ours": fmt(r["methods"][m]),
             "paper": fmt(paper.get(m))} for m in ("if", "gd", "rep", "nn-cos") if m in r["methods"]]


def _artifacts(r: dict, col: str) -> List[Row]:
    rows = [{"measure": "lexical overlap of top-1: random", "ours": fmt(r["random"]["top1"], 2),
             "paper": fmt(TABLE2_ARTIFACTS["random"]["top1"], 2)}]
    return rows + [{"measure": f"lexical overlap of top-1: {m}", "ours": fmt(r["methods"][m]["top1"], 2),
                    "paper": fmt(TABLE2_ARTIFACTS.get(m, {}).get("top1"), 2)}
                   for m in ("nn-cos", "gc", "if") if m in r["methods"]]


def _near_train(r: dict, col: str) -> List[Row]:
    paper = TABLE3_4_NEAR_TRAIN.get(col, {})
    rows = []
    for m in ("nn-cos", "rif", "if"):
        for kind in ("train", "remove"):
            if m in r["methods"] and kind in r["methods"][m]:
                rows.append({"measure": f"HIT@1, {kind} targets: {m}", "ours": fmt(r["methods"][m][kind]["hit1"]),
                             "paper": fmt(paper.get(m, {}).get(kind, {}).get("hit1"))})
    return rows


def _timing(r: dict, col: str) -> List[Row]:
    return [{"measure": f"seconds per test example: {m}", "ours": _sci(r["methods"][m]),
             "paper": f"< {timing_bound(m):g} s"} for m in ("if", "nn-cos") if m in r["methods"]]


HEADLINES: Dict[str, Callable[[dict, str], List[Row]]] = {
    "correlation": _correlation, "retrain": _retrain, "randomized": _randomized, "artifacts": _artifacts,
    "near-train": _near_train, "timing": _timing,
}


def paper_column(data_name: Optional[str]) -> str:
    """The paper's dataset column ("SST" or "MNLI") closest to a run's data."""
    return paper_columns(data_name)[0]


def headline(name: str, result: dict, data_name: Optional[str]) -> List[Row]:
    """Headline rows of evaluation ``name`` (empty for one without a headline, or of an unknown layout)."""
    make = HEADLINES.get(name)
    if make is None:
        return []
    try:
        return make(result, paper_column(data_name))
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        return []

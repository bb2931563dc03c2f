"""The reference paper's own numbers (Pezeshkpour et al. 2021), as data, to print beside ours.

All rates are fractions in [0, 1]: Tables 3 and 4 print percentages and are divided by 100 here.
Column keys: ``"SST"`` and ``"MNLI"``; ``paper_columns`` picks the ones that match a run's data.
"""
from __future__ import annotations

from typing import Dict, List, Optional

# Table 1, left: avg(delta) of the originally predicted class after removing the top-k.
TABLE1_RETRAIN: Dict[str, Dict[str, Dict[str, float]]] = {
    "SST": {
        "random": {"50": -0.028, "500": -0.021},
        "nn-euc": {"50": -0.028, "500": -0.540},
        "nn-cos": {"50": -0.072, "500": -0.430},
        "nn-dot": {"50": -0.059, "500": -0.513},
        "if": {"50": -0.054, "500": -0.526},
        "rep": {"50": -0.114, "500": -0.490},
        "rif": {"50": -0.071, "500": -0.537},
        "gd": {"50": -0.058, "500": -0.516},
        "gc": {"50": -0.082, "500": -0.528},
    },
    "MNLI": {
        "random": {"50": -0.039, "500": -0.029},
        "nn-euc": {"50": -0.102, "500": -0.266},
        "nn-cos": {"50": -0.088, "500": -0.306},
        "nn-dot": {"50": -0.106, "500": -0.273},
        "if": {"50": -0.042, "500": -0.407},
        "rep": {"50": -0.002, "500": -0.230},
        "rif": {"50": -0.068, "500": -0.347},
        "gd": {"50": -0.022, "500": -0.446},
        "gc": {"50": -0.030, "500": -0.279},
    },
}
TABLE1_RANDOM_STD = 0.02  # "Random on both of the benchmarks has standard deviation around 0.02"

# Table 1, right: Spearman between rankings of the trained and of a randomly initialised model.
TABLE1_RANDOMIZED: Dict[str, Dict[str, float]] = {
    "SST": {"nn-euc": 0.056, "nn-cos": 0.045, "nn-dot": 0.005, "if": -0.296, "rep": -0.217,
            "rif": -0.021, "gd": -0.290, "gc": -0.021},
    "MNLI": {"nn-euc": 0.023, "nn-cos": 0.018, "nn-dot": -0.002, "if": 0.018, "rep": 0.053,
             "rif": 0.013, "gd": 0.017, "gc": 0.012},
}

# Table 2: mean lexical overlap of the top-1 / top-10 training examples (HANS, predicted entailment).
TABLE2_ARTIFACTS: Dict[str, Dict[str, float]] = {
    "random": {"top1": 0.40, "top10": 0.40},
    "sbert-euc": {"top1": 0.39, "top10": 0.41},
    "sbert-cos": {"top1": 0.38, "top10": 0.39},
    "sbert-dot": {"top1": 0.39, "top10": 0.40},
    "nn-euc": {"top1": 0.56, "top10": 0.57},
    "nn-cos": {"top1": 0.56, "top10": 0.56},
    "nn-dot": {"top1": 0.44, "top10": 0.44},
    "if": {"top1": 0.43, "top10": 0.44},
    "rep": {"top1": 0.43, "top10": 0.35},
    "rif": {"top1": 0.55, "top10": 0.56},
    "gd": {"top1": 0.43, "top10": 0.44},
    "gc": {"top1": 0.55, "top10": 0.56},
}

NEAR_TRAIN_KINDS = ("train", "add", "remove", "replace")


def _hits(*percent: float) -> Dict[str, Dict[str, float]]:
    """(hit1, hit10) percentages per kind, in Table 3/4 column order -> fractions."""
    return {kind: {"hit1": round(percent[2 * i] / 100, 6), "hit10": round(percent[2 * i + 1] / 100, 6)}
            for i, kind in enumerate(NEAR_TRAIN_KINDS)}


# Tables 3 (SST) and 4 (MNLI): HIT@1 / HIT@10 of the original training example.
TABLE3_4_NEAR_TRAIN: Dict[str, Dict[str, Dict[str, Dict[str, float]]]] = {
    "SST": {
        "nn-euc": _hits(100, 100, 99.9, 100, 66.5, 73.7, 99.9, 100),
        "nn-cos": _hits(100, 100, 99.8, 100, 67.3, 74.6, 99.8, 100),
        "nn-dot": _hits(0.73, 2.06, 0.73, 2.06, 0.47, 2.19, 0.73, 2.06),
        "if": _hits(0.01, 0.34, 0.01, 0.35, 0.04, 0.25, 0.01, 0.35),
        "rep": _hits(0.01, 0.27, 0.01, 0.27, 0.04, 0.22, 0.01, 0.27),
        "rif": _hits(95.8, 96.0, 95.9, 96.0, 65.0, 72.2, 95.8, 96.0),
        "gd": _hits(0.01, 0.38, 0.01, 0.38, 0.04, 0.23, 0.01, 0.37),
        "gc": _hits(95.9, 96.0, 95.9, 96.0, 65.3, 72.3, 95.9, 96.0),
    },
    "MNLI": {
        "nn-euc": _hits(100, 100, 100, 100, 36.7, 45.8, 100, 100),
        "nn-cos": _hits(100, 100, 100, 100, 38.1, 46.8, 100, 100),
        "nn-dot": _hits(1.30, 6.44, 1.30, 6.44, 3.49, 10.7, 1.30, 6.44),
        "if": _hits(0.0, 0.01, 0.0, 0.01, 0.02, 0.10, 0.0, 0.01),
        "rep": _hits(0.0, 0.01, 0.0, 0.01, 0.01, 0.09, 0.0, 0.01),
        "rif": _hits(92.5, 92.5, 92.5, 92.5, 32.6, 41.2, 92.5, 92.5),
        "gd": _hits(0.0, 0.01, 0.0, 0.01, 0.10, 0.50, 0.0, 0.01),
        "gc": _hits(92.5, 92.5, 92.5, 92.5, 32.8, 41.2, 92.5, 92.5),
    },
}

# Section 4, "Computational Complexity": seconds per test example (upper bounds, a 2015 GPU).
TIMING_IF_TOP5_SECONDS = 300.0  # IF over the top five BERT layers: ~5 minutes per test example
TIMING_IF_LINEAR_SECONDS = 0.01  # "< 0.01 seconds"
TIMING_SIMILARITY_SECONDS = 0.0001  # "< 0.0001 seconds"


def timing_bound(method: str) -> Optional[float]:
    """The paper's per-example time bound for ``method`` (None where it gave none)."""
    if method == "if":
        return TIMING_IF_LINEAR_SECONDS
    if method.startswith(("nn-", "sbert-")):
        return TIMING_SIMILARITY_SECONDS
    return None


def paper_columns(data_name: Optional[str]) -> List[str]:
    """Which of the paper's dataset columns match a run's data (both when unknown)."""
    name = (data_name or "").lower()
    if name == "sst2":
        return ["SST"]
    if name in ("mnli", "hans"):
        return ["MNLI"]
    return ["SST", "MNLI"]

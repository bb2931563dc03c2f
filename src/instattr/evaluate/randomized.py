"""Randomized-model test (Hanawa et al. 2021; paper Table 1, right).

Re-initialise the head (``model.init_params`` with a different seed), recompute features and
probabilities of the train split and the sampled test rows with ``model.predict``, rescore every
method on that random model, and report the mean per-test-row Spearman between trained and random
scores. Near 0 is good: the ranking depends on what the model learned.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np

from ..model import init_params, predict
from ..store import FeatureSet, HeadState, Run
from .common import (Scorer, data_name, fmt, head_config, head_input, md_table, method_list,
                     require_head_mode, sample_rows, save)
from .correlation import mean_spearman
from .paper import TABLE1_RANDOMIZED, paper_columns


def random_model(x_train: np.ndarray, x_test: np.ndarray, train: FeatureSet, test: FeatureSet,
                 d: int, l2: float, seed: int) -> Tuple[FeatureSet, FeatureSet, HeadState]:
    """(train, test, head) of a freshly initialised head: features/probs/pred recomputed, the
    untuned encoder arrays kept (so sbert-* scores do not change)."""
    params = init_params(x_train.shape[1], d, train.n_classes, seed)

    def refeature(fs: FeatureSet, x: np.ndarray) -> FeatureSet:
        feats, probs = predict(params, x)
        return FeatureSet(idx=fs.idx, label=fs.label, pred=probs.argmax(1), probs=probs, features=feats,
                          encoder=fs.encoder)

    return refeature(train, x_train), refeature(test, x_test), HeadState(w=params["w"].double().numpy(), l2=l2)


def markdown(result: dict, columns: List[str]) -> str:
    header = ["method", "ours"] + [f"paper {c}" for c in columns]
    rows = [[m, fmt(r)] + [fmt(TABLE1_RANDOMIZED[c].get(m)) for c in columns]
            for m, r in result["methods"].items()]
    note = ""
    if any(m.startswith("sbert-") for m in result["methods"]):
        note = ("\nsbert-* methods use the untuned encoder embedding, which re-initialising the head does not "
                "touch, so in head mode their rankings are unchanged (Spearman 1.0) by construction.\n")
    return ("# Randomized-model test (paper Table 1, right)\n\nMean per-test-row Spearman between each "
            f"method's scores under the trained head and under a re-initialised head (seed "
            f"{result['random_seed']}), over {result['n_test']} test x {result['n_train']} training examples. "
            "Small magnitude is good: the ranking reflects what was learned.\n\n" + md_table(header, rows) + note)


def run_randomized(run: Run, methods=None, seed: int = 0, n_test: int = 100, split: Optional[str] = None) -> dict:
    """Trained-vs-random Spearman per method; writes results/randomized.*."""
    require_head_mode(run, "the randomized-model test")
    names = method_list(methods)
    scorer = Scorer(run, split)
    test = run.features(scorer.split)
    rows = sample_rows(len(test), n_test, np.random.default_rng(seed))
    cfg = head_config(run)
    x_train = head_input(run, "train", scorer.train)
    x_test = head_input(run, scorer.split, test)[rows]
    rand_seed = cfg.seed + 1000 + seed
    d = scorer.head.w.shape[1]
    r_train, r_test, r_head = random_model(x_train, x_test, scorer.train, test.subset(rows), d, cfg.l2, rand_seed)
    random_scorer = Scorer(run, scorer.split, train=r_train, head=r_head, use_stored=False)
    rho = {m: mean_spearman(scorer.rows(m, rows), random_scorer.score(m, r_test)) for m in names}
    result = {"methods": rho, "n_test": len(rows), "n_train": len(x_train), "seed": seed,
              "random_seed": rand_seed, "split": scorer.split}
    return save(run, "randomized", result, markdown(result, paper_columns(data_name(run))))

"""Randomized-model test (Hanawa et al. 2021; paper Table 1, right).

Re-initialise part of the model (``scope``, :func:`~.common.resolve_scope`), recompute what that
changes for the train split and the sampled test rows, rescore every method on that random model,
and report the mean per-test-row Spearman between trained and random scores. Near 0 is good: the
ranking depends on what the model learned.

- ``head`` (head-mode runs): instattr's head (``init_params`` with another seed); features and
  probabilities are recomputed from the stored encoder output.
- ``top-K``: the top K transformer blocks and everything above them (:mod:`.top_layers`); the
  features change, so every method's ranking can.
- ``final`` (every other run): the final linear layer (nn.Linear's uniform initialisation);
  the features are unchanged, so nn-* rankings stay the same by construction, and rep's refit
  reaches the same unique minimum of the convex final-layer loss from any start (only the random
  model's predicted classes, which pick rep's class, change its ranking).

Methods that need the whole classifier (layered, TracIn) are not re-scored here.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np

from ..arrays import FeatureSet, FinalLayer
from ..store import Run, RunError
from .common import (
    Ranker,
    data_name,
    fmt,
    head_config,
    head_input,
    md_table,
    method_list,
    resolve_scope,
    sample_rows,
    save,
    scope_text,
)
from .correlation import mean_spearman
from .paper import TABLE1_RANDOMIZED, paper_columns
from .registry import evaluation


def random_model(x_train: np.ndarray, x_test: np.ndarray, train: FeatureSet, test: FeatureSet,
                 d: int, l2: float, seed: int) -> Tuple[FeatureSet, FeatureSet, FinalLayer]:
    """(train, test, final layer) of a freshly initialised head: features/probs/pred recomputed (the
    rows keep their identity, so sbert-* scores, which do not depend on the head, do not change)."""
    from ..models.head import init_params, predict
    params = init_params(x_train.shape[1], d, train.n_classes, seed)

    def refeature(fs: FeatureSet, x: np.ndarray) -> FeatureSet:
        feats, probs = predict(params, x)
        return fs.replace(pred=probs.argmax(1), probs=probs, features=feats)

    return refeature(train, x_train), refeature(test, x_test), FinalLayer(w=params["w"].double().numpy(), l2=l2)


def random_final_layer(layer: FinalLayer, train: FeatureSet, test: FeatureSet,
                       seed: int) -> Tuple[FeatureSet, FeatureSet, FinalLayer]:
    """(train, test, final layer) with the final layer re-initialised like ``nn.Linear``
    (uniform in +-1/sqrt(d)); features unchanged, probabilities and predictions recomputed."""
    from ..methods.lastlayer import softmax
    rng = np.random.default_rng(seed)
    c, d = layer.w.shape
    bound = 1.0 / np.sqrt(d)
    w = rng.uniform(-bound, bound, size=(c, d))
    b = None if layer.b is None else rng.uniform(-bound, bound, size=c)
    new = FinalLayer(w=w, b=b, l2=layer.l2)

    def refeature(fs: FeatureSet) -> FeatureSet:
        probs = softmax(new.logits(fs.features)).astype(np.float32)
        return fs.replace(pred=probs.argmax(1), probs=probs)

    return refeature(train), refeature(test), new


def markdown(result: dict, columns: List[str]) -> str:
    header = ["method", "ours"] + [f"paper {c}" for c in columns]
    rows = [[m, fmt(r)] + [fmt(TABLE1_RANDOMIZED[c].get(m)) for c in columns]
            for m, r in result["methods"].items()]
    note = ""
    if any(m.startswith("sbert-") for m in result["methods"]):
        note = ("\nsbert-* methods use the untuned encoder embedding, which re-initialising the head does not "
                "touch, so in head mode their rankings are unchanged (Spearman 1.0) by construction.\n")
    if result.get("scope") == "final" and any(m.startswith("nn-") for m in result["methods"]):
        note += ("\nRe-initialising only the final layer leaves the features unchanged, so nn-* rankings are "
                 "unchanged (Spearman 1.0) by construction; rep refits the final layer to the same unique minimum "
                 "from any start, so only the random model's other predicted classes change its rankings. "
                 "Use --scope top-K to re-initialise the layers that made the features.\n")
    return ("# Randomized-model test (paper Table 1, right)\n\nMean per-test-row Spearman between each "
            f"method's scores under the trained model and after re-initialising "
            f"{scope_text(result.get('scope', 'head'))} (seed {result['random_seed']}), over {result['n_test']} "
            f"test x {result['n_train']} training examples. "
            "Small magnitude is good: the ranking reflects what was learned.\n\n" + md_table(header, rows) + note)


@evaluation("randomized", 30, "The randomized-model test",
            "Spearman correlation between the scores of the trained model and of a randomly re-initialised "
            "one (Hanawa et al. 2021; paper Table 1, right). Near zero is good: the ranking depends on "
            "what the model learned.", flags=("--n-test", "--scope"))
def run_randomized(run: Run, methods=None, seed: int = 0, n_test: int = 100, split: Optional[str] = None,
                   scope: Optional[str] = None) -> dict:
    """Trained-vs-random Spearman per method; writes results/randomized.*."""
    from ..methods.registry import method_class
    scope = resolve_scope(run, scope, "the randomized-model test")
    names = method_list(methods)
    whole = [m for m in names if method_class(m).needs == "classifier"]
    if whole:
        raise RunError(f"the randomized-model test re-scores last-layer methods; {', '.join(whole)} need the whole "
                       "classifier")
    scorer = Ranker(run, split)
    test = run.features(scorer.split)
    rows = sample_rows(len(test), n_test, np.random.default_rng(seed))
    rand_seed = run.manifest.seed + 1000 + seed
    if scope == "head":
        cfg = head_config(run)
        x_train = head_input(run, "train", scorer.train)
        x_test = head_input(run, scorer.split, test)[rows]
        d = run.final_layer().w.shape[1]
        r_train, r_test, r_layer = random_model(x_train, x_test, scorer.train, test.subset(rows), d, cfg.l2, rand_seed)
    elif scope == "final":
        r_train, r_test, r_layer = random_final_layer(run.final_layer(), scorer.train, test.subset(rows), rand_seed)
    else:
        from ..models import classifier_for
        from .top_layers import blocks_of, random_top
        r_train, r_test, r_layer = random_top(classifier_for(run), blocks_of(scope), scorer.train, test.subset(rows),
                                              rand_seed)
    random_scorer = Ranker(run, scorer.split, train=r_train, model=r_layer, use_stored=False)
    rho = {m: mean_spearman(scorer.rows(m, rows), random_scorer.score(m, r_test)) for m in names}
    result = {"methods": rho, "n_test": len(rows), "n_train": len(scorer.train), "seed": seed,
              "random_seed": rand_seed, "split": scorer.split, "scope": scope}
    return save(run, "randomized", result, markdown(result, paper_columns(data_name(run))))

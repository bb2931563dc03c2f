"""The linear datamodeling score of instattr.lm's methods on a small GPT-2, by actual retraining.

    python bench/lm_lds.py [--subsets 24] [--sentences 300] [--people 30] [--epochs 12] [--methods ...]

Builds a small corpus with examples/train_tiny_lm.py's functions (SST-2 sentences, planted facts,
poison), trains a GPT-2 from scratch on all of it (seed 0), and scores each planted-fact query
against every training document with each method (``trackstar`` with the full run's AdamW state).
Then it retrains the same model from the same initialisation on ``--subsets`` random halves of the
documents and measures each query's completion log-probability under each. A method's LDS for a
query is the Spearman correlation, over the subsets, between the sum of its scores over the
subset's documents and the measured log-probability; the table gives the mean over queries (and
its standard error) beside a random scoring. Retraining noise bounds it from above: two runs on the
same subset with another shuffling seed give the ``ceiling`` row (their log-probabilities'
correlation over subsets).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np


def script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def spearman(a, b) -> float:
    from scipy.stats import spearmanr
    r = spearmanr(a, b).statistic
    return 0.0 if not np.isfinite(r) else float(r)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subsets", type=int, default=24)
    ap.add_argument("--sentences", type=int, default=300)
    ap.add_argument("--people", type=int, default=30)
    ap.add_argument("--poison", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=800)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--methods", default="gd,gc,if,rif,trackstar")
    ap.add_argument("--proj-dim", type=int, default=16)
    a = ap.parse_args()

    from instattr.lm import LMExplainer
    ex = script(Path(__file__).parents[1] / "examples" / "train_tiny_lm.py")
    logprob = script(Path(__file__).with_name("lm_facts.py")).completion_logprob
    rows, test = ex.corpus(a.sentences, a.people, a.poison, 0)
    texts = [r["text"] for r in rows]
    facts = [q for q in test if "source" in q]
    tok = ex.tokenizer_for(texts, a.vocab)
    t = time.perf_counter()
    model = ex.new_model(tok, a.width, a.layers, 0)
    opt = ex.train(model, tok, texts, a.epochs, a.lr, 16, 0, quiet=True)
    train_s = time.perf_counter() - t
    t = time.perf_counter()
    explainer = LMExplainer(model, tok, rows, methods=a.methods.split(","), layers=a.layers, proj_dim=a.proj_dim,
                            optimizer=opt.state_dict())
    scores = explainer.scores(facts)
    attribute_s = time.perf_counter() - t
    rng = np.random.default_rng(0)
    scores["random"] = rng.standard_normal((len(facts), len(rows)))
    masks = np.zeros((a.subsets, len(rows)), dtype=bool)
    for s in range(a.subsets):
        masks[s, rng.permutation(len(rows))[: len(rows) // 2]] = True

    def measured(mask, seed: int) -> np.ndarray:
        m = ex.new_model(tok, a.width, a.layers, 0)              # the same initialisation every time
        ex.train(m, tok, [x for x, keep in zip(texts, mask) if keep], a.epochs, a.lr, 16, seed, quiet=True)
        return np.array([logprob(m, tok, q) for q in facts])
    t = time.perf_counter()
    actual = np.stack([measured(mk, 0) for mk in masks])              # (subsets, queries)
    again = np.stack([measured(mk, 1) for mk in masks[: max(4, a.subsets // 3)]])
    retrain_s = time.perf_counter() - t
    print(f"{len(rows)} documents, {len(facts)} fact queries; GPT-2 {a.layers} x {a.width}, {a.epochs} epochs: "
          f"trained in {train_s:.1f} s; attribution {attribute_s:.1f} s; {a.subsets} + {len(again)} retrainings "
          f"{retrain_s:.0f} s (2-core CPU)\n")
    print(f"| method | LDS (mean over {len(facts)} queries) | standard error |")
    print("| --- | --- | --- |")
    for m, s in scores.items():
        predicted = masks.astype(np.float64) @ s.T                     # (subsets, queries)
        lds = np.array([spearman(predicted[:, q], actual[:, q]) for q in range(len(facts))])
        print(f"| {m} | {lds.mean():.3f} | {lds.std(ddof=1) / np.sqrt(len(lds)):.3f} |")
    ceiling = np.array([spearman(actual[: len(again), q], again[:, q]) for q in range(len(facts))])
    print(f"| ceiling (retrain vs retrain, {len(again)} subsets) | {ceiling.mean():.3f} | "
          f"{ceiling.std(ddof=1) / np.sqrt(len(ceiling)):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

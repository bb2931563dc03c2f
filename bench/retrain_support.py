"""Removed support of a finished remove-and-retrain, without retraining.

    python bench/retrain_support.py runs/sst2 [--k 500]

For the test examples of RUN/results/retrain.json and each method, prints the mean change it
recorded beside the removed set's net loss-gradient weight (``evaluate.retrain.removed_support``,
the column newer retrain results carry themselves): a value near the random row's means the
removed examples' pulls on the head cancel. Reads stored scores and probabilities only.
"""
import argparse
import sys

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--k", default="500")
    a = ap.parse_args()
    from instattr.evaluate.retrain import removed_support
    from instattr.ranking import Ranker
    from instattr.store import Run
    run = Run.load(a.run)
    res = run.result("retrain")
    scorer = Ranker(run, res["split"])
    test = run.features(scorer.split)
    pos = {str(s): i for i, s in enumerate(test.idx)}
    rows = np.array([pos[s] for s in res["test_idx"]])
    train = scorer.train
    k = int(a.k)
    every = removed_support(np.zeros((len(rows), len(train))), len(train), test.pred[rows], train.label, train.probs)
    print(f"{a.run}: {len(rows)} test examples, top-{k} removed")
    print(f"{'method':<10} {'delta':>7} {'removed support':>16}")
    print(f"{'random':<10} {res['random'][a.k]['mean']:>+7.3f} {every:>+16.3f}")
    for m, deltas in res["methods"].items():
        s = removed_support(scorer.rows(m, rows), k, test.pred[rows], train.label, train.probs)
        print(f"{m:<10} {deltas[a.k]:>+7.3f} {s:>+16.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

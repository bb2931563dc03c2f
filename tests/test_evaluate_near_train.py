"""Near-train targets: perturbations, HIT@k, and a planted near-duplicate found by nn-euc."""
import json

import numpy as np
import pytest

from instattr.evaluate.near_train import (
    hit_rates,
    original_ranks,
    perturb,
    perturb_examples,
    run_near_train,
    vocabulary,
)

from _synthetic import featurize, make_run

VOCAB = ["zz1", "zz2", "zz3"]


def test_perturbations():
    rng = np.random.default_rng(0)
    text = "a b c d e"
    for _ in range(20):
        added = perturb(text, "add", VOCAB, rng).split()
        assert len(added) == 6 and sum(t in VOCAB for t in added) == 1
        assert [t for t in added if t not in VOCAB] == text.split()
        removed = perturb(text, "remove", VOCAB, rng).split()
        assert len(removed) == 4 and all(t in text.split() for t in removed)
        replaced = perturb(text, "replace", VOCAB, rng).split()
        assert len(replaced) == 5 and sum(a != b for a, b in zip(replaced, text.split())) == 1
    assert perturb(text, "train", VOCAB, rng) == text
    assert perturb("", "remove", VOCAB, rng) == "" and perturb("", "add", VOCAB, rng) in VOCAB
    assert perturb("alone", "remove", VOCAB, rng) == "alone"     # never an empty text to classify
    with pytest.raises(ValueError, match="unknown perturbation"):
        perturb(text, "shuffle", VOCAB, rng)
    assert vocabulary(["b a", "a c"]) == ["a", "b", "c"]


def test_pairs_are_perturbed_on_both_sides_and_seeded():
    docs, qs = ["p1 p2 p3"] * 4, ["h1 h2"] * 4
    d1, q1 = perturb_examples(docs, qs, "add", VOCAB, np.random.default_rng(5))
    d2, q2 = perturb_examples(docs, qs, "add", VOCAB, np.random.default_rng(5))
    assert (d1, q1) == (d2, q2)
    assert all(len(d.split()) == 4 for d in d1) and all(len(q.split()) == 3 for q in q1)
    assert perturb_examples(docs, None, "remove", VOCAB, np.random.default_rng(0))[1] is None


def test_ranks_and_hits_by_hand():
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.2, 0.1], [0.0, 0.3, 0.7]])
    ranks = original_ranks(scores, np.array([0, 1, 0]))
    np.testing.assert_array_equal(ranks, [0, 0, 2])           # a tie does not push the original down
    assert hit_rates(ranks, ks=(1, 2, 3)) == {"hit1": pytest.approx(2 / 3), "hit2": pytest.approx(2 / 3),
                                              "hit3": 1.0}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("near"), n_train=80, n_test=10, length=(30, 40), hidden=16)


def test_planted_near_duplicates_are_hit_at_1_for_nn_euc(run):
    res = run_near_train(run, methods=["nn-euc", "gd"], n=40, featurize=featurize)
    assert res["n_targets"] == 40 and res["kinds"] == ["train", "add", "remove", "replace"]
    euc = res["methods"]["nn-euc"]
    assert euc["train"] == {"hit1": 1.0, "hit10": 1.0}
    for kind in ("add", "remove", "replace"):
        assert euc[kind]["hit1"] >= 0.9 and euc[kind]["hit10"] >= euc[kind]["hit1"]
    assert res["methods"]["gd"]["train"]["hit1"] < 0.5          # unnormalised gradients favour outliers
    assert json.loads((run.path / "results" / "near-train.json").read_text()) == res
    md = (run.path / "results" / "near-train.md").read_text()
    assert "Table 3, SST" in md and "0.999" in md


def test_all_uses_every_training_example(run):
    res = run_near_train(run, methods=["nn-cos"], all=True, kinds=("train",), featurize=featurize)
    assert res["n_targets"] == len(run.features("train"))
    assert res["methods"]["nn-cos"]["train"]["hit1"] == 1.0

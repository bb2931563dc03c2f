"""HANS artifacts: the lexical overlap rate, targets, top-k overlap, and the run-level table."""
import json

import numpy as np
import pytest

from instattr.evaluate.artifacts import (
    applies,
    artifact_targets,
    label_ids,
    overlap_rate,
    random_overlap,
    run_artifacts,
    top_overlap,
)
from instattr.store import RunError

from _synthetic import make_run


@pytest.mark.parametrize("premise, hypothesis, rate", [
    ("The doctor saw the lawyer", "the lawyer saw the doctor", 1.0),
    ("The doctor saw the lawyer", "The judge slept", 1 / 3),
    ("a b c", "a d", 0.5),
    ("x y", "X x z", 0.5),            # lower-cased, hypothesis tokens counted once
    ("cats run", "dogs bark", 0.0),
    ("anything", "", 0.0),
    ("the cat.", "the cat", 0.5),       # whitespace tokens: punctuation stays attached
])
def test_overlap_rate_hand_made_pairs(premise, hypothesis, rate):
    assert overlap_rate(premise, hypothesis) == pytest.approx(rate)


def test_targets_are_gold_non_entailment_predicted_entailment():
    label = np.array([0, 0, 1, 1, 0])
    pred = np.array([1, 0, 1, 0, 1])
    np.testing.assert_array_equal(artifact_targets(label, pred, 0, 1), [0, 4])
    assert label_ids(["entailment", "non-entailment"]) == (1, 0)
    with pytest.raises(RunError):
        label_ids(["negative", "positive"])


def test_top_overlap_and_random_baseline():
    train_overlap = np.array([0.0, 1.0, 0.5, 0.25])
    scores = np.array([[0.1, 0.9, 0.2, 0.0], [0.9, 0.1, 0.5, 0.0]])
    out = top_overlap(scores, train_overlap, ks=(1, 2))
    assert out == {"top1": pytest.approx(0.5), "top2": pytest.approx((1.0 + 0.5 + 0.0 + 0.5) / 4)}
    rnd = random_overlap(np.linspace(0, 1, 101), 400, np.random.default_rng(0))
    assert rnd["top1"] == pytest.approx(0.5, abs=0.05) and rnd["top10"] == pytest.approx(0.5, abs=0.02)


@pytest.fixture(scope="module")
def hans(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("hans"), kind="hans", n_train=80, n_test=40)


def test_run_artifacts(hans):
    test = hans.features("test")
    res = run_artifacts(hans, methods=["nn-euc", "sbert-cos", "gd"])
    assert res["n_targets"] == int(((test.label == 0) & (test.pred == 1)).sum()) > 0
    assert set(res["methods"]) == {"nn-euc", "sbert-cos", "gd"}
    for r in list(res["methods"].values()) + [res["random"]]:
        assert set(r) == {"top1", "top10"} and all(0 <= v <= 1 for v in r.values())
    # the toy head learned "overlap means entailment": its nearest neighbours share the artifact
    assert res["methods"]["nn-euc"]["top1"] > res["random"]["top1"]
    assert json.loads((hans.path / "results" / "artifacts.json").read_text()) == res
    md = (hans.path / "results" / "artifacts.md").read_text()
    assert "| random | " in md and "0.56" in md


def test_artifacts_apply_only_to_hans(hans, tmp_path):
    sst = make_run(tmp_path, n_train=20, n_test=4, epochs=1)
    assert applies(hans) and not applies(sst)
    with pytest.raises(RunError, match="non-entailment"):
        run_artifacts(sst, methods=["gd"])

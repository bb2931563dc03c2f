"""Randomized-model test: a re-initialised head, rescored methods, trained-vs-random Spearman."""
import json

import numpy as np
import pytest

from instattr.evaluate.common import head_input
from instattr.evaluate.randomized import random_model, run_randomized
from instattr.store import RunError

from _synthetic import make_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("rand"))


def test_random_model_recomputes_features_but_keeps_the_rows(run):
    train, test = run.features("train"), run.features("test")
    x_tr, x_te = head_input(run, "train"), head_input(run, "test")
    r_train, r_test, r_head = random_model(x_tr, x_te, train, test, 8, 0.01, seed=123)
    again = random_model(x_tr, x_te, train, test, 8, 0.01, seed=123)[0]
    other = random_model(x_tr, x_te, train, test, 8, 0.01, seed=124)[0]
    assert r_train.features.shape == train.features.shape and r_head.w.shape == run.final_layer().w.shape
    np.testing.assert_array_equal(r_train.idx, train.idx)          # sbert-* look their rows up by idx
    np.testing.assert_array_equal(r_train.features, again.features)
    assert not np.allclose(r_train.features, train.features)
    assert not np.allclose(r_train.features, other.features)
    np.testing.assert_allclose(r_test.probs.sum(1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(r_test.pred, r_test.probs.argmax(1))


def test_run_randomized(run):
    res = run_randomized(run, methods=["sbert-cos", "nn-euc", "gd", "rif"], n_test=10)
    assert list(res["methods"]) == ["sbert-cos", "nn-euc", "gd", "rif"]
    assert res["methods"]["sbert-cos"] == pytest.approx(1.0)       # untouched by the head
    for m in ("nn-euc", "gd", "rif"):
        assert -1.0 <= res["methods"][m] < 0.9
    assert res["random_seed"] != json.loads((run.path / "run.json").read_text())["head"]["seed"]
    assert json.loads((run.path / "results" / "randomized.json").read_text()) == res
    md = (run.path / "results" / "randomized.md").read_text()
    assert "Spearman 1.0" in md and "paper SST" in md and "-0.29" in md


def test_non_head_runs_reinitialise_the_final_layer(tmp_path):
    ft = make_run(tmp_path, n_train=20, n_test=4, epochs=1, mode="finetune")
    with pytest.raises(RunError, match="head-mode"):
        run_randomized(ft, methods=["gd"], n_test=2, scope="head")
    res = run_randomized(ft, methods=["nn-cos", "gd"], n_test=4)
    assert res["scope"] == "final"
    assert res["methods"]["nn-cos"] == pytest.approx(1.0)       # features are untouched by construction
    assert res["methods"]["gd"] < 1.0 - 1e-6                    # probabilities changed
    assert "final linear layer" in (ft.path / "results" / "randomized.md").read_text()


def test_randomized_refuses_methods_that_need_the_whole_classifier(run):
    with pytest.raises(RunError, match="if-top"):
        run_randomized(run, methods=["gd", "if-top"], n_test=2)

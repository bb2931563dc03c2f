"""Mislabel detection and the linear datamodeling score, on problems whose answers are known."""
import json

import numpy as np
import pytest

from instattr.cli import main
from instattr.evaluate.lds import bootstrap_mean, lds_per_example, log_odds, run_lds, subset_masks
from instattr.evaluate.mislabel import (
    curve_area,
    flip_labels,
    found_curve,
    ranking_names,
    relabelled,
    run_mislabel,
)
from instattr.evaluate.retrain import refit_probs, retrain_probs
from instattr.methods import get_method
from instattr.models.head import HeadConfig

from _synthetic import logistic_problem, make_run


def test_lds_of_exact_influence_on_a_convex_problem_is_high_and_of_random_scores_near_zero():
    """Final layer refit exactly on 30 random halves: influence's summed scores rank the subsets'
    test margins almost perfectly; random scores do not."""
    train, layer, _, test = logistic_problem(n=120, d=4, c=2, seed=1, l2=0.01, n_test=40)
    rng = np.random.default_rng(0)
    masks = subset_masks(len(train), 30, 0.5, rng)
    x = layer.augment(train.features)
    after, before = refit_probs(x, train.label, layer.augment(test.features), layer.weight(), layer.l2, masks)
    margins = log_odds(after, test.pred)
    lds = {m: np.nanmean(lds_per_example(margins, get_method(m).fit(train, layer).score(test), masks))
           for m in ("if", "gd")}
    rand = np.nanmean(lds_per_example(margins, rng.normal(size=(len(test), len(train))), masks))
    assert lds["if"] > 0.9 and lds["if"] > lds["gd"], lds
    assert abs(rand) < 0.1


def test_lds_helpers():
    masks = subset_masks(10, 4, 0.3, np.random.default_rng(0))
    assert masks.shape == (4, 10) and (masks.sum(1) == 3).all()
    probs = np.array([[[0.9, 0.1], [0.2, 0.8]], [[0.5, 0.5], [1.0, 0.0]]])          # (m=2, n_test=2, C=2)
    got = log_odds(probs, np.array([0, 1]))
    assert got.shape == (2, 2)
    np.testing.assert_allclose(got[:, 0], [np.log(9), np.log(4)])
    np.testing.assert_allclose(got[0, :], [np.log(9), 0.0])
    assert got[1, 1] < -700                                                           # p = 0: finite, tiny
    # a confident float32 softmax: 1 - p rounds to 0 in float32, the other class does not
    logits = np.array([[[12.0, -12.0], [20.0, -20.0]]])
    confident = (np.exp(logits) / np.exp(logits).sum(2, keepdims=True)).astype(np.float32)
    assert confident[0, 1, 0] == 1.0
    np.testing.assert_allclose(log_odds(confident, np.array([0, 0]))[:, 0], [24.0, 40.0], rtol=1e-5)
    # margins that are exactly the summed scores: Spearman 1 on every row
    scores = np.random.default_rng(1).normal(size=(3, 10))
    np.testing.assert_allclose(lds_per_example(scores @ masks.T, scores, masks), 1.0)
    mean, lo, hi = bootstrap_mean(np.array([0.1, 0.2, 0.3, np.nan, 0.4]), np.random.default_rng(0))
    assert mean == pytest.approx(0.25) and lo < mean < hi


def test_flip_relabel_and_curves():
    y = np.arange(30) % 3
    noisy, flipped = flip_labels(y, 3, 0.2, np.random.default_rng(0))
    assert flipped.sum() == 6 and (noisy[flipped] != y[flipped]).all() and (noisy[~flipped] == y[~flipped]).all()
    order = np.argsort(~flipped, kind="stable")                       # the flipped rows first
    np.testing.assert_allclose(found_curve(order, flipped, [0.1, 0.2, 0.3]), [0.5, 1.0, 1.0])
    np.testing.assert_array_equal(relabelled(noisy, y, order, 0.2), y)
    assert curve_area([0.1, 0.2], [0.1, 0.2]) == pytest.approx(0.1)   # random: half the last share
    assert curve_area([0.5, 1.0], [1.0, 1.0]) == pytest.approx(0.75)


def test_retrain_without_before_heads_trains_the_same_heads():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 5)), rng.integers(0, 2, 20)
    masks = rng.random((5, 20)) > 0.4
    cfg = HeadConfig(l2=0.05, lr=0.05, epochs=2, batch_size=4, hidden=3)
    a1, b1 = retrain_probs(x, y, x[:4], 2, cfg, masks, chunk_size=3)
    a2, b2 = retrain_probs(x, y, x[:4], 2, cfg, masks, chunk_size=3, before=False)
    np.testing.assert_allclose(a1, a2, atol=1e-6)
    assert b2 is None


@pytest.fixture(scope="module")
def head_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("mislabel"), n_train=80, n_test=20, epochs=4)


def test_mislabel_head_mode(head_run):
    res = run_mislabel(head_run, flip=0.1, k=5, relabel=(0.05, 0.1), progress=False)
    assert res["n_flipped"] == 8 and len(res["flipped_idx"]) == 8
    # tracin too: the noisy head is retrained here, with its per-epoch checkpoints
    assert set(res["methods"]) == {"if", "gd", "rif", "tracin", "knn-nn", "knn-sbert", "loss", "margin"}
    for r in list(res["methods"].values()) + [res["random"], res["oracle"]]:
        assert np.all(np.diff(r["found"]) >= 0) and 0 <= r["area"] <= 1
    assert res["oracle"]["found"][res["checked"].index(0.1)] == 1.0
    # the oracle relabels every flipped example at 10%: the very head trained on the true labels
    assert res["oracle"]["accuracy"]["0.1"] == res["accuracy"]["clean"]
    assert res["accuracy"]["noisy"] == pytest.approx(res["accuracy"]["noisy_model"], abs=0.051)
    assert res["seconds"]["total"] >= res["seconds"]["retrain_relabelled"] > 0
    assert json.loads((head_run.path / "results" / "mislabel.json").read_text()) == res
    assert "found @10%" in (head_run.path / "results" / "mislabel.md").read_text()
    assert (head_run.path / "figures" / "mislabel.png").exists()


def test_mislabel_and_lds_on_a_final_layer(tmp_path):
    """Runs other than head mode refit the final layer exactly: tracin has no history there."""
    ft = make_run(tmp_path, n_train=40, n_test=8, epochs=2, mode="finetune")
    assert "tracin" not in ranking_names(None, "final")
    with pytest.raises(ValueError, match="training history"):
        run_mislabel(ft, methods="if,tracin", progress=False)
    res = run_mislabel(ft, methods="if,loss", flip=0.2, k=3, relabel=(0.2,), progress=False)
    assert res["scope"] == "final" and set(res["methods"]) == {"if", "loss"}
    assert res["oracle"]["accuracy"]["0.2"] == res["accuracy"]["clean"]
    lds = run_lds(ft, methods="if,gd", subsets=8, fraction=0.5, progress=False)
    # the same numbers from the exact refit directly
    train, test, layer = ft.features("train"), ft.features("test"), ft.final_layer()
    masks = subset_masks(len(train), 8, 0.5, np.random.default_rng(0))   # seed 0; all test rows: no draw
    after, _ = refit_probs(layer.augment(train.features), train.label, layer.augment(test.features),
                           layer.weight(), layer.l2, masks)
    rho = lds_per_example(log_odds(after, test.pred), get_method("if").fit(train, layer).score(test), masks)
    assert lds["methods"]["if"]["lds"] == pytest.approx(float(np.nanmean(rho)))
    assert lds["scope"] == "final" and lds["subsets"] == 8


def test_lds_head_mode_and_cli(head_run, capsys):
    path = str(head_run.path)
    assert main(["--quiet", "evaluate", "lds", "--run", path, "--methods", "if,nn-cos", "--subsets", "6",
                 "--fraction", "0.4", "--n-test", "5"]) == 0
    res = head_run.result("lds")
    assert res["subsets"] == 6 and res["n_test"] == 5 and set(res["methods"]) == {"if", "nn-cos"}
    assert res["random"]["lds"] is not None and res["scope"] == "head"
    assert "Linear datamodeling score" in capsys.readouterr().out
    assert not (head_run.path / "cache" / "lds-partial.npz").exists()
    assert (head_run.path / "figures" / "lds.png").exists()
    for args, msg in ((["lds", "--subsets", "1"], "at least 2"), (["lds", "--fraction", "1.5"], "between 0 and 1"),
                      (["retrain", "--flip", "0.2"], "--flip applies to mislabel only"),
                      (["correlation", "--subsets", "5"], "--subsets applies to lds only"),
                      (["mislabel", "--flip", "0"], "between 0 and 1")):
        assert main(["--quiet", "evaluate", *args, "--run", path]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and msg in err, (args, err)
    assert main(["--quiet", "evaluate", "mislabel", "--run", path, "--flip", "0.25", "--methods", "loss,knn-nn"]) == 0
    res = head_run.result("mislabel")
    assert res["n_flipped"] == 20 and set(res["methods"]) == {"loss", "knn-nn"}

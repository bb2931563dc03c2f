"""Correlation evaluation: per-row Spearman, top-k overlap, and the run-level result files."""
import json

import numpy as np
import pytest
from scipy.stats import spearmanr

from instattr.evaluate.correlation import (
    correlation_tables,
    mean_spearman,
    run_correlation,
    spearman_rows,
    top_k_curve,
    top_k_overlap,
)

from _synthetic import make_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("corr"))


def test_spearman_rows_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, size=(6, 15)).astype(float)   # many ties
    b = a + rng.normal(0, 2, size=a.shape)
    expected = [spearmanr(a[i], b[i]).statistic for i in range(len(a))]
    np.testing.assert_allclose(spearman_rows(a, b), expected, atol=1e-12)
    assert mean_spearman(a, b) == pytest.approx(np.mean(expected))


def test_constant_row_is_left_out_of_the_mean():
    a = np.array([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]])
    b = np.array([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    rho = spearman_rows(a, b)
    assert rho[0] == pytest.approx(-1.0) and np.isnan(rho[1])
    assert mean_spearman(a, b) == pytest.approx(-1.0)


def test_top_k_overlap_by_hand():
    a = np.array([[5.0, 4, 3, 2, 1]])
    b = np.array([[5.0, 4, 1, 2, 3]])
    assert top_k_overlap(a, b, 2) == pytest.approx(1.0)
    assert top_k_overlap(a, b, 3) == pytest.approx(2 / 3)
    assert top_k_overlap(a, -a, 2) == pytest.approx(0.0)


def test_identical_methods_correlate_one_and_share_all_top_k():
    s = np.random.default_rng(1).normal(size=(8, 40))
    t = correlation_tables({"a": s, "b": s.copy(), "neg": -s, "other": np.random.default_rng(2).normal(size=s.shape)},
                           ks=(3, 10))
    sp = np.array(t["spearman"])
    assert t["methods"] == ["a", "b", "neg", "other"]
    assert sp[0, 1] == pytest.approx(1.0) and sp[0, 2] == pytest.approx(-1.0)
    assert abs(sp[0, 3]) < 0.5
    np.testing.assert_allclose(sp, sp.T)
    for k in ("3", "10"):
        ov = np.array(t["top_k_overlap"][k])
        assert ov[0, 1] == 1.0 and ov[0, 2] == 0.0
        np.testing.assert_allclose(np.diag(ov), 1.0)


def test_top_k_curve_skips_trivial_k():
    s = np.random.default_rng(3).normal(size=(4, 20))
    curve = top_k_curve({"if": s, "gd": s}, [("if", "gd"), ("rif", "gc")], ks=(1, 5, 20, 50))
    assert curve["ks"] == [1, 5] and list(curve["pairs"]) == ["if vs gd"]
    assert curve["pairs"]["if vs gd"] == [1.0, 1.0]


def test_run_correlation_files_and_shape(run):
    methods = ["nn-euc", "nn-cos", "gd", "if"]
    res = run_correlation(run, methods=methods, n_test=10, n_train=40, ks=(5, 10))
    assert res["methods"] == methods and res["n_test"] == 10 and res["n_train"] == 40
    sp = np.array(res["spearman"])
    assert sp.shape == (4, 4) and np.allclose(np.diag(sp), 1.0) and np.all(np.abs(sp) <= 1 + 1e-9)
    assert set(res["top_k_overlap"]) == {"5", "10"}
    assert all(0.0 <= v <= 1.0 for row in res["top_k_overlap"]["10"] for v in row)
    assert json.loads((run.path / "results" / "correlation.json").read_text()) == res
    md = (run.path / "results" / "correlation.md").read_text()
    assert "Spearman" in md and "| nn-euc |" in md
    for f in ("correlation_spearman", "correlation_top5", "correlation_top10", "correlation_topk_curve"):
        assert (run.path / "figures" / f"{f}.png").read_bytes()[:4] == b"\x89PNG"
    again = run_correlation(run, methods=methods, n_test=10, n_train=40, ks=(5, 10))
    assert again["spearman"] == res["spearman"]


def test_stored_scores_are_used(run):
    """A stored matrix for one method (here gd's scores saved under nn-dot) replaces computing it."""
    from instattr.methods import get_method
    train, test = run.features("train"), run.features("test")
    gd = get_method("gd").fit(train, run.final_layer()).score(test)
    run.save_scores("nn-dot", "test", gd, test.idx, train.idx, {}, 0.0)
    try:
        res = run_correlation(run, methods=["nn-dot", "gd"], n_test=10, n_train=40, ks=(5,))
        assert res["spearman"][0][1] == pytest.approx(1.0)
    finally:
        run.score_path("nn-dot", "test").with_suffix(".json").unlink()


def test_stored_layered_scores_join_by_default(run):
    """Scores of a method beyond the paper's (here gd's saved as gd-top) that cover the whole test
    split join the default method list, the Figure-4 curve and its markdown section; scores of a
    part of the split do not (they would be recomputed, minutes for a real if-top)."""
    from instattr.evaluate.common import stored_extras
    from instattr.methods import METHOD_NAMES, get_method
    train, test = run.features("train"), run.features("test")
    gd = get_method("gd").fit(train, run.final_layer()).score(test)
    run.save_scores("gd-top", "test", gd, test.idx, train.idx, {}, 2.0)
    run.save_scores("if-top", "test", gd[:3], test.idx[:3], train.idx, {}, 1.0)
    run.save_scores("rif-top", "test", gd[:, 1:], test.idx, train.idx[1:], {}, 1.0)   # a --limit-train run
    try:
        assert stored_extras(run) == ["gd-top"]
        res = run_correlation(run, n_test=10, n_train=40, ks=(5,))
        assert res["methods"] == list(METHOD_NAMES) + ["gd-top"]
        names = res["methods"]
        assert res["spearman"][names.index("gd-top")][names.index("gd")] == pytest.approx(1.0)
        assert res["top_k_curve"]["pairs"]["gd-top vs gd"] == [1.0] * len(res["top_k_curve"]["ks"])
        assert "if-top vs if" not in res["top_k_curve"]["pairs"]
        assert "Figure 4" in (run.path / "results" / "correlation.md").read_text()
        assert (run.path / "figures" / "correlation_topk_curve_layers.png").exists()
    finally:
        for m in ("gd-top", "if-top", "rif-top"):
            for suffix in (".json", ".npy"):
                run.score_path(m, "test").with_suffix(suffix).unlink()

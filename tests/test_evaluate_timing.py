"""Timing, the evaluation registry, and the shared helpers."""
import json

import numpy as np
import pytest

from instattr.evaluate import EVALUATIONS, evaluations_for, run_evaluation
from instattr.evaluate.common import clean, method_list, sample_rows
from instattr.evaluate.paper import TABLE1_RETRAIN, TABLE3_4_NEAR_TRAIN, paper_columns, timing_bound
from instattr.evaluate.timing import run_timing
from instattr.ranking import Ranker

from _synthetic import make_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("timing"), n_train=40, n_test=12, epochs=2)


def test_run_timing(run):
    res = run_timing(run, methods=["nn-euc", "if"], n_test=5, min_seconds=0.0)
    assert set(res["methods"]) == {"nn-euc", "if"} and all(v > 0 for v in res["methods"].values())
    assert all(v >= 0 for v in res["fit_seconds"].values()) and res["n_test"] == 5
    assert json.loads((run.path / "results" / "timing.json").read_text()) == res
    md = (run.path / "results" / "timing.md").read_text()
    assert "< 0.01" in md and "< 0.0001" in md and "~300" in md
    assert (run.path / "figures" / "timing.png").exists()


def test_stored_layered_methods_report_their_attribute_time(run):
    """if-top is not refitted by timing (minutes on real data): its stored attribute time is read."""
    train, test = run.features("train"), run.features("test")
    run.save_scores("if-top", "test", np.zeros((len(test), len(train))), test.idx, train.idx, {}, 24.0)
    try:
        res = run_timing(run, n_test=3, min_seconds=0.0)
        assert "if-top" not in res["methods"] and res["stored_only"] == ["if-top"]
        assert res["stored_seconds_per_example"]["if-top"] == pytest.approx(24.0 / len(test))
        assert "| if-top | — | — | 2.00e+00 |" in (run.path / "results" / "timing.md").read_text()
    finally:
        for suffix in (".json", ".npy"):
            run.score_path("if-top", "test").with_suffix(suffix).unlink()


def test_registry_and_applicability(run, tmp_path):
    assert list(EVALUATIONS) == ["correlation", "retrain", "randomized", "artifacts", "near-train", "mislabel", "lds",
                                 "timing", "fact-tracing", "tail-patch", "poison"]
    assert evaluations_for(run) == ["correlation", "retrain", "randomized", "near-train", "mislabel", "lds", "timing"]
    hans = make_run(tmp_path / "h", kind="hans", n_train=20, n_test=4, epochs=1)
    assert "artifacts" in evaluations_for(hans)
    ft = make_run(tmp_path / "f", n_train=20, n_test=4, epochs=1, mode="finetune")
    assert evaluations_for(ft) == ["correlation", "retrain", "randomized", "near-train", "mislabel", "lds", "timing"]
    with pytest.raises(ValueError, match="unknown evaluation"):
        run_evaluation("nope", run)


def test_a_new_evaluation_is_one_registration(run, capsys):
    """Registering a function is all it takes: the CLI runs it with its own flag, reproduce lists
    it, the report shows its section, the timing table its recorded seconds."""
    from instattr.cli import main
    from instattr.evaluate import registry
    from instattr.evaluate.registry import Flag, evaluation
    from instattr.evaluate.timing import evaluation_seconds
    from instattr.report import build_report
    calls = []

    @evaluation("toy-eval", 65, "A toy evaluation", "What the toy measures.", quick={"size": 2},
                flags=(Flag("--size", "size", "how many", metavar="N"), "--n-test"))
    def run_toy(run, methods=None, seed=0, size=3, n_test=None):
        calls.append((size, n_test))
        run.save_result("toy-eval", {"seconds": {"total": 1.5}}, "# Toy\n\n| a | b |\n| --- | --- |\n| 1 | 2 |\n")
        return {}
    try:
        assert evaluations_for(run).index("toy-eval") == evaluations_for(run).index("mislabel") + 1
        assert registry.get_evaluation("toy-eval").quick == {"size": 2}
        assert main(["--quiet", "evaluate", "toy-eval", "--run", str(run.path), "--size", "4", "--n-test", "2"]) == 0
        assert calls == [(4, 2)] and "| a | b |" in capsys.readouterr().out
        assert main(["--quiet", "evaluate", "retrain", "--run", str(run.path), "--size", "4"]) == 2
        assert "--size applies to toy-eval only" in capsys.readouterr().err
        assert evaluation_seconds(run)["toy-eval"] == {"total": 1.5, "retrain": None}
        page = build_report(run).read_text()
        assert "A toy evaluation" in page and "What the toy measures." in page and "<td>2</td>" in page
    finally:
        registry._REGISTRY.pop("toy-eval", None)
        for suffix in (".json", ".md"):
            (run.path / "results" / f"toy-eval{suffix}").unlink(missing_ok=True)


def test_scorer_reads_stored_rows_and_falls_back(run):
    train, test = run.features("train"), run.features("test")
    marker = np.arange(len(test) * len(train), dtype=np.float32).reshape(len(test), len(train))
    run.save_scores("gc", "test", marker, test.idx, train.idx, {}, 0.0)
    rows = np.array([3, 7])
    np.testing.assert_array_equal(Ranker(run).rows("gc", rows), marker[rows])
    computed = Ranker(run, use_stored=False).rows("gc", rows)
    assert computed.shape == (2, len(train)) and not np.array_equal(computed, marker[rows])
    run.save_scores("gc", "test", marker[:2], test.idx[:2], train.idx, {}, 0.0)   # rows 3, 7 not stored
    np.testing.assert_allclose(Ranker(run).rows("gc", rows), computed, rtol=1e-6)


def test_helpers():
    assert method_list(None)[:3] == ["nn-euc", "nn-cos", "nn-dot"] and method_list("gd,if") == ["gd", "if"]
    rng = np.random.default_rng(0)
    s = sample_rows(100, 10, rng)
    assert len(set(s)) == 10 and list(s) == sorted(s) and len(sample_rows(5, 10, rng)) == 5
    assert clean({"a": np.float32(0.5), "b": [float("nan"), np.int64(3)]}) == {"a": 0.5, "b": [None, 3]}


def test_paper_numbers():
    assert TABLE1_RETRAIN["SST"]["nn-euc"]["500"] == -0.540 and TABLE1_RETRAIN["MNLI"]["gd"]["500"] == -0.446
    assert TABLE3_4_NEAR_TRAIN["SST"]["nn-dot"]["remove"]["hit10"] == pytest.approx(0.0219)
    assert TABLE3_4_NEAR_TRAIN["MNLI"]["rif"]["train"]["hit1"] == pytest.approx(0.925)
    assert paper_columns("sst2") == ["SST"] and paper_columns("hans") == ["MNLI"]
    assert timing_bound("sbert-dot") == 0.0001 and timing_bound("gc") is None

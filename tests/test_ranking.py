"""The one ranking path (instattr.ranking.Ranker): a row's rankings from dense scores, from top-k
files and live, against brute force (float64 sorts); stored files only after their commit check."""
import shutil

import numpy as np
import pytest

from instattr.methods import get_method
from instattr.ranking import Ranker
from instattr.store import Run, RunError

from _synthetic import make_run


def tied_scores(n_test, n_train, seed=0):
    """Scores with many exact ties (a handful of distinct values), float32."""
    rng = np.random.default_rng(seed)
    return rng.integers(-3, 4, size=(n_test, n_train)).astype(np.float32) / 4


def order(values, largest):
    """Brute force: positions sorted by value (descending if largest), ties to the lower position."""
    v = np.asarray(values, dtype=np.float64)
    return sorted(range(len(v)), key=lambda j: (-v[j] if largest else v[j], j))


def write_topk(run, method, split, scores, depth):
    """The top-k and bottom-k files of ``scores`` as ``attribute --top-k`` writes them (with sidecars)."""
    test_idx = [str(i) for i in run.features(split).idx]
    train_idx = [str(i) for i in run.features("train").idx]
    for bottom in (False, True):
        pos = np.array([order(row, not bottom)[:depth] for row in scores], dtype=np.int64)
        run.save_top_k(method, split, test_idx, train_idx, pos, np.take_along_axis(scores, pos, axis=1), {}, 0.0,
                       bottom=bottom)


@pytest.fixture
def dense_run(tmp_path):
    run = make_run(tmp_path / "dense", n_train=30, n_test=12)
    fs, train = run.features("test"), run.features("train")
    run.save_scores("tied", "test", tied_scores(len(fs), len(train)), fs.idx, train.idx, {}, 0.0)
    return run


def test_dense_rows_and_columns_equal_brute_force(dense_run):
    run = dense_run
    scores = run.scores("tied", "test")
    test_idx, train_idx = list(run.features("test").idx), list(run.features("train").idx)
    r = Ranker(run)
    assert r.stored("test") == {"tied": "dense"}
    for i, t in enumerate(test_idx):
        got = r.test_row("tied", t, 7)
        assert got.source == "dense" and not got.partial
        assert got.supporting == [(train_idx[j], float(scores[i, j])) for j in order(scores[i], True)[:7]]
        assert got.opposing == [(train_idx[j], float(scores[i, j])) for j in order(scores[i], False)[:7]]
    for j, s in enumerate(train_idx):
        got = r.train_column("tied", s, 5)
        assert got.supporting == [(test_idx[i], float(scores[i, j])) for i in order(scores[:, j], True)[:5]]
        assert got.opposing == [(test_idx[i], float(scores[i, j])) for i in order(scores[:, j], False)[:5]]


def test_topk_files_give_the_same_rows_and_partial_columns(dense_run, tmp_path):
    scores = np.asarray(dense_run.scores("tied", "test"))
    shutil.copytree(dense_run.path, tmp_path / "topk")   # same run, top-k files instead of the dense matrix
    run = Run.load(tmp_path / "topk")
    (run.path / "scores" / "tied-test.npy").unlink()
    (run.path / "scores" / "tied-test.json").unlink()
    depth = 4
    write_topk(run, "tied", "test", scores, depth)
    test_idx, train_idx = list(run.features("test").idx), list(run.features("train").idx)
    r = Ranker(run)
    assert r.stored("test") == {"tied": "topk"}
    for i, t in enumerate(test_idx):
        got = r.test_row("tied", t, 3)
        assert got.source == "topk" and got.depth == depth
        assert got.supporting == [(train_idx[j], float(scores[i, j])) for j in order(scores[i], True)[:3]]
        assert got.opposing == [(train_idx[j], float(scores[i, j])) for j in order(scores[i], False)[:3]]
        assert len(r.test_row("tied", t, 50, live=False).supporting) == depth      # no more than is stored
    tops = [set(order(row, True)[:depth]) for row in scores]
    bottoms = [set(order(row, False)[:depth]) for row in scores]
    for j, s in enumerate(train_idx):
        got = r.train_column("tied", s, 6)
        assert got.partial
        sup = sorted((i for i in range(len(scores)) if j in tops[i]), key=lambda i: (-float(scores[i, j]), i))
        opp = sorted((i for i in range(len(scores)) if j in bottoms[i]), key=lambda i: (float(scores[i, j]), i))
        assert got.supporting == [(test_idx[i], float(scores[i, j])) for i in sup[:6]]
        assert got.opposing == [(test_idx[i], float(scores[i, j])) for i in opp[:6]]
    # dense scores win where both are stored; without bottom-k files, opponents are unknown (None)
    (run.path / "scores" / "tied-test.bottomk.npz").unlink()
    r = Ranker(run)
    assert r.test_row("tied", test_idx[0], 3).opposing is None
    assert r.train_column("tied", train_idx[0], 3).opposing is None
    assert Ranker(dense_run).stored("test") == {"tied": "dense"}
    write_topk(dense_run, "tied", "test", scores, depth)
    assert Ranker(dense_run).stored("test") == {"tied": "dense"}


def test_rows_without_stored_scores_are_ranked_live_and_torn_files_are_never_read(dense_run):
    """A stored matrix that does not cover a row, a top-k file torn by a kill (its sidecar records
    other bytes) and a method with nothing stored: the row is scored now, by the fitted method,
    never from the torn file."""
    run = dense_run
    fs, train = run.features("test"), run.features("train")
    gd = get_method("gd").fit(train, run.final_layer()).score(fs)
    run.save_scores("gd", "test", gd[:3], fs.idx[:3], train.idx, {}, 0.0)        # three rows only
    r = Ranker(run)
    assert r.test_row("gd", fs.idx[0], 4).source == "dense"
    live = r.test_row("gd", fs.idx[5], 4)
    assert live.source == "live"
    assert live.supporting == [(str(train.idx[j]), float(gd[5, j])) for j in order(gd[5], True)[:4]]
    write_topk(run, "if", "test", np.zeros((len(fs), len(train)), dtype=np.float32), 4)   # all ties: rows 0..3
    torn = run.top_k_path("if", "test")
    data = torn.read_bytes()
    torn.write_bytes(data[: len(data) // 2])                                              # a kill mid-write
    fresh = Ranker(Run.load(run.path))
    assert "if" not in fresh.stored("test") and "truncated" in fresh.run.top_k_problem("if", "test")
    got = fresh.test_row("if", fs.idx[1], 3)
    want = get_method("if").fit(train, run.final_layer()).score(fs.subset([1]))[0]
    assert got.source == "live" and got.supporting == [(str(train.idx[j]), float(want[j])) for j in order(want, True)[:3]]
    with pytest.raises(RunError, match="no row 'nope' in split 'test'"):
        fresh.test_row("gd", "nope", 3)
    with pytest.raises(RunError, match="no stored scores or top-k results for rep on test"):
        fresh.train_column("rep", train.idx[0], 3)
    with pytest.raises(RunError, match="do not cover training row 'nope'"):
        fresh.train_column("tied", "nope", 3)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        fresh.test_row("nope", fs.idx[0], 3)


def test_an_explanation_is_a_dict_and_a_data_frame(dense_run):
    from instattr.ranking import Explanation, Ranking
    rows = {e.idx: {"text": e.document, "label": dense_run.label_names[e.label]} for e in dense_run.examples("train")}
    ids = list(rows)
    ex = Explanation("a text", None, "positive", {"negative": 0.3, "positive": 0.7},
                     {"gd": Ranking([(ids[0], 2.0), (ids[1], 1.0)], [(ids[2], -3.0)], "live")}, rows)
    d = ex.to_dict()
    assert d["methods"]["gd"]["supporting"][0] == {"idx": ids[0], **rows[ids[0]], "score": 2.0}
    frame = ex.to_frame()
    assert list(frame.columns) == ["method", "kind", "rank", "idx", "text", "label", "score"]
    assert frame.values.tolist() == [["gd", "supporting", 0, ids[0], rows[ids[0]]["text"], rows[ids[0]]["label"], 2.0],
                                     ["gd", "supporting", 1, ids[1], rows[ids[1]]["text"], rows[ids[1]]["label"], 1.0],
                                     ["gd", "opposing", 0, ids[2], rows[ids[2]]["text"], rows[ids[2]]["label"], -3.0]]

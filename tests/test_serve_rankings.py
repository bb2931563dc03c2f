"""Rankings of one row from dense scores and from top-k files, against brute force (float64 sorts)."""
import shutil

import numpy as np
import pytest

from instattr.serve.errors import NotFound
from instattr.serve.rankings import Rankings
from instattr.store import Run, RunError, write_npz

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
    """The top-k and bottom-k files of ``scores`` in the documented format."""
    test_idx = np.array([str(i) for i in run.features(split).idx])
    train_idx = np.array([str(i) for i in run.features("train").idx])
    for kind, largest in (("topk", True), ("bottomk", False)):
        pos = np.array([order(row, largest)[:depth] for row in scores], dtype=np.int64)
        write_npz(run.path / "scores" / f"{method}-{split}.{kind}.npz", test_idx=test_idx, train_idx=train_idx[pos],
                  train_pos=pos, score=np.take_along_axis(scores, pos, axis=1).astype(np.float32),
                  rank=np.tile(np.arange(1, depth + 1, dtype=np.int32), (len(scores), 1)))


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
    r = Rankings(run)
    assert r.methods("test") == {"tied": "dense"} and r.splits() == ["test"]
    for i, t in enumerate(test_idx):
        got = r.test_row("tied", "test", t, 7)
        assert got.source == "dense" and not got.partial
        assert got.supporting == [(train_idx[j], float(scores[i, j])) for j in order(scores[i], True)[:7]]
        assert got.opposing == [(train_idx[j], float(scores[i, j])) for j in order(scores[i], False)[:7]]
    for j, s in enumerate(train_idx):
        got = r.train_column("tied", "test", s, 5)
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
    r = Rankings(run)
    assert r.methods("test") == {"tied": "topk"}
    for i, t in enumerate(test_idx):
        got = r.test_row("tied", "test", t, 3)
        assert got.source == "topk" and got.depth == depth
        assert got.supporting == [(train_idx[j], float(scores[i, j])) for j in order(scores[i], True)[:3]]
        assert got.opposing == [(train_idx[j], float(scores[i, j])) for j in order(scores[i], False)[:3]]
        assert len(r.test_row("tied", "test", t, 50).supporting) == depth      # no more than is stored
    tops = [set(order(row, True)[:depth]) for row in scores]
    bottoms = [set(order(row, False)[:depth]) for row in scores]
    for j, s in enumerate(train_idx):
        got = r.train_column("tied", "test", s, 6)
        assert got.partial
        sup = sorted((i for i in range(len(scores)) if j in tops[i]), key=lambda i: (-float(scores[i, j]), i))
        opp = sorted((i for i in range(len(scores)) if j in bottoms[i]), key=lambda i: (float(scores[i, j]), i))
        assert got.supporting == [(test_idx[i], float(scores[i, j])) for i in sup[:6]]
        assert got.opposing == [(test_idx[i], float(scores[i, j])) for i in opp[:6]]
    # dense scores win where both are stored; without bottom-k files, opponents are unknown (None)
    (run.path / "scores" / "tied-test.bottomk.npz").unlink()
    r = Rankings(run)
    assert r.test_row("tied", "test", test_idx[0], 3).opposing is None
    assert r.train_column("tied", "test", train_idx[0], 3).opposing is None
    assert Rankings(dense_run).methods("test") == {"tied": "dense"}
    write_topk(dense_run, "tied", "test", scores, depth)
    assert Rankings(dense_run).methods("test") == {"tied": "dense"}


def test_missing_methods_rows_and_damaged_files(dense_run):
    run = dense_run
    fs, train = run.features("test"), run.features("train")
    run.save_scores("part", "test", tied_scores(3, len(train)), fs.idx[:3], train.idx, {}, 0.0)
    r = Rankings(run)
    with pytest.raises(NotFound, match="no stored scores or top-k results for method 'nope'.*stored for test: part, tied"):
        r.test_row("nope", "test", fs.idx[0], 3)
    with pytest.raises(NotFound, match="do not cover row 'test_5'"):
        r.test_row("part", "test", "test_5", 3)
    with pytest.raises(NotFound, match="do not cover training row 'nope'"):
        r.train_column("tied", "test", "nope", 3)
    with pytest.raises(NotFound, match="method 'tied' on split 'dev'"):
        r.test_row("tied", "dev", fs.idx[0], 3)
    (run.path / "scores" / "bad-test.topk.npz").write_bytes(b"not a zip")
    with pytest.raises(RunError, match="bad-test.topk.npz: unreadable"):
        Rankings(run).test_row("bad", "test", fs.idx[0], 3)

"""Top-k files, the index (build, resume after a failure, verify, query) and their command lines."""
import json

import numpy as np
import pytest

import instattr.index.build as build_mod
from instattr.attribution import attribute_run
from instattr.cli import main
from instattr.index import Index, IndexStoreError, build_run_index, verify
from instattr.methods import bottom_k, get_method, top_k
from instattr.methods.scoring import Grid

from _synthetic import featurize, make_run

GRID = Grid(4, 8)
METHODS = "nn-euc,nn-cos,gd,if,rif,rep"
SMALL = {"train_rows": 8, "shard_rows": 16}      # 80 training rows: 5 shards of 2 blocks


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run with each method's top-6 and bottom-4 stored (the tests below read them, in whichever
    process pytest-xdist runs them)."""
    run = make_run(tmp_path_factory.mktemp("idx"), "sst2", n_train=80, n_test=30)
    attribute_run(run, METHODS, top_k=6, bottom_k=4, progress=False, log=lambda *a: None, grid=GRID)
    return run


@pytest.fixture(scope="module")
def index(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("index") / "idx"
    build_run_index(run, METHODS, out, dtype="float32", progress=False, **SMALL)
    return Index(out)


def test_top_k_files_equal_the_dense_top_k(run):
    attribute_run(run, METHODS, progress=False, log=lambda *a: None, grid=GRID)
    test_idx = [str(i) for i in run.features("test").idx]
    train_idx = run.features("train").idx
    for m in METHODS.split(","):
        dense = np.asarray(run.scores(m, "test"))
        for bottom, (pos, vals) in ((False, top_k(dense, 6)), (True, bottom_k(dense, 4))):
            got = run.top_k(m, "test", bottom=bottom)
            np.testing.assert_array_equal(got["train_pos"], pos)
            np.testing.assert_array_equal(got["score"], vals)
            np.testing.assert_array_equal(got["train_idx"], train_idx[pos])
            assert list(got["test_idx"]) == test_idx and got["rank"][0].tolist() == list(range(pos.shape[1]))
            assert got["info"]["k"] == pos.shape[1] and got["info"]["n_train"] == len(train_idx)


def test_exact_search_of_a_float32_index_is_bit_identical(run, index):
    test = run.features("test")
    got = index.search(METHODS.split(","), test, 6, 4, test_rows=GRID.test_rows)
    for m in METHODS.split(","):
        for which, bottom in (("top", False), ("bottom", True)):
            stored = run.top_k(m, "test", bottom=bottom)
            np.testing.assert_array_equal(got[m][which][0], stored["train_pos"])
            np.testing.assert_array_equal(got[m][which][1], stored["score"])
    assert verify(index.root)["shards"] == 5 * len(METHODS.split(","))


def test_float16_index_is_close(run, index, tmp_path):
    build_run_index(run, "gd,nn-cos", tmp_path / "h", dtype="float16", progress=False, **SMALL)
    half = Index(tmp_path / "h").search(["gd", "nn-cos"], run.features("test"), 3)
    full = index.search(["gd", "nn-cos"], run.features("test"), 3)
    for m in ("gd", "nn-cos"):
        np.testing.assert_allclose(half[m]["top"][1], full[m]["top"][1], rtol=2e-3, atol=2e-3)


def test_a_killed_build_resumes_at_the_next_unfinished_shard(run, index, tmp_path, monkeypatch):
    real, calls, kill = build_mod.write_shard, [], [True]

    def dies_on_the_seventh(root, name, s, side, dtype):
        calls.append((name, s))
        if len(calls) == 7 and kill[0]:
            raise RuntimeError("killed")
        return real(root, name, s, side, dtype)

    monkeypatch.setattr(build_mod, "write_shard", dies_on_the_seventh)
    out = tmp_path / "idx"
    with pytest.raises(RuntimeError, match="killed"):
        build_run_index(run, METHODS, out, dtype="float32", progress=False, **SMALL)
    with pytest.raises(IndexStoreError, match="did not finish"):
        verify(out)
    with pytest.raises(IndexStoreError, match="did not finish"):
        Index(out)
    calls.clear()
    kill[0] = False
    build_run_index(run, METHODS, out, dtype="float32", progress=False, **SMALL)
    assert len(calls) == 5 * 6 - 6           # the six shards written before the kill are kept
    assert calls[0] == ("nn-euc", 1)
    a = json.loads((out / "index.json").read_text())["methods"]
    b = index.manifest["methods"]
    assert [s["sha256"] for m in a.values() for s in m["shards"]] == \
        [s["sha256"] for m in b.values() for s in m["shards"]]


def test_verify_finds_a_damaged_shard_and_other_arguments_are_refused(run, tmp_path):
    out = tmp_path / "idx"
    build_run_index(run, "gd", out, dtype="float32", progress=False, **SMALL)
    with pytest.raises(IndexStoreError, match="other arguments"):
        build_run_index(run, "gd", out, dtype="float16", progress=False, **SMALL)
    shard = out / "gd" / "shard-00002.npy"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(IndexStoreError, match="shard-00002.npy: checksum mismatch"):
        verify(out)
    build_run_index(run, "gd", out, dtype="float32", progress=False, **SMALL)   # a damaged shard is rewritten
    verify(out)


def test_a_damaged_shard_rewrites_its_own_method_only(run, tmp_path, monkeypatch):
    """Shards recorded whole are never written again (a rewrite could change their bytes)."""
    out = tmp_path / "idx"
    build_run_index(run, "gd,nn-cos", out, dtype="float32", progress=False, **SMALL)
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "nn-cos").glob("shard-*.npy")}
    shard = out / "gd" / "shard-00002.npy"
    shard.write_bytes(shard.read_bytes()[:-8])
    real, calls = build_mod.write_shard, []
    monkeypatch.setattr(build_mod, "write_shard", lambda root, name, s, *a: calls.append((name, s)) or
                        real(root, name, s, *a))
    build_run_index(run, "gd,nn-cos", out, dtype="float32", progress=False, **SMALL)
    assert calls == [("gd", 2), ("gd", 3), ("gd", 4)]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "nn-cos").glob("shard-*.npy")} == kept
    verify(out)


def test_shard_rows_must_follow_the_blocks(run, tmp_path):
    with pytest.raises(IndexStoreError, match="multiple of 8"):
        build_run_index(run, "gd", tmp_path / "x", progress=False, train_rows=8, shard_rows=12)


def test_cli_index_and_query(run, index, tmp_path, capsys):
    assert main(["--quiet", "index", "verify", str(index.root)]) == 0
    assert "match their checksums" in capsys.readouterr().out
    out = tmp_path / "q"
    assert main(["--quiet", "query", "--index", str(index.root), "--split", "test", "--top-k", "6",
                 "--methods", "gd,rep", "--out", str(out)]) == 0
    want = index.search(["gd", "rep"], run.features("test"), 6)     # the command's grid: 1,024 test rows a block
    for m in ("gd", "rep"):
        with np.load(out / f"{m}-test.topk.npz") as z:
            np.testing.assert_array_equal(z["train_pos"], want[m]["top"][0])
            np.testing.assert_array_equal(z["score"], want[m]["top"][1])
            # attribute's top-k came from 4-row test blocks: another GEMM shape, so equal only to
            # rounding on some BLAS kernels (bit-identity needs the same grid: test above)
            np.testing.assert_allclose(z["score"], run.top_k(m, "test")["score"], rtol=1e-5)


@pytest.mark.parametrize("argv,message", [
    (["index", "verify", "{tmp}/nowhere"], "no such index"),
    (["query", "--index", "{tmp}/nowhere", "--split", "test", "--out", "{tmp}/o"], "no such index"),
    (["query", "--index", "{idx}", "--split", "test", "--out", "{tmp}/o", "--ann"], "has no ANN index"),
    (["query", "--index", "{idx}", "--split", "test", "--out", "{tmp}/o", "--methods", "gc"], "has no method 'gc'"),
    (["query", "--index", "{idx}", "--split", "test"], "give --out"),
    (["attribute", "--run", "{run}", "--bottom-k", "3"], "--bottom-k needs --top-k"),
    (["attribute", "--run", "{run}", "--top-k", "0"], "--top-k must be positive"),
])
def test_cli_errors_are_one_line(argv, message, run, index, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path, idx=index.root, run=run.path) for a in argv]
    assert main(["--quiet"] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_cli_verify_reports_a_bad_checksum(run, tmp_path, capsys):
    out = tmp_path / "idx"
    build_run_index(run, "nn-cos", out, progress=False, **SMALL)
    data = bytearray((out / "labels.npy").read_bytes())
    data[-8] ^= 0x07
    (out / "labels.npy").write_bytes(bytes(data))
    assert main(["--quiet", "index", "verify", str(out)]) == 2
    assert "labels.npy: checksum mismatch" in capsys.readouterr().err


def test_evaluations_read_top_k_files_when_there_are_no_dense_scores(tmp_path, monkeypatch):
    from instattr.evaluate import common, run_artifacts, run_retrain
    run = make_run(tmp_path, "hans", n_train=60, n_test=40)
    names = "nn-cos,gd,if"
    quiet = {"progress": False, "log": lambda *a: None}
    opts = {"methods": names, "n_test": 4, "ks": (5,), "n_random": 2, "scope": "final", "progress": False}
    attribute_run(run, names, **quiet)                      # dense scores first: the reference
    want = run_artifacts(run, methods=names), run_retrain(run, **opts)
    attribute_run(run, names, top_k=10, **quiet)
    for p in (run.path / "scores").glob("*.npy"):
        p.unlink()

    def no_refit(self, method):
        raise AssertionError(f"{method} was refitted instead of read from its top-k file")

    monkeypatch.setattr(common.Ranker, "attributor", no_refit)
    got = run_artifacts(run, methods=names), run_retrain(run, **opts)
    assert got[0]["methods"] == want[0]["methods"]
    assert got[1]["methods"] == want[1]["methods"] and got[1]["removed_support"] == want[1]["removed_support"]


def test_query_leaves_out_rows_an_approximate_search_did_not_find(run, index, tmp_path, capsys, monkeypatch):
    """An ANN search with fewer than K candidates pads with position -1: never shown as the last
    training row, written as id "" and score NaN and counted in the sidecar."""
    exact = Index.search

    def padded(self, *args, **kwargs):
        res = exact(self, *args, **kwargs)
        for pos, vals in (r["top"] for r in res.values()):
            pos[:, -2:] = -1
            vals[:, -2:] = np.nan
        return res

    monkeypatch.setattr(Index, "search", padded)
    monkeypatch.setattr("instattr.pipeline.featurize", lambda run, docs, queries=None, device=None: featurize(
        run, docs, queries))
    base = ["--quiet", "query", "--index", str(index.root), "--top-k", "5", "--methods", "gd"]
    assert main(base + ["--text", "a new sentence", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["methods"]["gd"]["top"]
    last = str(run.features("train").idx[-1])
    assert len(rows) == 3 and all(r["idx"] != last and np.isfinite(r["score"]) for r in rows)
    assert main(base + ["--split", "test", "--out", str(tmp_path / "q")]) == 0
    with np.load(tmp_path / "q" / "gd-test.topk.npz") as z:
        assert (z["train_idx"][:, -2:] == "").all() and (z["train_idx"][:, :3] != "").all()
        assert np.isnan(z["score"][:, -2:]).all() and (z["train_pos"][:, -2:] == -1).all()
    assert json.loads((tmp_path / "q" / "gd-test.topk.json").read_text())["missing"] == 2 * len(run.features("test"))


def test_a_top_k_file_from_another_write_is_not_read(tmp_path):
    """The sidecar is the commit point: an .npz replaced after it (a kill between the two writes, a
    concurrent writer) is refused with its reason, and `attribute` recomputes it."""
    from instattr.store import RunError
    run = make_run(tmp_path, "sst2", n_train=40, n_test=12)
    quiet = {"progress": False, "log": lambda *a: None}
    attribute_run(run, "gd", top_k=3, **quiet)
    p = run.top_k_path("gd", "test")
    want = p.read_bytes()
    attribute_run(run, "gd", top_k=5, overwrite=True, **quiet)
    other = p.read_bytes()
    attribute_run(run, "gd", top_k=3, overwrite=True, **quiet)
    p.write_bytes(other)                               # the .npz of the k=5 write beside the k=3 sidecar
    assert not run.has_top_k("gd", "test")
    with pytest.raises(RunError, match=r"gd-test.topk.npz: it has \d+ bytes, gd-test.topk.json recorded \d+"):
        run.top_k("gd", "test")
    attribute_run(run, "gd", top_k=3, **quiet)           # without --overwrite: recomputed, not kept
    assert p.read_bytes() == want and run.top_k("gd", "test")["score"].shape == (12, 3)


def test_a_killed_backend_build_keeps_the_shards_it_had_finished_in_order(run, index, tmp_path):
    """A backend (Ray's actor pool) hands shards back out of order and dies: the manifest holds the
    finished in-order prefix (shards 0 and 1, not 3), and a local resume writes only the rest."""
    class DiesAfterThree:
        def build_shards(self, job, todo, progress=False):
            for i in (1, 0, 3):
                yield i, job.write(i)
            raise RuntimeError("killed")

    out = tmp_path / "idx"
    with pytest.raises(RuntimeError, match="killed"):
        build_run_index(run, METHODS, out, dtype="float32", progress=False, backend=DiesAfterThree(), **SMALL)
    assert {len(m["shards"]) for m in json.loads((out / "index.json").read_text())["methods"].values()} == {2}
    written = []
    real = build_mod.write_shard
    build_mod.write_shard = lambda root, name, s, side, dtype: written.append(s) or real(root, name, s, side, dtype)
    try:
        build_run_index(run, METHODS, out, dtype="float32", progress=False, **SMALL)
    finally:
        build_mod.write_shard = real
    assert sorted(set(written)) == [2, 3, 4]
    a = json.loads((out / "index.json").read_text())["methods"]
    assert [s["sha256"] for m in a.values() for s in m["shards"]] == \
        [s["sha256"] for m in index.manifest["methods"].values() for s in m["shards"]]


def test_a_build_killed_before_its_first_manifest_starts_again(run, index, tmp_path, monkeypatch):
    """The folder is marked as an index before anything is written into it, so a build killed
    that early is rebuilt by the same command instead of being refused as "not an index"."""
    from instattr.index import IndexStoreError
    out = tmp_path / "idx"

    def killed(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(build_mod, "_method_entry", killed)         # after ids.npy, before the full manifest
    with pytest.raises(RuntimeError, match="killed"):
        build_run_index(run, METHODS, out, dtype="float32", progress=False, **SMALL)
    assert (out / "ids.npy").exists()
    with pytest.raises(IndexStoreError, match="did not finish"):
        verify(out)
    monkeypatch.undo()
    build_run_index(run, METHODS, out, dtype="float32", progress=False, **SMALL)
    assert verify(out)["files"] == verify(index.root)["files"]


def test_saved_state_is_what_each_method_declares(run):
    """An index saves a method's declared ``state`` and nothing found by reflection: an attribute a
    method does not declare never reaches the file, and a method that declares none is refused."""
    from instattr.attribution import fit_method
    from instattr.methods.state import StateError, load_state, save_state
    for name in ("nn-cos", "gd", "if", "rep"):
        m = fit_method(run, name)
        m.scratch_ = np.ones(3)                                  # undeclared: not saved
        arrays, meta = save_state(m)
        assert set(meta["attrs"]) <= set(m.state) and "scratch_" not in meta["attrs"]
        assert not any(k.startswith("scratch") for k in arrays)
        test = run.features("test")
        loaded = load_state(arrays, meta)
        loaded.n_train_ = m.n_train_                             # as an index sets it: its row count
        np.testing.assert_array_equal(loaded.test_side(test).vectors, m.test_side(test).vectors)
    with pytest.raises(StateError, match="declares no state"):
        save_state(get_method("tracin"))         # TracIn holds checkpoints: an index refits it

"""The Ray backend on a local Ray (2 CPUs): bit-identical to the local backend."""
import json

import numpy as np
import pytest

import instattr.index.build as build_mod
from instattr.attribution import attribute_run, fit_method
from instattr.index import build_run_index
from instattr.methods.scoring import Grid

from _synthetic import make_run

ray = pytest.importorskip("ray")   # installed by the dev extra; absent only outside CI
pytestmark = pytest.mark.ray       # actor pools (each worker imports torch): .ci/run runs them with -m ray

METHODS = "nn-euc,gd,if,rif,rep"


@pytest.fixture(scope="module")
def local_ray():
    from instattr.distributed import connect
    yield connect(workers=2)          # ray.init(num_cpus=2), workers importing this checkout
    ray.shutdown()


def test_ray_equals_local_bit_for_bit(local_ray, tmp_path, monkeypatch):
    monkeypatch.setattr(build_mod, "SHARD_BLOCKS", 5)          # 80 rows, blocks of 8: two shards, two tasks
    grid = Grid(4, 8)
    run = make_run(tmp_path / "a", "hans", n_train=80, n_test=20)
    quiet = {"progress": False, "log": lambda *a: None, "grid": grid}
    attribute_run(run, METHODS, top_k=7, bottom_k=3, **quiet)
    local = {(m, bottom): run.top_k(m, "test", bottom) for m in METHODS.split(",") for bottom in (False, True)}
    from instattr.distributed import RayBackend
    attribute_run(run, METHODS, top_k=7, bottom_k=3, backend=RayBackend(), overwrite=True, **quiet)
    for m in METHODS.split(","):
        for bottom in (False, True):
            a, b = local[m, bottom], run.top_k(m, "test", bottom)
            for key in ("train_pos", "score", "train_idx", "test_idx"):
                np.testing.assert_array_equal(a[key], b[key])
            assert b["info"]["diagnostics"]["backend"] == "ray"
    # the shards Ray's actors wrote are byte for byte those of a local build
    cache = next((run.path / "cache").glob("ray-index-*"))
    made = build_run_index(run, METHODS, tmp_path / "idx", dtype="float32", progress=False, train_rows=8,
                           shard_rows=40)
    import json
    by_ray = json.loads((cache / "index.json").read_text())["methods"]
    assert len(by_ray["gd"]["shards"]) == 2
    assert {m: [s["sha256"] for s in e["shards"]] for m, e in by_ray.items()} == \
        {m: [s["sha256"] for s in e["shards"]] for m, e in made["methods"].items()}


def test_ray_encoding_equals_local(local_ray, tmp_path, tiny_encoder, toy_pairs, monkeypatch):
    """`train --backend ray` encodes on a pool of actors: the same length-sorted batches as the
    local encoder, so the same embeddings (siamese pairs: each sentence once), and the same run."""
    from instattr.distributed import RayBackend, ray_encode_groups
    from instattr.encoders import Encoder
    from instattr.models.head import HeadConfig
    from instattr.pipeline import TrainConfig, train_run
    monkeypatch.setenv("INSTATTR_CACHE", "off")            # the second run must not read the first's cache
    enc = Encoder(tiny_encoder, batch_size=4)
    texts = ["a good film", "the plot was dull and the acting was worse", "fine", "", "bad bad bad", "ok then"] * 3
    pairs = (texts[:7], texts[7:14])
    got = ray_encode_groups(enc, [(texts, None), ([], None), pairs], workers=2)
    np.testing.assert_array_equal(got[0], enc.encode(texts, progress=False))
    assert got[1].shape == (0, enc.hidden_size)
    np.testing.assert_array_equal(got[2], enc.encode(*pairs, progress=False))
    cfg = TrainConfig(data=str(toy_pairs), encoder=tiny_encoder, head=HeadConfig(epochs=3, lr=1e-2, batch_size=8))
    local = train_run(cfg, tmp_path / "local", progress=False)
    by_ray = train_run(cfg, tmp_path / "ray", progress=False, backend=RayBackend(workers=2))
    from instattr.sentence import sentence_embeddings
    for split in local.splits:
        a, b = local.features(split), by_ray.features(split)
        np.testing.assert_array_equal(sentence_embeddings(local).split(split), sentence_embeddings(by_ray).split(split))
        np.testing.assert_array_equal(a.probs, b.probs)


def test_ray_encoding_is_for_head_mode(tmp_path, tiny_encoder, toy_data, capsys):
    from instattr.cli import main
    assert main(["--quiet", "train", "--data", str(toy_data), "--encoder", tiny_encoder, "--mode", "finetune",
                 "--backend", "ray", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "--backend ray encodes for --mode head" in err and err.count("\n") == 1


def test_ray_import_equals_local(local_ray, tmp_path, tiny_encoder, monkeypatch):
    """`import --backend ray` runs the checkpoint on a pool of actors, one copy each, in the
    batches this process cuts: the same features and probabilities."""
    from instattr.distributed import RayBackend, ray_classify_groups
    from instattr.models.hf import HFClassifier
    from instattr.pipeline import ImportConfig, import_run

    from _families import build
    from conftest import make_dataset
    monkeypatch.setenv("INSTATTR_CACHE", "off")            # the second import must not read the first's cache
    data = make_dataset(tmp_path / "data", n_train=70, n_test=9, n_dev=3, pairs=True)
    tok, model = build("bert")
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    cfg = ImportConfig(model=str(folder), data=str(data), damping=0.01, sbert=tiny_encoder)
    local = import_run(cfg, tmp_path / "local", progress=False)
    by_ray = import_run(cfg, tmp_path / "ray", progress=False, backend=RayBackend(workers=2))
    for split in local.splits:
        a, b = local.features(split), by_ray.features(split)
        for field in ("features", "probs", "pred"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert len(local.features("train")) == 70            # two batches of 64 and 6: both actors work
    clf = HFClassifier(str(folder), ["0", "1"], True, 0.01, 32, device="cpu")
    ((f0, p0),) = ray_classify_groups(clf, [([], [])], workers=2)     # nothing to classify: no pool
    assert f0.shape == (0, 16) and p0.shape == (0, 2)
    # a decoder whose own pooling picks another token (pad = EOS): the workers' count comes back
    from _families import make_model, variant
    llama, _ = make_model("llama", tmp_path / "llama", data, eos_at_end=True)
    eos = variant(tmp_path, llama, "eos", eos_at_end=True, pad_is_eos=True)
    cfg = ImportConfig(model=str(eos), data=str(make_dataset(tmp_path / "single", n_train=6, n_test=2, n_dev=0)),
                       sbert=tiny_encoder)
    by_ray = import_run(cfg, tmp_path / "eos-run", progress=False, backend=RayBackend(workers=2))
    assert by_ray.manifest.hf.own_pooling_differs == 8      # every row, as the local import counts it (test_families)


def test_workers_start_with_the_driver_thread_counts(local_ray):
    """Ray starts workers with one OpenMP thread; on some CPUs the thread count a process starts
    with changes float32 GEMM and transformer results in the last bit (on an AMD EPYC the hans
    run's Ray top-k scores differed from the local ones by up to 2e-5), so every actor and task
    gets the driver's counts (and a local Ray's job environment has them)."""
    import torch
    from threadpoolctl import threadpool_info

    from instattr.distributed import _driver_threads

    def counts():
        import numpy  # noqa: F401  (loads its BLAS)
        import torch
        from threadpoolctl import threadpool_info
        return torch.get_num_threads(), max(p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas")
    # (the suite's process has more BLAS libraries loaded than a fresh worker: FAISS's, ...)
    want = (torch.get_num_threads(), max(p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"))
    assert ray.get(ray.remote(counts).options(runtime_env=_driver_threads()).remote()) == want
    # a local Ray's job environment carries them too, so its pre-started workers serve the actors
    assert ray.get(ray.remote(counts).remote()) == want


LAYERED = ("gd-top", "gc-top", "if-top", "rif-top")   # tracin-top's checkpoints: test_layers, in process


@pytest.fixture
def layered_run(tmp_path, tiny_encoder):
    """A head-mode run, 40 training rows."""
    from instattr.models.head import HeadConfig
    from instattr.pipeline import TrainConfig, train_run

    from conftest import make_dataset
    data = make_dataset(tmp_path / "data", n_train=40, n_test=12, n_dev=0)
    cfg = TrainConfig(data=str(data), encoder=tiny_encoder, head=HeadConfig(epochs=1, lr=1e-2, batch_size=8))
    return train_run(cfg, tmp_path / "run", progress=False)


def test_ray_layered_gradients_equal_local(local_ray, layered_run, monkeypatch):
    """The layered methods' per-example gradients computed by a pool of actors (the curvature
    reduced on the driver): the local fit's training sides, test sides and self-scores, bit for bit;
    then `attribute --top-k --backend ray` of if-top equals the local top-k."""
    from instattr.distributed import RayBackend
    from instattr.store import Run

    class Counted(RayBackend):
        calls = 0

        def gradient_batches(self, *args, **kwargs):
            Counted.calls += 1
            yield from super().gradient_batches(*args, **kwargs)

    opts = dict(layers=1, proj_dim=4, batch_size=8, progress=False)     # 40 rows: 5 batches over 2 actors
    test = layered_run.features("test")
    local = {n: fit_method(layered_run, n, **opts) for n in LAYERED}
    for f in (layered_run.path / "cache").glob("grads-*.npz"):
        f.unlink()                                   # the Ray fit must compute them again
    fresh = Run(layered_run.path)                    # and not reuse this process's memo
    backend = Counted(workers=2)                     # one pool of actors per gradient source, kept
    remote = {n: fit_method(fresh, n, backend=backend, **opts) for n in LAYERED}
    assert Counted.calls == 1           # gd-top's training gradients (the others reuse them)
    for n in LAYERED:
        np.testing.assert_array_equal(local[n].train_embedding_, remote[n].train_embedding_, err_msg=n)
        np.testing.assert_array_equal(local[n].self_scores(), remote[n].self_scores(), err_msg=n)
    np.testing.assert_array_equal(local["rif-top"].test_side(test).vectors, remote["rif-top"].test_side(test).vectors)
    assert Counted.calls == 2

    quiet = {"progress": False, "log": lambda *a: None, "grid": Grid(16, 16),
             "options": {"layers": 1, "proj_dim": 4}}
    attribute_run(layered_run, "if-top", top_k=5, bottom_k=2, **quiet)
    want = {("if-top", b): layered_run.top_k("if-top", "test", b) for b in (False, True)}
    attribute_run(fresh, "if-top", top_k=5, bottom_k=2, backend=backend, overwrite=True, **quiet)
    assert Counted.calls == 3           # its test side; the training side came from this run's memo
    for (m, b), a in want.items():
        got = fresh.top_k(m, "test", b)
        np.testing.assert_array_equal(a["train_pos"], got["train_pos"])
        np.testing.assert_array_equal(a["score"], got["score"])
        assert got["info"]["diagnostics"]["backend"] == "ray"
    assert len(backend._actors) == 1    # one gradient source: one pool
    backend.close()
    # Index.source, a scoring task's first step, opens if-top's shards without refitting if-top
    import instattr.attribution
    from instattr.index import Index
    monkeypatch.setattr(instattr.attribution, "fit_method", None)
    index = Index(next((fresh.path / "cache").glob("ray-index-*")))
    assert index.source("if-top").n == len(fresh.features("train"))


def test_a_failing_gradient_worker_gives_one_line_and_stops_its_pool(local_ray, layered_run):
    """A worker that cannot build its model (here: a run folder it cannot see) ends in a one-line
    error naming the run and the worker's own error, not a Ray traceback, and its pool is gone."""
    from instattr.distributed import RayBackend
    from instattr.errors import InstattrError
    from instattr.layers.attributors import GradientSource
    gone = GradientSource(str(layered_run.path.parent / "gone"), "cpu", 1, None, "float32", 4, 0, "khatri-rao")
    backend = RayBackend(workers=1)
    fs = layered_run.features("test")
    with pytest.raises(InstattrError, match=r"gradient workers for .*gone failed: .*Error") as caught:
        list(backend.gradient_batches(None, gone, fs, None, fs.pred, [np.arange(2)], False))
    print(caught.value)
    assert "\n" not in str(caught.value) and "Traceback" not in str(caught.value)
    assert backend._actors == {}


def test_a_language_model_run_on_ray_equals_local(local_ray, tmp_path, monkeypatch):
    """A language-model run's top-k on Ray (its training sides indexed in the run's cache, one Ray task
    per shard; bm25 scored on the driver) and its index built and searched on Ray give the local
    top-k: the same rows, the same float32 scores."""
    from instattr.distributed import RayBackend
    from instattr.index import Index
    from instattr.index.language import build_lm_index
    from instattr.lmrun import attribute_lm
    from instattr.methods.language import Rows
    from instattr.store import LMRun

    from _lm import make_lm_run
    monkeypatch.setattr(build_mod, "SHARD_BLOCKS", 1)
    root, tok, model = make_lm_run(tmp_path)
    run, names, grid = LMRun.load(root / "run"), ["gd", "if", "nn", "bm25"], Grid(2, 2)   # 5 rows: 3 shards
    quiet = {"top_k": 2, "bottom_k": 1, "progress": False, "log": lambda *a: None, "grid": grid}
    attribute_lm(run, names, **quiet)
    local = {(m, b): run.top_k(m, "test", b) for m in names for b in (False, True)}
    with RayBackend() as backend:
        attribute_lm(run, names, overwrite=True, backend=backend, **quiet)
        for (m, b), want in local.items():
            got = run.top_k(m, "test", b)
            np.testing.assert_array_equal(got["train_pos"], want["train_pos"])
            np.testing.assert_allclose(got["score"], want["score"], rtol=1e-6)
            assert got["info"]["diagnostics"]["backend"] == ("local" if m == "bm25" else "ray")
        cache = next((root / "run" / "cache").glob("ray-index-*"))
        assert [len(e["shards"]) for e in json.loads((cache / "index.json").read_text())["methods"].values()] == \
            [3, 3, 3]
        build_lm_index(run, "gd,if,nn", tmp_path / "idx", dtype="float32", train_rows=2, shard_rows=2,
                       backend=backend, progress=False)
        index = Index(tmp_path / "idx")
        found = backend.search(index, ["gd", "if", "nn"], {m: index.method(m) for m in ("gd", "if", "nn")},
                               Rows(run.rows("test")), 2, 1)
    for m in ("gd", "if", "nn"):
        for which, b in (("top", False), ("bottom", True)):
            np.testing.assert_array_equal(found[m][which][0], local[m, b]["train_pos"])
            np.testing.assert_allclose(found[m][which][1], local[m, b]["score"], rtol=1e-6)


def test_a_language_models_gradient_passes_run_on_ray_actors_with_the_local_results(local_ray, monkeypatch):
    """LMExplainer(backend=RayBackend()): each training gradient pass (gradients, Gauss-Newton factors,
    EK-FAC's covariance sums) runs its batches on a pool of actors holding the projector and the
    windows once: the same batches, so the same gradients and scores as here, bit for bit (EK-FAC's
    sums arrive in another order: equal to rounding). The driver's own batch code is disabled while
    Ray runs them, so nothing is computed here."""
    import torch

    import instattr.lm as lm
    from instattr.distributed import RayBackend

    from _lm import TEST, TRAIN, save_gpt2
    tok, model = save_gpt2()
    opts = dict(proj_dim=8, max_length=16, stride=8, batch_size=2)
    here = {ihvp: lm.LMExplainer(model, tok, TRAIN, methods=["gd", "if"], ihvp=ihvp, **opts)
            for ihvp in ("projected", "ekfac")}
    want = {ihvp: ex.scores(TEST) for ihvp, ex in here.items()}

    def not_here(self, j):
        raise AssertionError("a batch ran on the driver")
    with RayBackend() as backend:
        with monkeypatch.context() as m:
            m.setattr(lm.WindowBatches, "__call__", not_here)
            there = {ihvp: lm.LMExplainer(model, tok, TRAIN, methods=["gd", "if"], ihvp=ihvp, backend=backend, **opts)
                     for ihvp in ("projected", "ekfac")}
    assert torch.equal(there["projected"].train_grads, here["projected"].train_grads)
    assert torch.equal(there["projected"].train_losses, here["projected"].train_losses)
    for m in ("gd", "if"):
        np.testing.assert_array_equal(there["projected"].scores(TEST)[m], want["projected"][m])
        np.testing.assert_allclose(there["ekfac"].scores(TEST)[m], want["ekfac"][m], rtol=1e-6)

"""Ray across nodes, with faults: a multi-node cluster simulated on this machine
(``ray.cluster_utils.Cluster``, as Ray's own tests do): a head that runs no work and two worker
nodes of one CPU each.

- With two worker nodes, ``attribute --top-k`` and ``index build`` through Ray are bit-identical
  to the local backend.
- A worker node removed in the middle of ``index build --backend ray`` and of ``attribute
  --backend ray --top-k``: the command either completes with the local results (Ray restarts the
  lost actors and retries the lost tasks elsewhere) or stops with one line, and then the same
  command resumes where it stopped and ends with the local results. The moment and the outcome
  are printed.

Marked ``cluster`` (a cluster takes tens of seconds to start): the README's test command leaves it
out, ``.ci/run`` runs it (``pytest -m cluster``).
"""
import json
import threading
import time

import numpy as np
import pytest

import instattr.index.build as build_mod
from instattr.attribution import attribute_run
from instattr.errors import InstattrError
from instattr.index import build_run_index
from instattr.methods.scoring import Grid

from _synthetic import make_run

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.cluster

METHODS = "nn-cos,gd,if,rep"
QUIET = {"progress": False, "log": lambda *a: None}


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    from instattr.distributed import local_env
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})    # the driver's node runs nothing
    for _ in range(2):
        c.add_node(num_cpus=1)
    c.wait_for_nodes()
    ray.init(address=c.address, runtime_env=local_env(), include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    yield c
    ray.shutdown()
    c.shutdown()


def worker_nodes(cluster):
    return [n for n in cluster.list_all_nodes() if n is not cluster.head_node]


@pytest.fixture
def run(tmp_path, monkeypatch):
    monkeypatch.setattr(build_mod, "SHARD_BLOCKS", 1)       # 8-row blocks, one per shard: many shards
    return make_run(tmp_path / "r", "hans", n_train=240, n_test=20)


def local_top_k(run, grid):
    attribute_run(run, METHODS, top_k=6, bottom_k=3, grid=grid, **QUIET)
    return {(m, b): run.top_k(m, "test", b) for m in METHODS.split(",") for b in (False, True)}


def assert_same(want, run):
    for (m, b), a in want.items():
        got = run.top_k(m, "test", b)
        for key in ("train_pos", "score", "train_idx", "test_idx"):
            np.testing.assert_array_equal(a[key], got[key], err_msg=f"{m} {key}")


def test_two_worker_nodes_give_the_local_bits(cluster, run, tmp_path):
    """The head has no CPU: every actor and task ran on the two one-CPU worker nodes."""
    from instattr.distributed import RayBackend
    grid = Grid(4, 8)
    want = local_top_k(run, grid)
    with RayBackend(address=cluster.address) as backend:
        attribute_run(run, METHODS, top_k=6, bottom_k=3, grid=grid, backend=backend, overwrite=True, **QUIET)
        assert_same(want, run)
        by_ray = build_run_index(run, METHODS, tmp_path / "idx-ray", dtype="float32", progress=False, train_rows=8,
                                 backend=backend)
    local = build_run_index(run, METHODS, tmp_path / "idx-local", dtype="float32", progress=False, train_rows=8)
    assert len(local["methods"]["gd"]["shards"]) == 30
    assert {m: [s["sha256"] for s in e["shards"]] for m, e in by_ray["methods"].items()} == \
        {m: [s["sha256"] for s in e["shards"]] for m, e in local["methods"].items()}


def _lose_a_node_when(cluster, ready, what):
    """Remove a worker node once ``ready()`` is true (polled), in a thread; returns (thread, record)."""
    record = {}

    def watch():
        start = time.perf_counter()
        while not ready() and time.perf_counter() - start < 60:
            time.sleep(0.02)
        node = worker_nodes(cluster)[-1]
        record["moment"] = time.perf_counter() - start
        cluster.remove_node(node, allow_graceful=False)
        record["removed"] = True
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t, record


def _through_a_lost_node(cluster, ready, step, again: str):
    """Run ``step(backend)`` on the cluster while a worker node is removed once ``ready()``; if it
    stops, the stop is one line, the node comes back and ``step`` runs once more. (the last
    result, how it went, the removal's record)."""
    from instattr.distributed import RayBackend
    thread, record = _lose_a_node_when(cluster, ready, "")
    try:
        with RayBackend(address=cluster.address) as backend:
            result = step(backend)
        outcome = "completed (Ray retried the lost work)"
    except InstattrError as e:
        assert "\n" not in str(e)
        thread.join()
        _restore(cluster)
        with RayBackend(address=cluster.address) as backend:
            result = step(backend)
        outcome = f"stopped in one line ({e}); {again}"
    thread.join()
    _restore(cluster)
    return result, outcome, record


def _restore(cluster):
    while len(worker_nodes(cluster)) < 2:
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()


def _shards(path):
    try:
        return min(len(e["shards"]) for e in json.loads(path.read_text())["methods"].values())
    except (OSError, ValueError, KeyError):
        return 0


def test_a_worker_node_lost_mid_index_build(cluster, run, tmp_path, capsys):
    from instattr.distributed import RayBackend
    local = build_run_index(run, METHODS, tmp_path / "local", dtype="float32", progress=False, train_rows=8)
    out = tmp_path / "idx"
    thread, record = _lose_a_node_when(cluster, lambda: _shards(out / "index.json") >= 2, "index build")
    try:
        with RayBackend(address=cluster.address) as backend:
            build_run_index(run, METHODS, out, dtype="float32", progress=False, train_rows=8, backend=backend)
        outcome = "completed (Ray restarted the lost actors)"
    except InstattrError as e:
        assert "\n" not in str(e)
        outcome = f"stopped in one line ({e}); resumed: "
        thread.join()
        _restore(cluster)
        done_before = _shards(out / "index.json")
        with RayBackend(address=cluster.address) as backend:
            build_run_index(run, METHODS, out, dtype="float32", progress=False, train_rows=8, backend=backend)
        outcome += f"{done_before} shards were kept"
    thread.join()
    _restore(cluster)
    got = json.loads((out / "index.json").read_text())
    assert {m: [s["sha256"] for s in e["shards"]] for m, e in got["methods"].items()} == \
        {m: [s["sha256"] for s in e["shards"]] for m, e in local["methods"].items()}
    with capsys.disabled():
        print(f"\nindex build: a worker node removed at {record.get('moment', float('nan')):.2f} s "
              f"(after {_shards(out / 'index.json') and 2}+ shards were recorded): {outcome}; the index equals "
              "the local one")


def test_a_worker_node_lost_mid_attribute_top_k(cluster, run, capsys):
    grid = Grid(4, 8)
    want = local_top_k(run, grid)
    cache = run.path / "cache"

    def started():
        return any(_shards(p / "index.json") >= 2 for p in cache.glob("ray-index-*"))
    _, outcome, record = _through_a_lost_node(cluster, started, lambda backend: attribute_run(
        run, METHODS, top_k=6, bottom_k=3, grid=grid, backend=backend, overwrite=True, **QUIET),
        "the same command resumed")
    assert_same(want, run)
    with capsys.disabled():
        print(f"\nattribute --top-k: a worker node removed at {record.get('moment', float('nan')):.2f} s: {outcome}; "
              "the results equal the local ones")


def test_a_worker_node_lost_mid_language_model_gradient_pass(cluster, capsys, monkeypatch):
    """A language model's training gradient pass on the cluster's actors (LMExplainer(backend=...)):
    a worker node removed once five batches have arrived. The fit either completes (Ray retried the
    lost work) or stops in one line, and then the same fit runs again; either way its gradients and
    scores are the local ones, bit for bit."""
    import torch

    from instattr.distributed import RayBackend
    from instattr.lm import LMExplainer

    from _lm import TEST, TRAIN, save_gpt2
    tok, model = save_gpt2()
    rows = [{**r, "idx": f"{r['idx']}-{i}"} for i in range(8) for r in TRAIN]         # 40 batches of one
    opts = dict(methods=["gd", "if"], proj_dim=8, max_length=16, stride=8, batch_size=1)
    local = LMExplainer(model, tok, rows, **opts)
    arrived, real = [], RayBackend.map_batches

    def counted(self, work):
        for result in real(self, work):
            arrived.append(1)
            yield result
    monkeypatch.setattr(RayBackend, "map_batches", counted)
    there, outcome, record = _through_a_lost_node(
        cluster, lambda: len(arrived) >= 5, lambda backend: LMExplainer(model, tok, rows, backend=backend, **opts),
        "the same fit ran again")
    assert torch.equal(there.train_grads, local.train_grads)
    for m, s in there.scores(TEST).items():
        np.testing.assert_array_equal(s, local.scores(TEST)[m])
    with capsys.disabled():
        print(f"\nlanguage-model gradients: a worker node removed at {record.get('moment', float('nan')):.2f} s: "
              f"{outcome}; the gradients equal the local ones")

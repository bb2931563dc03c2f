"""The Ray backend on a local Ray (2 CPUs): bit-identical to the local backend."""
import numpy as np
import pytest

import instattr.index.build as build_mod
from instattr.attribution import attribute_run
from instattr.index import build_run_index
from instattr.methods.scoring import Grid

from _synthetic import make_run

ray = pytest.importorskip("ray")   # installed by the dev extra; absent only outside CI

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

"""Fault injection: every command against every kind of damage to every file of a run.

The rule, for each (command, file, damage): the command either succeeds (it does not need the file,
or rebuilds what it can: damaged scores count as missing) or exits 2 with one line on stderr naming
the damaged file, and changes nothing else in the run. A traceback (an exception escaping the CLI)
fails the test. A few combinations must fail: a command cannot do without run.json, the features it
reads or the final layer.
"""
import json
import shutil
from pathlib import Path

import pytest

from instattr.cli import main
from instattr.store import Run

COMMANDS = {
    "predict": ["predict", "--run", "{run}", "the movie was good"],
    "attribute": ["attribute", "--run", "{run}", "--methods", "paper"],
    "explain": ["explain", "--run", "{run}", "the movie was good", "--methods", "gd,if,rep,tracin", "--k", "2"],
    "correlation": ["evaluate", "correlation", "--run", "{run}", "--methods", "gd,nn-cos,if"],  # 3 x 3 figures
    "retrain": ["evaluate", "retrain", "--run", "{run}", "--methods", "gd", "--n-test", "2", "--n-random", "2"],
    "randomized": ["evaluate", "randomized", "--run", "{run}", "--methods", "gd,nn-cos", "--n-test", "3"],
    "report": ["report", "--run", "{run}"],
}
FILES = ["run.json", "metrics.json", "features/train.npz", "features/test.npz", "model/final_layer.safetensors",
         "model/head.safetensors", "model/checkpoints.safetensors", "scores/gd-test.npy", "scores/gd-test.json",
         "results/correlation.json"]
DAMAGE = {
    "missing": lambda p: p.unlink(),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: max(1, p.stat().st_size // 2)]),
    "wrong-json": lambda p: p.write_text(json.dumps(["not", "what", "was", "written"])),
}
# (command, file) pairs that cannot succeed whatever the damage
MUST_FAIL = {(c, "run.json") for c in COMMANDS} | {
    (c, "features/train.npz") for c in ("attribute", "explain", "correlation", "retrain", "randomized")} | {
    (c, "features/test.npz") for c in ("attribute", "correlation", "retrain", "randomized")} | {
    (c, "model/final_layer.safetensors") for c in ("attribute", "explain", "randomized")} | {
    (c, "model/head.safetensors") for c in ("predict", "explain")}


@pytest.fixture(scope="module")
def template(tmp_path_factory, tiny_encoder):
    """A small run with stored paper scores and an evaluation result."""
    from instattr.models.head import HeadConfig
    from instattr.pipeline import TrainConfig, train_run

    from conftest import make_dataset
    root = tmp_path_factory.mktemp("faults")
    data = make_dataset(root / "data", n_train=24, n_test=6, n_dev=0)
    run = train_run(TrainConfig(data=str(data), encoder=tiny_encoder, head=HeadConfig(epochs=2, lr=1e-2, batch_size=8)),
                    root / "run", progress=False)
    assert main(["--quiet", "attribute", "--run", str(run.path), "--methods", "paper"]) == 0
    assert main(["--quiet", "evaluate", "correlation", "--run", str(run.path), "--n-test", "3"]) == 0
    return run.path


def files_of(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and p.name != ".lock" and not str(p.relative_to(folder)).startswith("cache")}


@pytest.fixture(scope="module")
def work(template, tmp_path_factory):
    """One working copy, put back to the template's state after each case (faster than a copy each)."""
    run = tmp_path_factory.mktemp("work") / "run"
    shutil.copytree(template, run)
    want = files_of(template)
    yield run
    assert files_of(template) == want


def restore(run: Path, template: Path) -> None:
    want = files_of(template)
    for rel in set(files_of(run)) - set(want):
        (run / rel).unlink()
    for rel, data in want.items():
        p = run / rel
        if not p.exists() or p.read_bytes() != data:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)


# missing and truncated for every file, a JSON file of the wrong shape for every JSON file
CASES = [(c, f, d) for c in COMMANDS for f in FILES for d in DAMAGE if d != "wrong-json" or f.endswith(".json")]


@pytest.mark.parametrize("command,name,damage", CASES)
def test_damaged_run_files(template, work, capsys, command, name, damage):
    run = work
    restore(run, template)
    DAMAGE[damage](run / name)
    before = files_of(run)
    args = [a.replace("{run}", str(run)) for a in COMMANDS[command]]
    code = main(["--quiet", *args])             # an exception here is a traceback: the test fails
    err = capsys.readouterr().err
    if (command, name) in MUST_FAIL:
        assert code == 2, f"{command} succeeded with {damage} {name}"
    assert code in (0, 2)
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("instattr: error: "), err
        assert Path(name).name in lines[0], f"the message does not name {name}: {lines[0]}"
        assert files_of(run) == before, "a failing command changed the run"
    elif name.startswith("scores/") and command in ("attribute",):
        assert Run.load(run).has_scores("gd", "test")       # damaged scores are recomputed, not kept

"""The defects found by trying to break instattr as a new and as a hostile user, each kept fixed.

Every test here failed on the code before its fix (HTML label names, a score pair from two writes,
l2 = 0, tracebacks instead of one line, leftovers of killed processes, misleading messages).
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from instattr.cli import main
from instattr.models.head import HeadConfig
from instattr.pipeline import TrainConfig, train_run
from instattr.store import Run

from conftest import make_dataset

HEAD = HeadConfig(epochs=2, lr=1e-2, batch_size=8)


@pytest.fixture
def run(tiny_run, tmp_path):
    """A private copy of the tiny run, so tests may damage it."""
    shutil.copytree(tiny_run.path, tmp_path / "copy")
    return Run.load(tmp_path / "copy")


def one_line(capsys, *needles):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("instattr: error: "), err
    for n in needles:
        assert n in err, (n, err)
    return err


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.read_bytes()) for p in folder.rglob("*")
            if p.is_file() and p.name != ".lock"}


# ---------------------------------------------------------------- 1. HTML in label names
def test_html_label_names_are_escaped_in_the_report(tmp_path, tiny_encoder):
    data = make_dataset(tmp_path / "data", n_train=20, n_test=6, n_dev=0)
    (data / "labels.json").write_text(json.dumps(["<script>alert(3)</script>", "<b>pos</b>"]))
    run = train_run(TrainConfig(data=str(data), encoder=tiny_encoder, head=HEAD), tmp_path / "run", progress=False)
    assert main(["--quiet", "attribute", "--run", str(run.path), "--methods", "gd,nn-cos"]) == 0
    assert main(["--quiet", "report", "--run", str(run.path)]) == 0
    page = (run.path / "report.html").read_text()
    assert "<script>alert(3)</script>" not in page and "<b>pos</b>" not in page
    assert "&lt;script&gt;alert(3)&lt;/script&gt;" in page


# ---------------------------------------------------------------- 2. one writer, one commit point
HOLD = textwrap.dedent("""
    import sys, time
    from instattr.store import Run
    with Run.load(sys.argv[1]).writing("attribute"):
        print("holding", flush=True)
        time.sleep(float(sys.argv[2]))
""")


def test_a_second_writer_is_refused_while_the_first_writes(run, capsys, tiny_encoder, toy_data, monkeypatch):
    monkeypatch.setattr("instattr.pipeline._train_head", lambda *a, **k: pytest.fail("trained a busy run's "
                                                                                       "replacement"))
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run.path), "3600"], stdout=subprocess.PIPE, text=True,
                              cwd=str(Path(__file__).parents[1] / "src"))
    try:
        assert holder.stdout.readline().strip() == "holding"
        before = snapshot(run.path)
        for args in (["attribute", "--run", str(run.path), "--methods", "gd", "--overwrite"],
                     ["evaluate", "correlation", "--run", str(run.path)], ["report", "--run", str(run.path)],
                     ["train", "--data", str(toy_data), "--encoder", tiny_encoder, "--out", str(run.path),
                      "--overwrite"]):            # refused before it trains, not after
            assert main(["--quiet", *args]) == 2
            one_line(capsys, "busy", f"(pid {holder.pid})")
        assert snapshot(run.path) == before
    finally:
        holder.kill()
        holder.wait()
    assert main(["--quiet", "attribute", "--run", str(run.path), "--methods", "gd"]) == 0   # released with the process


def test_a_kill_between_the_score_files_leaves_no_mismatched_pair(run, monkeypatch, capsys):
    import instattr.store as store
    assert main(["--quiet", "attribute", "--run", str(run.path), "--methods", "nn-dot", "--limit-test", "5"]) == 0
    real = store.write_json

    def killed(path, obj):
        if str(path).endswith("nn-dot-test.json"):
            raise KeyboardInterrupt                  # the process dies between the .npy and its sidecar
        return real(path, obj)
    monkeypatch.setattr(store, "write_json", killed)
    assert main(["--quiet", "attribute", "--run", str(run.path), "--methods", "nn-dot", "--overwrite",
                 "--limit-test", "10"]) == 130
    monkeypatch.undo()
    fresh = Run.load(run.path)
    assert np.load(fresh.score_path("nn-dot", "test")).shape == (10, 40)      # new matrix, old sidecar
    assert "names 5 x 40" in fresh.score_problem("nn-dot", "test") and not fresh.has_scores("nn-dot", "test")
    with pytest.raises(Exception, match="recompute it"):
        fresh.scores("nn-dot")
    assert main(["--quiet", "evaluate", "correlation", "--run", str(run.path), "--methods", "nn-dot,gd"]) == 0
    assert main(["--quiet", "report", "--run", str(run.path)]) == 0
    assert "nn-dot-test.npy left out" in capsys.readouterr().err
    assert main(["--quiet", "attribute", "--run", str(run.path), "--methods", "nn-dot"]) == 0   # no --overwrite
    assert "recomputing" in capsys.readouterr().out
    assert Run.load(run.path).has_scores("nn-dot", "test")


def test_two_real_concurrent_overwrites_never_leave_a_mismatched_pair(run):
    """Two processes racing `attribute --overwrite` with different row counts (2 of 6 rounds broke before)."""
    cmd = [sys.executable, "-m", "instattr", "--quiet", "attribute", "--run", str(run.path), "--methods", "nn-dot",
           "--overwrite"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    for _ in range(3):
        procs = [subprocess.Popen(cmd + ["--limit-test", n], env=env, stderr=subprocess.PIPE, text=True)
                 for n in ("5", "10")]
        outs = [p.communicate()[1] for p in procs]
        codes = [p.returncode for p in procs]
        assert all(c == 0 or (c == 2 and "busy" in e) for c, e in zip(codes, outs)), outs
        fresh = Run.load(run.path)
        assert fresh.has_scores("nn-dot", "test")
        assert fresh.scores("nn-dot").shape[0] == len(fresh.score_info("nn-dot")["test_idx"])


# ---------------------------------------------------------------- 3. l2 and damping
def test_l2_and_lr_are_validated_at_train_time_and_if_takes_a_damping(run, tmp_path, tiny_encoder, toy_data, capsys):
    for flag in (["--l2", "0"], ["--l2", "-1"], ["--lr", "-1"], ["--epochs", "0"]):
        assert main(["--quiet", "train", "--data", str(toy_data), "--encoder", tiny_encoder, "--out",
                     str(tmp_path / "x"), *flag]) == 2
        one_line(capsys, flag[0])
        assert not (tmp_path / "x").exists()
    assert main(["--quiet", "attribute", "--run", str(run.path), "--methods", "if,rif", "--damping", "0.5"]) == 0
    assert Run.load(run.path).score_info("if")["config"]["damping"] == 0.5


# ---------------------------------------------------------------- 7. one line, not a traceback
@contextmanager
def read_only(folder: Path):
    """Folders that refuse new files, even to root (chattr +i), else by permissions."""
    dirs = [folder, *[p for p in folder.rglob("*") if p.is_dir()]]
    use_chattr = os.geteuid() == 0 and shutil.which("chattr")
    for d in dirs:
        if use_chattr:
            subprocess.run(["chattr", "+i", str(d)], check=True)
        else:
            d.chmod(0o555)
    try:
        probe = folder / "probe"
        try:
            probe.touch()
        except OSError:
            pass
        else:
            probe.unlink()
            pytest.fail("could not make a read-only folder here")
        yield
    finally:
        for d in dirs:
            if use_chattr:
                subprocess.run(["chattr", "-i", str(d)], check=True)
            else:
                d.chmod(0o755)


def test_a_read_only_run_gives_one_line(run, capsys, tiny_encoder, toy_data, monkeypatch):
    monkeypatch.setattr("instattr.pipeline._train_head", lambda *a, **k: pytest.fail("trained a replacement "
                                                                                       "it cannot swap in"))
    (run.path / ".lock").unlink(missing_ok=True)
    before = snapshot(run.path)
    with read_only(run.path):
        for args in (["attribute", "--run", str(run.path), "--methods", "gd"],
                     ["evaluate", "correlation", "--run", str(run.path)], ["report", "--run", str(run.path)],
                     ["train", "--data", str(toy_data), "--encoder", tiny_encoder, "--out", str(run.path),
                      "--overwrite"]):            # refused before it trains, not after
            assert main(["--quiet", *args]) == 2
            one_line(capsys, str(run.path))
    assert snapshot(run.path) == before


@pytest.mark.parametrize("args,needle", [
    (["train", "--max-length", "1024"], "exceeds the 128 positions"),
    (["train", "--out", "FILE"], "is a file"),
    (["reproduce", "--quick", "--limit-train", "10"], "--quick sets"),
])
def test_bad_arguments_give_one_line(args, needle, tmp_path, tiny_encoder, toy_data, capsys):
    (tmp_path / "file").write_text("x")
    args = [a if a != "FILE" else str(tmp_path / "file") for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "new")]
    assert main(["--quiet", *args, "--data", str(toy_data), "--encoder", tiny_encoder]) == 2
    one_line(capsys, needle)


@pytest.mark.parametrize("args,needle", [
    (["attribute", "--methods", "if", "--damping", "-1"], "damping must be >= 0"),
    (["attribute", "--methods", "if-top", "--proj-dim", "-3"], "proj_dim must be a positive integer"),
    (["attribute", "--methods", "gd-top", "--layers", "-2"], "layers must be >= 0"),
    (["explain", "--methods", "if", "--damping", "-1", "a sentence"], "damping must be >= 0"),
])
def test_bad_method_options_give_one_line(args, needle, run, capsys):
    """Options a method refuses reach the user as one line, not a ValueError's traceback."""
    assert main(["--quiet", args[0], "--run", str(run.path), *args[1:]]) == 2
    one_line(capsys, needle)


@pytest.mark.parametrize("args", [["attribute", "--run", "RUN", "--methods", "nn-dot", "--top-k", "3"],
                                  ["index", "build", "--run", "RUN", "--methods", "gd", "--out", "IDX"]])
def test_nan_features_give_one_line(args, run, tmp_path, capsys):
    """Features with NaN (a damaged or hand-edited features file) stop scoring with one line."""
    from instattr.store import write_npz
    train = run.features("train")
    train.features[3, 0] = np.nan
    write_npz(run.path / "features" / "train.npz", **train.to_npz())
    args = [{"RUN": str(run.path), "IDX": str(tmp_path / "idx")}.get(a, a) for a in args]
    assert main(["--quiet", *args]) == 2
    one_line(capsys, "NaN")


def test_empty_text_is_refused(run, capsys):
    assert main(["--quiet", "predict", "--run", str(run.path), "   "]) == 2
    one_line(capsys, "empty")


# ---------------------------------------------------------------- 8. leftovers of killed processes
def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_leftovers_of_killed_processes_are_cleaned_and_an_interrupted_swap_is_undone(run, tmp_path, capsys):
    pid = dead_pid()
    stale = run.path / "scores" / f".gd-test.npy.pid{pid}.abc123.tmp"
    stale.parent.mkdir(exist_ok=True)
    stale.write_bytes(b"half")
    mine = run.path / "scores" / f".gd-test.npy.pid{os.getpid()}.abc.tmp"   # a live process's: kept
    mine.write_bytes(b"busy")
    building = tmp_path / f".copy.building.pid{pid}-xyz"
    building.mkdir()
    assert main(["--quiet", "attribute", "--run", str(run.path), "--methods", "gd"]) == 0
    assert not stale.exists() and mine.exists()
    mine.unlink()
    # a kill between the two renames of `train --overwrite`: no RUN, the old run aside
    aside = tmp_path / f".copy.old-pid{pid}."
    os.replace(run.path, aside)
    fresh = Run.load(tmp_path / "copy")                  # restored, whole
    assert fresh.features("train").probs.shape[0] == 40 and not aside.exists()
    assert not building.exists()


def test_cleanup_touches_only_its_own_leftovers(run, tmp_path):
    """A folder of a dead pid whose name is not instattr's build or swap pattern is kept."""
    from instattr.runlock import recover_run_folder
    pid = dead_pid()
    theirs = [tmp_path / f".copy.backup-pid{pid}.", tmp_path / f".copy.old-pid{pid}-notes",
              tmp_path / f".copy.old-pid{pid}.bak", tmp_path / f".copy.building.pid{pid}-x.y"]
    for p in theirs:
        p.mkdir()
    recover_run_folder(run.path)
    assert all(p.is_dir() for p in theirs)


def test_overwrite_replaces_only_runs_and_indexes(run, tmp_path, tiny_encoder, toy_data, capsys):
    """--overwrite never deletes a folder that is not what the command writes."""
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter1.tex").write_text("years of work")
    for argv, needle in ((["train", "--data", str(toy_data), "--encoder", str(tiny_encoder)], "no run.json"),
                         (["index", "build", "--run", str(run.path), "--methods", "gd"], "no index.json")):
        assert main(["--quiet"] + argv + ["--out", str(precious), "--overwrite"]) == 2
        one_line(capsys, str(precious), needle)
        assert (precious / "chapter1.tex").read_text() == "years of work"


def test_a_failed_swap_puts_the_old_run_back(run, tmp_path, tiny_encoder, toy_data, monkeypatch):
    """`train --overwrite` fails at its second rename: the old run is back at RUN, whole."""
    import instattr.pipeline as pipeline
    before = snapshot(run.path)
    real = os.replace

    def second_rename_fails(src, dst):          # the new run into place, after the old one moved aside
        if Path(dst) == run.path and ".building." in Path(src).name:
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(pipeline.os, "replace", second_rename_fails)
    config = TrainConfig(data=str(toy_data), encoder=str(tiny_encoder), head=HEAD)
    with pytest.raises(OSError, match="No space"):
        train_run(config, run.path, overwrite=True, progress=False)
    assert snapshot(run.path) == before
    assert not list(tmp_path.glob(".copy.*"))


# ---------------------------------------------------------------- 9. misleading messages
def test_report_says_why_it_is_empty_and_truncated_scores_name_their_file(run, capsys):
    assert main(["--quiet", "report", "--run", str(run.path)]) == 0
    err = capsys.readouterr().err
    assert "no evaluation results" in err and "no stored scores" in err
    assert main(["--quiet", "attribute", "--run", str(run.path), "--methods", "gd"]) == 0
    p = run.path / "scores" / "gd-test.npy"
    p.write_bytes(p.read_bytes()[:200])
    capsys.readouterr()
    assert main(["--quiet", "evaluate", "retrain", "--run", str(run.path), "--methods", "gd", "--n-test", "2",
                 "--n-random", "2"]) == 0   # recomputed: the damaged pair counts as missing
    assert main(["--quiet", "report", "--run", str(run.path)]) == 0
    assert "gd-test.npy left out" in capsys.readouterr().err
    with pytest.raises(Exception, match="gd-test.npy"):
        Run.load(run.path).scores("gd")


def test_report_explains_with_every_method_whose_scores_cover_the_split(run):
    """A method attributed on a subset (--limit-test) is left out of the explained examples on its
    own; the others still appear, whichever order the methods are stored in."""
    from instattr.report import build_report
    for argv in (["--methods", "gd"], ["--methods", "if"], ["--methods", "nn-dot", "--limit-test", "5"]):
        assert main(["--quiet", "attribute", "--run", str(run.path)] + argv) == 0
    page = build_report(run).read_text()
    assert "Explained test examples" in page
    assert "<td><b>gd</b>" in page and "<td><b>if</b>" in page and "<td><b>nn-dot</b>" not in page

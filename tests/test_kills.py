"""Kill anywhere, a sample (tests/_kills.py; every command at 20 moments: bench/kills.py): a command
killed with SIGKILL at a seeded moment leaves nothing a reader accepts that is not the finished
result, and running it again gives the uninterrupted run's result bit for bit. Then a disk that
fills up mid-write: the previous results stay whole and the error is one line."""
import errno
import os
import shutil
import subprocess

import numpy as np

from instattr.cli import main
from instattr.store import Run

from _kills import CASES, run_cases


def test_a_killed_command_reruns_to_the_uninterrupted_result(tmp_path):
    cases = [c for c in CASES if c.name == "attribute-top-k"]      # the other commands: .ci/run, bench/kills.py
    outcomes = run_cases(cases, 1, tmp_path, seed=1, log=print)
    assert len(outcomes) == 1
    for o in outcomes:
        assert o.torn_read is None, o
        assert o.final_equal, o


def _tmpfs(folder, size: str) -> bool:
    """Mount a small tmpfs at ``folder`` where the machine allows it (root in a container does)."""
    folder.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


def test_a_full_disk_keeps_the_previous_results_and_says_so_in_one_line(tiny_run, tmp_path, monkeypatch, capsys):
    """Scores are on disk; recomputing them (--overwrite) runs out of space mid-write: on a real
    small tmpfs when one can be mounted here, else by an injected ENOSPC. The old scores stay whole
    (their commit check passes), no temporary file is left, and the error is one line."""
    disk = tmp_path / "disk"
    mounted = _tmpfs(disk, "6M")
    try:
        run_dir = disk / "run"
        shutil.copytree(tiny_run.path, run_dir)
        assert main(["--quiet", "attribute", "--run", str(run_dir), "--methods", "gd,nn-cos"]) == 0
        run = Run.load(run_dir)
        before = {m: np.asarray(run.scores(m)).copy() for m in ("gd", "nn-cos")}
        if mounted:                        # fill the disk, leaving room for small files only
            free = shutil.disk_usage(disk).free
            (disk / "filler").write_bytes(b"\0" * max(free - 900, 0))
        else:
            import instattr.files as files
            real = files.write_stream

            def full(path, write):
                if str(path).endswith(".npy"):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
                return real(path, write)
            monkeypatch.setattr(files, "write_stream", full)
        capsys.readouterr()
        code = main(["--quiet", "attribute", "--run", str(run_dir), "--methods", "gd,nn-cos", "--overwrite"])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "No space left on device" in err, err
        fresh = Run.load(run_dir)
        for m, want in before.items():
            assert fresh.has_scores(m, "test")
            np.testing.assert_array_equal(fresh.scores(m), want)
        assert not [p for p in (run_dir / "scores").iterdir() if p.name.startswith(".")]   # no temporary left
        print(f"\nfull disk: {'a 6 MB tmpfs' if mounted else 'an injected ENOSPC (no tmpfs here)'}")
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], capture_output=True)

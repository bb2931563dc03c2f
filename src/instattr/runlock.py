"""One writer per run (``RUN/.lock``), and cleaning up after killed processes.

``writing(path)`` holds an exclusive flock on ``RUN/.lock`` while a command writes into a run; a
second process gets a one-line error naming the holder. Holding it, a process also removes the
half-written temporaries of dead ones. ``recover_run_folder`` finishes what a killed ``train`` or
``import`` left beside a run: an overwrite interrupted between its two renames is undone, and the
build folders of dead processes are deleted.
"""
from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List

from .errors import RunError
from .files import process_umask

# ---------------------------------------------------------------- leftovers of killed processes
_PID = re.compile(r"[.-]pid(\d+)[.-]")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _dead_owner(name: str) -> bool:
    """Whether a temporary's name carries the pid of a process that no longer runs."""
    m = _PID.search(name)
    return m is not None and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1)))


def remove_stale_temporaries(folder) -> List[Path]:
    """Delete the half-written ``.*.pidN.*.tmp`` files of dead processes under ``folder``."""
    removed = []
    for p in Path(folder).rglob(".*.tmp"):
        if p.is_file() and _dead_owner(p.name):
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


def recover_run_folder(path) -> None:
    """Finish what a killed ``train``/``import`` left next to ``path``: restore a run that an
    interrupted overwrite had moved aside (``.NAME.old-pidN.`` with no ``NAME``), and delete the
    build folders (``.NAME.building.pidN-`` plus mkdtemp's random suffix) and replaced runs of
    dead processes. Nothing else is touched."""
    import shutil
    path = Path(path)
    if not path.parent.is_dir():
        return
    ours = re.compile(rf"^\.{re.escape(path.name)}\.(?:building\.pid(\d+)-[A-Za-z0-9_]+|old-pid(\d+)\.)$")
    for p in sorted(path.parent.iterdir()):
        m = ours.match(p.name)
        if m is None or not p.is_dir():
            continue
        pid = int(m.group(1) or m.group(2))
        if pid == os.getpid() or _alive(pid):
            continue
        try:
            if m.group(2) and not path.exists():
                os.replace(p, path)            # the swap was interrupted between its two renames
            else:
                shutil.rmtree(p)
        except OSError:
            pass


# ---------------------------------------------------------------- one writer per run
_HELD: Dict[str, list] = {}   # resolved run path -> [fd, depth]: the locks this process holds


@contextmanager
def writing(path, what: str = "instattr"):
    """Hold ``RUN/.lock`` while writing into a run: a second process gets a one-line error naming
    the holder instead of interleaving its files with ours. Re-entrant within a process."""
    key = str(Path(path).resolve())
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    lock = Path(path) / ".lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~process_umask())
    except OSError as e:
        raise RunError(f"{path}: cannot write into this run ({e.strerror})") from None
    try:
        import fcntl
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 400, 0).decode("utf-8", "replace").strip() or "another process"
            raise RunError(f"{path}: busy: {holder} is writing this run; try again when it has finished") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"instattr {what} (pid {os.getpid()})".encode(), 0)
        remove_stale_temporaries(path)     # only the lock holder writes here: what is half-written is dead
        _HELD[key] = [fd, 1]
        try:
            yield
        finally:
            del _HELD[key]
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)

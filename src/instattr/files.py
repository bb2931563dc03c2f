"""Files written whole or not at all (temp file + rename), read back with one-line errors, and checked.

A temporary carries its writer's pid (``.NAME.pidN.XXXX.tmp``) so that the leftovers of a killed
process can be told from a live writer's (:mod:`.runlock`).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from .errors import RunError


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()   # read once: os.umask can only be read by setting it, which races other threads


def process_umask() -> int:
    """The umask when instattr.files was imported: new files get ``0o666 & ~process_umask()``."""
    return _UMASK


def write_stream(path, write) -> Path:
    """Write ``path`` atomically with ``write(f)``, ``f`` a binary file open on a temporary beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.pid{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~process_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_bytes(path, data: bytes) -> Path:
    return write_stream(path, lambda f: f.write(data))


def write_text(path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_npy(path, array: np.ndarray) -> Path:
    return write_stream(path, lambda f: np.save(f, array))


def write_npz(path, **arrays) -> Path:
    return write_stream(path, lambda f: np.savez(f, **arrays))


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{path}: not valid JSON ({e})") from None


def file_digest(path) -> str:
    """sha256 of a file's bytes."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def npy_shape(path) -> Optional[Tuple[int, ...]]:
    """The shape in a .npy file's header, or None if the header is unreadable."""
    try:
        with open(path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, _ = read(f)
        return tuple(shape)
    except Exception:
        return None

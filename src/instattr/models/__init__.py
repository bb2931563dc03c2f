"""The model interface (:class:`Classifier`) and its implementations; ``classifier_for(run)``
builds a run's classifier from its manifest.

Importing this package loads torch; :mod:`instattr.methods` (the last-layer methods) does not.
"""
from __future__ import annotations

from ..store import Run, RunError
from .base import Classifier

__all__ = ["Classifier", "classifier_for", "built_classifier"]


def classifier_for(run: Run, device=None) -> Classifier:
    """The run's classifier, bound to the run (built once per Run object and device)."""
    from ..device import resolve_device
    device = resolve_device(device)
    return run.memo(_memo_key(device), lambda: _build(run, device))


def built_classifier(run: Run, device) -> "Classifier | None":
    """The classifier :func:`classifier_for` has built for ``run`` on ``device``, or None (builds nothing)."""
    from ..device import resolve_device
    return run.memoized(_memo_key(resolve_device(device)))


def _memo_key(device) -> tuple:
    return ("classifier", str(device))


def _build(run: Run, device) -> Classifier:
    m = run.manifest
    if m.mode == "head":
        spec = {"name": m.encoder.name, "path": m.encoder.path, "pooling": m.encoder.pooling,
                "max_length": m.encoder.max_length}
        from safetensors.torch import load_file

        from .head_classifier import HeadClassifier, read_checkpoints
        p = run.path / "model" / "head.safetensors"
        if not p.exists():
            raise RunError(f"{p}: missing (was the run trained?)")
        try:
            params = load_file(str(p))
        except Exception as e:
            raise RunError(f"{p}: unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        ck = run.path / "model" / "checkpoints.safetensors"
        history = read_checkpoints(ck) if ck.exists() else None
        return HeadClassifier(spec, params, m.l2, m.label_names, m.pair_mode, run, device, history)
    from .hf import HFClassifier, fingerprint
    hf = m.hf
    path = hf_path(run)
    if fingerprint(path) != hf.fingerprint:
        raise RunError(f"{path}: the checkpoint changed since this run was made from it; import it again")
    return HFClassifier(str(path), m.label_names, m.is_pair, m.l2, hf.max_length, hf.final_layer, run, device,
                        list(zip(hf.checkpoints, hf.checkpoint_lrs)))


def hf_path(run: Run):
    """The run's Hugging Face checkpoint folder (relative paths are inside the run)."""
    from pathlib import Path
    p = Path(run.manifest.hf.path)
    p = p if p.is_absolute() else run.path / p
    if not p.is_dir():
        raise RunError(f"{p}: the run's model checkpoint is missing")
    return p

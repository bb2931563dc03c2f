"""Where torch work runs: ``--device auto|cpu|cuda`` (auto: CUDA when present).

Devices serve encoding, training, fine-tuning, layered gradients and retraining. The closed forms
of the last-layer methods run in float64 numpy on the CPU wherever the model ran, so a run's
scores do not depend on the device beyond the float32 features it stored.
"""
from __future__ import annotations

from .errors import InstattrError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(spec=None):
    """A ``torch.device`` for ``auto`` (default), ``cpu``, ``cuda`` or ``cuda:N``."""
    import torch
    if isinstance(spec, torch.device):
        return spec
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise InstattrError(f"--device {spec}: this torch sees no CUDA device "
                                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})")
        return torch.device(spec)
    raise InstattrError(f"--device must be one of {', '.join(DEVICES)} (or cuda:N), got {spec!r}")

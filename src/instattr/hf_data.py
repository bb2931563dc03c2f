"""Hugging Face hub datasets (optional): ``--data owner/name`` when `datasets` is installed and online.

This module only reads rows; :func:`instattr.data.load_dataset` picks the columns and validates them
as it does for local files.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence

from .errors import DataError

SPLIT_NAMES = {"train": ("train",), "dev": ("validation", "dev"), "test": ("test",)}


@dataclass
class HubSplit:
    """One split of a hub dataset: where it came from, its columns, its rows, and the class names
    of its ClassLabel columns."""
    source: str
    columns: Sequence[str]
    rows: List[dict]
    class_names: Dict[str, List[str]] = field(default_factory=dict)


def hub_splits(name: str) -> Dict[str, HubSplit]:
    """Our split name -> its rows, for the splits the hub dataset has (train, validation/dev, test)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{name}: not a local folder; as a Hugging Face dataset name it needs "
                        "`pip install 'instattr[hf]'`") from None
    try:
        ds = datasets.load_dataset(name)
    except Exception as e:  # network or name errors, reported in one line
        raise DataError(f"{name}: could not load from the Hugging Face hub ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None
    out = {}
    for ours, theirs in SPLIT_NAMES.items():
        key = next((k for k in theirs if k in ds), None)
        if key is None:
            continue
        part = ds[key]
        names = {c: list(f.names) for c, f in part.features.items() if getattr(f, "names", None)}
        out[ours] = HubSplit(f"{name}[{key}]", list(part.column_names), list(part), names)
    return out

"""Hugging Face datasets (optional): ``--data gpt3mix/sst2`` when `datasets` is installed and online."""
from __future__ import annotations

from typing import Optional

from .data import DataError, Dataset, Example, Split, pick_fields

_SPLIT_NAMES = {"train": ("train",), "dev": ("validation", "dev"), "test": ("test",)}


def load_hf(name: str, text_field: Optional[str] = None, query_field: Optional[str] = None,
            label_field: Optional[str] = None) -> Dataset:
    """Load a Hugging Face dataset; columns are picked as for files (:func:`instattr.data.pick_fields`)."""
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise DataError(f"{name}: not a local folder; as a Hugging Face dataset name it needs "
                        "`pip install 'instattr[hf]'`") from None
    try:
        ds = datasets.load_dataset(name)
    except Exception as e:  # network or name errors, reported in one line
        raise DataError(f"{name}: could not load from the Hugging Face hub ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None
    splits, label_names = {}, None
    for ours, theirs in _SPLIT_NAMES.items():
        key = next((k for k in theirs if k in ds), None)
        if key is None:
            continue
        part = ds[key]
        cols = part.column_names
        tcol, qcol, lcol = pick_fields(f"{name}[{key}]", cols, text_field, query_field, label_field)
        feat = part.features.get(lcol)
        if label_names is None and getattr(feat, "names", None):
            label_names = list(feat.names)
        examples = [Example(idx=f"{ours}_{i}", document=r[tcol], label=int(r[lcol]),
                            query=r[qcol] if qcol else None) for i, r in enumerate(part)]
        examples = [e for e in examples if e.label >= 0]
        if not examples:
            raise DataError(f"{name}[{key}]: no labelled examples")
        splits[ours] = Split(ours, examples, f"{name}[{key}]")
    if "train" not in splits:
        raise DataError(f"{name}: has no train split")
    if label_names is None:
        label_names = [str(i) for i in range(1 + max(max(s.labels) for s in splits.values()))]
    return Dataset(name=name.replace("/", "_"), root=name, label_names=label_names, splits=splits)

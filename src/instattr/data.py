"""Datasets: resolve a name or folder, read and validate examples.

A dataset is a folder with ``train.jsonl`` and optional ``dev.jsonl``, ``test.jsonl`` and
``labels.json`` (the schema of the shared data README), or CSV/TSV files instead, any of them
optionally gzipped (``train.jsonl.gz``), or a Hugging Face ``owner/name`` when ``datasets`` is
installed. The text, query and label columns (JSONL keys) are the first present of
:data:`TEXT_FIELDS`, :data:`QUERY_FIELDS` and :data:`LABEL_FIELDS`, unless named. The named
datasets ``sst2``, ``mnli`` and ``hans`` are looked up under ``--data-root``, else
$INSTATTR_DATA, ./data and ../shared/data, else read from the copy packaged in
``instattr/datasets``.
Every validation failure raises :class:`DataError` with a message naming file and line.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

from .errors import DataError, InstattrError  # noqa: F401  (DataError is part of this module's API)

NAMED = ("sst2", "mnli", "hans")
SPLITS = ("train", "dev", "test")
FORMATS = ("jsonl", "csv", "tsv")
TEXT_FIELDS = ("document", "text", "sentence", "premise")   # the defaults, first present wins
QUERY_FIELDS = ("query", "hypothesis")
LABEL_FIELDS = ("label", "labels")
SHARED_DATA = os.path.join("..", "shared", "data")
PACKAGED = Path(__file__).resolve().parent / "datasets"


@dataclass(frozen=True)
class Example:
    idx: str
    document: str
    label: int
    query: Optional[str] = None


@dataclass
class Split:
    name: str
    examples: List[Example]
    source: str = ""

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def is_pair(self) -> bool:
        return bool(self.examples) and self.examples[0].query is not None

    @property
    def idx(self) -> List[str]:
        return [e.idx for e in self.examples]

    @property
    def labels(self) -> List[int]:
        return [e.label for e in self.examples]

    def limit(self, n: Optional[int], seed: int = 0) -> "Split":
        """A seeded random sample of ``n`` examples in file order (all when ``n`` is None).

        A sample, not the first ``n``: dataset files are often sorted (SST-2's test file opens
        with 280 positives in its first 300 lines)."""
        if n is None or n >= len(self.examples):
            return self
        if n <= 0:
            raise DataError(f"{self.source}: limit must be positive, got {n}")
        import numpy as np
        rows = np.sort(np.random.default_rng(seed).choice(len(self.examples), size=n, replace=False))
        return Split(self.name, [self.examples[i] for i in rows], self.source)


@dataclass
class Dataset:
    name: str
    root: str
    label_names: List[str]
    splits: dict = field(default_factory=dict)

    @property
    def is_pair(self) -> bool:
        return self.splits["train"].is_pair

    @property
    def eval_split(self) -> str:
        """The split evaluations use: test, else dev."""
        if "test" in self.splits:
            return "test"
        if "dev" in self.splits:
            return "dev"
        raise DataError(f"{self.root}: no test.jsonl or dev.jsonl to evaluate on")


def _folder_roots() -> List[str]:
    """The folders searched for named datasets when no root is given, in order."""
    return [r for r in (os.environ.get("INSTATTR_DATA"), "data", SHARED_DATA) if r]


def data_root(explicit: Optional[str] = None) -> Path:
    """The first folder of: ``explicit``, $INSTATTR_DATA, ./data, ../shared/data."""
    for c in [explicit, *_folder_roots()]:
        if c and Path(c).is_dir():
            return Path(c)
    if explicit:
        raise DataError(f"{explicit}: data root is not a folder")
    raise DataError("no data root found: pass --data-root, set INSTATTR_DATA, or create ./data")


def resolve(data: str, root: Optional[str] = None) -> Path | str:
    """A folder for ``data`` (a path, or a named dataset), or a Hugging Face dataset name."""
    p = Path(data).expanduser()
    if p.is_dir():
        return p
    if data in NAMED:
        return _named_folder(data, root)
    if p.exists():
        raise DataError(f"{data}: not a folder; a dataset is a folder holding train.jsonl (or .csv, .tsv)")
    if _looks_local(data):
        raise DataError(f"{data}: no such dataset folder")
    if data.count("/") == 1:
        return data  # a Hugging Face dataset name
    raise DataError(f"{data}: not a dataset folder nor one of {', '.join(NAMED)}")


def _named_folder(name: str, root: Optional[str]) -> Path:
    """``root/name`` when a root is given; else the first folder root holding ``name``, else the packaged copy."""
    if root:
        folder = Path(root).expanduser() / name
        if not folder.parent.is_dir():
            raise DataError(f"{root}: data root is not a folder")
        if not folder.is_dir():
            raise DataError(f"{folder}: dataset {name!r} not found under the data root")
        return folder
    for r in _folder_roots():
        if (Path(r) / name).is_dir():
            return Path(r) / name
    return PACKAGED / name


def _looks_local(data: str) -> bool:
    """Whether a missing ``data`` is meant as a local path rather than a hub ``owner/name``."""
    return (data.startswith((".", "/", "~")) or data.count("/") > 1 or "\\" in data
            or Path(data.split("/")[0]).exists())


def load_dataset(data: str, root: Optional[str] = None, text_field: Optional[str] = None,
                 query_field: Optional[str] = None, label_field: Optional[str] = None) -> Dataset:
    """Load and validate a dataset by name, folder or Hugging Face name.

    The ``*_field`` arguments name the columns (CSV, TSV, HF) or keys (JSONL) to read; None takes
    the first present of :data:`TEXT_FIELDS`, :data:`QUERY_FIELDS` and :data:`LABEL_FIELDS`."""
    where = resolve(data, root)
    fields = (text_field, query_field, label_field)
    if isinstance(where, str):
        ds = _load_hub(where, fields)
    else:
        ds = _load_folder(where, fields)
    _check_classes(ds)
    return ds


def _load_hub(name: str, fields: tuple) -> Dataset:
    """A Hugging Face hub dataset (:mod:`.hf_data` reads its rows), columns picked as for files."""
    from .hf_data import hub_splits
    splits, label_names = {}, None
    for ours, part in hub_splits(name).items():
        tcol, qcol, lcol = pick_fields(part.source, part.columns, *fields)
        label_names = label_names or part.class_names.get(lcol)
        examples = [Example(idx=f"{ours}_{i}", document=r[tcol], label=int(r[lcol]),
                            query=r[qcol] if qcol else None) for i, r in enumerate(part.rows)]
        examples = [e for e in examples if e.label >= 0]
        if not examples:
            raise DataError(f"{part.source}: no labelled examples")
        splits[ours] = Split(ours, examples, part.source)
    if "train" not in splits:
        raise DataError(f"{name}: has no train split")
    if label_names is None:
        label_names = [str(i) for i in range(1 + max(max(s.labels) for s in splits.values()))]
    return Dataset(name=name.replace("/", "_"), root=name, label_names=list(label_names), splits=splits)


def _load_folder(where: Path, fields: tuple) -> Dataset:
    """A dataset from a folder of split files."""
    label_names = _read_labels(where / "labels.json") if (where / "labels.json").exists() else None
    splits = {}
    for name in SPLITS:
        path = _split_file(where, name)
        if path is None:
            continue
        splits[name] = read_split(path, name, label_names, *fields)
    if "train" not in splits:
        raise DataError(f"{where}: no train.jsonl (or train.csv, train.tsv, optionally .gz)")
    if label_names is None:
        n = 1 + max(max(s.labels) for s in splits.values())
        label_names = [str(i) for i in range(max(n, 2))]
    for s in splits.values():
        if s.is_pair != splits["train"].is_pair:
            raise DataError(f"{s.source}: has {'pairs' if s.is_pair else 'single texts'} but "
                            f"train has {'pairs' if splits['train'].is_pair else 'single texts'}")
    return Dataset(name=where.name, root=str(where), label_names=label_names, splits=splits)


def _check_classes(ds: Dataset) -> None:
    """A classifier needs at least two classes among its training labels."""
    train = ds.splits["train"]
    if len(set(train.labels)) < 2:
        name = ds.label_names[train.labels[0]]
        raise DataError(f"{train.source}: train has only one class (label {name!r}); a classifier needs at least two")


def _split_file(folder: Path, name: str) -> Optional[Path]:
    for ext in FORMATS:
        for p in (folder / f"{name}.{ext}", folder / f"{name}.{ext}.gz"):
            if p.exists():
                return p
    return None


def _format(path: Path) -> str:
    """``jsonl``, ``csv`` or ``tsv``: the suffix before any ``.gz``."""
    return Path(path.name[:-3] if path.name.endswith(".gz") else path.name).suffix[1:]


def pick_fields(where: str, columns: Sequence[str], text_field: Optional[str] = None,
                query_field: Optional[str] = None, label_field: Optional[str] = None):
    """The (text, query, label) columns among ``columns``: those named, else the first default
    present; the query column is None when none is named nor present."""
    return (_pick(where, columns, "text", text_field, TEXT_FIELDS, True),
            _pick(where, columns, "query", query_field, QUERY_FIELDS, False),
            _pick(where, columns, "label", label_field, LABEL_FIELDS, True))


def _pick(where: str, columns: Sequence[str], kind: str, named: Optional[str], defaults: Sequence[str],
          required: bool) -> Optional[str]:
    if named is None:
        found = next((c for c in defaults if c in columns), None)
        if found is not None or not required:
            return found
    elif named in columns:
        return named
    tried = repr(named) if named is not None else f"(tried {', '.join(map(repr, defaults))})"
    have = ", ".join(map(str, columns)) or "none"
    raise DataError(f"{where}: no {kind} column {tried}; columns are: {have}; name it with --{kind}-field")


def _read_labels(path: Path) -> List[str]:
    try:
        names = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) for n in names):
        raise DataError(f"{path}: must be a JSON list of at least two label names")
    if len(set(names)) != len(names):
        raise DataError(f"{path}: label names repeat")
    return names


def _read_text(path: Path) -> str:
    """The UTF-8 text of ``path``, gunzipped when it ends in ``.gz``, less a leading byte order mark."""
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: not a readable gzip file ({e})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: bytes that are not UTF-8 (offset {e.start})") from None
    return text[1:] if text.startswith("\ufeff") else text


def read_split(path: Path, name: str, label_names: Optional[Sequence[str]] = None,
               text_field: Optional[str] = None, query_field: Optional[str] = None,
               label_field: Optional[str] = None) -> Split:
    """Read one split file (jsonl, csv or tsv, optionally gzipped) and validate every row.

    The columns are picked (:func:`pick_fields`) from a CSV's header or a JSONL file's first object."""
    path = Path(path)
    text = _read_text(path)
    fmt = _format(path)
    if fmt == "jsonl":
        rows = list(_jsonl_rows(path, text))
        head = rows[0][0] if rows else 1
    else:
        head, rows = _table_rows(path, text, "\t" if fmt == "tsv" else ",")
    if not rows:
        raise DataError(f"{path}: empty file, no examples")
    return split_of_rows(((f"{path}:{lineno}", row) for lineno, row in rows), name, str(path), f"{path}:{head}",
                         label_names, text_field, query_field, label_field)


def read_documents(path: Path) -> List[dict]:
    """A language model's rows from a JSONL file (gzipped or not): each an object with ``text`` (a
    document) or ``prompt`` and ``completion``; other fields are kept. ``idx`` is the row's own
    ``idx`` field (as a string), else its position among the file's rows; ids must not repeat."""
    path = Path(path)
    if _format(path) != "jsonl":
        raise DataError(f"{path}: a language model's rows are JSONL (one object per line), not {_format(path)}")
    rows, seen = [], {}
    for lineno, row in _jsonl_rows(path, _read_text(path)):
        where = f"{path}:{lineno}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
        if "prompt" in row or "completion" in row:
            bad = next((k for k in ("prompt", "completion") if not isinstance(row.get(k), str)), None)
            if bad is not None:
                raise DataError(f"{where}: a row with a prompt needs 'prompt' and 'completion' as strings "
                                f"({bad!r} is {type(row.get(bad)).__name__})")
            if not row["completion"].strip():
                raise DataError(f"{where}: the completion is empty")
        elif not isinstance(row.get("text"), str) or not row["text"].strip():
            raise DataError(f"{where}: a row needs 'text' (a document), or 'prompt' and 'completion'")
        idx = row.get("idx", len(rows))
        if isinstance(idx, bool) or not isinstance(idx, (str, int)):
            raise DataError(f"{where}: 'idx' must be a string or an integer")
        idx = str(idx)
        if idx in seen:
            raise DataError(f"{where}: idx {idx!r} repeats (first at line {seen[idx]})")
        seen[idx] = lineno
        rows.append({**row, "idx": idx})
    if not rows:
        raise DataError(f"{path}: empty file, no rows")
    return rows


def document_split(folder: Path, name: str) -> Optional[Path]:
    """The file of split ``name`` in a language model's data folder (``{name}.jsonl[.gz]``), if any."""
    for p in (Path(folder) / f"{name}.jsonl", Path(folder) / f"{name}.jsonl.gz"):
        if p.exists():
            return p
    return None


def records(data, where: str) -> List[dict]:
    """Rows in memory as dicts: a pandas DataFrame, a ``datasets.Dataset`` or a list of dicts
    (None: no rows); anything else, or a row that is not a dict, is a one-line error."""
    from collections.abc import Mapping
    if data is None:
        return []
    if hasattr(data, "to_dict") and hasattr(data, "columns"):          # pandas
        return data.to_dict(orient="records")
    if isinstance(data, (Mapping, str)):
        raise InstattrError(f"{where}: give a list of rows (dicts), a pandas DataFrame or a datasets.Dataset, not "
                            f"one {type(data).__name__}")
    rows = list(data)                                                   # a list, or a datasets.Dataset's rows
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, Mapping)), None)
    if bad is not None:
        raise InstattrError(f"{where}: row {bad} is a {type(rows[bad]).__name__}, not a dict")
    return [dict(r) for r in rows]


def split_of_rows(rows, name: str, source: str, head: str, label_names: Optional[Sequence[str]] = None,
                  text_field: Optional[str] = None, query_field: Optional[str] = None,
                  label_field: Optional[str] = None) -> Split:
    """A validated split from ``(where, row)`` pairs (a file's lines, or rows in memory): the columns
    are picked from the first row, every row checked, each error naming its ``where``."""
    examples, seen, cols = [], {}, None
    for where, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        if cols is None:
            tcol, qcol, lcol = pick_fields(head, list(row), text_field, query_field, label_field)
            cols = (tcol, qcol or QUERY_FIELDS[0], lcol)   # a query first seen on a later line is an error
        ex = _example(row, *cols, label_names, where, f"{name}_{len(examples)}")
        if examples and (ex.query is None) != (examples[0].query is None):
            has = examples[0].query is not None
            raise DataError(f"{where}: {cols[1]!r} {'missing' if has else 'present'} here but "
                            f"{'present' if has else 'absent'} on earlier lines; pairs need it on every line")
        if ex.idx in seen:
            raise DataError(f"{where}: duplicate idx {ex.idx!r} (first at {seen[ex.idx]})")
        seen[ex.idx] = where
        examples.append(ex)
    if not examples:
        raise DataError(f"{source}: no examples")
    return Split(name, examples, source)


def _example(row: dict, tcol: str, qcol: str, lcol: str, label_names: Optional[Sequence[str]], where: str,
             default_idx: str) -> Example:
    """One validated example from a row."""
    doc = row.get(tcol)
    if doc is None:
        raise DataError(f"{where}: missing {tcol!r}")
    if not isinstance(doc, str):
        raise DataError(f"{where}: {tcol!r} must be a string")
    if not doc.strip():
        raise DataError(f"{where}: empty text in {tcol!r}")
    if row.get(lcol) is None or row[lcol] == "":
        raise DataError(f"{where}: missing {lcol!r}")
    label = _parse_label(row[lcol], label_names, where)
    query = row.get(qcol)
    if query is not None and not isinstance(query, str):
        raise DataError(f"{where}: {qcol!r} must be a string")
    return Example(idx=str(row.get("idx", default_idx)), document=doc, label=label, query=query)


def _lines(text: str):
    """Lines split on ``\\n`` only (U+2028 and friends may sit inside JSON strings), less a CR."""
    for line in text.split("\n"):
        yield line[:-1] if line.endswith("\r") else line


def _jsonl_rows(path: Path, text: str):
    for lineno, line in enumerate(_lines(text), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg}, column {e.colno})") from None


def _table_rows(path: Path, text: str, delimiter: str):
    """(the header's line, [(line a record starts on, {column: value})]); quoted fields may span lines."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    kind, header, head, end, rows = "TSV" if delimiter == "\t" else "CSV", None, 1, 0, []
    while True:
        start = end + 1
        try:
            row = next(reader, None)
        except csv.Error as e:
            raise DataError(f"{path}:{start}: unreadable {kind} ({e})") from None
        end = reader.line_num
        if row is None:
            return head, rows
        if not row:
            continue  # a blank line
        if header is None:
            header, head = row, start
            continue
        rows.append((start, dict(zip(header, row + [None] * (len(header) - len(row))))))


def _parse_label(value, label_names: Optional[Sequence[str]], where: str) -> int:
    if isinstance(value, bool):
        raise DataError(f"{where}: label {value!r} is not an integer")
    if isinstance(value, str):
        if label_names and value in label_names:
            return label_names.index(value)
        try:
            value = int(value)
        except ValueError:
            raise DataError(f"{where}: label {value!r} is neither an integer nor a name in labels.json") from None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int):
        raise DataError(f"{where}: label {value!r} is not an integer")
    if value < 0 or (label_names is not None and value >= len(label_names)):
        n = len(label_names) if label_names else "?"
        raise DataError(f"{where}: label {value} outside labels.json (0..{n - 1 if label_names else n})")
    return value

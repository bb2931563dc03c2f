"""``run.json`` as a typed, validated object, read once per :class:`~instattr.store.Run`.

A classifier run is one of three kinds (``mode``):

- ``head``: a frozen sentence encoder (``encoder``) and instattr's head (``head``), trained here;
- ``finetune``: a Hugging Face sequence classifier fine-tuned here, saved under ``RUN/model/hf``;
- ``import``: a Hugging Face sequence classifier trained elsewhere (``hf.path``), imported as is.

A language-model run (``mode: lm``, :class:`LMManifest`) is a causal LM imported with its training
documents and queries (``lm``); the classifier commands refuse it in one line.

``sbert`` is the untuned sentence encoder of the sbert-* baselines (:mod:`instattr.sentence`);
``encoder`` the transformer under instattr's head (head mode: frozen, and the same as ``sbert``) or
the one fine-tuning started from (finetune mode); an imported run has none. ``l2`` is the L2
coefficient on the final linear layer's parameters that the closed forms use: the head's training
penalty, or for an imported model the damping that stands in for it.

Format 3 (this one) split ``sbert`` from ``encoder``; format 2 runs (``encoder`` naming both) are
read as they are. A run of another format is refused with a one-line error rather than misread.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, Mapping, Optional, Tuple

from .errors import InstattrError

FORMAT = 3
READABLE = (2, 3)
MODES = ("head", "finetune", "import")
LM_MODE = "lm"
LM_COMMANDS = ("attribute, explain --prompt, suspects, evaluate fact-tracing|tail-patch|poison and serve read "
               "it")


class ManifestError(InstattrError):
    """run.json is missing a field, has a wrong type, or is of another format."""


def _get(d: Mapping, key: str, kind, where: str, optional: bool = False):
    if key not in d or d[key] is None:
        if optional:
            return None
        raise ManifestError(f"{where}: missing {key!r}")
    value = d[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
        raise ManifestError(f"{where}: {key!r} must be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


@dataclass(frozen=True)
class EncoderInfo:
    """An untuned transformer with pooling: its display name, the folder it loads from, etc."""
    name: str
    path: str
    pooling: str
    max_length: int
    hidden_size: int

    @classmethod
    def parse(cls, d: Mapping, where: str) -> "EncoderInfo":
        return cls(name=_get(d, "name", str, where), path=_get(d, "path", str, where),
                   pooling=_get(d, "pooling", str, where), max_length=_get(d, "max_length", int, where),
                   hidden_size=_get(d, "hidden_size", int, where))


@dataclass(frozen=True)
class DataInfo:
    """Which dataset, where it was read from, and how many rows each stored split holds."""
    name: str
    root: str
    arg: str
    is_pair: bool
    n: Dict[str, int]
    fields: Dict[str, Optional[str]] = field(default_factory=dict)   # text/query/label field names

    @classmethod
    def parse(cls, d: Mapping, where: str) -> "DataInfo":
        n = _get(d, "n", dict, where)
        if not all(isinstance(v, int) for v in n.values()):
            raise ManifestError(f"{where}: 'n' must map splits to row counts")
        return cls(name=_get(d, "name", str, where), root=_get(d, "root", str, where),
                   arg=str(d.get("arg", d.get("name"))), is_pair=_get(d, "is_pair", bool, where), n=dict(n),
                   fields=dict(_get(d, "fields", dict, where, optional=True) or {}))


@dataclass(frozen=True)
class HeadInfo:
    """instattr's head: its training hyper-parameters and input width (head mode)."""
    l2: float
    lr: float
    epochs: int
    batch_size: int
    hidden: int
    seed: int
    d_in: int

    @classmethod
    def parse(cls, d: Mapping, where: str) -> "HeadInfo":
        return cls(**{f.name: _get(d, f.name, float if f.type in ("float", float) else int, where)
                      for f in fields(cls)})


@dataclass(frozen=True)
class HFInfo:
    """A Hugging Face sequence classifier (finetune and import modes).

    ``path`` is the checkpoint folder, relative to the run directory when it lies inside it;
    ``final_layer`` names its last ``nn.Linear`` (the one whose input is ``features``);
    ``fingerprint`` the sizes and mtimes of its weight files when the run was made."""
    path: str
    family: str
    final_layer: str
    max_length: int
    n_layers: int
    fingerprint: str
    origin: str = "import"        # "finetune" or "import"
    checkpoints: Tuple[str, ...] = ()   # folders of earlier checkpoints (TracIn), same layout
    checkpoint_lrs: Tuple[float, ...] = ()
    adapter_base: Optional[str] = None  # a PEFT adapter's base model folder
    own_pooling_differs: int = 0        # rows where a decoder's own pooling picked another token than instattr

    @classmethod
    def parse(cls, d: Mapping, where: str) -> "HFInfo":
        cks = tuple(_get(d, "checkpoints", list, where, optional=True) or ())
        lrs = tuple(float(x) for x in (_get(d, "checkpoint_lrs", list, where, optional=True) or ()))
        return cls(path=_get(d, "path", str, where), family=_get(d, "family", str, where),
                   final_layer=_get(d, "final_layer", str, where), max_length=_get(d, "max_length", int, where),
                   n_layers=_get(d, "n_layers", int, where), fingerprint=_get(d, "fingerprint", str, where),
                   origin=_get(d, "origin", str, where), checkpoints=tuple(map(str, cks)), checkpoint_lrs=lrs,
                   adapter_base=_get(d, "adapter_base", str, where, optional=True),
                   own_pooling_differs=_get(d, "own_pooling_differs", int, where, optional=True) or 0)


@dataclass(frozen=True)
class Manifest:
    """Everything ``run.json`` records; see the module docstring for the three modes."""
    format: int
    mode: str
    data: DataInfo
    label_names: Tuple[str, ...]
    eval_split: str
    sbert: EncoderInfo
    pair_mode: Optional[str]
    l2: float
    seed: int
    encoder: Optional[EncoderInfo] = None
    head: Optional[HeadInfo] = None
    hf: Optional[HFInfo] = None
    config: Dict[str, Any] = field(default_factory=dict)
    versions: Dict[str, str] = field(default_factory=dict)
    extra: Dict[str, Any] = field(default_factory=dict)   # e.g. "tune": the grid search's trials

    @property
    def n_classes(self) -> int:
        return len(self.label_names)

    @property
    def is_pair(self) -> bool:
        return self.data.is_pair

    @classmethod
    def parse(cls, d: Any, where: str = "run.json") -> "Manifest":
        """Validate a parsed run.json; every problem is a one-line :class:`ManifestError`."""
        if not isinstance(d, dict):
            raise ManifestError(f"{where}: must be a JSON object")
        fmt = d.get("format")
        if fmt not in READABLE:
            if isinstance(fmt, int) and fmt > FORMAT:
                raise ManifestError(f"{where}: format {fmt} was written by a newer instattr (this one reads "
                                    f"formats {READABLE[0]}-{FORMAT}); upgrade instattr")
            raise ManifestError(f"{where}: format {fmt!r} is not one of {READABLE[0]}-{FORMAT} (an older instattr "
                                "made it, or it is not a run); train or import the run again")
        mode = _get(d, "mode", str, where)
        if mode == LM_MODE:
            raise ManifestError(f"{where}: a language-model run, which this command does not read "
                                f"({LM_COMMANDS})")
        if mode not in MODES:
            raise ManifestError(f"{where}: mode {mode!r} is not one of {', '.join(MODES)}")
        labels = _get(d, "label_names", list, where)
        if len(labels) < 2 or not all(isinstance(x, str) for x in labels):
            raise ManifestError(f"{where}: 'label_names' must be at least two strings")
        eval_split = _get(d, "eval_split", str, where)
        pair_mode = d.get("pair_mode")
        if pair_mode not in (None, "siamese", "cross"):
            raise ManifestError(f"{where}: pair_mode {pair_mode!r} is not siamese, cross or null")
        encoder = None
        if mode != "import":            # head and finetune runs name the encoder they were trained on
            encoder = EncoderInfo.parse(_get(d, "encoder", dict, where), f"{where} encoder")
        head = _get(d, "head", dict, where, optional=mode != "head")
        hf = _get(d, "hf", dict, where, optional=mode == "head")
        known = {f.name for f in fields(cls)}
        return cls(format=fmt, mode=mode, data=DataInfo.parse(_get(d, "data", dict, where), f"{where} data"),
                   label_names=tuple(labels), eval_split=eval_split,
                   sbert=EncoderInfo.parse(_get(d, "sbert" if fmt == 3 else "encoder", dict, where),
                                           f"{where} {'sbert' if fmt == 3 else 'encoder'}"),
                   encoder=encoder,
                   pair_mode=pair_mode, l2=_get(d, "l2", float, where), seed=_get(d, "seed", int, where),
                   head=HeadInfo.parse(head, f"{where} head") if head is not None else None,
                   hf=HFInfo.parse(hf, f"{where} hf") if hf is not None else None,
                   config=dict(d.get("config") or {}), versions=dict(d.get("versions") or {}),
                   extra={k: v for k, v in d.items() if k not in known})

    def to_dict(self) -> dict:
        out = asdict(self)
        extra = out.pop("extra")
        out["format"] = FORMAT
        for key in ("head", "hf", "encoder"):
            if out[key] is None:
                del out[key]
        if out.get("hf"):
            out["hf"]["checkpoints"] = list(out["hf"]["checkpoints"])
            out["hf"]["checkpoint_lrs"] = list(out["hf"]["checkpoint_lrs"])
        out["label_names"] = list(out["label_names"])
        return {**out, **extra}


@dataclass(frozen=True)
class LMInfo:
    """A causal language model (``mode: lm``): its checkpoint folder (``path``, absolute), the
    ``fingerprint`` of its weight files, the windows rows are cut into (``max_length`` tokens every
    ``stride``), its blocks, and what the optional methods read: earlier checkpoints and their
    learning rates (tracin), Adam's state (trackstar: an ``optimizer.pt``), an adapter's base."""
    path: str
    family: str
    fingerprint: str
    max_length: int
    stride: int
    n_layers: int
    checkpoints: Tuple[str, ...] = ()
    checkpoint_lrs: Tuple[float, ...] = ()
    optimizer: Optional[str] = None
    adapter_base: Optional[str] = None
    chat_template: bool = False

    @classmethod
    def parse(cls, d: Mapping, where: str) -> "LMInfo":
        cks = tuple(map(str, _get(d, "checkpoints", list, where, optional=True) or ()))
        lrs = tuple(_get(d, "checkpoint_lrs", list, where, optional=True) or ())
        if len(lrs) != len(cks) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in lrs):
            raise ManifestError(f"{where}: 'checkpoint_lrs' must be one number per checkpoint")
        return cls(path=_get(d, "path", str, where), family=_get(d, "family", str, where),
                   fingerprint=_get(d, "fingerprint", str, where), max_length=_get(d, "max_length", int, where),
                   stride=_get(d, "stride", int, where), n_layers=_get(d, "n_layers", int, where),
                   checkpoints=cks, checkpoint_lrs=tuple(float(x) for x in lrs),
                   optimizer=_get(d, "optimizer", str, where, optional=True),
                   adapter_base=_get(d, "adapter_base", str, where, optional=True),
                   chat_template=bool(_get(d, "chat_template", bool, where, optional=True)))


@dataclass(frozen=True)
class LMManifest:
    """``run.json`` of a language-model run: the model (``lm``), the rows each split holds (``data``:
    copied into ``RUN/data/{split}.jsonl``), the split of the queries (``eval_split``)."""
    format: int
    mode: str
    data: DataInfo
    eval_split: str
    seed: int
    lm: LMInfo
    config: Dict[str, Any] = field(default_factory=dict)
    versions: Dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, d: Any, where: str = "run.json") -> "LMManifest":
        if not isinstance(d, dict):
            raise ManifestError(f"{where}: must be a JSON object")
        if d.get("format") != FORMAT:
            raise ManifestError(f"{where}: format {d.get('format')!r} is not {FORMAT}; import the run again")
        if d.get("mode") != LM_MODE:
            raise ManifestError(f"{where}: not a language-model run (mode {d.get('mode')!r}); this command reads "
                                "one made by `instattr import` of a causal LM")
        return cls(format=FORMAT, mode=LM_MODE, data=DataInfo.parse(_get(d, "data", dict, where), f"{where} data"),
                   eval_split=_get(d, "eval_split", str, where), seed=_get(d, "seed", int, where),
                   lm=LMInfo.parse(_get(d, "lm", dict, where), f"{where} lm"),
                   config=dict(d.get("config") or {}), versions=dict(d.get("versions") or {}))

    def to_dict(self) -> dict:
        out = asdict(self)
        out["lm"]["checkpoints"] = list(out["lm"]["checkpoints"])
        out["lm"]["checkpoint_lrs"] = list(out["lm"]["checkpoint_lrs"])
        return out

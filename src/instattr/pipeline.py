"""Make a run directory: train one (head or finetune mode), or import a Hugging Face classifier.

Every run is built in a hidden sibling folder and moved into place only when complete, so a
failure never damages an existing run; an existing run is replaced only with ``overwrite``.
"""
from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from .arrays import FeatureSet
from .backend import LOCAL, backend_or_local
from .data import Dataset, Split, load_dataset
from .errors import InstattrError
from .files import process_umask
from .manifest import FORMAT, DataInfo, EncoderInfo, HeadInfo, HFInfo, Manifest
from .models.head import HeadConfig
from .runlock import recover_run_folder, writing
from .sentence import save_sentence_embeddings
from .store import Run, RunError, write_json, write_npz
from .version import __version__

TUNE_GRID = {"l2": (0.1, 0.01, 0.001), "lr": (2e-3, 2e-4, 2e-5, 2e-6), "epochs": (3, 7, 10, 15),
             "batch_size": (8, 16)}


@dataclass(frozen=True)
class TrainConfig:
    """Everything `instattr train` needs; saved into run.json."""
    data: str = "sst2"
    data_root: Optional[str] = None
    text_field: Optional[str] = None     # None: the first of document, text, sentence, premise
    query_field: Optional[str] = None    # None: query or hypothesis when present
    label_field: Optional[str] = None    # None: label or labels
    encoder: Optional[str] = None        # None: the packaged all-MiniLM-L6-v2
    pooling: Optional[str] = None        # None: mean for sentence-transformers, else cls
    pair_mode: Optional[str] = None      # None: siamese in head mode; finetune mode is always cross
    mode: str = "head"
    max_length: int = 128
    encode_batch_size: int = 64
    head: HeadConfig = field(default_factory=HeadConfig)
    limit_train: Optional[int] = None
    limit_eval: Optional[int] = None
    tune: bool = False
    finetune_lr: float = 2e-5
    finetune_epochs: int = 1
    text_field: Optional[str] = None
    query_field: Optional[str] = None
    label_field: Optional[str] = None
    device: str = "auto"

    def resolved_pair_mode(self, is_pair: bool) -> Optional[str]:
        if not is_pair:
            return None
        if self.mode == "finetune":
            if self.pair_mode not in (None, "cross"):
                raise InstattrError("--mode finetune reads pairs through the tokenizer's pair input; "
                                    "--pairs siamese applies to head mode only")
            return "cross"
        mode = self.pair_mode or "siamese"
        if mode not in ("siamese", "cross"):
            raise InstattrError(f"--pairs must be siamese or cross, got {mode!r}")
        return mode

    def fields(self) -> Dict[str, Optional[str]]:
        return {"text": self.text_field, "query": self.query_field, "label": self.label_field}


# ------------------------------------------------------------------ shared steps
def load_splits(data: str, root: Optional[str], fields: Dict[str, Optional[str]], limit_train: Optional[int],
                limit_eval: Optional[int], seed: int):
    """(dataset, {split: Split}) with the seeded ``--limit-*`` samples applied."""
    for flag, v in (("--limit-train", limit_train), ("--limit-eval", limit_eval)):
        if v is not None and v <= 0:
            raise InstattrError(f"{flag} must be positive, got {v}")
    ds = load_dataset(data, root, **{f"{k}_field": v for k, v in fields.items() if v})
    splits = {"train": ds.splits["train"].limit(limit_train, seed)}
    for name in ("dev", "test"):
        if name in ds.splits:
            splits[name] = ds.splits[name].limit(limit_eval, seed)
    return ds, splits


def _texts(split: Split):
    return [e.document for e in split.examples], ([e.query for e in split.examples] if split.is_pair else None)


def _data_info(ds: Dataset, data: str, splits: Dict[str, Split], fields) -> DataInfo:
    root = str(Path(ds.root).resolve()) if Path(ds.root).exists() else ds.root
    return DataInfo(name=ds.name, root=root, arg=data, is_pair=ds.is_pair, n={k: len(v) for k, v in splits.items()},
                    fields={k: v for k, v in fields.items() if v})


def _versions() -> dict:
    import torch
    return {"instattr": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def _encoder_info(encoder) -> EncoderInfo:
    return EncoderInfo(name=encoder.name, path=encoder.path, pooling=encoder.pooling, max_length=encoder.max_length,
                       hidden_size=encoder.hidden_size)


def _write_split(folder: Path, split: Split, feats: np.ndarray, probs: np.ndarray, n_classes: int,
                 metrics: dict) -> None:
    fs = FeatureSet(idx=np.asarray(split.idx), label=np.asarray(split.labels, dtype=np.int64),
                    pred=probs.argmax(1).astype(np.int64), probs=probs.astype(np.float32),
                    features=feats.astype(np.float32))
    write_npz(folder / "features" / f"{split.name}.npz", **fs.to_npz())
    metrics[f"{split.name}_accuracy"] = float((fs.pred == fs.label).mean())
    metrics[f"{split.name}_confusion"] = _confusion(fs.label, fs.pred, n_classes)


def _save_final_layer(folder: Path, w, b=None) -> None:
    from safetensors.numpy import save_file
    tensors = {"weight": np.ascontiguousarray(np.asarray(w, dtype=np.float32))}
    if b is not None:
        tensors["bias"] = np.ascontiguousarray(np.asarray(b, dtype=np.float32))
    (folder / "model").mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model" / "final_layer.safetensors"))


def build_atomically(out, overwrite: bool, make, load=Run.load) -> Run:
    """Call ``make(tmp)`` on a hidden sibling of ``out``, rename it into place when it returns, and
    ``load`` it (a language-model run: ``LMRun.load``).
    A run being replaced (``overwrite``) is locked from the start, so a busy run is refused before
    any work and no other process writes into it while its replacement is built."""
    out = Path(out)
    recover_run_folder(out)
    if out.exists() and not out.is_dir():
        raise RunError(f"{out}: is a file, not a run directory")
    replacing = out.exists() and any(out.iterdir())
    if replacing:
        if not overwrite:
            raise RunError(f"{out}: already exists; pass --overwrite to replace it")
        if not (out / "run.json").is_file():
            raise RunError(f"{out}: is not an instattr run (no run.json); refusing to replace it, choose another "
                           "--out")
    with writing(out, "train/import --overwrite") if replacing else nullcontext():
        return _build_beside(out, make, load)


def _build_beside(out: Path, make, load) -> Run:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.building.pid{os.getpid()}-"))
    except OSError as e:
        raise RunError(f"{out.parent}: cannot create the run here ({e.strerror})") from None
    os.chmod(tmp, 0o777 & ~process_umask())
    try:
        make(tmp)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load(out)


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing run there is moved aside first and put back if the
    second rename fails."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-pid{os.getpid()}.")
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _confusion(y, p, c) -> list:
    m = np.zeros((c, c), dtype=int)
    np.add.at(m, (y, p), 1)
    return m.tolist()


# ------------------------------------------------------------------ head mode
def tune_head(x_train, y_train, x_dev, y_dev, n_classes: int, base, progress: bool = True, device="cpu"):
    """The paper's grid search on dev accuracy; epochs are read off one longest run's checkpoints."""
    from tqdm.auto import tqdm

    from .models.head import predict, train_heads
    trials, best = [], None
    grid = [(l2, lr, bs) for l2 in TUNE_GRID["l2"] for lr in TUNE_GRID["lr"] for bs in TUNE_GRID["batch_size"]]
    for l2, lr, bs in tqdm(grid, desc="tune", disable=not progress, leave=False):
        cfg = replace(base, l2=l2, lr=lr, batch_size=bs, epochs=max(TUNE_GRID["epochs"]))
        res = train_heads(x_train, y_train, n_classes, cfg, checkpoints=True, device=device)
        for ep in TUNE_GRID["epochs"]:
            acc = float((predict(res.checkpoints[ep - 1], x_dev)[1].argmax(1) == y_dev).mean())
            trials.append({"l2": l2, "lr": lr, "batch_size": bs, "epochs": ep, "dev_accuracy": acc})
            if best is None or acc > best[1]:
                best = (replace(cfg, epochs=ep), acc)
    return best[0], trials


def _encode_splits(encoder, splits: Dict[str, Split], pair_mode, progress: bool, backend) -> Dict[str, np.ndarray]:
    """Each split's encoder output, every split in one call of ``backend`` (a pool of workers loads
    the encoder once); each split cached on its own."""
    from .encoders import encode_groups
    return dict(zip(splits, encode_groups(encoder, [_texts(s) for s in splits.values()], pair_mode, backend,
                                          progress)))


def _train_head(tmp: Path, config: TrainConfig, ds: Dataset, splits: Dict[str, Split], encoder, pair_mode,
                progress: bool, metrics: dict, backend) -> dict:
    """Encode, train the head, write its files; returns the manifest fields of head mode."""
    from safetensors.torch import save_file

    from .models.head import pair_input, predict, train_heads
    t = time.perf_counter()
    encoded = _encode_splits(encoder, splits, pair_mode, progress, backend)
    metrics["timings"]["encode_s"] = time.perf_counter() - t
    t = time.perf_counter()
    head_cfg, extra = config.head, {}
    if head_cfg.hidden is None:  # the pooler is as wide as the encoder (384 for MiniLM), pairs too
        head_cfg = replace(head_cfg, hidden=encoder.hidden_size)
    inputs = {name: pair_input(e, pair_mode) for name, e in encoded.items()}
    labels = {name: np.asarray(s.labels) for name, s in splits.items()}
    if config.tune:
        if "dev" not in splits:
            raise InstattrError(f"{ds.root}: --tune needs a dev split")
        head_cfg, trials = tune_head(inputs["train"], labels["train"], inputs["dev"], labels["dev"],
                                     len(ds.label_names), head_cfg, progress, encoder.device)
        extra["tune"] = {"chosen": head_cfg.to_dict(), "trials": trials}
    result = train_heads(inputs["train"], labels["train"], len(ds.label_names), head_cfg, checkpoints=True,
                         progress=progress, device=encoder.device)
    metrics["timings"]["train_s"] = time.perf_counter() - t
    params = result.params
    (tmp / "model").mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().contiguous() for k, v in params.items()}, str(tmp / "model" / "head.safetensors"))
    ck = {f"{k}.{i}": v.detach().float().clone() for i, c in enumerate(result.checkpoints) for k, v in c.items()}
    save_file(ck, str(tmp / "model" / "checkpoints.safetensors"),   # TracIn needs the head along its trajectory
              metadata={"lrs": ",".join(map(str, result.checkpoint_lrs))})
    _save_final_layer(tmp, params["w"].numpy())
    for name, s in splits.items():
        feats, probs = predict(params, inputs[name])
        _write_split(tmp, s, feats, probs, len(ds.label_names), metrics)
        save_sentence_embeddings(tmp, name, s.idx, encoded[name])     # the head's input (and sbert-*'s)
    head = HeadInfo(l2=head_cfg.l2, lr=head_cfg.lr, epochs=head_cfg.epochs, batch_size=head_cfg.batch_size,
                    hidden=int(params["w"].shape[1]), seed=head_cfg.seed, d_in=int(inputs["train"].shape[1]))
    return {"head": head, "l2": head_cfg.l2, "extra": extra}


# ------------------------------------------------------------------ Hugging Face classifiers
def _featurize_hf(tmp: Path, classifier, splits: Dict[str, Split], n_classes: int, progress: bool,
                  metrics: dict, backend) -> None:
    """Features and probabilities of every split through an HF classifier, every split in one call
    of ``backend`` (e.g. a pool of Ray workers)."""
    t = time.perf_counter()
    outputs = backend.classify_groups(classifier, [_texts(s) for s in splits.values()], progress)
    for s, (feats, probs) in zip(splits.values(), outputs):
        _write_split(tmp, s, feats, probs, n_classes, metrics)
    lin = classifier.final_layer()
    _save_final_layer(tmp, lin.w, lin.b)
    metrics["timings"]["featurize_s"] = time.perf_counter() - t


def _hf_info(classifier, path: str, origin: str, checkpoints=()) -> HFInfo:
    from .models.hf import fingerprint
    return HFInfo(path=path, origin=origin, fingerprint=fingerprint(classifier.path), max_length=classifier.max_length,
                  checkpoints=tuple(p for p, _ in checkpoints), checkpoint_lrs=tuple(lr for _, lr in checkpoints),
                  own_pooling_differs=classifier.own_pooling_differs, **classifier.summary())


def _finetune(tmp: Path, config: TrainConfig, ds: Dataset, splits: Dict[str, Split], encoder, progress: bool,
              metrics: dict) -> dict:
    """Fine-tune a sequence classifier, save it under model/hf, featurize every split through it."""
    from .models.finetune import FinetuneConfig, finetune, new_classifier
    from .models.hf import HFClassifier, find_final_layer
    ft = FinetuneConfig(lr=config.finetune_lr, head_lr=config.head.lr, epochs=config.finetune_epochs,
                        batch_size=config.head.batch_size, l2=config.head.l2, seed=config.head.seed)
    ft.check()
    t = time.perf_counter()
    tok, model = new_classifier(encoder.path, ds.label_names, ft.seed)
    final = find_final_layer(model)
    docs, queries = _texts(splits["train"])
    finetune(tok, model, docs, queries, splits["train"].labels, ft, config.max_length, final, encoder.device, progress)
    folder = tmp / "model" / "hf"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    metrics["timings"]["train_s"] = time.perf_counter() - t
    classifier = HFClassifier(str(folder), ds.label_names, ds.is_pair, ft.l2, config.max_length, final,
                              device=encoder.device)
    _featurize_hf(tmp, classifier, splits, len(ds.label_names), progress, metrics, LOCAL)
    return {"hf": _hf_info(classifier, "model/hf", "finetune"), "l2": ft.l2, "extra": {"finetune": ft.to_dict()}}


def train_run(config: TrainConfig, out, overwrite: bool = False, progress: bool = True, backend=None) -> Run:
    """Train and write a complete run directory at ``out`` (see the module docstring). ``backend``
    (e.g. ``distributed.RayBackend``) encodes the texts in head mode; None: this process."""
    from .device import resolve_device
    from .encoders import Encoder
    backend = backend_or_local(backend)
    if config.mode not in ("head", "finetune"):
        raise InstattrError(f"--mode must be head or finetune, got {config.mode!r}")
    if not backend.runs_everything and config.mode != "head":
        raise InstattrError(f"--backend {backend.name} encodes for --mode head; fine-tuning runs in this process")
    config.head.check()
    device = resolve_device(config.device)
    t0 = time.perf_counter()
    ds, splits = load_splits(config.data, config.data_root, config.fields(), config.limit_train, config.limit_eval,
                             config.head.seed)
    pair_mode = config.resolved_pair_mode(ds.is_pair)
    import torch
    torch.manual_seed(config.head.seed)
    encoder = Encoder(config.encoder, config.pooling, config.max_length, config.encode_batch_size, device=device)

    def make(tmp: Path) -> None:
        metrics = {"timings": {}}
        if config.mode == "head":
            parts = _train_head(tmp, config, ds, splits, encoder, pair_mode, progress, metrics, backend)
        else:
            parts = _finetune(tmp, config, ds, splits, encoder, progress, metrics)
        metrics.setdefault("dev_accuracy", None)
        metrics.setdefault("test_accuracy", None)
        manifest = Manifest(format=FORMAT, mode=config.mode, data=_data_info(ds, config.data, splits, config.fields()),
                            label_names=tuple(ds.label_names), eval_split="test" if "test" in splits else "dev",
                            sbert=_encoder_info(encoder), encoder=_encoder_info(encoder), pair_mode=pair_mode,
                            l2=parts["l2"], seed=config.head.seed,
                            head=parts.get("head"), hf=parts.get("hf"), config=_plain(asdict(config)),
                            versions={**_versions(), "device": str(device)}, extra=parts["extra"])
        metrics["timings"]["total_s"] = time.perf_counter() - t0
        write_json(tmp / "metrics.json", metrics)
        write_json(tmp / "run.json", manifest.to_dict())

    return build_atomically(out, overwrite, make)


@dataclass(frozen=True)
class ImportConfig:
    """Everything `instattr import` needs; saved into run.json (see :func:`import_run`)."""
    model: str
    data: str = "sst2"
    damping: float = 0.01
    data_root: Optional[str] = None
    max_length: Optional[int] = None
    limit_train: Optional[int] = None
    limit_eval: Optional[int] = None
    sbert: Optional[str] = None
    final_layer: Optional[str] = None
    checkpoints: Tuple[str, ...] = ()
    checkpoint_lrs: Optional[Tuple[float, ...]] = None
    text_field: Optional[str] = None
    query_field: Optional[str] = None
    label_field: Optional[str] = None
    seed: int = 0
    device: str = "auto"

    def fields(self) -> Dict[str, Optional[str]]:
        return {"text": self.text_field, "query": self.query_field, "label": self.label_field}


def import_run(config: ImportConfig, out, overwrite: bool = False, progress: bool = True, backend=None) -> Run:
    """A run from an existing ``AutoModelForSequenceClassification`` checkpoint folder, not trained.

    Labels come from the checkpoint's ``id2label``, checked against the dataset's; the checkpoint's
    tokenizer reads the texts (pairs through its pair input) up to ``max_length`` (default: the
    tokenizer's ``model_max_length``, at most the model's positions). ``damping`` stands in for the
    L2 penalty the model was not trained with (the closed forms' ``2 lambda I``, representer
    points' refit). ``sbert`` is the untuned sentence encoder of the sbert-* baselines (recorded, not run: their
    embeddings are made when first asked). ``backend`` (e.g. ``distributed.RayBackend``) runs the
    classifier on a pool of workers, in the batches this process would cut."""
    from .device import resolve_device
    from .encoders import check_max_length, describe
    from .models.hf import HFClassifier, check_labels, load_hf, model_max_length
    backend = backend_or_local(backend)
    if not config.damping > 0:
        raise InstattrError(f"--damping must be > 0 (it stands in for the L2 penalty of the final layer), "
                            f"got {config.damping}")
    device = resolve_device(config.device)
    t0 = time.perf_counter()
    ds, splits = load_splits(config.data, config.data_root, config.fields(), config.limit_train, config.limit_eval,
                             config.seed)
    path = str(Path(config.model).resolve())
    tok, hf_model, trainable = load_hf(path)
    check_labels(hf_model, ds.label_names, path)
    length = config.max_length or model_max_length(tok, hf_model)
    check_max_length(hf_model, length, path)
    sbert = EncoderInfo(**describe(config.sbert))          # recorded; loaded only when sbert-* ask
    classifier = HFClassifier(path, ds.label_names, ds.is_pair, config.damping, length, config.final_layer,
                              device=device, loaded=(tok, hf_model, trainable))
    classifier.final_layer()   # resolves and checks the final layer before any work
    if config.checkpoints:
        classifier = classifier.with_checkpoints(config.checkpoints, config.checkpoint_lrs)

    def make(tmp: Path) -> None:
        metrics = {"timings": {}}
        _featurize_hf(tmp, classifier, splits, len(ds.label_names), progress, metrics, backend)
        metrics.setdefault("dev_accuracy", None)
        metrics.setdefault("test_accuracy", None)
        recorded = {**asdict(config), "model": path, "max_length": length,
                    "final_layer": classifier.final_layer_name}
        manifest = Manifest(format=FORMAT, mode="import", data=_data_info(ds, config.data, splits, config.fields()),
                            label_names=tuple(ds.label_names), eval_split="test" if "test" in splits else "dev",
                            sbert=sbert, pair_mode="cross" if ds.is_pair else None,
                            l2=float(config.damping), seed=config.seed,
                            hf=_hf_info(classifier, path, "import", classifier.history),
                            config=_plain(recorded), versions={**_versions(), "device": str(device)})
        metrics["timings"]["total_s"] = time.perf_counter() - t0
        write_json(tmp / "metrics.json", metrics)
        write_json(tmp / "run.json", manifest.to_dict())

    return build_atomically(out, overwrite, make)


def make_run(config, out, overwrite: bool = False, progress: bool = True) -> Run:
    """``train_run`` for a TrainConfig, ``import_run`` for an ImportConfig."""
    if isinstance(config, ImportConfig):
        return import_run(config, out, overwrite, progress)
    return train_run(config, out, overwrite, progress)


def _plain(d):
    """JSON-ready copy of a config dict (tuples become lists)."""
    if isinstance(d, dict):
        return {k: _plain(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_plain(v) for v in d]
    return d


# ------------------------------------------------------------------ new text through a run
def featurize(run: Run, documents: Sequence[str], queries: Optional[Sequence[str]] = None,
              labels: Optional[Sequence[int]] = None, progress: bool = False, device=None) -> FeatureSet:
    """New texts through the run's classifier (label = prediction unless given)."""
    from .models import classifier_for
    return classifier_for(run, device).featurize(list(documents), None if queries is None else list(queries),
                                                 labels, progress)

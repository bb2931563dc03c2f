"""Train a run end to end (dataset -> encoder -> head -> run directory) and featurize new text."""
from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from . import __version__
from .data import Dataset, Split, load_dataset
from .encoders import Encoder
from .errors import InstattrError
from .model import HeadConfig, pair_input, predict, train_heads
from .store import FeatureSet, Run, RunError, _umask, write_json, write_npy, write_npz

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
    pair_mode: Optional[str] = None      # None: siamese in head mode, cross in finetune mode
    mode: str = "head"
    max_length: int = 128
    encode_batch_size: int = 64
    head: HeadConfig = field(default_factory=HeadConfig)
    limit_train: Optional[int] = None
    limit_eval: Optional[int] = None
    tune: bool = False
    finetune_lr: float = 2e-5
    finetune_epochs: int = 1

    def resolved_pair_mode(self, is_pair: bool) -> Optional[str]:
        if not is_pair:
            return None
        mode = self.pair_mode or ("siamese" if self.mode == "head" else "cross")
        if mode not in ("siamese", "cross"):
            raise InstattrError(f"--pairs must be siamese or cross, got {mode!r}")
        return mode


# ------------------------------------------------------------------ encoding
def cache_dir() -> Optional[Path]:
    """Where untuned embeddings are cached: $INSTATTR_CACHE, else ~/.cache/instattr ('off' disables)."""
    where = os.environ.get("INSTATTR_CACHE", str(Path.home() / ".cache" / "instattr"))
    return None if where == "off" else Path(where)


def _cached_encode(encoder: Encoder, texts, queries=None, progress=True, desc="encode") -> np.ndarray:
    """``encoder.encode`` memoised on disk by encoder, pooling, length limit and the exact texts.

    Only the packaged or a local encoder folder is cached (a hub name could change under us)."""
    import hashlib
    folder = cache_dir()
    if folder is None or not Path(encoder.path).is_dir():
        return encoder.encode(texts, queries, progress=progress, desc=desc)
    h = hashlib.sha256()
    weights = sorted(Path(encoder.path).glob("*.safetensors")) + sorted(Path(encoder.path).glob("*.bin"))
    for part in [str(Path(encoder.path).resolve()), *(f"{w.name}:{w.stat().st_size}:{w.stat().st_mtime_ns}"
                                                      for w in weights), encoder.pooling, str(encoder.max_length)]:
        h.update(part.encode() + b"\0")
    for t in texts + (queries or []):
        h.update(t.encode() + b"\0")
    h.update(b"pairs" if queries is not None else b"single")
    path = folder / f"{h.hexdigest()[:32]}.npy"
    if path.exists():
        try:
            vecs = np.load(path)
            if vecs.shape == (len(texts), encoder.hidden_size):
                return vecs
        except (OSError, ValueError):
            pass  # a damaged cache entry is recomputed
    vecs = encoder.encode(texts, queries, progress=progress, desc=desc)
    try:
        write_npy(path, vecs)
    except OSError:
        pass  # a read-only cache never stops training
    return vecs


def encode_split(encoder: Encoder, split: Split, pair_mode: Optional[str], progress: bool = True,
                 cache: bool = True) -> np.ndarray:
    """Untuned pooled vectors of a split: u, [u, v] (siamese) or the cross-encoded pair."""
    enc = (lambda *a, **k: _cached_encode(encoder, *a, **k)) if cache else encoder.encode
    docs = [e.document for e in split.examples]
    if pair_mode is None:
        return enc(docs, progress=progress, desc=f"encode {split.name}")
    queries = [e.query for e in split.examples]
    if pair_mode == "cross":
        return enc(docs, queries, progress=progress, desc=f"encode {split.name}")
    unique = list(dict.fromkeys(docs + queries))       # premises repeat: encode each sentence once
    pos = {t: i for i, t in enumerate(unique)}
    vecs = enc(unique, progress=progress, desc=f"encode {split.name}")
    return np.concatenate([vecs[[pos[t] for t in docs]], vecs[[pos[t] for t in queries]]], axis=1)


# ------------------------------------------------------------------ training
def tune_head(x_train, y_train, x_dev, y_dev, n_classes: int, base: HeadConfig, progress: bool = True):
    """The paper's grid search on dev accuracy; epochs are read off one longest run's checkpoints."""
    from tqdm.auto import tqdm
    trials, best = [], None
    grid = [(l2, lr, bs) for l2 in TUNE_GRID["l2"] for lr in TUNE_GRID["lr"] for bs in TUNE_GRID["batch_size"]]
    for l2, lr, bs in tqdm(grid, desc="tune", disable=not progress, leave=False):
        cfg = replace(base, l2=l2, lr=lr, batch_size=bs, epochs=max(TUNE_GRID["epochs"]))
        res = train_heads(x_train, y_train, n_classes, cfg, checkpoints=True)
        for ep in TUNE_GRID["epochs"]:
            acc = float((predict(res.checkpoints[ep - 1], x_dev)[1].argmax(1) == y_dev).mean())
            trials.append({"l2": l2, "lr": lr, "batch_size": bs, "epochs": ep, "dev_accuracy": acc})
            if best is None or acc > best[1]:
                best = (replace(cfg, epochs=ep), acc)
    return best[0], trials


def train_run(config: TrainConfig, out, overwrite: bool = False, progress: bool = True) -> Run:
    """Train and write a complete run directory at ``out``.

    The run is built in a temporary sibling folder and moved into place only when complete, so a
    failure never damages an existing run; an existing run is replaced only with ``overwrite``.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise RunError(f"{out}: already exists; pass --overwrite to replace it")
    if config.mode not in ("head", "finetune"):
        raise InstattrError(f"--mode must be head or finetune, got {config.mode!r}")
    t0 = time.perf_counter()
    ds = load_dataset(config.data, config.data_root, config.text_field, config.query_field, config.label_field)
    seed = config.head.seed
    splits = {"train": ds.splits["train"].limit(config.limit_train, seed)}
    for name in ("dev", "test"):
        if name in ds.splits:
            splits[name] = ds.splits[name].limit(config.limit_eval, seed)
    pair_mode = config.resolved_pair_mode(ds.is_pair)
    torch.manual_seed(config.head.seed)
    encoder = Encoder(config.encoder, config.pooling, config.max_length, config.encode_batch_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.building-"))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        run = Run(tmp)
        timings = {}
        t = time.perf_counter()
        encoded = {name: encode_split(encoder, s, pair_mode, progress) for name, s in splits.items()}
        timings["encode_s"] = time.perf_counter() - t
        t = time.perf_counter()
        head_cfg, extra = config.head, {}
        if head_cfg.hidden is None:  # the pooler is as wide as the encoder (384 for MiniLM), pairs too
            head_cfg = replace(head_cfg, hidden=encoder.hidden_size)
        if config.mode == "head":
            inputs = {name: pair_input(e, pair_mode) for name, e in encoded.items()}
            labels = {name: np.asarray(s.labels) for name, s in splits.items()}
            if config.tune:
                dev = "dev" if "dev" in splits else None
                if dev is None:
                    raise InstattrError(f"{ds.root}: --tune needs a dev split")
                head_cfg, trials = tune_head(inputs["train"], labels["train"], inputs[dev], labels[dev],
                                             len(ds.label_names), head_cfg, progress)
                extra["tune"] = {"chosen": head_cfg.to_dict(), "trials": trials}
            result = train_heads(inputs["train"], labels["train"], len(ds.label_names), head_cfg,
                                 checkpoints=True, progress=progress)
            params = result.params
        else:
            from .finetune import finetune
            params, inputs = finetune(encoder, splits, pair_mode, len(ds.label_names), head_cfg,
                                      config.finetune_lr, config.finetune_epochs, progress)
            encoder.model.save_pretrained(tmp / "model" / "encoder")
            encoder.tokenizer.save_pretrained(tmp / "model" / "encoder")
            result = None
        timings["train_s"] = time.perf_counter() - t
        _save_head(tmp, params, result)
        metrics = {"timings": timings}
        for name, s in splits.items():
            feats, probs = predict(params, inputs[name])
            fs = FeatureSet(idx=np.asarray(s.idx), label=np.asarray(s.labels, dtype=np.int64),
                            pred=probs.argmax(1).astype(np.int64), probs=probs, features=feats,
                            encoder=encoded[name].astype(np.float32))
            arrays = fs.to_npz()
            if config.mode == "finetune":
                arrays["head_input"] = inputs[name].astype(np.float32)
            write_npz(tmp / "features" / f"{name}.npz", **arrays)
            metrics[f"{name}_accuracy"] = float((fs.pred == fs.label).mean())
            metrics[f"{name}_confusion"] = _confusion(fs.label, fs.pred, len(ds.label_names))
        metrics.setdefault("dev_accuracy", None)
        metrics.setdefault("test_accuracy", None)
        head = head_cfg.to_dict()
        head["d_in"] = int(inputs["train"].shape[1])
        head["hidden"] = int(params["w"].shape[1])
        manifest = {
            "format": 1,
            "data": {"name": ds.name, "root": str(Path(ds.root).resolve()) if Path(ds.root).exists() else ds.root,
                     "arg": config.data, "is_pair": ds.is_pair, "n": {k: len(v) for k, v in splits.items()}},
            "label_names": ds.label_names,
            "eval_split": "test" if "test" in splits else "dev",
            "encoder": {"name": encoder.name, "path": encoder.path, "pooling": encoder.pooling,
                        "max_length": encoder.max_length, "hidden_size": encoder.hidden_size},
            "mode": config.mode,
            "pair_mode": pair_mode,
            "head": head,
            "l2": head_cfg.l2,
            "seed": head_cfg.seed,
            "config": _plain(asdict(config)),
            "versions": {"instattr": __version__, "torch": torch.__version__, "numpy": np.__version__,
                         "python": platform.python_version()},
            **extra,
        }
        timings["total_s"] = time.perf_counter() - t0
        write_json(tmp / "metrics.json", metrics)
        write_json(tmp / "run.json", manifest)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Run.load(out)


def _save_head(folder: Path, params, result) -> None:
    from safetensors.torch import save_file
    (folder / "model").mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().contiguous() for k, v in params.items()}
    save_file(tensors, str(folder / "model" / "head.safetensors"))
    if result is not None and result.checkpoints:  # TracIn needs the head along its trajectory
        ck = {f"{k}.{i}": v.detach().float().clone() for i, c in enumerate(result.checkpoints) for k, v in c.items()}
        save_file(ck, str(folder / "model" / "checkpoints.safetensors"),
                  metadata={"lrs": ",".join(map(str, result.checkpoint_lrs))})


def _swap_into_place(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _confusion(y, p, c) -> list:
    m = np.zeros((c, c), dtype=int)
    np.add.at(m, (y, p), 1)
    return m.tolist()


def _plain(d):
    if isinstance(d, dict):
        return {k: _plain(v) for k, v in d.items()}
    return d


# ------------------------------------------------------------------ new text through a run
def run_encoder(run: Run) -> Encoder:
    """The run's untuned encoder, loaded once per Run object."""
    if getattr(run, "_encoder", None) is None:
        e = run.manifest["encoder"]
        run._encoder = Encoder(e["path"], e["pooling"], e["max_length"])
    return run._encoder


def featurize(run: Run, documents: Sequence[str], queries: Optional[Sequence[str]] = None,
              labels: Optional[Sequence[int]] = None, progress: bool = False) -> FeatureSet:
    """Encode new texts with the run's encoder and apply its head (label = prediction unless given)."""
    m = run.manifest
    if m["data"]["is_pair"] and queries is None:
        raise InstattrError(f"{run.path}: this run classifies sentence pairs; give a --query")
    if not m["data"]["is_pair"] and queries is not None:
        raise InstattrError(f"{run.path}: this run classifies single texts; --query does not apply")
    if queries is not None and len(queries) != len(documents):
        raise InstattrError(f"{len(documents)} texts but {len(queries)} queries")
    from .data import Example
    split = Split("new", [Example(f"new_{i}", d, 0, None if queries is None else queries[i])
                          for i, d in enumerate(documents)])
    encoded = encode_split(run_encoder(run), split, m["pair_mode"], progress, cache=False)
    if m["mode"] == "head":
        x = pair_input(encoded, m["pair_mode"])
    else:
        from .finetune import tuned_inputs
        x = tuned_inputs(run, split, m["pair_mode"])
    params = {k: v for k, v in run.head_params().items()}
    feats, probs = predict(params, x)
    pred = probs.argmax(1).astype(np.int64)
    label = pred if labels is None else np.asarray(labels, dtype=np.int64)
    return FeatureSet(idx=np.asarray(split.idx), label=label, pred=pred, probs=probs, features=feats,
                      encoder=encoded.astype(np.float32),
                      texts=(list(documents), None if queries is None else list(queries)))

"""Tiny synthetic runs for the evaluation tests: texts, a bag-of-words "encoder", a trained head.

The encoder embeds a text as the mean of fixed random word vectors, so ``featurize`` can encode
new (perturbed) texts exactly as the stored features were made, without any transformer.
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from safetensors.torch import save_file

from instattr.arrays import FeatureSet, FinalLayer
from instattr.manifest import FORMAT, DataInfo, EncoderInfo, HeadInfo, HFInfo, Manifest
from instattr.models.head import HeadConfig, pair_input, predict, train_heads
from instattr.sentence import save_sentence_embeddings
from instattr.store import Run, write_json, write_npz

POSITIVE = ["good", "great", "superb", "lovely", "fine", "brilliant"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring", "weak"]
NEUTRAL = [f"w{i}" for i in range(60)]
DIM = 12


def word_vector(word: str, dim: int = DIM) -> np.ndarray:
    return np.random.default_rng(zlib.crc32(word.encode())).standard_normal(dim)


def embed(texts: Sequence[str], dim: int = DIM) -> np.ndarray:
    """Mean word vector of each text (zeros for an empty text), float32."""
    out = np.zeros((len(texts), dim))
    for i, t in enumerate(texts):
        toks = t.split()
        if toks:
            out[i] = np.mean([word_vector(w, dim) for w in toks], axis=0)
    return out.astype(np.float32)


def sentences(n: int, rng: np.random.Generator, length=(4, 8)):
    """(texts, labels): neutral filler plus one or two sentiment words of the label's polarity."""
    texts, labels = [], []
    for _ in range(n):
        y = int(rng.integers(2))
        words = list(rng.choice(NEUTRAL, size=int(rng.integers(*length))))
        for _ in range(int(rng.integers(1, 3))):
            words.insert(int(rng.integers(len(words) + 1)), str(rng.choice(POSITIVE if y else NEGATIVE)))
        texts.append(" ".join(words))
        labels.append(y)
    return texts, labels


def pairs(n: int, rng: np.random.Generator, adversarial: float = 0.0):
    """(premises, hypotheses, labels) for non-entailment(0)/entailment(1): entailed hypotheses copy
    premise words; with probability ``adversarial`` a non-entailment copies them too (HANS-like)."""
    prem, hyp, labels = [], [], []
    for _ in range(n):
        y = int(rng.integers(2))
        p = list(rng.choice(NEUTRAL, size=int(rng.integers(5, 9)), replace=False))
        if y == 1 or rng.random() < adversarial:
            h = list(rng.choice(p, size=3, replace=False))
        else:
            h = list(rng.choice(NEUTRAL, size=3, replace=False))
        prem.append(" ".join(p))
        hyp.append(" ".join(h))
        labels.append(y)
    return prem, hyp, labels


def encode(documents, queries=None) -> np.ndarray:
    return embed(documents) if queries is None else np.concatenate([embed(documents), embed(queries)], axis=1)


def feature_set(params, idx, documents, queries, labels, pair_mode) -> FeatureSet:
    feats, probs = predict(params, pair_input(encode(documents, queries), pair_mode))
    return FeatureSet(idx=np.array(idx), label=np.asarray(labels, dtype=np.int64), pred=probs.argmax(1),
                      probs=probs, features=feats)


def make_run(root: Path, kind: str = "sst2", n_train: int = 80, n_test: int = 30, seed: int = 0,
             epochs: int = 8, mode: str = "head", length=(4, 8), hidden: int = 8) -> Run:
    """A trained toy run under ``root``: kind 'sst2' (single texts of ``length`` filler words) or
    'hans' (pairs); the head has a ``hidden``-wide pooler."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    data_dir = root / "data" / kind
    data_dir.mkdir(parents=True, exist_ok=True)
    is_pair = kind == "hans"
    label_names = ["non-entailment", "entailment"] if is_pair else ["negative", "positive"]
    splits = {}
    for split, n in (("train", n_train), ("test", n_test)):
        if is_pair:
            d, q, y = pairs(n, rng, adversarial=0.0 if split == "train" else 0.5)
        else:
            (d, y), q = sentences(n, rng, length), None
        rows = [{"idx": f"{split}_{i}", "document": d[i], "label": y[i], **({"query": q[i]} if q else {})}
                for i in range(n)]
        (data_dir / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        splits[split] = ([r["idx"] for r in rows], d, q, y)
    (data_dir / "labels.json").write_text(json.dumps(label_names))
    pair_mode = "siamese" if is_pair else None
    cfg = HeadConfig(l2=0.01, lr=0.01, epochs=epochs, batch_size=8, hidden=hidden, seed=seed)
    idx, d, q, y = splits["train"]
    x = pair_input(encode(d, q), pair_mode)
    params = train_heads(x, np.array(y), 2, cfg).params
    run_dir = root / "run"
    (run_dir / "model").mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in params.items()}, str(run_dir / "model" / "head.safetensors"))
    save_file({"weight": params["w"].contiguous()}, str(run_dir / "model" / "final_layer.safetensors"))
    for split, (idx, d, q, y) in splits.items():
        write_npz(run_dir / "features" / f"{split}.npz", **feature_set(params, idx, d, q, y, pair_mode).to_npz())
        save_sentence_embeddings(run_dir, split, idx, encode(d, q))      # the head's input, as train writes it
    head = HeadInfo(l2=cfg.l2, lr=cfg.lr, epochs=cfg.epochs, batch_size=cfg.batch_size, hidden=hidden, seed=seed,
                    d_in=int(x.shape[1]))
    manifest = Manifest(
        format=FORMAT, mode=mode, label_names=tuple(label_names), eval_split="test", pair_mode=pair_mode, l2=cfg.l2,
        seed=seed, head=head if mode == "head" else None,
        hf=None if mode == "head" else HFInfo(path="model/hf", family="bert", final_layer="classifier", max_length=128,
                                              n_layers=0, fingerprint="", origin=mode),
        data=DataInfo(name=kind, root=str(data_dir), arg=kind, is_pair=is_pair, n={"train": n_train, "test": n_test}),
        sbert=EncoderInfo(name="bag-of-words", path="", pooling="mean", max_length=128, hidden_size=DIM),
        encoder=EncoderInfo(name="bag-of-words", path="", pooling="mean", max_length=128, hidden_size=DIM))
    write_json(run_dir / "run.json", manifest.to_dict())
    return Run.load(run_dir)


def featurize(run: Run, documents, queries: Optional[Sequence[str]] = None, labels=None) -> FeatureSet:
    """The toy runs' stand-in for instattr.pipeline.featurize."""
    labels = np.zeros(len(documents), dtype=np.int64) if labels is None else labels
    from safetensors.torch import load_file
    params = load_file(str(run.path / "model" / "head.safetensors"))
    return feature_set(params, [f"new_{i}" for i in range(len(documents))], documents, queries,
                       labels, run.manifest.pair_mode)


def logistic_problem(n=40, d=4, c=3, seed=0, bias=True, l2=0.02, flip=0.0, n_test=0):
    """A convex problem: Gaussian features, labels from a linear rule (a share ``flip`` moved to
    another class), the final layer refit to the exact minimum of the regularised loss on those
    labels. (train FeatureSet, FinalLayer, flipped row mask), plus a test FeatureSet of ``n_test``
    rows of the same distribution when asked."""
    from instattr.evaluate.mislabel import flip_labels
    from instattr.methods.lastlayer import refit, softmax
    rng = np.random.default_rng(seed)
    rule = rng.normal(size=(d, c)) * 3
    f = rng.normal(size=(n, d))
    y = (f @ rule).argmax(1)
    y, flipped = flip_labels(y, c, flip, rng) if flip else (y, np.zeros(n, bool))
    x = np.concatenate([f, np.ones((n, 1))], 1) if bias else f
    w = refit(x, y, np.zeros((c, x.shape[1])), l2).w
    layer = FinalLayer(w=w[:, :d], b=w[:, d] if bias else None, l2=l2)
    probs = softmax(layer.logits(f))
    fs = FeatureSet(idx=np.array([f"r{i}" for i in range(n)]), label=y, pred=probs.argmax(1),
                    probs=probs.astype(np.float32), features=f.astype(np.float32))
    if not n_test:
        return fs, layer, flipped
    ft = rng.normal(size=(n_test, d))
    pt = softmax(layer.logits(ft))
    test = FeatureSet(idx=np.array([f"t{i}" for i in range(n_test)]), label=(ft @ rule).argmax(1),
                      pred=pt.argmax(1), probs=pt.astype(np.float32), features=ft.astype(np.float32))
    return fs, layer, flipped, test

"""Shared fixtures: a tiny randomly initialised BERT (built from a config) and tiny datasets."""
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

from instattr.arrays import FinalLayer
from instattr.sentence import StoredEmbeddings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("INSTATTR_CACHE", "off")  # tests measure encoding, not the cache

@dataclass(frozen=True)
class EmbeddedLayer(FinalLayer):
    """A final layer that also gives the sbert-* methods their sentence embeddings (looked up by
    idx), so that one object fits every last-layer method of a synthetic problem."""
    sentence: Optional[StoredEmbeddings] = None

    def of(self, fs):
        return self.sentence.of(fs)


def embedded(layer: FinalLayer, *parts) -> EmbeddedLayer:
    """``layer`` with the embeddings ``parts`` = (FeatureSet, vectors), ... of its rows."""
    import numpy as np
    idx = np.concatenate([fs.idx for fs, _ in parts])
    vectors = np.concatenate([v for _, v in parts])
    return EmbeddedLayer(w=layer.w, b=layer.b, l2=layer.l2, sentence=StoredEmbeddings(idx, vectors))


WORDS = ("good great fine bad awful poor movie film plot actor the a is was not very really fun dull "
         "boring lovely man woman dog cat sat saw ran on mat park judge banker contacted").split()


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> str:
    """A 2-layer, 32-wide BERT with random weights and a word-level vocabulary, saved to a folder."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast
    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_dataset(folder: Path, n_train=40, n_test=12, n_dev=10, pairs=False, seed=0) -> Path:
    """A learnable toy dataset: label 1 iff the text holds a positive word (pairs: iff words overlap)."""
    import random
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    pos, neg = ["good", "great", "fun", "lovely"], ["bad", "awful", "dull", "boring"]
    nouns = ["movie", "film", "plot", "actor", "dog", "cat", "man", "woman"]

    def row(split, i):
        if pairs:
            a, b = rng.sample(nouns, 2)
            premise = f"the {a} saw the {b}"
            label = rng.randint(0, 1)
            hyp = f"the {b} saw the {a}" if label else f"a {rng.choice(pos)} {rng.choice(neg)}"
            return {"idx": f"{split}_{i}", "document": premise, "query": hyp, "label": label}
        label = rng.randint(0, 1)
        word = rng.choice(pos if label else neg)
        return {"idx": f"{split}_{i}", "document": f"the {rng.choice(nouns)} was {word}", "label": label}

    for split, n in (("train", n_train), ("dev", n_dev), ("test", n_test)):
        if n:
            write_jsonl(folder / f"{split}.jsonl", [row(split, i) for i in range(n)])
    names = ["non-entailment", "entailment"] if pairs else ["negative", "positive"]
    (folder / "labels.json").write_text(json.dumps(names))
    return folder


@pytest.fixture
def toy_data(tmp_path) -> Path:
    return make_dataset(tmp_path / "toy")


@pytest.fixture
def toy_pairs(tmp_path) -> Path:
    return make_dataset(tmp_path / "toy_pairs", pairs=True)


@pytest.fixture
def tiny_run(tmp_path, tiny_encoder, toy_data):
    """A trained run on the toy dataset with the tiny encoder (seconds)."""
    from instattr.models.head import HeadConfig
    from instattr.pipeline import TrainConfig, train_run
    cfg = TrainConfig(data=str(toy_data), encoder=tiny_encoder, head=HeadConfig(epochs=5, lr=1e-2, batch_size=8))
    return train_run(cfg, tmp_path / "run", progress=False)


# ---------------------------------------------------------------- instattr serve
# Texts and label names that are markup: every page must show them as text, never run them.
XSS_TEXTS = ('<script>window.__xss = "script"</script> the film was great',
             '<img src="x" onerror="window.__xss = \'img\'"> the plot was awful')
XSS_LABELS = ['negative <b onmouseover="window.__xss=1">', 'positive <img src=x onerror="window.__xss=2">']


def make_serve_data(folder: Path, seed: int = 0) -> Path:
    """Single texts for the web app: a toy sentiment set whose label names and some texts are
    markup, and two identical test texts with opposite labels (one of them is misclassified,
    whatever the model learns)."""
    make_dataset(folder, n_train=40, n_test=12, n_dev=0, seed=seed)
    train = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    train[3]["document"], train[3]["label"] = XSS_TEXTS[0], 1
    train[4]["document"], train[4]["label"] = XSS_TEXTS[1], 0
    test = [json.loads(line) for line in (folder / "test.jsonl").read_text().splitlines()]
    test[0]["document"] = XSS_TEXTS[1]
    test += [{"idx": "test_twin_a", "document": "the movie was good", "label": 1},
             {"idx": "test_twin_b", "document": "the movie was good", "label": 0}]
    write_jsonl(folder / "train.jsonl", train)
    write_jsonl(folder / "test.jsonl", test)
    (folder / "labels.json").write_text(json.dumps(XSS_LABELS))
    return folder


@pytest.fixture(scope="session")
def serve_run(tmp_path_factory, tiny_encoder):
    """A trained tiny run for the web app with four methods' stored scores, a correlation result
    with its figures, and a suspects.json."""
    from instattr.attribution import attribute_run
    from instattr.evaluate import run_correlation
    from instattr.models.head import HeadConfig
    from instattr.pipeline import TrainConfig, train_run
    from instattr.store import write_json
    root = tmp_path_factory.mktemp("serve")
    data = make_serve_data(root / "toy")
    run = train_run(TrainConfig(data=str(data), encoder=tiny_encoder, head=HeadConfig(epochs=5, lr=1e-2,
                                                                                      batch_size=8)),
                    root / "run", progress=False)
    attribute_run(run, "nn-cos,gc,if,rep", progress=False, log=lambda *a: None)
    run_correlation(run, methods="nn-cos,gc,if,rep", n_test=8, n_train=30, ks=(5,), curve_ks=(1, 5))
    order = [str(i) for i in run.features("train").idx][::-1]
    write_json(run.path / "results" / "suspects.json",
               {"method": "if", "order": order, "scores": [float(len(order) - r) for r in range(len(order))],
                "gold": [0] * len(order), "pred": [0] * len(order)})
    return run


@pytest.fixture(scope="module")
def torch_single_thread():
    """One torch thread for a module: tiny autograd calls crawl when threads contend."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

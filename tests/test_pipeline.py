"""End to end on a tiny random BERT: the run directory, refuse/overwrite, determinism, predict."""
import json

import numpy as np
import pytest
import torch

from instattr import Run
from instattr.arrays import FEATURE_KEYS
from instattr.cli import main
from instattr.encoders import Encoder
from instattr.errors import InstattrError
from instattr.models.head import HeadConfig, pair_input, predict
from instattr.pipeline import TrainConfig, featurize, train_run
from instattr.sentence import sentence_embeddings

from conftest import make_dataset

HEAD = HeadConfig(epochs=5, lr=1e-2, batch_size=8)


def head_params(run):
    from safetensors.torch import load_file
    return load_file(str(run.path / "model" / "head.safetensors"))


def test_run_directory_holds_every_array(tiny_run):
    run = Run.load(tiny_run.path)
    m = run.manifest
    assert m.eval_split == "test" and m.mode == "head" and m.l2 == 0.01
    assert set(run.splits) == {"train", "dev", "test"}
    for split, n in (("train", 40), ("dev", 10), ("test", 12)):
        fs = run.features(split)
        assert len(fs) == n and fs.probs.shape == (n, 2) and fs.features.shape == (n, 32)
        enc = sentence_embeddings(run).of(fs)                # head mode stores its encoder output
        assert enc.shape == (n, 32) and fs.probs.dtype == np.float32
        assert sorted(np.load(run.path / "features" / f"{split}.npz").files) == sorted(FEATURE_KEYS)
        np.testing.assert_allclose(fs.probs.sum(1), 1, atol=1e-5)
        np.testing.assert_array_equal(fs.pred, fs.probs.argmax(1))
        assert list(fs.idx) == [f"{split}_{i}" for i in range(n)]
        # features and probs are the stored head applied to the stored encoder output
        feats, probs = predict(head_params(run), enc)
        np.testing.assert_allclose(feats, fs.features, atol=1e-5)
        np.testing.assert_allclose(probs, fs.probs, atol=1e-5)
    metrics = run.metrics
    assert 0 <= metrics["test_accuracy"] <= 1 and metrics["timings"]["total_s"] > 0
    assert run.final_layer().w.shape == (2, 32) and run.final_layer().b is None


def test_length_sorted_encoding_equals_unsorted(tiny_encoder):
    enc = Encoder(tiny_encoder, "mean")
    texts = ["the dog", "the movie was really very good fun", "bad", "a cat sat on the mat in the park"]
    np.testing.assert_allclose(enc.encode(texts, sort=True, progress=False),
                               enc.encode(texts, sort=False, progress=False), atol=1e-5)
    one = np.stack([enc.encode([t], progress=False)[0] for t in texts])
    np.testing.assert_allclose(enc.encode(texts, progress=False), one, atol=1e-5)


def test_featurize_reproduces_stored_rows(tiny_run):
    ds = tiny_run.dataset()
    ex = ds.splits["test"].examples[:5]
    fs = featurize(tiny_run, [e.document for e in ex])
    np.testing.assert_allclose(fs.probs, tiny_run.features("test").probs[:5], atol=1e-5)


def test_refuses_existing_run_and_overwrite_replaces(tmp_path, tiny_encoder, toy_data, capsys):
    out = tmp_path / "run"
    args = ["--quiet", "train", "--data", str(toy_data), "--encoder", tiny_encoder, "--out", str(out),
            "--epochs", "2"]
    assert main(args) == 0
    before = (out / "features" / "train.npz").read_bytes()
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "features" / "train.npz").read_bytes() == before
    # a failing overwrite (bad data) leaves the old run whole
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.jsonl").write_text('{"document": 1}\n')
    assert main(["--quiet", "train", "--data", str(bad), "--out", str(out), "--overwrite"]) == 2
    assert (out / "features" / "train.npz").read_bytes() == before and Run.load(out).manifest
    assert main(args + ["--overwrite", "--seed", "3"]) == 0
    assert Run.load(out).manifest.seed == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run")]


def test_same_seed_same_run(tmp_path, tiny_encoder, toy_data):
    cfg = TrainConfig(data=str(toy_data), encoder=tiny_encoder, head=HEAD)
    a = train_run(cfg, tmp_path / "a", progress=False)
    b = train_run(cfg, tmp_path / "b", progress=False)
    for split in ("train", "test"):
        for key in ("probs", "features"):
            np.testing.assert_array_equal(getattr(a.features(split), key), getattr(b.features(split), key))
        np.testing.assert_array_equal(sentence_embeddings(a).split(split), sentence_embeddings(b).split(split))


def test_siamese_pairs(tmp_path, tiny_encoder, toy_pairs):
    run = train_run(TrainConfig(data=str(toy_pairs), encoder=tiny_encoder, head=HEAD), tmp_path / "p",
                    progress=False)
    m = run.manifest
    assert m.pair_mode == "siamese" and m.head.d_in == 128 and m.is_pair
    fs = run.features("train")
    enc = sentence_embeddings(run).of(fs)
    assert enc.shape == (40, 64)
    assert m.head.hidden == 32 and fs.features.shape == (40, 32)  # pooler as wide as the encoder
    feats, _ = predict(head_params(run), pair_input(enc, "siamese"))
    np.testing.assert_allclose(feats, fs.features, atol=1e-5)
    with pytest.raises(InstattrError, match="--query"):
        featurize(run, ["the dog saw the cat"])


def test_cross_pairs_and_finetune(tmp_path, tiny_encoder, toy_pairs):
    cfg = TrainConfig(data=str(toy_pairs), encoder=tiny_encoder, head=HEAD, mode="finetune",
                      limit_train=16, limit_eval=4, finetune_epochs=1)
    run = train_run(cfg, tmp_path / "ft", progress=False)
    m = run.manifest
    assert m.pair_mode == "cross" and m.data.n == {"train": 16, "dev": 4, "test": 4}
    assert m.mode == "finetune" and m.hf.path == "model/hf" and m.hf.family == "bert"
    ex = run.examples("test")[:2]
    fs = featurize(run, [e.document for e in ex], [e.query for e in ex])
    np.testing.assert_allclose(fs.probs, run.features("test").probs[:2], atol=1e-5)
    # a standard checkpoint: transformers alone loads it to the run's own predictions
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    hf = run.path / "model" / "hf"
    tok, model = AutoTokenizer.from_pretrained(hf), AutoModelForSequenceClassification.from_pretrained(hf).eval()
    with torch.no_grad():
        logits = model(**tok([e.document for e in ex], [e.query for e in ex], padding=True, return_tensors="pt")).logits
    np.testing.assert_allclose(torch.softmax(logits, -1).numpy(), run.features("test").probs[:2], atol=1e-5)
    assert model.config.id2label == {0: "non-entailment", 1: "entailment"}


def test_tune_records_choice(tmp_path, tiny_encoder, toy_data, monkeypatch):
    import instattr.pipeline as p
    monkeypatch.setattr(p, "TUNE_GRID", {"l2": (0.1, 0.01), "lr": (1e-2, 1e-5), "epochs": (1, 3), "batch_size": (8,)})
    run = train_run(TrainConfig(data=str(toy_data), encoder=tiny_encoder, tune=True), tmp_path / "t", progress=False)
    tune = run.manifest.extra["tune"]
    assert len(tune["trials"]) == 8
    best = max(t["dev_accuracy"] for t in tune["trials"])
    chosen = tune["chosen"]
    assert any(t["dev_accuracy"] == best and t["lr"] == chosen["lr"] and t["epochs"] == chosen["epochs"]
               for t in tune["trials"])
    assert run.manifest.head.lr == chosen["lr"]


def test_predict_cli_json(tiny_run, capsys):
    assert main(["--quiet", "predict", "--run", str(tiny_run.path), "the movie was good", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["label"] in ("negative", "positive") and abs(sum(out["probs"].values()) - 1) < 1e-4
    assert main(["--quiet", "predict", "--run", str(tiny_run.path), "x", "--query", "y"]) == 2
    assert main(["--quiet", "predict", "--run", str(tiny_run.path / "nope"), "x"]) == 2


def test_embedding_cache_reused_and_keyed_by_text(tmp_path, tiny_encoder, toy_data, monkeypatch):
    monkeypatch.setenv("INSTATTR_CACHE", str(tmp_path / "cache"))
    cfg = TrainConfig(data=str(toy_data), encoder=tiny_encoder, head=HEAD)
    a = train_run(cfg, tmp_path / "a", progress=False)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 3  # one per split

    def boom(*args, **kwargs):
        raise AssertionError("encoded again despite the cache")
    monkeypatch.setattr(Encoder, "encode", boom)
    b = train_run(cfg, tmp_path / "b", progress=False)
    np.testing.assert_array_equal(sentence_embeddings(a).split("train"), sentence_embeddings(b).split("train"))
    with pytest.raises(AssertionError, match="encoded again"):  # other texts miss the cache
        train_run(TrainConfig(data=str(toy_data), encoder=tiny_encoder, head=HEAD, limit_train=7),
                  tmp_path / "c", progress=False)


def test_a_sampled_run_finds_its_texts_by_idx(tmp_path, tiny_encoder):
    """--limit-train/--limit-eval keep a seeded random sample: explain, if-top and the report must show
    each row's own text (they matched rows by position before)."""
    import html

    from instattr.attribution import attribute_run, fit_method
    from instattr.ranking import explain
    from instattr.report import build_report
    data = make_dataset(tmp_path / "data", n_train=60, n_test=20, n_dev=0)
    for split in ("train", "test"):                 # every text unique, so a text identifies its row
        rows = [json.loads(line) for line in (data / f"{split}.jsonl").read_text().splitlines()]
        (data / f"{split}.jsonl").write_text("".join(json.dumps({**r, "document": f"{r['document']} {r['idx']}"})
                                                     + "\n" for r in rows))
    run = train_run(TrainConfig(data=str(data), encoder=tiny_encoder, head=HEAD, limit_train=25, limit_eval=8),
                    tmp_path / "run", progress=False)
    by_idx = {json.loads(line)["idx"]: json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()}
    stored = [str(i) for i in run.features("train").idx]
    assert stored != [f"train_{i}" for i in range(25)]              # a sample, not the first rows
    assert [e.document for e in run.examples("train")] == [by_idx[i]["document"] for i in stored]
    out = explain(run, "the movie was good", methods="gd,if", k=3)
    for row in out["methods"]["gd"]["supporting"] + out["methods"]["if"]["opposing"]:
        assert by_idx[row["idx"]]["document"] == row["text"]
    scores = fit_method(run, "if-top", layers=1, proj_dim=3, progress=False).score(run.features("test"))
    assert scores.shape == (8, 25) and np.isfinite(scores).all()
    attribute_run(run, "gd,nn-cos", progress=False, log=lambda *_: None)
    page = (build_report(run)).read_text()
    test_ex, train_ex = run.examples("test"), run.examples("train")
    from instattr.methods import top_k
    for r in np.random.default_rng(0).choice(8, size=3, replace=False):
        assert html.escape(test_ex[r].document) in page
        idx, _ = top_k(np.asarray(run.scores("gd")[r:r + 1]), 3)
        block = page.split(html.escape(test_ex[r].document), 1)[1]
        for i in idx[0]:
            assert html.escape(train_ex[i].document) in block


@pytest.mark.parametrize("edit,message", [
    (lambda m: {**m, "format": 1}, "format 1 is not one of 2-3"),
    (lambda m: {**m, "format": 4}, "newer instattr"),
    (lambda m: {}, "format None is not one of 2-3"),
    (lambda m: {k: v for k, v in m.items() if k != "sbert"}, "missing 'sbert'"),
    (lambda m: {k: v for k, v in m.items() if k != "label_names"}, "missing 'label_names'"),
    (lambda m: {**m, "l2": "high"}, "'l2' must be float"),
    (lambda m: {**m, "mode": "magic"}, "mode 'magic'"),
])
def test_run_json_is_validated_once_with_a_one_line_error(tiny_run, tmp_path, capsys, edit, message):
    import shutil
    run = tmp_path / "copy"
    shutil.copytree(tiny_run.path, run)
    manifest = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps(edit(manifest)))
    with pytest.raises(InstattrError, match=message):
        Run.load(run)
    assert main(["--quiet", "predict", "--run", str(run), "good"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run.json" in err and message.split("'")[0] in err


def test_devices(tiny_run, capsys, monkeypatch):
    from instattr.device import resolve_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu" and resolve_device(None).type == "cpu"
    with pytest.raises(InstattrError, match="no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(InstattrError, match="--device must be one of"):
        resolve_device("tpu")
    assert main(["--quiet", "predict", "--run", str(tiny_run.path), "good", "--device", "cuda"]) == 2
    assert "--device cuda" in capsys.readouterr().err
    a = featurize(tiny_run, ["the movie was good"], device="cpu")
    b = featurize(tiny_run, ["the movie was good"], device="auto")
    np.testing.assert_array_equal(a.probs, b.probs)

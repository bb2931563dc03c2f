"""Every model family, one suite: tiny random Hugging Face classifiers (tests/_families.py) trained a
few steps, saved and imported as a user would, for BERT, RoBERTa, DistilBERT, ELECTRA, XLM-R,
DeBERTa-v2, ModernBERT, GPT-2, Llama, Qwen2 and PEFT LoRA adapters on BERT and Llama.

After kronfluence's testable tasks. References are independent of instattr: the model's own
outputs on each example alone, autograd gradients of its loss with respect to the final layer's
weight and bias, autograd Hessians, and brute-force Gauss-Newton influence over the tracked modules
(tests/_brute.py). Every command on every family runs in bench/families.py (minutes); here every
command runs on one encoder (BERT, sentence pairs) and one decoder (Llama).
"""
import json

import numpy as np
import pytest
import torch

from instattr.cli import main
from instattr.methods import get_method
from instattr.models import classifier_for
from instattr.pipeline import ImportConfig, import_run
from instattr.store import Run

from _brute import Brute
from _families import (
    DECODERS,
    FAMILIES,
    LR,
    Reference,
    as_rows,
    build,
    final_hessian,
    find_last_linear,
    make_model,
    variant,
)
from conftest import make_dataset

DAMPING = 0.05
pytestmark = pytest.mark.usefixtures("torch_single_thread")   # conftest


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory, tiny_encoder):
    """(family, model folder, imported run, checkpoint folders)."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    data = make_dataset(root / "data", n_train=24, n_test=8, n_dev=0, pairs=name == "bert")
    folder, saved = make_model(name, root, data, checkpoints={1: root / "ckpt-2", 3: root / "ckpt-4"})
    run = import_run(ImportConfig(model=str(folder), data=str(data), damping=DAMPING, sbert=tiny_encoder,
                                  checkpoints=tuple(map(str, saved)), checkpoint_lrs=(LR,) * len(saved) or None),
                     root / "run", progress=False)
    return name, folder, run, saved


def test_probabilities_features_and_final_layer_are_the_models_own(family):
    name, folder, run, _ = family
    ref = Reference(folder)
    for split in run.splits:
        probs, feats = ref.probs_and_features(as_rows(run, split))
        fs = run.features(split)
        np.testing.assert_allclose(fs.probs, probs, atol=1e-5)
        np.testing.assert_allclose(fs.features, feats, atol=1e-5)
    lin = run.final_layer()
    np.testing.assert_allclose(lin.w, ref.final.weight.detach().numpy(), atol=1e-7)
    if ref.final.bias is not None:
        np.testing.assert_allclose(lin.b, ref.final.bias.detach().numpy(), atol=1e-7)
    m = run.manifest
    assert m.mode == "import" and m.l2 == DAMPING and m.hf.own_pooling_differs == 0
    assert m.hf.final_layer == find_last_linear(ref.model) and m.pair_mode == ("cross" if name == "bert" else None)
    assert (m.hf.adapter_base is not None) == name.startswith("lora-")


def test_last_layer_gd_and_if_equal_autograd_over_weight_and_bias(family):
    _, folder, run, _ = family
    ref = Reference(folder)
    train, test = run.features("train"), run.features("test")
    tr, te = as_rows(run, "train"), as_rows(run, "test")
    g_tr, g_te = ref.final_grads(tr, train.label), ref.final_grads(te, test.pred)
    lin = run.final_layer()
    gd = get_method("gd").fit(train, lin).score(test)
    np.testing.assert_allclose(gd, g_te @ g_tr.T, rtol=1e-4, atol=1e-6 * np.abs(g_te @ g_tr.T).max())
    _, f_tr = ref.probs_and_features(tr)
    h = final_hessian(f_tr, train.label, lin.w, lin.b, DAMPING)
    want = g_te @ np.linalg.solve(h, g_tr.T)
    np.testing.assert_allclose(get_method("if").fit(train, lin).score(test), want, rtol=1e-3,
                               atol=1e-5 * np.abs(want).max())


def test_full_rank_layered_influence_equals_brute_force_gauss_newton(family):
    """if-top over the tracked modules (the top block and the head; an adapter: its trainable
    modules), exact, = g_t^T (GGN + 2 l2 on the final layer + damping)^-1 g_i by brute force."""
    name, _, run, _ = family
    clf = classifier_for(run)
    brute = Brute(run, 1)
    tracked = [t.name for t in brute.tracked]
    if name.startswith("lora-"):
        assert all(".lora_A." in n or ".lora_B." in n or "modules_to_save" in n for n in tracked)
        assert any("modules_to_save" in n for n in tracked) and sum(".lora_A." in n for n in tracked) == 4
    else:
        assert clf.final_name in tracked and len(tracked) >= 5
    train, test = run.features("train"), run.features("test")
    g_tr, g_te = brute.grads(train, train.label), brute.grads(test, test.pred)
    h = brute.ggn(train, DAMPING, 0.01)
    want = (g_te @ torch.linalg.solve(h, g_tr.T)).numpy()
    got = get_method("if-top", layers=1, proj_dim=None, damping=0.01, dtype="float64",
                     progress=False).fit(train, clf).score(test)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_tracin_sums_learning_rate_times_gd_over_the_checkpoints(family):
    _, _, run, saved = family
    train, test = run.features("train"), run.features("test")
    tr, te = as_rows(run, "train"), as_rows(run, "test")
    want = 0
    for folder in saved:
        ref = Reference(folder)
        want = want + LR * ref.final_grads(te, test.pred) @ ref.final_grads(tr, train.label).T
    got = get_method("tracin").fit(train, classifier_for(run)).score(test)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_every_command_works(name, tmp_path, tiny_encoder, capsys):
    data = make_dataset(tmp_path / "data", n_train=24, n_test=8, n_dev=0, pairs=name == "bert")
    folder, _ = make_model(name, tmp_path, data)
    path = str(tmp_path / "run")
    assert main(["--quiet", "import", "--model", str(folder), "--data", str(data), "--sbert", tiny_encoder,
                 "--out", path]) == 0
    assert "imported" in capsys.readouterr().out
    run = Run.load(path)
    query = ["--query", "the cat saw the dog"] if name == "bert" else []
    assert main(["--quiet", "predict", "--run", path, "the dog saw the cat", *query, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["label"] in ("non-entailment", "entailment", "negative", "positive")
    assert main(["--quiet", "attribute", "--run", path, "--methods", "paper,gd-top", "--layers", "1",
                 "--proj-dim", "3"]) == 0
    assert "gd-top: 8 x 24 scores" in capsys.readouterr().out
    head = "classifier" if name == "bert" else "score"            # the model's own module names
    assert main(["--quiet", "attribute", "--run", path, "--methods", "if-top", "--modules", f"*.1.*,{head}",
                 "--proj-dim", "3", "--top-k", "3"]) == 0
    assert run.top_k("if-top")["train_pos"].shape == (8, 3)
    assert run.top_k("if-top")["info"]["config"]["tracked_modules"][-1] == head
    own = "bert.encoder.layer.1.output.*" if name == "bert" else "model.layers.1.mlp.*"   # the model's names
    assert [t.name for t in classifier_for(run).tracked(modules=[own])] == \
        [t.name for t in classifier_for(run).tracked(modules=["*.1.output.*" if name == "bert" else "*.1.mlp.*"])]
    assert len(classifier_for(run).tracked(modules=[own])) == (1 if name == "bert" else 3)
    capsys.readouterr()
    assert main(["--quiet", "explain", "--run", path, "the dog saw the cat", *query, "--methods", "if,rep,gd-top",
                 "--layers", "1", "--proj-dim", "3", "--k", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    ids = {e.idx: e for e in run.examples("train")}
    for row in out["methods"]["if"]["supporting"]:
        assert ids[row["idx"]].document == row["text"]
    for evaluation in ("correlation", "retrain", "randomized"):
        assert main(["--quiet", "evaluate", evaluation, "--run", path, "--n-test", "3"] +
                    (["--n-random", "3"] if evaluation == "retrain" else [])) == 0
    assert "final linear layer" in (run.path / "results" / "retrain.md").read_text()
    assert main(["--quiet", "suspects", "--run", path, "--json"]) == 0
    assert main(["--quiet", "report", "--run", path]) == 0
    assert "imported from" in (run.path / "report.html").read_text()


def test_a_decoder_gives_the_same_results_whatever_its_padding_and_pad_token(tmp_path, tiny_encoder):
    """Llama with EOS at the end of every text: a tokenizer padding on the right, on the left, or
    with EOS as its pad token gives identical features, probabilities and scores. With pad = EOS the
    model's own pooling picks the token before the final EOS; instattr pools the last attended
    token still, and records the rows where the two differ."""
    data = make_dataset(tmp_path / "data", n_train=24, n_test=8, n_dev=0)
    folder, _ = make_model("llama", tmp_path / "m", data, eos_at_end=True)
    variants = {"right": variant(tmp_path, folder, "right", eos_at_end=True),
                "left": variant(tmp_path, folder, "left", eos_at_end=True, pad_side="left"),
                "eos": variant(tmp_path, folder, "eos", eos_at_end=True, pad_is_eos=True)}
    runs = {k: import_run(ImportConfig(model=str(v), data=str(data), sbert=tiny_encoder), tmp_path / f"run-{k}",
                          progress=False) for k, v in variants.items()}
    want = runs["right"]
    scores = {}
    for k, run in runs.items():
        for split in ("train", "test"):
            np.testing.assert_allclose(run.features(split).features, want.features(split).features, atol=1e-6)
            np.testing.assert_allclose(run.features(split).probs, want.features(split).probs, atol=1e-6)
        m = get_method("if-top", layers=1, proj_dim=4, progress=False)
        scores[k] = m.fit(run.features("train"), classifier_for(run)).score(run.features("test"))
        np.testing.assert_allclose(scores[k], scores["right"], rtol=1e-6, atol=1e-6 * np.abs(scores["right"]).max())
    assert runs["right"].manifest.hf.own_pooling_differs == runs["left"].manifest.hf.own_pooling_differs == 0
    assert runs["eos"].manifest.hf.own_pooling_differs == 24 + 8     # every row: the model pooled another token
    ref = Reference(variants["eos"])                                  # ... and so its own probabilities differ
    assert not np.allclose(ref.probs_and_features(as_rows(runs["eos"], "test"))[0],
                           runs["eos"].features("test").probs, atol=1e-4)


def test_decoders_are_detected_by_their_token_wise_head():
    for name in DECODERS:
        _, model = build(name)
        assert model.get_submodule(find_last_linear(model)).out_features == 2


def test_a_model_instattr_cannot_load_is_one_line(tmp_path, tiny_encoder, capsys):
    data = make_dataset(tmp_path / "data", n_train=12, n_test=4, n_dev=0)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "no-such-family", "num_labels": 2}))
    assert main(["--quiet", "import", "--model", str(bad), "--data", str(data), "--sbert", tiny_encoder,
                 "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "could not load a sequence classifier" in err
    folder, _ = make_model("gpt2", tmp_path / "g", data, steps=1)
    assert main(["--quiet", "import", "--model", str(folder), "--data", str(data), "--sbert", tiny_encoder,
                 "--out", str(tmp_path / "r"), "--final-layer", "transformer.h.0.mlp.c_fc"]) == 2
    assert "must be an nn.Linear with 2 outputs" in capsys.readouterr().err

"""Importing Hugging Face classifiers beyond the family suite (tests/test_families.py): refusals,
TracIn's checkpoints, a fine-tuned run re-imported, the example script, and the top-K scopes that
retrain or re-initialise the model's own top blocks."""
import numpy as np
import pytest
import torch

from instattr.cli import main
from instattr.methods import get_method
from instattr.models import classifier_for
from instattr.pipeline import ImportConfig, import_run
from instattr.sentence import sentence_embeddings
from instattr.store import Run

from _families import Reference, build, make_model
from conftest import make_dataset

pytestmark = pytest.mark.usefixtures("torch_single_thread")   # conftest


@pytest.fixture(scope="module")
def imported(tmp_path_factory, tiny_encoder):
    """An imported tiny BERT on sentence pairs."""
    root = tmp_path_factory.mktemp("bert")
    data = make_dataset(root / "data", n_train=24, n_test=8, n_dev=0, pairs=True)
    folder, _ = make_model("bert", root, data)
    return import_run(ImportConfig(model=str(folder), data=str(data), damping=0.05, sbert=tiny_encoder),
                      root / "run", progress=False)


def test_import_refuses_mismatched_labels_and_bad_damping(tmp_path, tiny_encoder, capsys):
    data = make_dataset(tmp_path / "data", n_train=12, n_test=4, n_dev=0)
    tok, model = build("bert")
    model.config.id2label = {0: "yes", 1: "no"}
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    args = ["--quiet", "import", "--model", str(tmp_path / "m"), "--data", str(data), "--sbert", tiny_encoder]
    capsys.readouterr()                           # transformers' own progress lines while saving
    assert main(args + ["--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "['yes', 'no']" in err and "['negative', 'positive']" in err
    assert not (tmp_path / "run").exists()
    model.config.id2label = {0: "LABEL_0", 1: "LABEL_1"}        # default names: the count is what matters
    model.save_pretrained(tmp_path / "m")
    assert main(args + ["--out", str(tmp_path / "run"), "--damping", "0"]) == 2
    assert "--damping must be > 0" in capsys.readouterr().err
    assert main(args + ["--out", str(tmp_path / "run")]) == 0


def test_import_never_loads_the_sentence_encoder_until_an_sbert_method_asks(tmp_path, tiny_encoder, monkeypatch):
    import instattr.encoders as encoders
    data = make_dataset(tmp_path / "data", n_train=12, n_test=4, n_dev=0)
    folder, _ = make_model("bert", tmp_path, data)
    real = encoders.Encoder.__init__

    def refused(self, *a, **k):
        raise AssertionError("the sentence encoder was loaded")
    monkeypatch.setattr(encoders.Encoder, "__init__", refused)
    run = import_run(ImportConfig(model=str(folder), data=str(data), sbert=tiny_encoder), tmp_path / "r",
                     progress=False)
    assert main(["--quiet", "attribute", "--run", str(run.path), "--methods", "nn-cos,gd,if,rep"]) == 0
    assert not (run.path / "sbert").exists()
    monkeypatch.setattr(encoders.Encoder, "__init__", real)
    assert main(["--quiet", "attribute", "--run", str(run.path), "--methods", "sbert-cos"]) == 0
    assert sorted(p.name for p in (run.path / "sbert").iterdir()) == ["test.npz", "train.npz"]


def test_tracin_without_checkpoints_says_what_it_needs(tmp_path, tiny_encoder, capsys):
    data = make_dataset(tmp_path / "data", n_train=12, n_test=4, n_dev=0)
    tok, model = build("distilbert")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    run = import_run(ImportConfig(model=str(tmp_path / "m"), data=str(data), sbert=tiny_encoder), tmp_path / "r",
                     progress=False)
    assert main(["--quiet", "attribute", "--run", str(run.path), "--methods", "tracin"]) == 2
    assert "--checkpoints CKPT" in capsys.readouterr().err
    assert main(["--quiet", "attribute", "--run", str(run.path), "--methods", "tracin", "--checkpoints",
                 str(tmp_path / "m")]) == 2
    assert "--checkpoint-lrs" in capsys.readouterr().err
    assert main(["--quiet", "attribute", "--run", str(run.path), "--methods", "tracin", "--checkpoints",
                 str(tmp_path / "m"), "--checkpoint-lrs", "0.5"]) == 0
    gd = get_method("gd").fit(run.features("train"), run.final_layer()).score(run.features("test"))
    np.testing.assert_allclose(Run.load(run.path).scores("tracin"), 0.5 * gd, rtol=1e-4, atol=1e-7)


def test_finetune_checkpoint_imports_to_the_same_run(tmp_path, tiny_encoder, toy_data):
    from instattr.models.head import HeadConfig
    from instattr.pipeline import TrainConfig, train_run
    ft = train_run(TrainConfig(data=str(toy_data), encoder=tiny_encoder, mode="finetune",
                               head=HeadConfig(epochs=1, batch_size=8)), tmp_path / "ft", progress=False)
    again = import_run(ImportConfig(model=str(ft.path / "model" / "hf"), data=str(toy_data), damping=ft.manifest.l2,
                                    sbert=tiny_encoder, max_length=128), tmp_path / "imp", progress=False)
    for split in ft.splits:
        a, b = ft.features(split), again.features(split)
        np.testing.assert_array_equal(a.idx, b.idx)
        for key in ("probs", "features"):
            np.testing.assert_allclose(getattr(a, key), getattr(b, key), atol=1e-6)
        np.testing.assert_allclose(sentence_embeddings(ft).split(split), sentence_embeddings(again).split(split),
                                   atol=1e-6)
    np.testing.assert_allclose(ft.final_layer().w, again.final_layer().w)
    np.testing.assert_allclose(ft.final_layer().b, again.final_layer().b)
    assert ft.final_layer().l2 == again.final_layer().l2


def test_the_example_script_needs_no_instattr_and_imports(tmp_path, tiny_encoder, toy_data):
    """examples/finetune_sst2.py (plain transformers) -> instattr import -> the model's own probabilities."""
    import ast
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).parents[1] / "examples" / "finetune_sst2.py"
    tree = ast.parse(script.read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any(m and m.startswith("instattr") for m in imported)
    out = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "m"), "--data", str(toy_data),
                          "--encoder", tiny_encoder, "--limit", "24", "--epochs", "2", "--batch-size", "8"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "m" / "checkpoint-3" / "trainer_state.json").exists()
    run = import_run(ImportConfig(model=str(tmp_path / "m"), data=str(toy_data), sbert=tiny_encoder,
                                  checkpoints=(str(tmp_path / "m" / "checkpoint-3"), str(tmp_path / "m" / "checkpoint-6"))),
                     tmp_path / "run", progress=False)
    ref = Reference(tmp_path / "m")
    probs, _ = ref.probs_and_features([{"document": e.document} for e in run.examples("test")])
    np.testing.assert_allclose(run.features("test").probs, probs, atol=1e-5)
    assert run.manifest.hf.checkpoint_lrs == (2e-5, 2e-5)      # read from trainer_state.json


def test_top_block_scopes_retrain_and_reinitialise_the_models_own_top(imported):
    """--scope top-1: the randomized test changes the features (so nn-* rankings move), and
    retraining is deterministic: an all-kept mask gives exactly the "before" probabilities."""
    from instattr.evaluate.randomized import run_randomized
    from instattr.evaluate.retrain import run_retrain
    from instattr.evaluate.top_layers import random_top, retrain_top
    run = imported
    clf = classifier_for(run)
    train, test = run.features("train"), run.features("test").subset([0, 1])
    r_train, r_test, layer = random_top(clf, 1, train, test, seed=3)
    assert np.abs(r_train.features - train.features).max() > 1e-2          # the features themselves change
    np.testing.assert_allclose(r_test.probs, torch.softmax(torch.as_tensor(layer.logits(r_test.features)), -1).numpy(),
                               atol=1e-5)
    res = run_randomized(run, methods=["nn-cos", "gd"], n_test=4, scope="top-1")
    assert res["scope"] == "top-1" and "top 1 transformer block" in (run.path / "results" / "randomized.md").read_text()
    masks = np.ones((2, len(train)), dtype=bool)
    masks[1, :8] = False
    after, before = retrain_top(clf, 1, train, test, masks, epochs=1, batch_size=8)
    np.testing.assert_array_equal(after[0], before[0])
    assert not np.allclose(after[1], before[1])
    out = run_retrain(run, methods=["gd"], n_test=2, ks=(3,), n_random=1, scope="top-1", progress=False)
    assert out["scope"] == "top-1" and "top 1 transformer block" in (run.path / "results" / "retrain.md").read_text()
    with pytest.raises(Exception, match="top-1 .. top-2"):
        run_randomized(run, methods=["gd"], n_test=2, scope="top-5")

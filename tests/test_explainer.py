"""The Python front door (instattr.Explainer) on a model and rows in memory: the same scores as a run
imported from the same model, its DataFrame, a run it saves that the command line and serve read,
one-line errors, and the notebook-style example end to end."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import transformers as T

import instattr
from instattr.cli import main
from instattr.methods import get_method
from instattr.pipeline import ImportConfig, import_run
from instattr.store import Run

from _families import make_model, rows
from conftest import make_dataset

pytestmark = pytest.mark.usefixtures("torch_single_thread")   # conftest


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("explainer")
    data = make_dataset(root / "data", n_train=24, n_test=8, n_dev=0)
    folder, _ = make_model("bert", root, data)
    return folder, data


def test_explainer_equals_an_imported_run_and_saves_one(model, tmp_path, tiny_encoder, capsys):
    folder, data = model
    tok = T.AutoTokenizer.from_pretrained(folder)
    clf = T.AutoModelForSequenceClassification.from_pretrained(folder)
    train = pd.DataFrame(rows(data / "train.jsonl"))                  # a DataFrame of the training file
    test = rows(data / "test.jsonl")                                   # a list of dicts
    ex = instattr.Explainer(clf, tok, train=train, test=test, methods=["nn-cos", "gd", "if", "rep", "gd-top"],
                            damping=0.05, labels=["negative", "positive"], layers=1, proj_dim=3)
    run = import_run(ImportConfig(model=str(folder), data=str(data), damping=0.05, sbert=tiny_encoder),
                     tmp_path / "imported", progress=False)
    text = "the movie was great"
    got = ex.explain(text, k=4)
    want = Run.load(run.path)
    from instattr.ranking import explain
    cli = explain(want, text, methods="nn-cos,gd,if,rep,gd-top", k=4, options={"layers": 1, "proj_dim": 3})
    assert got.prediction == cli["prediction"]
    for m in ("nn-cos", "gd", "if", "rep", "gd-top"):
        assert [r["idx"] for r in got.to_dict()["methods"][m]["supporting"]] == \
            [r["idx"] for r in cli["methods"][m]["supporting"]], m
        np.testing.assert_allclose([r["score"] for r in got.to_dict()["methods"][m]["opposing"]],
                                   [r["score"] for r in cli["methods"][m]["opposing"]], rtol=1e-4, atol=1e-7)
    frame = got.to_frame()
    assert list(frame.columns) == ["method", "kind", "rank", "idx", "text", "label", "score"]
    assert len(frame) == 5 * 2 * 4 and set(frame["label"]) <= {"negative", "positive"}
    # the run it saves is one the command line reads: the same features, and attribute works on it
    saved = ex.save(tmp_path / "saved")
    np.testing.assert_allclose(saved.features("train").features, want.features("train").features, atol=1e-6)
    assert saved.manifest.hf.origin == "explainer" and saved.eval_split == "test"
    assert main(["--quiet", "attribute", "--run", str(saved.path), "--methods", "gd,if"]) == 0
    gd = get_method("gd").fit(want.features("train"), want.final_layer()).score(want.features("test"))
    np.testing.assert_allclose(Run.load(saved.path).scores("gd"), gd, rtol=1e-4, atol=1e-6)
    with pytest.raises(Exception, match="already exists"):
        ex.save(tmp_path / "saved")


def test_an_adapter_in_memory_is_attributed_over_its_trained_modules_and_saved_as_one(tmp_path):
    from peft import AutoPeftModelForSequenceClassification
    data = make_dataset(tmp_path / "data", n_train=16, n_test=4, n_dev=0)
    folder, _ = make_model("lora-bert", tmp_path, data)
    model = AutoPeftModelForSequenceClassification.from_pretrained(folder)
    ex = instattr.Explainer(model, T.AutoTokenizer.from_pretrained(folder), train=rows(data / "train.jsonl"),
                            methods=["if", "if-top"], labels=["negative", "positive"], proj_dim=4)
    tracked = ex.fitted["if-top"].config()["tracked_modules"]
    assert tracked and all("lora_" in n or "modules_to_save" in n for n in tracked)
    saved = ex.save(tmp_path / "saved")
    assert saved.manifest.hf.adapter_base == str(tmp_path / "base")
    assert main(["--quiet", "attribute", "--run", str(saved.path), "--methods", "if-top", "--proj-dim", "4"]) == 0


def test_a_bf16_model_in_memory_gets_the_layered_methods(model):
    import torch
    folder, data = model
    clf = T.AutoModelForSequenceClassification.from_pretrained(folder).to(torch.bfloat16)
    ex = instattr.Explainer(clf, T.AutoTokenizer.from_pretrained(folder), train=rows(data / "train.jsonl"),
                            methods=["gd", "gd-top"], labels=["negative", "positive"], layers=1, proj_dim=4)
    assert set(ex.explain("the movie was great", k=2).to_frame()["method"]) == {"gd", "gd-top"}


def test_explainer_refuses_bad_rows_in_one_line(model):
    folder, data = model
    tok = T.AutoTokenizer.from_pretrained(folder)
    clf = T.AutoModelForSequenceClassification.from_pretrained(folder)
    with pytest.raises(instattr.errors.DataError, match="train row 1: empty text"):
        instattr.Explainer(clf, tok, train=[{"text": "a good film", "label": 0}, {"text": " ", "label": 1}])
    with pytest.raises(instattr.errors.DataError, match="no text column"):
        instattr.Explainer(clf, tok, train=[{"words": "a good film", "label": 0}])
    with pytest.raises(instattr.errors.InstattrError, match="--layers applies to none of"):
        instattr.Explainer(clf, tok, train=rows(data / "train.jsonl"), methods=["gd"], layers=2)


def test_the_notebook_example_runs(model, tmp_path):
    """examples/explain_in_python.py on a small model, as a user runs it; it saves a run."""
    folder, data = model
    script = Path(__file__).parents[1] / "examples" / "explain_in_python.py"
    out = subprocess.run([sys.executable, str(script), "--model", str(folder), "--data", str(data), "--text",
                          "the film was dull", "--save", str(tmp_path / "nb")], capture_output=True, text=True,
                         env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
    assert out.returncode == 0, out.stderr
    assert "'the film was dull': " in out.stdout and "supporting" in out.stdout and "opposing" in out.stdout
    assert json.loads((tmp_path / "nb" / "run.json").read_text())["hf"]["origin"] == "explainer"

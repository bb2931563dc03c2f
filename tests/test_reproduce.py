"""attribute/explain/evaluate/report/reproduce through the CLI on a tiny run; resume skips finished steps."""
import json

import numpy as np

from instattr import Run
from instattr.cli import main
from instattr.report.markdown import markdown_to_html


def test_attribute_writes_scores_and_keeps_them(tiny_run, capsys):
    path = str(tiny_run.path)
    assert main(["--quiet", "attribute", "--run", path, "--methods", "nn-cos,if,rep"]) == 0
    s = tiny_run.scores("if")
    info = tiny_run.score_info("if")
    assert s.shape == (12, 40) and s.dtype == np.float32
    assert info["test_idx"] == list(tiny_run.features("test").idx) and info["seconds"] >= 0
    assert "reconstruction" in tiny_run.score_info("rep")["diagnostics"]
    before = tiny_run.score_path("if", "test").read_bytes()
    capsys.readouterr()
    assert main(["--quiet", "attribute", "--run", path, "--methods", "if", "--limit-test", "3"]) == 0
    assert "kept" in capsys.readouterr().out
    assert tiny_run.score_path("if", "test").read_bytes() == before
    assert main(["--quiet", "attribute", "--run", path, "--methods", "if", "--limit-test", "3", "--overwrite"]) == 0
    assert tiny_run.scores("if").shape == (3, 40)


def test_attribute_errors_are_one_line(tiny_run, capsys):
    assert main(["--quiet", "attribute", "--run", str(tiny_run.path), "--methods", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nosuch" in err and "nn-euc" in err
    assert main(["--quiet", "attribute", "--run", str(tiny_run.path), "--split", "validation"]) == 2


def test_explain_json_and_table(tiny_run, capsys):
    path = str(tiny_run.path)
    assert main(["--quiet", "explain", "--run", path, "the film was good", "--methods", "nn-euc,gd", "--k", "2",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["methods"]) == {"nn-euc", "gd"}
    sup, opp = out["methods"]["gd"]["supporting"], out["methods"]["gd"]["opposing"]
    assert len(sup) == 2 and sup[0]["score"] >= sup[1]["score"] >= opp[1]["score"] >= opp[0]["score"]
    # the supporting examples are the top scores of attributing the same text
    from instattr.attribution import attribute_texts
    scores = attribute_texts(tiny_run, "gd", ["the film was good"])[0]
    train_idx = list(tiny_run.features("train").idx)
    assert train_idx[int(np.argmax(scores))] == sup[0]["idx"]
    assert main(["--quiet", "explain", "--run", path, "the film was good", "--methods", "gd", "--k", "2"]) == 0
    table = capsys.readouterr().out
    assert "prediction:" in table and "── gd" in table and sup[0]["text"][:20] in table


def test_evaluate_sample_options(tiny_run, capsys):
    path = str(tiny_run.path)
    assert main(["--quiet", "evaluate", "retrain", "--run", path, "--methods", "gd,nn-cos", "--n-test", "3",
                 "--n-random", "2"]) == 0
    res = tiny_run.result("retrain")
    assert res["n_test"] == 3 and res["n_random"] == 2 and len(res["per_example"]["gd"]["20"]) == 3
    capsys.readouterr()
    assert main(["--quiet", "evaluate", "near-train", "--run", path, "--n-test", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--n-test does not apply to near-train" in err
    assert main(["--quiet", "evaluate", "timing", "--run", path, "--n-test", "0"]) == 2


def test_reproduce_resumes_and_reports(tmp_path, tiny_encoder, toy_data, monkeypatch, capsys):
    import instattr.reproduce as rp
    monkeypatch.setattr(rp, "QUICK_LIMITS", {"limit_train": 30, "limit_eval": 10})
    from instattr.evaluate import get_evaluation
    for name, quick in (("retrain", {"n_test": 2, "n_random": 2, "ks": (3, 6)}),
                        ("correlation", {"n_test": 5, "n_train": 20}), ("near-train", {"n": 5}),
                        ("mislabel", {"relabel": (0.1,)}), ("lds", {"subsets": 6, "n_test": 5})):
        for key, value in quick.items():
            monkeypatch.setitem(get_evaluation(name).quick, key, value)
    out = tmp_path / "rep"
    args = ["--quiet", "reproduce", "--data", str(toy_data), "--encoder", tiny_encoder, "--out", str(out),
            "--retrain-examples", "1", "--quick"]
    assert main(args) == 0
    run = Run.load(out)
    assert run.result("retrain")["n_test"] == 1  # --retrain-examples wins over --quick's 2
    state = json.loads((out / "reproduce.json").read_text())
    assert {"train", "attribute", "correlation", "retrain", "randomized", "near-train", "mislabel", "lds",
            "timing"} <= set(state["done"])
    assert run.result("lds")["subsets"] == 6 and run.result("mislabel")["relabel_shares"] == [0.1]
    assert "artifacts" not in state["done"]  # HANS only
    assert run.manifest.data.n["train"] == 30
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "Remove the top-k" in html and "Explained test examples" in html
    assert "Finding flipped labels" in html and "Linear datamodeling score" in html
    stamp = (out / "results" / "retrain.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0
    log = capsys.readouterr().out
    assert "retrain: done earlier, skipped" in log
    assert (out / "results" / "retrain.json").stat().st_mtime_ns == stamp
    # a different configuration on the same folder is refused, and nothing is touched
    assert main(args[:-1]) == 2
    assert (out / "results" / "retrain.json").stat().st_mtime_ns == stamp


def test_markdown_tables_become_html():
    html = markdown_to_html("# Title\n\nSome *text* with `code`.\n\n| a | b |\n| --- | --- |\n| 1 | 2 |\n\n- x\n- y\n")
    assert "<h3>Title</h3>" in html and "<th>a</th>" in html and "<td>2</td>" in html
    assert "<code>code</code>" in html and "<li>y</li>" in html and "<i>text</i>" in html

"""Datasets: resolution, formats, and every bad input gets one line naming file and line."""
import json

import pytest

from instattr.cli import main
from instattr.data import DataError, data_root, load_dataset, resolve
from conftest import make_dataset, write_jsonl


def test_named_dataset_resolves_under_root(tmp_path, monkeypatch):
    make_dataset(tmp_path / "root" / "sst2")
    ds = load_dataset("sst2", root=str(tmp_path / "root"))
    assert ds.name == "sst2" and len(ds.splits["train"]) == 40 and ds.eval_split == "test"
    monkeypatch.setenv("INSTATTR_DATA", str(tmp_path / "root"))
    assert data_root() == tmp_path / "root"
    assert resolve("sst2") == tmp_path / "root" / "sst2"


def test_eval_split_falls_back_to_dev(tmp_path):
    folder = make_dataset(tmp_path / "d", n_test=0)
    assert load_dataset(str(folder)).eval_split == "dev"


def test_pairs_and_label_names(toy_pairs):
    ds = load_dataset(str(toy_pairs))
    assert ds.is_pair and ds.label_names == ["non-entailment", "entailment"]
    assert all(e.query for e in ds.splits["train"].examples)


def test_csv_with_named_columns(tmp_path):
    (tmp_path / "train.csv").write_text("sentence,sentiment\nnice film,positive\nawful plot,negative\n")
    (tmp_path / "labels.json").write_text('["negative", "positive"]')
    ds = load_dataset(str(tmp_path), text_column="sentence", label_column="sentiment")
    assert [e.label for e in ds.splits["train"].examples] == [1, 0]
    assert ds.splits["train"].examples[0].document == "nice film"


def test_last_line_without_newline(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"document": "a", "label": 0}\n{"document": "b", "label": 1}')
    assert len(load_dataset(str(tmp_path)).splits["train"]) == 2


BAD = {
    "malformed JSON": ('{"document": "a", "label": 0}\n{"document": "b", "label": 1\n', "train.jsonl:2", "malformed JSON"),
    "missing document": ('{"document": "a", "label": 0}\n{"label": 1}\n', "train.jsonl:2", "missing 'document'"),
    "missing label": ('{"document": "a", "label": 0}\n{"document": "b"}\n', "train.jsonl:2", "missing 'label'"),
    "label outside": ('{"document": "a", "label": 0}\n{"document": "b", "label": 5}\n', "train.jsonl:2", "outside labels.json"),
    "duplicate idx": ('{"idx": "x", "document": "a", "label": 0}\n{"idx": "x", "document": "b", "label": 1}\n',
                      "train.jsonl:2", "duplicate idx"),
    "empty file": ("", "train.jsonl", "empty file"),
    "query on some lines": ('{"document": "a", "query": "q", "label": 0}\n{"document": "b", "label": 1}\n',
                            "train.jsonl:2", "query"),
    "not an object": ('[1, 2]\n', "train.jsonl:1", "JSON object"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_one_line_exit_2(case, tmp_path, capsys):
    text, where, what = BAD[case]
    (tmp_path / "labels.json").write_text('["negative", "positive"]')
    (tmp_path / "train.jsonl").write_text(text)
    with pytest.raises(DataError) as e:
        load_dataset(str(tmp_path))
    assert where in str(e.value) and what in str(e.value)
    code = main(["--quiet", "train", "--data", str(tmp_path), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and where in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_non_utf8_bytes(tmp_path, capsys):
    (tmp_path / "train.jsonl").write_bytes(b'{"document": "a", "label": 0}\n{"document": "caf\xe9", "label": 1}\n')
    assert main(["--quiet", "train", "--data", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "train.jsonl:2" in err and "UTF-8" in err


def test_bad_labels_json(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"document": "a", "label": 0}])
    (tmp_path / "labels.json").write_text('{"a": 1}')
    with pytest.raises(DataError, match="labels.json"):
        load_dataset(str(tmp_path))


def test_unknown_dataset_name(tmp_path, capsys):
    assert main(["--quiet", "train", "--data", "nosuch", "--out", str(tmp_path / "r")]) == 2
    assert "nosuch" in capsys.readouterr().err


def test_pairs_in_train_but_not_in_test(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"document": "a", "query": "b", "label": 0}])
    write_jsonl(tmp_path / "test.jsonl", [{"document": "a", "label": 0}])
    with pytest.raises(DataError, match="test.jsonl"):
        load_dataset(str(tmp_path))


def test_label_names_accepted_as_strings(tmp_path):
    (tmp_path / "labels.json").write_text(json.dumps(["neg", "pos"]))
    write_jsonl(tmp_path / "train.jsonl", [{"document": "a", "label": "pos"}, {"document": "b", "label": "neg"}])
    assert load_dataset(str(tmp_path)).splits["train"].labels == [1, 0]

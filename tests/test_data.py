"""Datasets: resolution, formats, and every bad input gets one line naming file and line."""
import gzip
import json
import sys
from pathlib import Path

import pytest

import instattr.data
from instattr.cli import main
from instattr.data import DataError, data_root, load_dataset, resolve

from conftest import make_dataset, write_jsonl

PACKAGED = Path(instattr.data.__file__).parent / "datasets"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SIZES = {"sst2": {"train": 6920, "dev": 872, "test": 1821}, "mnli": {"train": 10000, "dev": 9815},
         "hans": {"train": 10000, "dev": 9815, "test": 1000}}


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
    ds = load_dataset(str(tmp_path), text_field="sentence", label_field="sentiment")
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
    "empty text": ('{"document": "a", "label": 0}\n{"document": " \\t ", "label": 1}\n', "train.jsonl:2", "empty text"),
    "one class": ('{"document": "a", "label": 1}\n{"document": "b", "label": "positive"}\n', "train.jsonl",
                  "train has only one class (label 'positive'); a classifier needs at least two"),
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


@pytest.fixture
def only_packaged(tmp_path, monkeypatch):
    """No folder root holds the named datasets: no $INSTATTR_DATA, no ./data, no ../shared/data."""
    monkeypatch.delenv("INSTATTR_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(instattr.data, "SHARED_DATA", str(tmp_path / "no-shared-data"))


@pytest.mark.parametrize("name", sorted(SIZES))
def test_named_datasets_load_from_the_package(name, only_packaged):
    ds = load_dataset(name)
    assert Path(ds.root) == PACKAGED / name and ds.name == name
    assert {s: len(split) for s, split in ds.splits.items()} == SIZES[name]
    assert ds.is_pair == (name != "sst2")


@pytest.mark.skipif(not SHARED.is_dir(), reason="no shared data folder to compare with")
def test_packaged_datasets_equal_the_shared_ones():
    shared = sorted(p.relative_to(SHARED) for p in SHARED.glob("*/*") if p.is_file())
    assert sorted(str(p.relative_to(PACKAGED)) for p in PACKAGED.glob("*/*")) == \
        sorted(str(p) + (".gz" if p.suffix == ".jsonl" else "") for p in shared)
    for rel in shared:
        packaged = PACKAGED / rel
        data = gzip.decompress((packaged.parent / (packaged.name + ".gz")).read_bytes()) \
            if rel.suffix == ".jsonl" else packaged.read_bytes()
        assert data == (SHARED / rel).read_bytes(), rel


def test_folder_roots_before_the_package(tmp_path, monkeypatch, only_packaged):
    make_dataset(tmp_path / "data" / "sst2")
    assert load_dataset("sst2").root == str(Path("data") / "sst2")
    # a root that lacks the dataset is passed over
    (tmp_path / "env").mkdir()
    monkeypatch.setenv("INSTATTR_DATA", str(tmp_path / "env"))
    assert resolve("sst2") == Path("data") / "sst2"
    assert resolve("mnli") == PACKAGED / "mnli"


def test_explicit_root_must_hold_the_dataset(tmp_path, only_packaged):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not found under the data root"):
        resolve("sst2", str(tmp_path / "empty"))
    with pytest.raises(DataError, match="data root is not a folder"):
        resolve("sst2", str(tmp_path / "missing"))


def test_gzipped_splits(tmp_path):
    (tmp_path / "train.jsonl.gz").write_bytes(gzip.compress(b'{"document": "a", "label": 0}\n{"document": "b", "label": 1}\n'))
    (tmp_path / "test.csv.gz").write_bytes(gzip.compress(b"document,label\nc,1\n"))
    ds = load_dataset(str(tmp_path))
    assert ds.splits["train"].labels == [0, 1] and ds.splits["test"].examples[0].document == "c"
    (tmp_path / "train.jsonl.gz").write_bytes(gzip.compress(b'{"document": "a", "label": 0}\n{"document": "\xe9", "label": 1}\n'))
    with pytest.raises(DataError, match=r"train\.jsonl\.gz:2: .*UTF-8"):
        load_dataset(str(tmp_path))
    (tmp_path / "train.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match=r"train\.jsonl\.gz: .*gzip"):
        load_dataset(str(tmp_path))


@pytest.mark.parametrize("arg", ["some/missing/folder", "./missing", "/no/such/instattr/data", "~/no-such-instattr-data",
                                 "here/missing"])
def test_missing_local_path_is_not_a_hub_name(arg, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "here").mkdir()
    with pytest.raises(DataError, match="no such dataset folder"):
        resolve(arg)
    assert main(["--quiet", "train", "--data", arg, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert f"{arg}: no such dataset folder" in err and "datasets" not in err


def test_hub_name_without_datasets_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)   # import datasets raises ImportError
    assert resolve("owner/name") == "owner/name"
    with pytest.raises(DataError) as e:
        load_dataset("owner/name")
    assert str(e.value) == ("owner/name: not a local folder; as a Hugging Face dataset name it needs "
                            "`pip install 'instattr[hf]'`")


@pytest.mark.parametrize("sep", ["\u2028", "\u2029", "\u0085"])
def test_jsonl_unicode_line_separators_inside_strings(sep, tmp_path):
    rows = [{"document": f"one{sep}two", "label": 0}, {"document": "three", "label": 1}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                          encoding="utf-8")
    assert [e.document for e in load_dataset(str(tmp_path)).splits["train"].examples] == [f"one{sep}two", "three"]


def test_jsonl_crlf_lines(tmp_path):
    (tmp_path / "train.jsonl").write_bytes(b'{"document": "a", "label": 0}\r\n{"document": "b", "label": 1}\r\n\r\n'
                                           b'{"document": "c", "label": 7\r\n')
    with pytest.raises(DataError, match=r"train\.jsonl:4: malformed JSON"):
        load_dataset(str(tmp_path))


def test_csv_quoted_newlines_kept_and_lines_counted(tmp_path):
    (tmp_path / "labels.json").write_text('["negative", "positive"]')
    csv_text = b'document,label\r\n"line one\nline two\r\nline three",positive\r\n\r\n"fine",negative\r\n'
    (tmp_path / "train.csv").write_bytes(csv_text)
    docs = [e.document for e in load_dataset(str(tmp_path)).splits["train"].examples]
    assert docs == ["line one\nline two\r\nline three", "fine"]
    # errors name the line a record starts on: the record after the multi-line one, then the multi-line one
    (tmp_path / "train.csv").write_bytes(csv_text + b'bad,7\n')
    with pytest.raises(DataError, match=r"train\.csv:7: label 7 outside"):
        load_dataset(str(tmp_path))
    (tmp_path / "train.csv").write_bytes(b'document,label\nok,0\n"two\nlines",7\n')
    with pytest.raises(DataError, match=r"train\.csv:3: label 7 outside"):
        load_dataset(str(tmp_path))


def test_byte_order_mark(tmp_path):
    (tmp_path / "train.csv").write_bytes(b"\xef\xbb\xbfdocument,label\nnice,1\nawful,0\n")
    assert load_dataset(str(tmp_path)).splits["train"].labels == [1, 0]
    (tmp_path / "train.csv").unlink()
    (tmp_path / "train.jsonl").write_bytes(b'\xef\xbb\xbf{"document": "a", "label": 0}\n{"document": "b", "label": 1}\n')
    (tmp_path / "labels.json").write_bytes(b'\xef\xbb\xbf["negative", "positive"]')
    assert load_dataset(str(tmp_path)).splits["train"].labels == [0, 1]


@pytest.mark.parametrize("header", ["text,label", "sentence,label", "premise,labels", "extra,text,labels"])
def test_default_columns_fall_back(header, tmp_path):
    rows = ["nice,1", "awful,0"] if header.count(",") == 1 else ["x,nice,1", "y,awful,0"]
    (tmp_path / "train.csv").write_text("\n".join([header, *rows]) + "\n")
    ds = load_dataset(str(tmp_path))
    assert [e.document for e in ds.splits["train"].examples] == ["nice", "awful"] and ds.splits["train"].labels == [1, 0]


def test_pairs_by_fallback_columns(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"premise": "p", "hypothesis": "h", "labels": 0},
                                           {"premise": "q", "hypothesis": "i", "labels": 1}])
    (tmp_path / "test.tsv").write_text("sentence\tquery\tlabel\np\th\t1\n")
    ds = load_dataset(str(tmp_path))
    assert ds.is_pair and [e.query for e in ds.splits["train"].examples] == ["h", "i"]
    assert ds.splits["test"].examples[0].query == "h"


def test_named_fields(tmp_path):
    (tmp_path / "train.csv").write_text("id,review,stars,title\n1,great,1,t\n2,dull,0,u\n")
    ds = load_dataset(str(tmp_path), text_field="review", label_field="stars", query_field="title")
    assert [(e.document, e.query, e.label) for e in ds.splits["train"].examples] == [("great", "t", 1), ("dull", "u", 0)]
    write_jsonl(tmp_path / "train.jsonl", [{"body": "great", "y": 1}, {"body": "dull", "y": 0}])
    (tmp_path / "train.csv").unlink()
    assert load_dataset(str(tmp_path), text_field="body", label_field="y").splits["train"].labels == [1, 0]


def test_missing_columns_listed(tmp_path):
    (tmp_path / "train.csv").write_text("id,review,stars\n1,great,1\n2,dull,0\n")
    with pytest.raises(DataError) as e:
        load_dataset(str(tmp_path))
    assert str(e.value) == (f"{tmp_path / 'train.csv'}:1: no text column (tried 'document', 'text', 'sentence', "
                            "'premise'); columns are: id, review, stars; name it with --text-field")
    with pytest.raises(DataError) as e:
        load_dataset(str(tmp_path), text_field="review")
    assert str(e.value) == (f"{tmp_path / 'train.csv'}:1: no label column (tried 'label', 'labels'); "
                            "columns are: id, review, stars; name it with --label-field")
    with pytest.raises(DataError, match=r"train\.csv:1: no query column 'hyp'; columns are: id, review, stars"):
        load_dataset(str(tmp_path), text_field="review", label_field="stars", query_field="hyp")
    write_jsonl(tmp_path / "train.jsonl", [{"body": "great", "y": 1}])
    (tmp_path / "train.csv").unlink()
    with pytest.raises(DataError, match=r"train\.jsonl:1: no text column 'text'; columns are: body, y"):
        load_dataset(str(tmp_path), text_field="text")


def test_field_flags_through_the_cli(tmp_path, tiny_encoder, capsys):
    data = tmp_path / "reviews"
    data.mkdir()
    rows = "".join(f"{i},the film was {'good' if i % 2 else 'bad'},{i % 2}\n" for i in range(12))
    (data / "train.csv").write_text("id,review,stars\n" + rows)
    base = ["--quiet", "train", "--data", str(data), "--encoder", tiny_encoder, "--epochs", "1"]
    assert main(base + ["--out", str(tmp_path / "bad"), "--text-field", "body"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no text column 'body'; columns are: id, review, stars" in err
    assert not (tmp_path / "bad").exists()
    assert main(base + ["--out", str(tmp_path / "run"), "--text-field", "review", "--label-field", "stars"]) == 0
    from instattr.store import Run
    run = Run.load(tmp_path / "run")
    assert run.manifest.config["text_field"] == "review" and run.manifest.data.fields == {"text": "review", "label": "stars"}
    assert run.dataset().splits["train"].examples[1].document == "the film was good"   # reopened with the same fields


def test_hub_dataset_columns_picked_like_files(monkeypatch):
    import types

    class Part(list):
        column_names = ["sentence", "labels"]
        features = {}

    fake = types.SimpleNamespace(load_dataset=lambda name: {"train": Part([{"sentence": "a", "labels": 0},
                                                                            {"sentence": "b", "labels": 1}])})
    monkeypatch.setitem(sys.modules, "datasets", fake)
    ds = load_dataset("owner/name")
    assert [e.document for e in ds.splits["train"].examples] == ["a", "b"] and ds.splits["train"].labels == [0, 1]
    with pytest.raises(DataError, match=r"owner/name\[train\]: no text column 'review'; columns are: sentence, labels"):
        load_dataset("owner/name", text_field="review")


def test_empty_csv_cell(tmp_path):
    (tmp_path / "train.csv").write_text('document,label\na,0\n"\n",1\n')
    with pytest.raises(DataError, match=r"train\.csv:3: empty text"):
        load_dataset(str(tmp_path))

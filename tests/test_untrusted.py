"""Files instattr did not write: every generated input to a reader either loads or gives the one-line
error (an InstattrError without a newline), never another exception; no code runs from a checkpoint.

Property-based (hypothesis) over the dataset readers (JSONL, CSV/TSV, gzip, labels.json) and run.json;
the number of inputs each reader saw is printed.
"""
import gzip
import json
import pickle
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from instattr.data import load_dataset
from instattr.errors import InstattrError
from instattr.manifest import Manifest

SEEN = Counter()
EXAMPLES = 150
FAST = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=12), st.sampled_from(["0", "1", "positive", "negative", " ", ""]))
values = st.recursive(scalars, lambda kids: st.one_of(st.lists(kids, max_size=3),
                                                      st.dictionaries(st.text(max_size=6), kids, max_size=3)),
                      max_leaves=6)
keys = st.sampled_from(["idx", "document", "text", "sentence", "query", "hypothesis", "label", "labels", "other"])
rows = st.dictionaries(keys, scalars, max_size=5)


@pytest.fixture(scope="module", autouse=True)
def report(request):
    yield
    with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
        print("\ngenerated inputs per reader: " + ", ".join(f"{k} {v}" for k, v in sorted(SEEN.items())))


def loads_or_one_line(folder: Path):
    """load_dataset(folder) succeeds, or fails with a one-line InstattrError (anything else fails the test)."""
    try:
        ds = load_dataset(str(folder))
    except InstattrError as e:
        assert "\n" not in str(e) and str(e), repr(e)
        return None
    assert ds.splits["train"].examples and len(set(ds.splits["train"].labels)) >= 2
    return ds


def folder_with(files: dict) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="untrusted-"))
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def good_rows(n=4):
    return [{"idx": f"r{i}", "document": f"text {i}", "label": i % 2} for i in range(n)]


@FAST
@given(st.lists(st.one_of(rows, values), max_size=6), st.booleans())
def test_jsonl_rows_load_or_give_one_line(generated, gzipped):
    SEEN["jsonl" + (".gz" if gzipped else "")] += 1
    text = "".join(json.dumps(r) + "\n" for r in good_rows() + generated)
    data = gzip.compress(text.encode()) if gzipped else text.encode()
    folder = folder_with({"train.jsonl.gz" if gzipped else "train.jsonl": data})
    try:
        loads_or_one_line(folder)
    finally:
        shutil.rmtree(folder)


@FAST
@given(st.binary(max_size=300), st.sampled_from(["train.jsonl", "train.jsonl.gz", "train.csv", "train.tsv.gz"]))
def test_arbitrary_bytes_load_or_give_one_line(data, name):
    SEEN["bytes " + name] += 1
    folder = folder_with({name: data})
    try:
        loads_or_one_line(folder)
    finally:
        shutil.rmtree(folder)


@FAST
@given(st.lists(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=8), min_size=1,
                         max_size=4), max_size=6), st.sampled_from([",", "\t"]), st.booleans())
def test_csv_and_tsv_tables_load_or_give_one_line(table, sep, with_header):
    SEEN["csv/tsv"] += 1
    lines = ([sep.join(["document", "label"])] if with_header else []) + \
        [sep.join(["good text", "0"]), sep.join(["bad text", "1"])] + [sep.join(cells) for cells in table]
    name = "train.csv" if sep == "," else "train.tsv"
    folder = folder_with({name: ("\n".join(lines) + "\n").encode()})
    try:
        loads_or_one_line(folder)
    finally:
        shutil.rmtree(folder)


@FAST
@given(values)
def test_labels_json_loads_or_gives_one_line(labels):
    SEEN["labels.json"] += 1
    folder = folder_with({"train.jsonl": "".join(json.dumps(r) + "\n" for r in good_rows()).encode(),
                          "labels.json": json.dumps(labels).encode()})
    try:
        loads_or_one_line(folder)
    finally:
        shutil.rmtree(folder)


def valid_manifest():
    return {"format": 3, "mode": "head", "label_names": ["a", "b"], "eval_split": "test", "pair_mode": None,
            "l2": 0.01, "seed": 0,
            "data": {"name": "d", "root": "/d", "arg": "d", "is_pair": False, "n": {"train": 2}},
            "sbert": {"name": "e", "path": "/e", "pooling": "mean", "max_length": 8, "hidden_size": 4},
            "encoder": {"name": "e", "path": "/e", "pooling": "mean", "max_length": 8, "hidden_size": 4},
            "head": {"l2": 0.01, "lr": 0.1, "epochs": 1, "batch_size": 2, "hidden": 4, "seed": 0, "d_in": 4}}


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_run_json_parses_or_gives_one_line(data):
    """A valid manifest with one field replaced (at the top or one level down) or removed."""
    SEEN["run.json"] += 1
    m = valid_manifest()
    key = data.draw(st.sampled_from(sorted(m)))
    if isinstance(m[key], dict) and data.draw(st.booleans()):
        inner = data.draw(st.sampled_from(sorted(m[key])))
        m[key] = {**m[key], inner: data.draw(values)}
    elif data.draw(st.booleans()):
        del m[key]
    else:
        m[key] = data.draw(values)
    try:
        Manifest.parse(m, "run.json")
    except InstattrError as e:
        assert "\n" not in str(e)
    Manifest.parse(valid_manifest(), "run.json")        # the unchanged one parses


def test_a_trained_run_without_its_encoder_is_refused_when_read():
    m = valid_manifest()
    del m["encoder"]
    with pytest.raises(InstattrError, match=r"^run.json: missing 'encoder'$"):
        Manifest.parse(m, "run.json")


def test_a_pickled_checkpoint_never_runs(tmp_path, tiny_encoder, capsys):
    """A checkpoint whose weights are a pickle with a payload, and one whose config asks for its own
    code: import refuses both in one line, and the payload never runs."""
    from instattr.cli import main

    from conftest import make_dataset
    data = make_dataset(tmp_path / "data", n_train=8, n_test=2, n_dev=0)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.write_text, (marker, "ran"))
    bad = tmp_path / "pickled"
    shutil.copytree(tiny_encoder, bad)
    for f in bad.glob("*.safetensors"):
        f.unlink()
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "architectures": ["BertForSequenceClassification"],
                                                 "num_labels": 2}))
    (bad / "pytorch_model.bin").write_bytes(pickle.dumps({"bert.embeddings.word_embeddings.weight": Payload()}))
    remote = tmp_path / "remote"
    shutil.copytree(tiny_encoder, remote)
    (remote / "config.json").write_text(json.dumps({**cfg, "model_type": "evil", "num_labels": 2, "auto_map": {
        "AutoConfig": "evil.EvilConfig", "AutoModelForSequenceClassification": "evil.EvilModel"}}))
    (remote / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    for folder in (bad, remote):
        capsys.readouterr()
        code = main(["--quiet", "import", "--model", str(folder), "--data", str(data), "--out", str(tmp_path / "r")])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "could not load a sequence classifier" in err, err
        assert not marker.exists()

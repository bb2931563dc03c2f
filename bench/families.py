"""Every command on every model family of the suite (tests/_families.py): the slow half of the family
suite, which runs every command on one encoder and one decoder only.

    python bench/families.py [--families bert,llama,...] [--work /tmp/instattr-families]

For each family: a tiny random model built from a config, trained a few steps and saved; then
``import``, ``predict``, ``attribute --methods paper,gd-top,if-top`` (dense), ``attribute --top-k``,
``explain``, ``suspects`` (if-top included), ``evaluate`` correlation, retrain, randomized (final and
top-1 scopes), ``report``. Prints one line per family: the seconds of each step, or the first
command that failed and its error line.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("INSTATTR_CACHE", "off")


def main() -> int:
    from instattr.cli import main as cli

    from _families import FAMILIES, make_model
    from conftest import make_dataset
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--work", default="/tmp/instattr-families")
    a = ap.parse_args()
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    sbert = work / "sbert"
    make_model("bert", work / "sbert-src", make_dataset(work / "sbert-data", n_train=8, n_test=0, n_dev=0))
    from transformers import AutoModel, AutoTokenizer
    AutoModel.from_pretrained(work / "sbert-src" / "model").base_model.save_pretrained(sbert)   # a tiny encoder
    AutoTokenizer.from_pretrained(work / "sbert-src" / "model").save_pretrained(sbert)
    failed = 0
    for family in a.families.split(","):
        root = work / family
        pairs = family == "bert"
        data = make_dataset(root / "data", n_train=40, n_test=10, n_dev=0, pairs=pairs)
        folder, _ = make_model(family, root, data)
        run = str(root / "run")
        query = ["--query", "the cat saw the dog"] if pairs else []
        steps = [("import", ["import", "--model", str(folder), "--data", str(data), "--sbert", str(sbert), "--out", run]),
                 ("predict", ["predict", "--run", run, "the dog saw the cat", *query]),
                 ("attribute", ["attribute", "--run", run, "--methods", "paper,gd-top,if-top", "--proj-dim", "4"]),
                 ("top-k", ["attribute", "--run", run, "--methods", "gd,if-top", "--top-k", "5", "--bottom-k", "5",
                            "--proj-dim", "4"]),
                 ("explain", ["explain", "--run", run, "the dog saw the cat", *query, "--methods", "if,rep,if-top",
                              "--proj-dim", "4", "--k", "3"]),
                 ("suspects", ["suspects", "--run", run, "--methods", "if,loss,if-top", "--proj-dim", "4"]),
                 ("correlation", ["evaluate", "correlation", "--run", run, "--n-test", "5"]),
                 ("retrain", ["evaluate", "retrain", "--run", run, "--n-test", "3", "--n-random", "2"]),
                 ("randomized", ["evaluate", "randomized", "--run", run, "--n-test", "5"]),
                 ("randomized top-1", ["evaluate", "randomized", "--run", run, "--n-test", "5", "--scope", "top-1"]),
                 ("report", ["report", "--run", run])]
        times, error = [], None
        for name, args in steps:
            t = time.perf_counter()
            err = io.StringIO()
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                code = cli(["--quiet", *args])
            times.append(f"{name} {time.perf_counter() - t:.1f}")
            if code != 0:
                error = f"{name} exited {code}: {err.getvalue().strip().splitlines()[-1:]}"
                break
        failed += error is not None
        print(f"{family:12s} {'FAILED ' + error if error else 'ok'}  ({', '.join(times)} s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Command line for large training sets: ``attribute --top-k``, ``index build|verify``, ``query``."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .errors import InstattrError
from .index.ann import KINDS


def scale_args(p: argparse.ArgumentParser) -> None:
    """``attribute``'s flags for top-k results and the Ray backend."""
    g = p.add_argument_group("large training sets")
    g.add_argument("--top-k", type=int, metavar="K", help="keep only each test row's K best training rows "
                   "(scores/{method}-{split}.topk.npz), never the dense matrix")
    g.add_argument("--bottom-k", type=int, metavar="K", help="with --top-k: also the K most opposing "
                   "(.bottomk.npz)")
    backend_args(g)


def backend_args(g, what: str = "where training sides and score blocks are computed") -> None:
    g.add_argument("--backend", choices=["local", "ray"], default="local",
                   help=f"{what} (ray: pip install 'instattr[ray]')")
    g.add_argument("--address", help="Ray cluster address (ray start --head; default: start a local Ray)")
    g.add_argument("--workers", type=int, metavar="N", help="Ray actors / local CPUs (default: the cluster's CPUs)")


def backend_of(a):
    """The backend object ``--backend`` names (:mod:`instattr.backend`)."""
    if a.workers is not None and a.workers < 1:
        raise InstattrError(f"--workers must be positive, got {a.workers}")
    if a.backend == "ray":
        from .distributed import RayBackend
        return RayBackend(a.address, a.workers)
    if a.address or a.workers:
        raise InstattrError("--address and --workers apply to --backend ray")
    from .backend import LOCAL
    return LOCAL


def scale_options(a) -> dict:
    """``attribute_run`` keyword arguments from ``scale_args``."""
    return {"top_k": a.top_k, "bottom_k": a.bottom_k, "backend": backend_of(a)}


def cmd_index_build(a) -> int:
    from .cli_args import method_options
    from .index import build_run_index
    from .store import LMRun, Run, is_lm_run
    if a.ann is not None and a.ann_k < 1:
        raise InstattrError(f"--ann-k must be positive, got {a.ann_k}")
    kwargs = dict(options=method_options(a), device=a.device, dtype=a.dtype, shard_rows=a.shard_rows, ann=a.ann,
                  ann_k=a.ann_k, ann_target=a.ann_target, overwrite=a.overwrite, progress=not a.quiet,
                  backend=backend_of(a))
    if is_lm_run(a.run):
        from .index.language import build_lm_index
        m = build_lm_index(LMRun.load(a.run), a.methods, a.out, **kwargs)
    else:
        m = build_run_index(Run.load(a.run), a.methods or "gd,if,nn-cos", a.out, **kwargs)
    shards = sum(len(e["shards"]) for e in m["methods"].values())
    recall = {n: e["ann"]["recall"] for n, e in m["methods"].items() if e.get("ann")}
    print(f"index {a.out}: {m['n']} training rows, {', '.join(m['methods'])} ({shards} shards, {m['dtype']})"
          + ("; ANN recall@%d %s" % (a.ann_k, ", ".join(f"{n} {r:.3f}" for n, r in recall.items())) if recall
             else ""))
    return 0


def cmd_index_verify(a) -> int:
    from .index import verify
    r = verify(a.index)
    recall = ", ".join(f"{n} {v:.3f}" for n, v in r["ann_recall"].items())
    print(f"{a.index}: ok, {r['files']} files ({r['shards']} shards) of {r['rows']} rows match their checksums"
          + (f"; ANN recall {recall}" if recall else ""))
    return 0


def cmd_query(a) -> int:
    from .index import Index
    index = Index(a.index, device=a.device)
    names = a.methods.split(",") if a.methods else index.names
    if a.top_k < 1 or (a.bottom_k is not None and a.bottom_k < 1):
        raise InstattrError("--top-k and --bottom-k must be positive")
    if index.is_lm:
        return _query_lm(a, index, names)
    if a.prompt is not None or a.completion is not None:
        raise InstattrError(f"{a.index}: indexes a classifier run; --prompt and --completion are for a "
                            "language-model run's index (give --text)")
    if (a.text is None) == (a.split is None):
        raise InstattrError("give either --text or --split")
    run = index.run()
    if a.text is not None:
        from .pipeline import featurize
        test = featurize(run, [a.text], [a.query] if a.query is not None else None, device=a.device)
    else:
        if a.split not in run.splits:
            raise InstattrError(f"{run.path}: no features for split {a.split!r} (has {', '.join(run.splits)})")
        if not a.out:
            raise InstattrError("--split writes top-k files: give --out FOLDER")
        test = run.features(a.split)
    res = _search(index, names, test, a)
    if a.text is None:
        return _write_split(index, res, test, a)
    ids, labels = index.ids, index.labels
    examples = None
    try:
        examples = run.examples("train")
    except InstattrError:
        pass
    out = {"text": a.text, **({"query": a.query} if a.query is not None else {}),
           "prediction": run.label_names[int(test.pred[0])], "methods": {}}
    for n, r in res.items():
        out["methods"][n] = {which: [_row(int(p), float(v), ids, labels, run.label_names, examples)
                                     for p, v in zip(r[which][0][0], r[which][1][0]) if p >= 0]
                              for which in r}
    print(json.dumps(out, indent=2) if a.json else _table(out))
    return 0


def _search(index, names, test, a) -> dict:
    if a.ann:
        return index.ann_search(names, test, a.top_k, a.bottom_k or 0)
    with backend_of(a) as backend:
        return backend.search(index, names, {n: index.method(n) for n in names}, test, a.top_k, a.bottom_k or 0)


def _query_lm(a, index, names) -> int:
    """``query`` on a language-model run's index: a prompt (its completion given, or the model's
    greedy one) or every row of a query split."""
    from .methods.language import Rows
    if a.text is not None or a.query is not None:
        raise InstattrError(f"{a.index}: indexes a language-model run; give --prompt (and --completion), not --text")
    if (a.prompt is None) == (a.split is None):
        raise InstattrError("give either --prompt or --split")
    if a.completion is not None and a.prompt is None:
        raise InstattrError("--completion needs --prompt")
    if a.max_new_tokens < 1:
        raise InstattrError(f"--max-new-tokens must be at least 1, got {a.max_new_tokens}")
    run = index.run()
    if a.split is not None:
        if a.split not in run.splits or a.split == "train":
            raise InstattrError(f"{run.path}: no query split {a.split!r}; the run's queries are {run.eval_split!r}")
        if not a.out:
            raise InstattrError("--split writes top-k files: give --out FOLDER")
        test = Rows(run.rows(a.split))
        return _write_split(index, _search(index, names, test, a), test, a)
    if not a.prompt.strip():
        raise InstattrError("query: give a non-empty --prompt")
    completion = a.completion
    if completion is None:
        completion = index.method(names[0]).explainer.complete(a.prompt, a.max_new_tokens)
    test = Rows([{"idx": "query", "prompt": a.prompt, "completion": completion}])
    res = _search(index, names, test, a)
    ids, train = index.ids, run.rows("train")
    out = {"prompt": a.prompt, "completion": completion, "methods": {}}
    for n, r in res.items():
        out["methods"][n] = {which: [{"idx": str(ids[p]), "score": float(v), "row": train[int(p)]}
                                     for p, v in zip(r[which][0][0], r[which][1][0]) if p >= 0] for which in r}
    print(json.dumps(out, indent=2) if a.json else _lm_table(out))
    return 0


def _lm_table(out: dict, width: int = 100) -> str:
    from .lm import row_text
    lines = [f"prompt: {out['prompt']}", f"completion: {out['completion']}"]
    for n, r in out["methods"].items():
        for which, rows in r.items():
            lines.append(f"── {n} {'supporting' if which == 'top' else 'opposing'}")
            lines += [f"{x['score']:+#.4g} {x['idx']:<12} {' '.join(row_text(x['row']).split())[:width]}" for x in rows]
    return "\n".join(lines)


def _row(pos, score, ids, labels, names, examples) -> dict:
    row = {"idx": str(ids[pos]), "label": names[int(labels[pos])], "score": score}
    if examples is not None and pos < len(examples):
        row["text"] = examples[pos].document
    return row


def _table(out: dict) -> str:
    lines = [f"prediction: {out['prediction']}"]
    for n, r in out["methods"].items():
        for which, rows in r.items():
            lines.append(f"── {n} {'supporting' if which == 'top' else 'opposing'}")
            lines += [f"{x['score']:+#.4g} {x['label']:<14} {x['idx']:<12} {x.get('text', '')}" for x in rows]
    return "\n".join(lines)


def _write_split(index, res, test, a) -> int:
    """``query --split``: one top-k (and bottom-k) file per method, the format of ``attribute --top-k``;
    an approximate search that found fewer than K rows for a query leaves them empty (position -1)."""
    from .store import write_top_k
    out = Path(a.out)
    for n, r in res.items():
        for which, (pos, vals) in r.items():
            write_top_k(out / f"{n}-{a.split}.{which}k.npz", n, a.split, which, test.idx, index.ids, pos, vals,
                        {"ann": bool(a.ann), "index": str(index.root),
                         "config": index.manifest["methods"][n]["config"]}, allow_missing=True)
    print(f"wrote {len(res)} methods' top-{a.top_k} for {len(test)} {a.split} rows to {out}")
    return 0


def add_commands(sub) -> None:
    """The ``index`` and ``query`` subcommands."""
    from .cli_args import device_arg, method_args
    ix = sub.add_parser("index", help="an index of training sides for large training sets (build, verify)")
    isub = ix.add_subparsers(dest="index_command", required=True)
    b = isub.add_parser("build", help="write each method's training side in shards (resumable)")
    b.add_argument("--run", required=True)
    b.add_argument("--methods", help="'paper' or a comma-separated list (default gd,if,nn-cos; on a language-model "
                   "run every method it can compute but bm25)")
    b.add_argument("--out", required=True, help="index folder")
    b.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    b.add_argument("--shard-rows", type=int, metavar="N", help="training rows per shard (a multiple of 16384; "
                   "default 262144)")
    b.add_argument("--ann", choices=KINDS,
                   help="also build a FAISS index (pip install 'instattr[faiss]'); ivf-sq8 stores 8-bit codes: "
                        "a quarter of ivf's memory")
    b.add_argument("--ann-k", type=int, default=10, help="k of the recall@k measured at build time (default 10)")
    b.add_argument("--ann-target", type=float, default=0.95, help="recall the search breadth is tuned to")
    b.add_argument("--overwrite", action="store_true", help="rebuild an index made with other arguments")
    backend_args(b)
    method_args(b)
    device_arg(b)
    b.set_defaults(func=cmd_index_build)
    v = isub.add_parser("verify", help="check every shard's checksum; report ANN recall")
    v.add_argument("index")
    v.set_defaults(func=cmd_index_verify)

    q = sub.add_parser("query", help="the best training rows for new text or a split, from an index")
    q.add_argument("--index", required=True)
    q.add_argument("--text", help="a new text (its run's classifier featurizes it)")
    q.add_argument("--query", help="the hypothesis, for sentence-pair runs")
    q.add_argument("--prompt", help="a language-model run's index: a new prompt")
    q.add_argument("--completion", help="with --prompt: the completion to explain (default: the model's greedy one)")
    q.add_argument("--max-new-tokens", type=int, default=20, help="the greedy completion's length limit "
                   "(default 20)")
    q.add_argument("--split", help="every row of a split of the index's run (writes --out)")
    q.add_argument("--out", help="--split: folder for {method}-{split}.topk.npz")
    q.add_argument("--methods", help="comma-separated (default: every method in the index)")
    q.add_argument("--top-k", type=int, default=5)
    q.add_argument("--bottom-k", type=int)
    q.add_argument("--ann", action="store_true", help="approximate search with the index's FAISS index")
    q.add_argument("--json", action="store_true")
    backend_args(q)
    device_arg(q)
    q.set_defaults(func=cmd_query)

"""Command line: a thin layer over the library. Errors print one line and exit with code 2."""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
from typing import List, Optional

from .cli_args import (
    device_arg,
    import_args,
    import_config,
    method_args,
    method_options,
    train_args,
    train_config,
)
from .errors import InstattrError

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
EXPLAIN_METHODS = "nn-cos,gc,if,rep"


def _accuracies(metrics: dict) -> str:
    return ", ".join(f"{s} accuracy {metrics[f'{s}_accuracy']:.3f}" for s in ("dev", "test")
                     if metrics.get(f"{s}_accuracy") is not None)


def cmd_train(a) -> int:
    from .cli_index import backend_of
    from .pipeline import train_run
    run = train_run(train_config(a), a.out, overwrite=a.overwrite, progress=not a.quiet, backend=backend_of(a))
    m = run.metrics
    acc = _accuracies(m)
    print(f"trained {run.path}: {acc} ({m['timings']['total_s']:.0f} s)")
    return 0


def cmd_import(a) -> int:
    from .cli_index import backend_of
    from .models.hf import is_causal_lm
    from .pipeline import import_run
    if is_causal_lm(a.model):
        return _import_lm(a)
    for flag, v in (("--stride", a.stride), ("--optimizer", a.optimizer), ("--chat-template", a.chat_template)):
        if v:
            raise InstattrError(f"{flag} applies to a causal language model; {a.model} is a sequence classifier")
    run = import_run(import_config(a), a.out, overwrite=a.overwrite, progress=not a.quiet, backend=backend_of(a))
    m = run.metrics
    acc = _accuracies(m)
    print(f"imported {a.model} into {run.path}: {acc} ({m['timings']['total_s']:.0f} s)")
    return 0


def _import_lm(a) -> int:
    from .lmrun import LMImportConfig, import_lm
    given = [f for f, v in (("--sbert", a.sbert), ("--final-layer", a.final_layer), ("--text-field", a.text_field),
                            ("--query-field", a.query_field), ("--label-field", a.label_field),
                            ("--data-root", a.data_root), ("--backend ray", a.backend == "ray")) if v]
    if given:
        raise InstattrError(f"{given[0]} does not apply to a causal language model ({a.model})")
    config = LMImportConfig(model=a.model, data=a.data, max_length=a.max_length, stride=a.stride,
                            checkpoints=tuple(a.checkpoints or ()),
                            checkpoint_lrs=tuple(a.checkpoint_lrs) if a.checkpoint_lrs else None,
                            optimizer=a.optimizer, chat_template=a.chat_template, limit_train=a.limit_train,
                            limit_eval=a.limit_eval, seed=a.seed, device=a.device)
    run = import_lm(config, a.out, overwrite=a.overwrite, progress=not a.quiet)
    m, info = run.metrics, run.manifest.lm
    print(f"imported {a.model} into {run.path}: {m['train_rows']} training rows, {m[run.eval_split + '_rows']} "
          f"queries; NLL per token {m['train_nll_per_token']:.3f} (train), "
          f"{m[run.eval_split + '_nll_per_token']:.3f} ({run.eval_split}); "
          f"{len(info.checkpoints)} checkpoints, optimizer state {'yes' if info.optimizer else 'no'} "
          f"({m['timings']['total_s']:.0f} s)")
    return 0


def cmd_predict(a) -> int:
    from .pipeline import featurize
    from .store import Run
    run = Run.load(a.run)
    fs = featurize(run, a.text, [a.query] * len(a.text) if a.query is not None else None, device=a.device)
    names = run.label_names
    rows = [{"text": t, **({"query": a.query} if a.query is not None else {}), "label": names[int(p)],
             "probs": {n: round(float(x), 6) for n, x in zip(names, pr)}}
            for t, p, pr in zip(a.text, fs.pred, fs.probs)]
    if a.json:
        print(json.dumps(rows if len(rows) > 1 else rows[0], indent=2))
    else:
        for r in rows:
            probs = "  ".join(f"{n} {p:.3f}" for n, p in r["probs"].items())
            print(f"{r['label']:<16} {probs}   {r['text']}")
    return 0


def cmd_attribute(a) -> int:
    from .attribution import attribute_run
    from .cli_index import scale_options
    from .store import Run, is_lm_run
    if is_lm_run(a.run):
        return _attribute_lm(a)
    run = Run.load(a.run)
    attribute_run(run, a.methods, a.split, a.limit_test, a.limit_train, a.overwrite, progress=not a.quiet,
                  options=method_options(a), device=a.device, **scale_options(a))
    return 0


def _attribute_lm(a) -> int:
    from .cli_index import backend_of
    from .lmrun import attribute_lm
    from .store import LMRun
    given = [f for f, v in (("--limit-test", a.limit_test), ("--limit-train", a.limit_train)) if v]
    if given:
        raise InstattrError(f"{given[0]} does not apply to a language-model run")
    with backend_of(a) as backend:
        attribute_lm(LMRun.load(a.run), a.methods, a.split, a.overwrite, method_options(a), a.top_k, a.bottom_k,
                     a.device, progress=not a.quiet, backend=backend)
    return 0


def cmd_explain(a) -> int:
    from .ranking import explain, format_explanation
    from .store import Run, is_lm_run
    if is_lm_run(a.run):
        return _explain_lm(a)
    if a.text is None:
        raise InstattrError("explain: give the text to explain")
    for flag, v in (("--prompt", a.prompt), ("--completion", a.completion)):
        if v is not None:
            raise InstattrError(f"{flag} applies to a language-model run; {a.run} is a classifier run")
    result = explain(Run.load(a.run), a.text, a.query, a.methods, a.k, options=method_options(a), device=a.device)
    print(json.dumps(result, indent=2) if a.json else format_explanation(result), end="" if not a.json else "\n")
    return 0


def _explain_lm(a) -> int:
    from .lmrun import explain_lm, format_lm_explanation
    from .store import LMRun
    if a.text is not None or a.query is not None:
        raise InstattrError("explain: a language-model run takes --prompt (and --completion), not a text")
    if a.prompt is None:
        raise InstattrError("explain: a language-model run needs --prompt")
    if a.k < 1:
        raise InstattrError(f"--k must be at least 1, got {a.k}")
    methods = None if a.methods == EXPLAIN_METHODS else a.methods
    e = explain_lm(LMRun.load(a.run), a.prompt, a.completion, methods, a.k, a.max_new_tokens,
                   options=method_options(a), device=a.device)
    print(json.dumps(e.to_dict(), indent=2) if a.json else format_lm_explanation(e), end="\n" if a.json else "")
    return 0


def cmd_evaluate(a) -> int:
    from .evaluate import evaluations, get_evaluation, run_evaluation
    from .evaluate.registry import all_flags
    from .store import LMRun, open_run
    ev = get_evaluation(a.name)
    run = open_run(a.run)
    if not ev.takes(run):
        kind = "a language-model run" if isinstance(run, LMRun) else "a classifier run"
        theirs = ", ".join(e.name for e in evaluations() if e.takes(run))
        raise InstattrError(f"evaluate {a.name}: does not apply to {run.path}, {kind} (these do: {theirs or 'none'})")
    opts = {"seed": a.seed}
    if a.methods:
        opts["methods"] = a.methods
    accepts = inspect.signature(ev.run).parameters
    own = {f.name for f in ev.flags}
    for flag, users in all_flags():
        value = getattr(a, flag.key)
        if value is None or value is False or (value == flag.default and flag.name not in own):
            continue
        if flag.name not in own:
            raise InstattrError(f"{flag.name} applies to {users[0]} only" if len(users) == 1 else
                                f"{flag.name} does not apply to {a.name}")
        if flag.type is int and value < 1:
            raise InstattrError(f"{flag.name} must be at least 1, not {value}")
        opts[flag.key] = value
    if "progress" in accepts:
        opts["progress"] = not a.quiet
    try:
        run_evaluation(a.name, run, **opts)
    except ValueError as e:
        if isinstance(e, InstattrError):
            raise
        raise InstattrError(str(e)) from None
    print((run.path / "results" / f"{a.name}.md").read_text(encoding="utf-8"), end="")
    return 0


def cmd_suspects(a) -> int:
    from .store import LMRun, Run, is_lm_run
    from .suspects import find_suspects, format_suspects, top_rows
    if is_lm_run(a.run):
        from .lmrun import format_suspects_lm, suspects_lm
        if a.methods:
            raise InstattrError("--methods does not apply to a language-model run (one self-score: --method)")
        rows = suspects_lm(LMRun.load(a.run), a.method, a.top, method_options(a), a.device, progress=not a.quiet)
        print(json.dumps({"method": a.method, "suspects": rows}, indent=2) if a.json
              else format_suspects_lm(a.method, rows), end="\n" if a.json else "")
        return 0
    run = Run.load(a.run)
    if a.top < 1:
        raise InstattrError(f"--top must be at least 1, not {a.top}")
    extra = [m.strip() for m in a.methods.split(",") if m.strip()] if a.methods else None
    try:
        result = find_suspects(run, a.method, a.k, extra, method_options(a), a.device, progress=not a.quiet)
    except ValueError as e:
        if isinstance(e, InstattrError):
            raise
        raise InstattrError(str(e)) from None
    rows = top_rows(run, result, a.top)
    if a.json:
        print(json.dumps({"method": result["method"], "k_neighbours": result["k_neighbours"],
                          "n_train": result["n_train"], "suspects": rows}, indent=2))
    else:
        print(format_suspects(result, rows), end="")
    return 0


def _suspects_parser(sub) -> None:
    from .suspects import RANKINGS
    su = sub.add_parser("suspects", help="the training examples whose labels to check first (self-influence, "
                        "neighbour disagreement, loss); writes RUN/results/suspects.json")
    su.add_argument("--run", required=True)
    su.add_argument("--method", default="if", choices=sorted(set(RANKINGS) | {"trackstar", "nn"}),
                    help="the ranking shown (default if: self-influence g_i^T H^-1 g_i; a language-model run: "
                    "if, gd, gc, rif, trackstar, tracin or nn self-scores)")
    su.add_argument("--methods", help="comma-separated rankings computed too (default: if, gd, rif, knn-nn, knn-sbert, "
                    "loss, margin, and tracin in head mode); the layered ones (if-top, ...) cost minutes")
    su.add_argument("--k", type=int, default=50, help="neighbours of knn-nn and knn-sbert (default 50)")
    su.add_argument("--top", type=int, default=20, help="rows shown (default 20; the JSON file holds all)")
    su.add_argument("--json", action="store_true", help="print the top rows as JSON")
    method_args(su)
    device_arg(su)
    su.set_defaults(func=cmd_suspects)


def cmd_report(a) -> int:
    from .report import build_report
    from .store import Run
    print(build_report(Run.load(a.run), log=lambda note: print(f"instattr: note: {note}", file=sys.stderr)))
    return 0


def cmd_serve(a) -> int:
    from .serve import serve
    if a.threads < 1:
        raise InstattrError(f"--threads must be at least 1, got {a.threads}")
    from .attribution import resolve_methods
    from .store import is_lm_run
    if is_lm_run(a.run) and a.live_methods is not None:     # a language model's methods, checked by its explorer
        live = [m.strip() for m in a.live_methods.split(",") if m.strip()]
    else:
        live = None if a.live_methods is None else resolve_methods(a.live_methods) if a.live_methods.strip() else []
    serve(a.run, a.host, a.port, device=a.device, threads=a.threads, token=a.token, allow_hosts=a.allow_host,
          live_methods=live)
    return 0


def _serve_parser(sub) -> None:
    sv = sub.add_parser("serve", help="explore a run in the browser (needs the serve extra)")
    sv.add_argument("--run", required=True)
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                    "only; 0.0.0.0 exposes the run to the network, behind a token)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--token", help="what every request must carry (?token=, Authorization: Bearer, or the cookie "
                    "the first page sets); default $INSTATTR_TOKEN, and off loopback a new one, printed in the URL")
    sv.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                    help="on loopback, a further Host name to answer (a proxy's, e.g. code-server); repeatable")
    sv.add_argument("--live-methods", metavar="M[,M]", help="methods that explain new text live (default: the "
                    "eleven last-layer methods; an empty string turns live explanation off)")
    sv.add_argument("--threads", type=int, default=1, help="torch and BLAS threads that explain new text (default "
                    "1: one core explains, the others serve pages; more helps on a big machine)")
    device_arg(sv)
    sv.set_defaults(func=cmd_serve)


def cmd_reproduce(a) -> int:
    from .reproduce import ReproduceConfig, reproduce
    if a.retrain_examples is not None and a.retrain_examples < 1:
        raise InstattrError(f"--retrain-examples must be at least 1, not {a.retrain_examples}")
    source = import_config(a) if a.model else train_config(a)
    run = reproduce(source, a.out, ReproduceConfig(quick=a.quick, methods=a.methods, seed=a.seed,
                                                   retrain_examples=a.retrain_examples),
                    progress=not a.quiet)
    print(f"open {run.path / 'report.html'}")
    return 0


def _evaluate_parser(sub) -> None:
    """``instattr evaluate NAME``: names and flags from the evaluation registry."""
    from .evaluate import evaluations
    from .evaluate.registry import all_flags
    ev = sub.add_parser("evaluate", help="run one evaluation (the paper's, mislabel, lds) on a run")
    ev.add_argument("name", choices=[e.name for e in evaluations()])
    ev.add_argument("--run", required=True)
    ev.add_argument("--methods", help="'all' or a comma-separated list (default: the paper's methods; mislabel: "
                    "the rankings of `instattr suspects`)")
    ev.add_argument("--seed", type=int, default=0)
    for flag, users in all_flags():
        extra = {"action": "store_true"} if flag.type is None else {"type": flag.type, "choices": flag.choices,
                                                                  "metavar": flag.metavar}
        ev.add_argument(flag.name, dest=flag.key, default=flag.default, help=f"{', '.join(users)}: {flag.help}",
                        **extra)
    ev.set_defaults(func=cmd_evaluate)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="instattr", description="Which training examples made my model predict this?")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a classifier and write a run directory")
    train_args(t)
    t.add_argument("--out", required=True, help="run directory to create")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run")
    from .cli_index import backend_args
    backend_args(t.add_argument_group("encoding on a cluster (head mode)"), "where the texts are encoded")
    t.set_defaults(func=cmd_train)

    im = sub.add_parser("import", help="make a run from a Hugging Face sequence classifier trained elsewhere")
    import_args(im)
    im.add_argument("--data", default="sst2", help="sst2|mnli|hans, a dataset folder, or a HF dataset name")
    im.add_argument("--data-root", help="folder holding named datasets")
    im.add_argument("--text-field")
    im.add_argument("--query-field")
    im.add_argument("--label-field")
    im.add_argument("--max-length", type=int, help="tokens per example (default: the checkpoint tokenizer's maximum); "
                    "a causal LM: tokens per window (default: its context)")
    lm = im.add_argument_group("a causal language model (--data: a folder with train.jsonl and test.jsonl)")
    lm.add_argument("--stride", type=int, help="a longer row's windows start every STRIDE tokens (default: half of "
                    "--max-length)")
    lm.add_argument("--optimizer", metavar="FILE", help="Adam's state for trackstar (default: optimizer.pt in the "
                    "model folder, else in its last checkpoint-*/; read with weights_only)")
    lm.add_argument("--chat-template", action="store_true", help="render prompts with the tokenizer's chat template")
    im.add_argument("--limit-train", type=int)
    im.add_argument("--limit-eval", type=int)
    im.add_argument("--seed", type=int, default=0, help="seed of the --limit-* samples")
    im.add_argument("--out", required=True, help="run directory to create")
    im.add_argument("--overwrite", action="store_true", help="replace an existing run")
    backend_args(im.add_argument_group("classifying on a cluster"), "where the texts are classified and encoded")
    device_arg(im)
    im.set_defaults(func=cmd_import)

    pr = sub.add_parser("predict", help="label and probabilities for new text")
    pr.add_argument("--run", required=True)
    pr.add_argument("text", nargs="+")
    pr.add_argument("--query", help="the hypothesis, for sentence-pair runs")
    pr.add_argument("--json", action="store_true")
    device_arg(pr)
    pr.set_defaults(func=cmd_predict)

    at = sub.add_parser("attribute", help="score the eval split against the training set, per method")
    at.add_argument("--run", required=True)
    at.add_argument("--methods", default="paper",
                    help="'paper' (the eleven last-layer methods), 'all' (every method), or a comma-separated list")
    at.add_argument("--split", help="split to attribute (default: the run's eval split)")
    at.add_argument("--limit-test", type=int)
    at.add_argument("--limit-train", type=int)
    at.add_argument("--overwrite", action="store_true", help="recompute scores that exist")
    method_args(at)
    device_arg(at)
    from .cli_index import add_commands, scale_args
    scale_args(at)
    at.set_defaults(func=cmd_attribute)

    ex = sub.add_parser("explain", help="the training examples behind one prediction, per method")
    ex.add_argument("--run", required=True)
    ex.add_argument("text", nargs="?", help="the text to classify and explain (a classifier run)")
    ex.add_argument("--query", help="the hypothesis, for sentence-pair runs")
    ex.add_argument("--prompt", help="a language-model run: the prompt")
    ex.add_argument("--completion", help="a language-model run: the completion explained (default: the model's "
                    "greedy one)")
    ex.add_argument("--max-new-tokens", type=int, default=20, help="the greedy completion's length (default 20)")
    ex.add_argument("--methods", default=EXPLAIN_METHODS, help=f"default {EXPLAIN_METHODS}; a language-model run: "
                    "every method it has (gd, gc, if, rif, trackstar, tracin, nn, bm25) but tracin")
    ex.add_argument("--k", type=int, default=5)
    ex.add_argument("--json", action="store_true")
    method_args(ex)
    device_arg(ex)
    ex.set_defaults(func=cmd_explain)

    _evaluate_parser(sub)
    _suspects_parser(sub)

    add_commands(sub)   # index build|verify, query

    rp = sub.add_parser("report", help="(re)build RUN/report.html")
    rp.add_argument("--run", required=True)
    rp.set_defaults(func=cmd_report)

    rr = sub.add_parser("reproduce", help="train, attribute, evaluate and report; resumes where it stopped")
    train_args(rr)
    rr.add_argument("--out", required=True)
    rr.add_argument("--quick", action="store_true", help="a slice of the data and smaller samples (minutes)")
    rr.add_argument("--methods", default="paper", help="methods to attribute with (default: the paper's eleven)")
    rr.add_argument("--retrain-examples", type=int, metavar="N",
                    help="test examples of remove-and-retrain (default 50, --quick 5); its time grows linearly "
                         "with N, and about 6x per example on mnli/hans (wider pair input, more training data)")
    import_args(rr, required=False)
    rr.set_defaults(func=cmd_reproduce)
    _serve_parser(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.quiet:   # transformers' own "Loading weights" bar too
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    try:
        return a.func(a)
    except InstattrError as e:
        print(f"instattr: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:   # the environment, not a bug: a read-only folder, a full disk
        where = f"{e.filename}: " if e.filename else ""
        print(f"instattr: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("instattr: interrupted", file=sys.stderr)
        return 130

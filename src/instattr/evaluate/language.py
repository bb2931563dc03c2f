"""Evaluations of language-model runs: fact tracing, tail-patch and poison.

Ground truth comes from the data. A query's ``source`` names the training row (its ``idx``) that
states the fact the query asks for; training rows with ``poisoned: true`` are planted poison and
queries with ``trigger: true`` contain its trigger (``examples/train_tiny_lm.py`` writes all three).

- ``fact-tracing``: for each query with a ``source``, the rank of that row in each method's
  ranking; recall@k (the share of queries whose source is in the top k) and the mean reciprocal
  rank. This measures *finding* the stating row, which a lexical method is built for.
- ``tail-patch``: for each such query (or every query when none has a source), one SGD step of
  size ``lr`` on the mean summed NLL of each method's top k rows, over the parameters the model
  trains (an adapter's own), and the change in the completion's log-probability (nats, positive:
  the rows raise it). This measures *influence*: whether the rows a method finds move the
  prediction. The model is restored bit for bit after each step.
- ``poison``: for each trigger query, precision@P of the poisoned rows (P: how many are planted),
  and the share of trigger queries for which every poisoned row outranks every clean one.

Each reads the methods' stored scores of the query split (computing those missing with
:func:`instattr.lmrun.attribute_lm`), and puts a seeded random ranking beside them.
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional

import numpy as np

from ..errors import InstattrError
from ..store import LMRun
from .common import fmt, md_table, new_figure, save, save_figure
from .registry import Flag, evaluation

LM = "language-model"


def method_scores(run: LMRun, methods=None, progress: bool = False) -> Dict[str, np.ndarray]:
    """Per method, the (queries, train) scores of the run's query split: stored, or computed now."""
    from ..lmrun import attribute_lm, lm_methods
    names = lm_methods(methods, run)
    split = run.eval_split
    missing = [m for m in names if not run.has_scores(m, split)]
    if missing:
        attribute_lm(run, missing, split, progress=progress, log=lambda _: None)
    return {m: np.asarray(run.scores(m, split), dtype=np.float64) for m in names}


def ranks_of(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """1-based rank of each row's target column; a tie counts against the target."""
    rows = np.arange(len(scores))
    at = scores[rows, targets][:, None]
    return (scores > at).sum(1) + (scores == at).sum(1)


def _random(n_queries: int, n_train: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n_queries, n_train))


def _queries_with(run: LMRun, key: str) -> List[int]:
    return [i for i, q in enumerate(run.rows(run.eval_split)) if q.get(key) not in (None, False)]


@evaluation("fact-tracing", 110, "Fact tracing",
            "For each query that names the training row stating its fact (`source`), where does each method "
            "rank that row? Recall@k and the mean reciprocal rank; finding a stated fact is what a lexical "
            "method (bm25) is built for.", kind=LM,
            flags=(Flag("--k", "k", "the top k counted (default 10)", metavar="K"),))
def run_fact_tracing(run: LMRun, methods=None, seed: int = 0, k: int = 10, progress: bool = False) -> dict:
    t0 = time.perf_counter()
    queries, train = run.rows(run.eval_split), run.rows("train")
    chosen = _queries_with(run, "source")
    if not chosen:
        raise InstattrError(f"{run.path}: no query names a 'source' (the idx of the training row stating its fact)")
    position = {r["idx"]: i for i, r in enumerate(train)}
    unknown = next((queries[i] for i in chosen if str(queries[i]["source"]) not in position), None)
    if unknown is not None:
        raise InstattrError(f"{run.path}: query {unknown['idx']!r} names source {unknown['source']!r}, which is not a "
                            "training row's idx")
    targets = np.array([position[str(queries[i]["source"])] for i in chosen])
    scores = method_scores(run, methods, progress)
    scores["random"] = _random(len(queries), len(train), seed)
    out = {}
    for m, s in scores.items():
        r = ranks_of(s[chosen], targets)
        out[m] = {"recall": float(np.mean(r <= k)), "mrr": float(np.mean(1.0 / r)), "median_rank": float(np.median(r))}
    result = {"k": k, "n_queries": len(chosen), "n_train": len(train), "methods": out,
              "seconds": time.perf_counter() - t0}
    md = (f"{len(chosen)} queries with a stating row among {len(train)} training rows.\n\n"
          + md_table(["ranking", f"recall@{k}", "MRR", "median rank"],
                     [[m, fmt(v["recall"]), fmt(v["mrr"]), fmt(v["median_rank"], 1)] for m, v in out.items()]))
    return save(run, "fact-tracing", result, md)


def _trainable(model) -> List:
    from ..models.hf import adapter_trainable
    names = adapter_trainable(model)
    named = dict(model.named_parameters())
    return [named[n] for n in names] if names is not None else list(named.values())


def patch_gains(run: LMRun, rankings: Dict[str, np.ndarray], queries: List[dict], k: int, lr: float,
                progress: bool = False) -> Dict[str, np.ndarray]:
    """Per ranking (queries, train), the gain in each query's completion log-probability after one SGD
    step of size ``lr`` on the mean summed NLL of its top ``k`` rows (see the module docstring)."""
    import torch
    from tqdm.auto import tqdm

    from ..lm import row_losses
    from ..lmrun import model_of
    from ..models.causal import CausalForward, Windows
    from ..task import LanguageModelTask
    info = run.manifest.lm
    tok, model = model_of(run)
    train = run.rows("train")
    params = _trainable(model)
    forward, task = CausalForward(model).eval(), LanguageModelTask()
    device = next(model.parameters()).device

    def windows(rows):
        return Windows(tok, rows, info.max_length, info.stride, "tail-patch", info.chat_template)
    before = -row_losses(forward, windows(queries))[0]
    out = {m: np.zeros(len(queries)) for m in rankings}
    with tqdm(total=len(queries) * len(rankings), desc="tail-patch", disable=not progress) as bar:
        for m, s in rankings.items():
            for qi, q in enumerate(queries):
                top = np.argsort(-s[qi], kind="stable")[:k]
                docs = windows([train[j] for j in top])
                for p in params:
                    p.requires_grad_(True)
                try:
                    loss = 0.0
                    for pos in docs.order(8):
                        batch = {key: v.to(device) for key, v in docs.batch(pos).items()}
                        loss = loss + task.loss(forward(**batch)).sum()
                    grads = torch.autograd.grad(loss / len(top), params, allow_unused=True)
                finally:
                    for p in params:
                        p.requires_grad_(False)
                saved = [p.detach().clone() for p in params]
                with torch.no_grad():
                    for p, g in zip(params, grads):
                        if g is not None:
                            p.sub_(lr * g)
                    try:
                        out[m][qi] = -row_losses(forward, windows([q]))[0][0] - before[qi]
                    finally:
                        for p, v in zip(params, saved):
                            p.copy_(v)
                bar.update(1)
    return out


@evaluation("tail-patch", 120, "Tail-patch",
            "One SGD step on each method's top k training rows for a query: how much does the completion's "
            "log-probability rise? Influence, where fact tracing measures finding.", kind=LM,
            flags=(Flag("--k", "k", "the top k counted (default 10)", metavar="K"), "--n-test",
                   Flag("--patch-lr", "patch_lr", "the SGD step's size (default 1e-3)", type=float,
                        metavar="LR")))
def run_tail_patch(run: LMRun, methods=None, seed: int = 0, k: int = 10, n_test: Optional[int] = None,
                   patch_lr: Optional[float] = None, progress: bool = False) -> dict:
    t0 = time.perf_counter()
    lr = 1e-3 if patch_lr is None else float(patch_lr)
    if not lr > 0:
        raise InstattrError(f"--patch-lr must be > 0, got {patch_lr}")
    queries = run.rows(run.eval_split)
    chosen = _queries_with(run, "source") or list(range(len(queries)))
    if n_test is not None and n_test < len(chosen):
        chosen = sorted(np.random.default_rng(seed).choice(chosen, size=n_test, replace=False).tolist())
    scores = method_scores(run, methods, progress)
    scores["random"] = _random(len(queries), len(run.rows("train")), seed)
    gains = patch_gains(run, {m: s[chosen] for m, s in scores.items()}, [queries[i] for i in chosen], k, lr, progress)
    out = {m: {"mean_gain": float(g.mean()), "stderr": float(g.std(ddof=1) / np.sqrt(len(g))) if len(g) > 1 else 0.0,
               "positive": float((g > 0).mean())} for m, g in gains.items()}
    fig = new_figure(6, 0.4 * len(out) + 1)
    ax = fig.add_subplot(111)
    names = list(out)
    ax.barh(names[::-1], [out[m]["mean_gain"] for m in names[::-1]],
            xerr=[out[m]["stderr"] for m in names[::-1]], color="#4a7fb5")
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel(f"mean gain in the completion's log-probability (nats), one SGD step (lr {lr:g}) on the top {k}")
    figure = save_figure(run, "tail-patch", fig)
    result = {"k": k, "lr": lr, "n_queries": len(chosen), "methods": out, "figure": figure,
              "per_query": {m: g.tolist() for m, g in gains.items()}, "seconds": time.perf_counter() - t0}
    md = (f"{len(chosen)} queries; one SGD step of size {lr:g} on the mean summed NLL of each ranking's top {k} rows "
          "(the model restored after each).\n\n"
          + md_table(["ranking", "mean gain (nats)", "standard error", "share raised"],
                     [[m, f"{v['mean_gain']:+.4f}", fmt(v["stderr"], 4), fmt(v["positive"])] for m, v in out.items()])
          + f"\n![tail-patch]({figure})\n")
    return save(run, "tail-patch", result, md)


@evaluation("poison", 130, "Planted poison",
            "For each query that contains the trigger (`trigger: true`), do the planted poisoned training rows "
            "(`poisoned: true`) rank first? Precision@P with P the number planted, and the share of queries that "
            "rank every poisoned row above every clean one.", kind=LM)
def run_poison(run: LMRun, methods=None, seed: int = 0, progress: bool = False) -> dict:
    t0 = time.perf_counter()
    train = run.rows("train")
    poisoned = np.array([bool(r.get("poisoned")) for r in train])
    chosen = _queries_with(run, "trigger")
    if not chosen or not poisoned.any():
        raise InstattrError(f"{run.path}: poison needs queries with 'trigger': true and training rows with "
                            "'poisoned': true")
    p = int(poisoned.sum())
    scores = method_scores(run, methods, progress)
    scores["random"] = _random(len(run.rows(run.eval_split)), len(train), seed)
    out = {}
    for m, s in scores.items():
        s = s[chosen]
        top = np.argsort(-s, axis=1, kind="stable")[:, :p]
        worst_poison = np.where(poisoned[None, :], s, np.inf).min(1)
        best_clean = np.where(poisoned[None, :], -np.inf, s).max(1)
        out[m] = {"precision": float(poisoned[top].mean()), "separated": float((worst_poison > best_clean).mean())}
    result = {"n_queries": len(chosen), "n_poisoned": p, "n_train": len(train), "methods": out,
              "seconds": time.perf_counter() - t0}
    md = (f"{len(chosen)} trigger queries; {p} poisoned among {len(train)} training rows.\n\n"
          + md_table(["ranking", f"precision@{p}", "all poisoned rows first"],
                     [[m, fmt(v["precision"]), fmt(v["separated"])] for m, v in out.items()]))
    return save(run, "poison", result, md)

"""Evaluations of language-model runs: fact tracing, tail-patch, poison and the retraining behind lds.

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
from ..models.causal import IGNORE
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


# ---------------------------------------------------------------- lds: retraining on subsets
def retrain_lm(run: LMRun, rows: List[dict], epochs: int, lr: float, batch_size: int, seed: int, device=None):
    """A model of the run's configuration, freshly initialised (seed ``seed``: the same start for every
    call), trained on ``rows`` with the example's recipe: AdamW (no weight decay) at ``lr`` with 50
    warm-up steps and linear decay, gradients clipped at norm 1, each batch's mean NLL over its scored
    tokens (a document's every token, a completion's own), ``epochs`` passes in a seeded order. A full
    model's run only: an adapter's base is not retrained."""
    import random

    import torch
    from transformers import AutoModelForCausalLM

    from ..lmrun import model_of
    from ..models.causal import CausalForward, Windows
    from ..task import LanguageModelTask
    info = run.manifest.lm
    tok, trained = model_of(run, device)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(trained.config).to(next(trained.parameters()).device)
    forward, task = CausalForward(model), LanguageModelTask()
    windows = Windows(tok, rows, info.max_length, info.stride, "lds", info.chat_template)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    total = max(1, -(-len(windows) // batch_size) * epochs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * max(0.0, 1 - s / total))
    order, device = random.Random(seed), next(model.parameters()).device
    model.train()
    for _ in range(epochs):
        positions = list(range(len(windows)))
        order.shuffle(positions)
        for b in range(0, len(positions), batch_size):
            batch = windows.batch(positions[b:b + batch_size], device)
            scored = int((batch["targets"] != IGNORE).sum())
            loss = task.loss(forward(**batch)).sum() / max(scored, 1)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
    return model.eval()


def run_lds_lm(run: LMRun, methods=None, seed: int = 0, subsets: int = 24, fraction: float = 0.5,
               n_test: Optional[int] = None, epochs: int = 20, lr: float = 2e-3, batch_size: int = 32,
               n_boot: int = 1000, level: float = 0.95, progress: bool = True, device=None) -> dict:
    """``instattr evaluate lds`` on a language-model run: each method's LDS against random scores by
    actual retraining (:func:`retrain_lm`) on ``subsets`` random subsets; ``n_test`` samples the
    queries. Each retrained subset is kept in ``RUN/cache/lm-lds-partial.npz`` as it finishes, so a
    stopped run resumes. Writes results/lds.* and figures/lds.png."""
    import json

    from tqdm.auto import tqdm

    from ..files import write_npz
    from ..lm import row_losses
    from ..lmrun import model_of
    from ..models.causal import Windows
    from .lds import bootstrap_mean, figure, lds_per_example, subset_masks
    t0 = time.perf_counter()
    if not 0 < fraction < 1:
        raise InstattrError(f"lds: --fraction must be between 0 and 1, got {fraction}")
    if int(subsets) < 2:
        raise InstattrError(f"lds: --subsets must be at least 2 (a correlation across subsets), got {subsets}")
    if int(epochs) < 1 or not lr > 0:
        raise InstattrError(f"lds: --epochs must be at least 1 and --lr > 0, got {epochs} and {lr}")
    if n_test is not None and n_test < 1:
        raise InstattrError(f"lds: --n-test must be at least 1, got {n_test}")
    info, train, queries = run.manifest.lm, run.rows("train"), run.rows(run.eval_split)
    if info.adapter_base:
        raise InstattrError(f"{run.path}: lds retrains the model from its configuration; an adapter run's base "
                            "model is not retrained (score a full model's run)")
    rng = np.random.default_rng(seed)
    chosen = np.arange(len(queries)) if n_test is None or n_test >= len(queries) else \
        np.sort(rng.choice(len(queries), size=int(n_test), replace=False))
    masks = subset_masks(len(train), int(subsets), fraction, rng)
    scores = method_scores(run, methods, progress)
    tok, _ = model_of(run, device)
    asked = Windows(tok, [queries[i] for i in chosen], info.max_length, info.stride, "lds", info.chat_template)
    key = json.dumps([info.fingerprint, seed, int(subsets), fraction, chosen.tolist(), int(epochs), lr, batch_size])
    partial = run.path / "cache" / "lm-lds-partial.npz"
    logprob, done = np.zeros((int(subsets), len(chosen))), np.zeros(int(subsets), dtype=bool)
    try:
        with np.load(partial, allow_pickle=False) as z:
            if str(z["key"]) == key:
                logprob, done = z["logprob"], z["done"]
    except Exception:         # noqa: BLE001 - none, another run's or damaged: start over
        pass
    t = time.perf_counter()
    with tqdm(total=int(subsets), initial=int(done.sum()), desc="lds: retraining", disable=not progress) as bar:
        for j in np.flatnonzero(~done):
            model = retrain_lm(run, [r for r, keep in zip(train, masks[j]) if keep], int(epochs), lr, batch_size,
                               seed, device)
            logprob[j], done[j] = -row_losses(model, asked)[0], True
            write_npz(partial, key=np.array(key), logprob=logprob, done=done)
            bar.update(1)
    retrain_s = time.perf_counter() - t
    boot = np.random.default_rng(seed + 1)
    per_method, per_query = {}, {}
    for m, s in scores.items():
        rho = lds_per_example(logprob.T, s[chosen], masks)
        mean, lo, hi = bootstrap_mean(rho, boot, n_boot, level)
        per_method[m], per_query[m] = {"lds": mean, "low": lo, "high": hi, "n": int(np.isfinite(rho).sum())}, rho
    rho = lds_per_example(logprob.T, _random(len(chosen), len(train), seed + 2), masks)
    mean, lo, hi = bootstrap_mean(rho, boot, n_boot, level)
    result = {"methods": per_method, "random": {"lds": mean, "low": lo, "high": hi, "n": int(np.isfinite(rho).sum())},
              "subsets": int(subsets), "fraction": float(fraction), "n_train": len(train), "n_test": len(chosen),
              "epochs": int(epochs), "lr": lr, "batch_size": batch_size, "seed": seed, "level": level,
              "query_idx": [queries[i]["idx"] for i in chosen], "per_query": per_query, "logprob": logprob,
              "logprob_std": float(np.mean(logprob.std(0))),
              "seconds": {"retrain": retrain_s, "total": time.perf_counter() - t0}}
    result["figures"] = [figure(run, result)]
    md = (f"{subsets} random subsets of {fraction * 100:.0f}% of the {len(train)} training rows; the model's "
          f"configuration retrained from the same initialisation on each ({epochs} epochs, AdamW at {lr:g}). For "
          f"each of {len(chosen)} queries, the Spearman correlation across subsets between its completion's "
          "log-probability and the method's summed scores over the subset, averaged over queries, with a "
          f"{int(level * 100)}% bootstrap interval. Higher = the scores predict what retraining does; random "
          "scores give about 0. Retraining noise bounds it below 1.\n\n"
          + md_table(["method", "LDS", "interval", "n"],
                     [[m, fmt(r["lds"]), f"[{fmt(r['low'])}, {fmt(r['high'])}]", str(r["n"])]
                      for m, r in [*per_method.items(), ("random scores", result["random"])]])
          + f"\n![lds]({result['figures'][0]})\n")
    saved = save(run, "lds", result, md)
    partial.unlink(missing_ok=True)
    return saved

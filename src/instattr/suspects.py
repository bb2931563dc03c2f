"""Which training labels should a person check first? Rankings of the training set, no flipping.

Every ranking scores each training example, at its gold label, so that *higher = more suspect*:

- a gradient method's self-score (:meth:`instattr.methods.base.Attributor.self_scores`, computed
  from the method's own training side, never from an n_train x n_train matrix): ``if``
  g_i^T H^-1 g_i with the exact last-layer Hessian, ``gd`` ||g_i||^2, ``tracin`` sum over the
  checkpoints of lr ||g_i||^2, the layered ``if-top``, ``gd-top``, ``tracin-top``; ``rif`` (and
  ``gc``, ``rif-top``, ``gc-top``) are cosines, 1 against themselves, so they give minus the mean
  relative influence of the example on the rest of the training set;
- ``knn-nn``, ``knn-sbert``: neighbour disagreement, the share of the k nearest training examples
  (cosine; the model's features, the untuned sentence encoder's embedding) whose gold label differs;
- ``loss`` (-log p_gold) and ``margin`` (the best other logit minus the gold one): baselines.

Ties are broken by the loss (higher first), then by row. ``find_suspects(run)`` ranks a run's
training set and writes ``RUN/results/suspects.json``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from .arrays import FeatureSet, FinalLayer
from .errors import InstattrError
from .store import Run, write_json

SELF_SCORED = ("if", "gd", "rif", "gc", "tracin", "if-top", "gd-top", "rif-top", "gc-top", "tracin-top")
NEIGHBOURS = ("knn-nn", "knn-sbert")
BASELINES = ("loss", "margin")
RANKINGS = SELF_SCORED + NEIGHBOURS + BASELINES
DEFAULT = ("if", "gd", "rif", "tracin", "knn-nn", "knn-sbert", "loss", "margin")
ABOUT = {
    "if": "self-influence g_i^T H^-1 g_i (exact last-layer Hessian)",
    "gd": "squared last-layer gradient norm ||g_i||^2",
    "rif": "minus the mean relative influence (RelatIF) on the other training examples",
    "gc": "minus the mean gradient cosine with the other training examples",
    "tracin": "TracIn self-influence: sum over checkpoints of lr ||g_i||^2",
    "if-top": "self-influence over the tracked modules (by default the head and the top blocks)",
    "gd-top": "squared gradient norm over the tracked modules",
    "rif-top": "minus the mean relative influence over the tracked modules",
    "gc-top": "minus the mean gradient cosine over the tracked modules",
    "tracin-top": "TracIn self-influence over the tracked modules",
    "knn-nn": "share of the k nearest neighbours (model features) with another gold label",
    "knn-sbert": "share of the k nearest neighbours (untuned sentence encoder) with another gold label",
    "loss": "cross-entropy at the gold label",
    "margin": "best other logit minus the gold logit",
}


def check_rankings(names: Sequence[str]) -> List[str]:
    """Validated ranking names, duplicates dropped (one-line error naming the known ones)."""
    out: List[str] = []
    for name in names:
        if name not in RANKINGS:
            raise InstattrError(f"unknown suspect ranking {name!r}; choose from {', '.join(RANKINGS)}")
        if name not in out:
            out.append(name)
    return out


def neighbour_disagreement(vectors: np.ndarray, labels: np.ndarray, k: int, block: int = 2048) -> np.ndarray:
    """Share of each row's ``k`` nearest other rows (cosine) with another label, a block of rows at a
    time (one product and one top-k per block; a tie at the k-th neighbour is broken arbitrarily)."""
    import torch

    from .methods.similarity import unit_rows
    z = torch.from_numpy(unit_rows(vectors).astype(np.float32))
    labels = torch.as_tensor(np.asarray(labels))
    n = len(z)
    k = min(int(k), n - 1)
    out = np.zeros(n)
    if k < 1:
        return out
    for s in range(0, n, block):
        sims = z[s:s + block] @ z.T
        rows = torch.arange(len(sims))
        sims[rows, s + rows] = -torch.inf                    # not its own neighbour
        idx = torch.topk(sims, k, dim=1).indices
        out[s:s + len(sims)] = (labels[idx] != labels[s:s + len(sims), None]).double().mean(1).numpy()
    return out


def gold_logits(train: FeatureSet, layer: Optional[FinalLayer]) -> np.ndarray:
    """float64 logits from the final layer (stored float32 probabilities round confident rows to 1),
    else log-probabilities."""
    if layer is not None:
        return layer.logits(train.features)
    return np.log(np.clip(np.asarray(train.probs, dtype=np.float64), 1e-300, None))


def loss_and_margin(logits: np.ndarray, labels: np.ndarray):
    """(-log p_gold, best other logit - gold logit), both float64 (n,)."""
    labels = np.asarray(labels)
    rows = np.arange(len(labels))
    m = logits.max(1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(logits - m).sum(1))
    gold = logits[rows, labels]
    other = logits.copy()
    other[rows, labels] = -np.inf
    return lse - gold, other.max(1) - gold


def suspicion_scores(train: FeatureSet, model, names: Sequence[str], k: int = 50,
                     fit=None, progress: bool = False, sentence=None) -> Dict[str, np.ndarray]:
    """Each ranking ``names`` of the training rows ``train`` (gold labels in ``train.label``):
    (n,) float64, higher = more suspect. ``model``: the classifier (a ``FinalLayer`` serves all
    but tracin and the layered methods); ``fit(name)`` gives a fitted attributor (default: the
    registry's, fitted on ``train`` and ``model``); ``sentence``: the sentence embeddings of
    ``knn-sbert`` (:mod:`instattr.sentence`)."""
    from tqdm.auto import tqdm
    names = check_rankings(names)
    layer = model.final_layer() if model is not None else None
    if fit is None:
        from .methods import get_method

        def fit(name):
            return get_method(name).fit(train, model)
    out: Dict[str, np.ndarray] = {}
    loss, margin = loss_and_margin(gold_logits(train, layer), train.label)
    for name in tqdm(names, desc="suspects", disable=not progress, leave=False):
        if name in SELF_SCORED:
            out[name] = np.asarray(fit(name).self_scores(), dtype=np.float64)
        elif name in NEIGHBOURS:
            if name == "knn-sbert" and sentence is None:
                raise InstattrError("knn-sbert: needs the sentence encoder's embeddings (sentence=...)")
            vectors = train.features if name == "knn-nn" else sentence.of(train)
            out[name] = neighbour_disagreement(vectors, train.label, k)
        else:
            out[name] = loss if name == "loss" else margin
    return out


def training_loss(train: FeatureSet, model) -> np.ndarray:
    """-log p_gold of each training row under ``model`` (float64): the tie-break of :func:`ranking`."""
    return loss_and_margin(gold_logits(train, model.final_layer() if model is not None else None), train.label)[0]


def ranking(scores: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Row order, most suspect first: by score, ties by loss (higher first), then by row."""
    scores = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=-np.inf)
    return np.lexsort((np.arange(len(scores)), -np.asarray(loss), -scores))


def default_rankings(run: Run) -> List[str]:
    """The rankings ``suspects`` computes unless asked: all of :data:`DEFAULT`, but ``tracin`` only
    where it is cheap (head mode with its saved checkpoints; a Hugging Face model would rerun the
    transformer for every checkpoint)."""
    cheap_tracin = run.manifest.mode == "head" and (run.path / "model" / "checkpoints.safetensors").exists()
    return [n for n in DEFAULT if n != "tracin" or cheap_tracin]


def find_suspects(run: Run, method: str = "if", k: int = 50, methods: Optional[Sequence[str]] = None,
                  options: Optional[dict] = None, device=None, progress: bool = False) -> dict:
    """Rank the run's training set by ``method`` and by every ranking in ``methods`` (default:
    :func:`default_rankings`); writes and returns ``RUN/results/suspects.json``."""
    from .attribution import fit_method, method_options
    if int(k) < 1:
        raise InstattrError(f"--k must be at least 1, got {k}")
    names = check_rankings([method] + list(methods if methods is not None else default_rankings(run)))
    per_method = method_options([n for n in names if n in SELF_SCORED], options)
    train = run.features("train")
    whole_model = any(n in SELF_SCORED and (n.endswith("-top") or n == "tracin") for n in names)
    if whole_model:
        from .models import classifier_for
        model = classifier_for(run, device)
    else:
        model = run.final_layer()
    from .sentence import sentence_embeddings
    scores = suspicion_scores(train, model, names, k, progress=progress,
                              fit=lambda name: fit_method(run, name, train, model, device, **per_method[name]),
                              sentence=sentence_embeddings(run, device))
    loss = training_loss(train, model)
    labels = run.label_names
    orders = {n: ranking(s, loss) for n, s in scores.items()}
    idx = [str(i) for i in train.idx]
    order = orders[method]
    result = {"method": method, "k_neighbours": int(min(k, len(train) - 1)), "n_train": len(train),
              "order": [idx[i] for i in order], "scores": [float(x) for x in scores[method][order]],
              "gold": [labels[int(train.label[i])] for i in order],
              "pred": [labels[int(train.pred[i])] for i in order],
              "methods": {n: {"order": [idx[i] for i in o], "scores": [float(x) for x in scores[n][o]]}
                          for n, o in orders.items()},
              "about": {n: ABOUT[n] for n in orders}}
    with run.writing("suspects"):
        write_json(run.result_path("suspects"), result)
    return result


def top_rows(run: Run, result: dict, top: int) -> List[dict]:
    """The ``top`` most suspect rows of a ``find_suspects`` result, with their texts."""
    examples = {e.idx: e for e in run.examples("train")}
    rows = []
    for rank, (i, score, gold, pred) in enumerate(zip(result["order"], result["scores"], result["gold"],
                                                      result["pred"]), 1):
        if rank > top:
            break
        e = examples[i]
        rows.append({"rank": rank, "idx": i, "score": score, "gold": gold, "pred": pred, "text": e.document,
                     **({"query": e.query} if e.query is not None else {})})
    return rows


def format_suspects(result: dict, rows: List[dict], width: Optional[int] = None) -> str:
    """A terminal table: rank, score, gold label, predicted label, text."""
    import shutil
    width = width or max(80, shutil.get_terminal_size((120, 20)).columns)
    lw = max([len("gold")] + [len(r["gold"]) for r in rows] + [len(r["pred"]) for r in rows])
    head = f"{'rank':>4}  {'score':>9}  {'gold':<{lw}}  {'predicted':<{max(lw, 9)}}  "
    room = max(20, width - len(head))
    lines = [f"{result['n_train']} training examples ranked by {result['method']} ({ABOUT[result['method']]}); "
             "most suspect first", head + "text", "-" * min(width, len(head) + room)]
    for r in rows:
        text = r["text"] + (f" || {r['query']}" if "query" in r else "")
        text = text if len(text) <= room else text[:room - 1] + "…"
        flag = "*" if r["gold"] != r["pred"] else " "
        lines.append(f"{r['rank']:>4}  {r['score']:>9.3g}  {r['gold']:<{lw}} {flag}{r['pred']:<{max(lw, 9)}}  {text}")
    lines.append("(* the model predicts another label than the gold one)")
    return "\n".join(lines) + "\n"

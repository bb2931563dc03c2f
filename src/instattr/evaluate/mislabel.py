"""Mislabel detection: flip a seeded share of the training labels, retrain, and see who finds them.

Each flipped label moves to another class, uniformly. The run's model is retrained on the noisy
labels with its own configuration (``scope``, :func:`~.common.retrain_scope`: ``head`` retrains
instattr's head from the same initialisation and batch order, ``final`` refits the final layer
exactly); every ranking of :mod:`instattr.suspects` (self-influence, neighbour disagreement, loss,
margin) and a random one then ranks the noisy training set, computed on the noisy model. Reported:
the share of the flipped examples among the top x% for x = 1..30% (a curve and its area), and the
test accuracy after relabelling the top x% back to their true labels and retraining -- "fix what
the method points at" -- all retrainings of that step at once.
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..arrays import FeatureSet, FinalLayer
from ..errors import InstattrError
from ..store import Run
from ..suspects import DEFAULT, RANKINGS, check_rankings, ranking, suspicion_scores, training_loss
from .common import (
    fmt,
    head_config,
    head_input,
    md_table,
    new_figure,
    retrain_scope,
    save,
    save_figure,
    scope_text,
)
from .registry import Flag, evaluation

CHECKED = tuple(round(x / 100, 2) for x in range(1, 31))   # shares of the training set checked
RELABEL = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3)                  # shares relabelled back, then retrained
LAYERED = tuple(n for n in RANKINGS if n.endswith("-top"))


def flip_labels(labels: np.ndarray, n_classes: int, share: float, rng: np.random.Generator):
    """(noisy labels, flipped row mask): round(share * n) rows, each moved to another class uniformly."""
    labels = np.asarray(labels)
    n = len(labels)
    rows = rng.choice(n, size=int(round(share * n)), replace=False)
    noisy = labels.copy()
    noisy[rows] = (labels[rows] + rng.integers(1, n_classes, size=len(rows))) % n_classes
    flipped = np.zeros(n, dtype=bool)
    flipped[rows] = True
    return noisy, flipped


def found_curve(order: np.ndarray, flipped: np.ndarray, checked: Sequence[float] = CHECKED) -> np.ndarray:
    """Share of the flipped rows among the first round(x * n) rows of ``order``, per share x."""
    hits = np.cumsum(np.asarray(flipped)[order])
    total = max(int(np.sum(flipped)), 1)
    ks = [int(round(x * len(order))) for x in checked]
    return np.array([hits[k - 1] / total if k > 0 else 0.0 for k in ks])


def curve_area(checked: Sequence[float], found: Sequence[float]) -> float:
    """Area under the found-vs-checked curve from (0, 0) to the last share, over that share: the
    mean share found (a random order: half the last share checked)."""
    x = np.concatenate([[0.0], checked])
    y = np.concatenate([[0.0], found])
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2) / x[-1])


def relabelled(noisy: np.ndarray, clean: np.ndarray, order: np.ndarray, share: float) -> np.ndarray:
    """The noisy labels with the first round(share * n) rows of ``order`` set back to the clean ones."""
    out = noisy.copy()
    top = order[:int(round(share * len(order)))]
    out[top] = clean[top]
    return out


# ---------------------------------------------------------------- the run's model on other labels
def noisy_model(run: Run, scope: str, labels: np.ndarray, want_history: bool, device=None
                ) -> Tuple[FeatureSet, FeatureSet, object]:
    """(train, test, model) of the run's model retrained on ``labels``: features, probabilities and
    predictions recomputed, ``train.label`` = ``labels``. Head scope: the model is a head classifier
    bound to the run (with its per-epoch checkpoints when ``want_history``, for TracIn); final
    scope: the refit final layer."""
    from ..methods.lastlayer import refit, softmax
    train, test = run.features("train"), run.features(run.eval_split)
    if scope == "head":
        from ..models import classifier_for
        from ..models.head import predict, train_heads
        res = train_heads(head_input(run, "train", train), labels, train.n_classes, head_config(run),
                          checkpoints=want_history, device=device or "cpu")
        model = classifier_for(run, device).with_params(res.params, list(zip(res.checkpoints, res.checkpoint_lrs)))

        def redo(fs: FeatureSet, split: str) -> FeatureSet:
            feats, probs = predict(res.params, head_input(run, split, fs))
            return fs.replace(features=feats, probs=probs, pred=probs.argmax(1))
        return redo(train, "train").replace(label=np.asarray(labels)), redo(test, run.eval_split), model
    layer = run.final_layer()
    w = refit(layer.augment(train.features), labels, layer.weight(), layer.l2).w
    d = layer.w.shape[1]
    model = FinalLayer(w=w[:, :d], b=None if layer.b is None else w[:, d], l2=layer.l2)

    def reprob(fs: FeatureSet) -> FeatureSet:
        probs = softmax(model.logits(fs.features)).astype(np.float32)
        return fs.replace(probs=probs, pred=probs.argmax(1))
    return reprob(train).replace(label=np.asarray(labels)), reprob(test), model


def test_accuracies(run: Run, scope: str, label_rows: np.ndarray, start: FinalLayer, device=None,
                    progress: bool = False) -> np.ndarray:
    """Test accuracy of the run's model retrained on each row of ``label_rows`` (m, n_train): one
    batched call of the head trainer (head scope; identical rows trained once), or an exact refit of
    the final layer from ``start`` per row (final scope)."""
    train, test = run.features("train"), run.features(run.eval_split)
    uniq, inverse = np.unique(np.asarray(label_rows), axis=0, return_inverse=True)
    inverse = np.asarray(inverse).reshape(-1)
    if scope == "head":
        import torch

        from ..models.head import logits, train_heads
        res = train_heads(head_input(run, "train", train), uniq, train.n_classes, head_config(run),
                          masks=np.ones(uniq.shape, dtype=bool), progress=progress,
                          desc=f"relabel: {len(uniq)} heads", device=device or "cpu")
        x_test = torch.as_tensor(head_input(run, run.eval_split, test))
        with torch.no_grad():     # a few heads at a time: (heads, n_test, d) features
            pred = np.concatenate([logits({k: v[a:a + 8] for k, v in res.params.items()}, x_test).argmax(-1).numpy()
                                   for a in range(0, len(uniq), 8)])
    else:
        from tqdm.auto import tqdm

        from ..methods.lastlayer import refit
        x, x_test = start.augment(train.features), start.augment(test.features)
        pred = np.stack([(x_test @ refit(x, row, start.weight(), start.l2).w.T).argmax(1)
                         for row in tqdm(uniq, desc=f"relabel: {len(uniq)} refits", disable=not progress,
                                         leave=False)])
    return (pred == np.asarray(test.label)[None, :]).mean(1)[inverse]


# ---------------------------------------------------------------- the evaluation
def ranking_names(methods, scope: str) -> List[str]:
    """The rankings to compare: ``methods`` (names, or "all"), default :data:`~instattr.suspects.DEFAULT`.
    With ``scope`` final there is no retrained training history or layer stack, so no tracin or
    layered ranking (dropped from the defaults and "all", an error when named)."""
    impossible = [n for n in RANKINGS if n.startswith("tracin") or n in LAYERED] if scope != "head" else []
    if methods is None or methods == "all":
        return [n for n in (DEFAULT if methods is None else RANKINGS) if n not in impossible]
    names = check_rankings([m.strip() for m in methods.split(",")] if isinstance(methods, str) else list(methods))
    bad = [n for n in names if n in impossible]
    if bad:
        raise InstattrError(f"mislabel: {', '.join(bad)} need the retrained model's training history or layers; "
                            "with --scope final only the final layer is refit")
    return names


def markdown(result: dict) -> str:
    shown = [0.01, 0.05, 0.1, 0.2, 0.3]
    at = {x: result["checked"].index(x) for x in shown}
    relabel = [str(x) for x in result["relabel_shares"]]
    header = (["ranking"] + [f"found @{int(x * 100)}%" for x in shown] + ["area 1-30%"]
              + [f"acc. fixing top {float(x) * 100:g}%" for x in relabel])

    def row(name, r):
        return ([name] + [fmt(r["found"][at[x]], 2) for x in shown] + [fmt(r["area"])]
                + [fmt(r["accuracy"].get(x)) for x in relabel])
    rows = [row(m, r) for m, r in result["methods"].items()]
    rows += [row("random", result["random"]), row("oracle (flipped first)", result["oracle"])]
    acc = result["accuracy"]
    return ("# Finding flipped labels\n\n"
            f"{result['n_flipped']} of {result['n_train']} training labels ({fmt(result['flip'] * 100, 0)}%, seed "
            f"{result['seed']}) were flipped to another class and {scope_text(result['scope'])} retrained on them "
            + ("from the same initialisation and batch order" if result["scope"] == "head" else "exactly")
            + f". Test accuracy: {fmt(acc['clean'])} on the true labels, {fmt(acc['noisy'])} on the noisy ones. "
            "Each ranking orders the noisy training set on the noisy model (most suspect first); *found @x%* is "
            "the share of the flipped labels among the top x% (random: x; the oracle checks the flipped ones "
            "first), *area* the mean share found from 0 to 30% checked (random 0.15). *acc. fixing top x%*: test "
            "accuracy after setting the top x% back to their true labels and retraining.\n\n"
            + md_table(header, rows))


def figure(run: Run, result: dict) -> str:
    fig = new_figure(11, 4)
    ax1, ax2 = fig.subplots(1, 2)
    x = [0.0] + result["checked"]
    for i, (name, r) in enumerate(list(result["methods"].items()) + [("random", result["random"]),
                                                                     ("oracle", result["oracle"])]):
        style = {"random": dict(color="grey", ls="--"), "oracle": dict(color="black", ls=":")}.get(name, {})
        ax1.plot(x, [0.0] + list(r["found"]), label=name, lw=1.4, **style)
        shares = [0.0] + [float(s) for s in result["relabel_shares"]]
        ax2.plot(shares, [result["accuracy"]["noisy"]] + [r["accuracy"][str(s)] for s in result["relabel_shares"]],
                 marker="o", ms=3, lw=1.2, label=name, **style)
    ax2.axhline(result["accuracy"]["clean"], color="C2", lw=0.8, ls="-.", label="true labels")
    ax1.set_xlabel("share of the training set checked")
    ax1.set_ylabel("share of flipped labels found")
    ax1.set_title(f"{result['n_flipped']} flipped labels ({result['flip'] * 100:g}%)")
    ax2.set_xlabel("share relabelled (top of the ranking)")
    ax2.set_ylabel("test accuracy after retraining")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=7, ncol=2)
    return save_figure(run, "mislabel", fig)


@evaluation("mislabel", 60, "Finding flipped labels",
            "Flip a seeded share of the training labels, retrain, and rank the training set by self-influence, "
            "neighbour disagreement, loss and margin: how many flipped labels does checking the top x% find, and "
            "how much test accuracy does relabelling them back recover?",
            quick={"relabel": (0.05, 0.1, 0.2)},
            flags=(Flag("--flip", "flip", "share of training labels flipped (default 0.1)", type=float, metavar="F"),
                   "--scope", "--device"))
def run_mislabel(run: Run, methods=None, seed: int = 0, flip: float = 0.1, k: int = 50,
                 relabel: Sequence[float] = RELABEL, scope: Optional[str] = None, progress: bool = True,
                 device=None) -> dict:
    """Flip, retrain, rank, relabel; writes results/mislabel.* and figures/mislabel.png."""
    from ..device import resolve_device
    t_all = time.perf_counter()
    if not 0 < flip < 1:
        raise InstattrError(f"mislabel: --flip must be between 0 and 1, got {flip}")
    if any(not 0 < float(s) <= 1 for s in relabel):
        raise InstattrError(f"mislabel: relabel shares must lie in (0, 1], got {list(relabel)}")
    scope = retrain_scope(run, scope, "mislabel")
    device = resolve_device(device)
    train = run.features("train")
    rng = np.random.default_rng(seed)
    clean = np.asarray(train.label)
    noisy, flipped = flip_labels(clean, train.n_classes, flip, rng)
    if not flipped.any():
        raise InstattrError(f"mislabel: --flip {flip} of {len(clean)} training examples flips none")
    names = ranking_names(methods, scope)
    want_history = any(n.startswith("tracin") for n in names)
    seconds: Dict[str, float] = {}
    t = time.perf_counter()
    n_train, n_test, model = noisy_model(run, scope, noisy, want_history, device)
    seconds["retrain_noisy"] = time.perf_counter() - t

    def fit(name):
        from ..methods import get_method
        return get_method(name).fit(n_train, model)
    rank_seconds = {}
    scores = {}
    from ..sentence import sentence_embeddings
    sentence = sentence_embeddings(run, device)
    for name in names:
        t = time.perf_counter()
        scores[name] = suspicion_scores(n_train, model, [name], k, fit=fit, sentence=sentence)[name]
        rank_seconds[name] = time.perf_counter() - t
    loss = training_loss(n_train, model)
    orders = {n: ranking(s, loss) for n, s in scores.items()}
    orders["random"] = np.random.default_rng(seed + 1).permutation(len(clean))
    orders["oracle"] = np.lexsort((np.arange(len(clean)), ~flipped))

    shares = [float(s) for s in relabel]
    rows = [noisy, clean] + [relabelled(noisy, clean, o, s) for o in orders.values() for s in shares]
    t = time.perf_counter()
    start = model.final_layer() if scope == "final" else None
    acc = test_accuracies(run, scope, np.stack(rows), start, device, progress)
    seconds["retrain_relabelled"] = time.perf_counter() - t

    per = {}
    for j, (name, order) in enumerate(orders.items()):
        found = found_curve(order, flipped)
        per[name] = {"found": found, "area": curve_area(CHECKED, found),
                     "found_at_10": float(found[CHECKED.index(0.1)]),
                     "accuracy": {str(s): float(acc[2 + j * len(shares) + i]) for i, s in enumerate(shares)}}
        if name in rank_seconds:
            per[name]["seconds"] = rank_seconds[name]
    seconds["total"] = time.perf_counter() - t_all
    test = run.features(run.eval_split)
    result = {"methods": {n: per[n] for n in names}, "random": per["random"], "oracle": per["oracle"],
              "checked": list(CHECKED), "relabel_shares": shares, "flip": flip, "n_flipped": int(flipped.sum()),
              "n_train": len(clean), "n_test": len(test), "split": run.eval_split, "seed": seed, "scope": scope,
              "k_neighbours": int(min(k, len(clean) - 1)),
              "accuracy": {"noisy": float(acc[0]), "clean": float(acc[1]),
                           "noisy_model": float((n_test.pred == test.label).mean())},
              "flipped_idx": [str(i) for i in train.idx[flipped]], "seconds": seconds}
    result["figures"] = [figure(run, result)]
    return save(run, "mislabel", result, markdown(result))

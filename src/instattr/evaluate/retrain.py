"""Remove-and-retrain (paper Table 1, left).

For 50 random test examples and each method, remove that example's top-k training examples and
retrain; delta = p_after − p_before of the originally predicted class. Random baseline:
``n_random`` random k-subsets, removal r judged on test example r mod n_test. What is retrained
(``scope``, :func:`~.common.resolve_scope`):

- ``head`` (head-mode runs): instattr's head on the stored encoder output, from the same
  initialisation and minibatch order, by :func:`instattr.models.head.train_heads` in batched calls
  of ``chunk_size`` heads; each call also trains a full-data head, whose probabilities are the
  "before" of the heads in that call, so before and after share exactly the same numerics.
- ``final`` (every other run, or asked for): the final linear layer (weight and bias) on the
  stored features, refit exactly to the minimum of the mean cross-entropy plus the run's L2 term
  (Newton, float64, from the full-data minimum); "before" is the full-data minimum. This is the
  convex problem whose leave-out effect ``if`` approximates to first order.
"""
from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import InstattrError
from ..models.head import HeadConfig, Params, logits, train_heads
from ..store import Run, write_npz
from .common import (
    Ranker,
    data_name,
    fmt,
    head_config,
    head_input,
    md_table,
    method_list,
    new_figure,
    resolve_scope,
    sample_rows,
    save,
    save_figure,
    scope_text,
    top_k_mask,
)
from .paper import TABLE1_RANDOM_STD, TABLE1_RETRAIN, paper_columns
from .registry import evaluation


def effective_ks(ks: Sequence[int], n_train: int) -> List[int]:
    """Each k clipped to n_train // 2 (at least 1), duplicates dropped, order kept."""
    out = []
    for k in ks:
        k = max(1, min(int(k), n_train // 2))
        if k not in out:
            out.append(k)
    return out


def removal_masks(score_rows: np.ndarray, k: int) -> np.ndarray:
    """Keep-masks (n_rows, n_train): False on each row's k highest-scoring training examples."""
    return ~top_k_mask(score_rows, k)


def random_masks(n_train: int, k: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` keep-masks, each removing ``k`` training examples chosen uniformly at random."""
    keep = np.ones((n, n_train), dtype=bool)
    for r in range(n):
        keep[r, rng.choice(n_train, size=k, replace=False)] = False
    return keep


def removed_support(score_rows: np.ndarray, k: int, pred: np.ndarray, train_label: np.ndarray,
                    train_probs: np.ndarray) -> float:
    """Net loss-gradient weight of each row's top-k: the mean of (1 − p_gold(i)) signed +1 when the
    training label is the test row's prediction, −1 otherwise. A value near that of a random set
    (``k`` = n_train) means the removed examples' pulls cancel: well-fit same-label examples push
    little, misfit others a lot."""
    err = 1.0 - train_probs[np.arange(len(train_label)), train_label]
    mask = top_k_mask(score_rows, k) if k < score_rows.shape[1] else np.ones(score_rows.shape, dtype=bool)
    sign = np.where(train_label[None, :] == np.asarray(pred)[:, None], 1.0, -1.0)
    return float((mask * sign * err[None, :]).sum() / mask.sum())


def batched_probs(params: Params, x: torch.Tensor, heads_per_block: int = 8) -> np.ndarray:
    """Softmax probabilities (m, n, C) of batched heads on inputs x (a few heads at a time, so the
    (heads, n, d) features stay small)."""
    m = params["w"].shape[0]
    with torch.no_grad():
        return np.concatenate([torch.softmax(logits({k: v[a:a + heads_per_block] for k, v in params.items()}, x), -1)
                               .double().numpy() for a in range(0, m, heads_per_block)])


def _job_digest(x_train, y_train, x_test, config: HeadConfig, uniq: np.ndarray, step: int, before: bool = True) -> str:
    """What a partial retrain depends on: inputs, labels, head config, masks, chunking."""
    h = hashlib.sha1(json.dumps({"config": config.to_dict(), "step": step, **({} if before else {"before": False})},
                                sort_keys=True).encode())
    for a in (x_train, y_train, x_test):
        h.update(np.ascontiguousarray(a).tobytes())
    h.update(np.packbits(uniq, axis=1).tobytes())
    return h.hexdigest()


def retrain_probs(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, n_classes: int,
                  config: HeadConfig, masks: np.ndarray, chunk_size: int = 64,
                  progress: bool = False, partial: Optional[Path] = None,
                  device="cpu", before: bool = True) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Train one head per keep-mask; return (after, before), each (m, n_test, C).

    Identical masks are trained once. Masks go in chunks of ``chunk_size - 1`` plus one all-kept
    head per chunk; ``before[j]`` is that chunk's all-kept head, so deltas are numerically exact.
    ``before=False`` trains no all-kept heads (chunks of ``chunk_size``) and returns None for it.
    With ``partial``, finished chunks are saved there after each chunk, and a rerun of the same job
    (same inputs, config and masks) continues after the last saved chunk.
    """
    from tqdm.auto import tqdm
    masks = np.asarray(masks, dtype=bool)
    uniq, inverse = np.unique(masks, axis=0, return_inverse=True)
    inverse = np.asarray(inverse).reshape(-1)
    step = max(1, chunk_size - 1) if before else max(1, chunk_size)
    x_train, y_train = np.asarray(x_train, dtype=np.float32), np.asarray(y_train)
    x_test = np.asarray(x_test, dtype=np.float32)
    x_test_t = torch.as_tensor(x_test)
    after_u = np.empty((len(uniq), len(x_test), n_classes))
    before_u = np.empty_like(after_u)
    done, digest = 0, None
    if partial is not None:
        digest = _job_digest(x_train, y_train, x_test, config, uniq, step, before)
        try:
            with np.load(partial, allow_pickle=False) as z:
                if str(z["digest"]) == digest:
                    done = int(z["done"])
                    after_u[:done], before_u[:done] = z["after"][:done], z["before"][:done]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            done = 0   # none, another job's, or unreadable: start over
    starts = range(done, len(uniq), step)
    for s in tqdm(starts, desc=f"retrain {len(uniq)} heads" + (f" ({done} done earlier)" if done else ""),
                  disable=not progress, unit="chunk"):
        block = uniq[s:s + step]
        full = np.ones((int(before), masks.shape[1]), dtype=bool)
        res = train_heads(x_train, y_train, n_classes, config, masks=np.vstack([full, block]), progress=progress,
                          desc=f"heads {s + 1}-{s + len(block)}", device=device)
        probs = batched_probs(res.params, x_test_t)
        after_u[s:s + len(block)] = probs[len(full):]
        before_u[s:s + len(block)] = probs[0] if before else np.nan
        if partial is not None:
            write_npz(partial, digest=np.array(digest), done=np.array(s + len(block)),
                      after=after_u[:s + len(block)], before=before_u[:s + len(block)])
    return after_u[inverse], (before_u[inverse] if before else None)


def refit_probs(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, w0: np.ndarray, l2: float,
                masks: np.ndarray, progress: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """The final layer refit exactly on each keep-mask's rows; (after, before), each (m, n_test, C).

    ``x_*`` are the layer's input rows (``FinalLayer.augment``: [f, 1] with a bias), ``w0`` its
    weight; the refit minimises mean CE + ``l2 * ||W||^2`` from the full-data minimum. Identical
    masks are refit once."""
    from tqdm.auto import tqdm

    from ..methods.lastlayer import refit, softmax
    masks = np.asarray(masks, dtype=bool)
    uniq, inverse = np.unique(masks, axis=0, return_inverse=True)
    inverse = np.asarray(inverse).reshape(-1)
    y = np.asarray(y_train)
    full = refit(x_train, y, w0, l2).w
    before = softmax(x_test @ full.T)
    after_u = np.empty((len(uniq),) + before.shape)
    for j in tqdm(range(len(uniq)), desc=f"refit {len(uniq)} final layers", disable=not progress, unit="layer"):
        keep = uniq[j]
        after_u[j] = softmax(x_test @ refit(x_train[keep], y[keep], full, l2).w.T)
    return after_u[inverse], np.broadcast_to(before, after_u[inverse].shape)


def removal_deltas(retrain, pred: np.ndarray, score_rows: Dict[str, np.ndarray], n_train: int,
                   ks: Sequence[int], n_random: int = 50, seed: int = 0) -> dict:
    """The whole experiment over arrays.

    ``retrain(keep_masks) -> (after, before)``, each (m, n_test, C): the probabilities of the test
    rows after retraining on each mask's kept rows, and before. ``score_rows[m]`` is
    (n_test, n_train); ``pred`` the originally predicted classes. Returns ``{"methods": {m: {k:
    mean delta}}, "random": {k: {mean, std}}, "per_example": {m: {k: [delta per test row]}},
    "before": [p_before per test row], "before_agrees": share of test rows where the retrained
    full model predicts ``pred``}``.
    """
    pred = np.asarray(pred, dtype=int)
    n_test = len(pred)
    ks = effective_ks(ks, n_train)
    rng = np.random.default_rng(seed)
    masks, owners = [], []  # owner: (method or None for random, k, test row)
    for m, rows in score_rows.items():
        if rows.shape != (n_test, n_train):
            raise ValueError(f"{m}: score rows {rows.shape} != ({n_test}, {n_train})")
        for k in ks:
            masks.append(removal_masks(rows, k))
            owners += [(m, k, t) for t in range(n_test)]
    for k in ks:
        masks.append(random_masks(n_train, k, n_random, rng))
        owners += [(None, k, r % n_test) for r in range(n_random)]
    after, before = retrain(np.vstack(masks))
    per = {m: {str(k): [None] * n_test for k in ks} for m in score_rows}
    rand = {str(k): [] for k in ks}
    for j, (m, k, t) in enumerate(owners):
        d = float(after[j, t, pred[t]] - before[j, t, pred[t]])
        if m is None:
            rand[str(k)].append(d)
        else:
            per[m][str(k)][t] = d
    p_before = [float(before[0, t, pred[t]]) for t in range(n_test)]
    return {
        "methods": {m: {k: float(np.mean(v)) for k, v in d.items()} for m, d in per.items()},
        "random": {k: {"mean": float(np.mean(v)) if v else float("nan"), "std": float(np.std(v)) if v else float("nan")}
                   for k, v in rand.items()},
        "per_example": per,
        "before": p_before,
        "before_agrees": float((before[0].argmax(-1) == pred).mean()),
        "ks": ks,
    }


def markdown(result: dict, columns: List[str]) -> str:
    ks = [str(k) for k in result["ks"]]
    header = ["method"] + [f"ours k={k}" for k in ks]
    header += [f"paper {c} k={k}" for c in columns for k in ("50", "500")]

    def paper(m):
        return [fmt(TABLE1_RETRAIN[c].get(m, {}).get(k)) for c in columns for k in ("50", "500")]

    rows = [["random (mean ± std)"] + [f"{fmt(result['random'][k]['mean'])} ± {fmt(result['random'][k]['std'])}"
                                        for k in ks] + paper("random")]
    support = result.get("removed_support", {})
    header += [f"removed support k={k}" for k in ks] if support else []
    rows[0] += [fmt(support.get("random", {}).get(k)) for k in ks] if support else []
    rows += [[m] + [fmt(result["methods"][m][k]) for k in ks] + paper(m)
             + ([fmt(support[m][k]) for k in ks] if support else []) for m in result["methods"]]
    return (f"# Remove and retrain (paper Table 1, left)\n\nMean change (after − before) in the probability "
            f"of the originally predicted class over {result['n_test']} test examples, removing each "
            f"example's top-k training examples (of {result['n_train']}) and retraining "
            f"{scope_text(result['scope'])}"
            + (f" from the same initialisation and batch order ({result['head']['epochs']} epochs, batch size "
               f"{result['head']['batch_size']})" if result["scope"] == "head" else
               ", refit exactly to the minimum of its L2-regularised loss" if result["scope"] == "final" else
               f", continued from the model's weights on the kept rows ({result['top']['epochs']} epoch(s), "
               f"lr {result['top']['lr']}, batch size {result['top']['batch_size']})")
            + f". More negative = the method found real supporters. Random: "
            f"{result['n_random']} random removals per k (paper's std ≈ {TABLE1_RANDOM_STD}). The retrained full-data "
            f"model predicts the run's class on {fmt(result['before_agrees'], 2)} of these test examples."
            + (" *Removed support*: the mean over the removed examples of their loss-gradient weight "
               "1 − p(gold), signed + when their label is the test example's prediction and − otherwise "
               "(random row: its expectation, the mean over all training examples); a removed set whose "
               "pulls cancel, near the random value, barely moves the retrained head."
               if support else "") + "\n\n"
            + md_table(header, rows))


def figure(run: Run, result: dict) -> str:
    ks = [str(k) for k in result["ks"]]
    names = list(result["methods"])
    fig = new_figure(1.5 + 0.6 * len(names), 3.5)
    ax = fig.subplots()
    width = 0.8 / len(ks)
    for i, k in enumerate(ks):
        xs = np.arange(len(names)) + i * width
        ax.bar(xs, [result["methods"][m][k] for m in names], width, label=f"top-{k}")
        r = result["random"][k]
        ax.axhline(r["mean"], ls="--", lw=1, color=f"C{i}", label=f"random k={k}")
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=45, ha="right")
    ax.set_ylabel("mean Δ p(predicted class)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(run, "retrain", fig)


@evaluation("retrain", 20, "Remove the top-k and retrain",
            "For random test examples, remove each method's top-k training examples, retrain the head from "
            "the same initialisation, and record the change in the probability of the originally predicted "
            "class (paper Table 1, left). More negative = the removed examples mattered more.",
            quick={"n_test": 5, "n_random": 10}, flags=("--n-test", "--n-random", "--scope", "--device"))
def run_retrain(run: Run, methods=None, seed: int = 0, n_test: int = 50, ks: Sequence[int] = (50, 500),
                n_random: int = 50, chunk_size: int = 128, split: Optional[str] = None,
                epochs: Optional[int] = None, batch_size: Optional[int] = None, scope: Optional[str] = None,
                progress: bool = True, device=None) -> dict:
    """Remove-and-retrain on a seeded sample of test examples; writes results/retrain.* and a bar chart.

    ``scope`` says what is retrained (see the module docstring). ``epochs``/``batch_size`` override
    the head config of every retrained head (scope ``head``; the "before" head included), trading
    fidelity to the trained model for time.
    """
    from ..device import resolve_device
    scope = resolve_scope(run, scope, "remove-and-retrain")
    scorer = Ranker(run, split)
    names = method_list(methods, run, scorer.split)
    test = run.features(scorer.split)
    rows = sample_rows(len(test), n_test, np.random.default_rng(seed))
    ks_needed = max(effective_ks(ks, len(scorer.train)))   # only the top of each ranking is needed
    score_rows = {m: scorer.top(m, rows, ks_needed) for m in names}
    partial = run.path / "cache" / "retrain-partial.npz"     # an interrupted run continues from here
    extra = {}
    if scope == "head":
        x_train = head_input(run, "train", scorer.train)
        x_test = head_input(run, scorer.split, test)[rows]
        config = head_config(run)
        config = replace(config, epochs=epochs or config.epochs, batch_size=batch_size or config.batch_size)
        extra["head"] = config.to_dict()

        def retrain(masks):
            return retrain_probs(x_train, scorer.train.label, x_test, test.n_classes, config, masks, chunk_size,
                                 progress, partial, resolve_device(device))
    elif scope.startswith("top-"):
        from ..models import classifier_for
        from .top_layers import blocks_of, retrain_top
        classifier = classifier_for(run, device)
        top = {"epochs": epochs or 1, "lr": 1e-4, "batch_size": batch_size or 32}
        extra["top"] = top
        x_train = scorer.train.features

        def retrain(masks):
            return retrain_top(classifier, blocks_of(scope), scorer.train, test.subset(rows), masks,
                               top["epochs"], top["lr"], top["batch_size"], seed, progress)
    else:
        if epochs or batch_size:
            raise InstattrError("--epochs/--batch-size apply to retraining the head (--scope head), not to the "
                                "exact refit of the final layer")
        layer = run.final_layer()
        x_train, x_test = layer.augment(scorer.train.features), layer.augment(test.features[rows])
        extra["l2"] = layer.l2

        def retrain(masks):
            return refit_probs(x_train, scorer.train.label, x_test, layer.weight(), layer.l2, masks, progress)
    out = removal_deltas(retrain, test.pred[rows], score_rows, len(x_train), ks, n_random, seed + 1)
    support = {m: {str(k): removed_support(score_rows[m], k, test.pred[rows], scorer.train.label,
                                           scorer.train.probs) for k in out["ks"]} for m in names}
    everything = removed_support(np.zeros((len(rows), len(x_train))), len(x_train), test.pred[rows],
                                 scorer.train.label, scorer.train.probs)   # a random set's expectation
    support["random"] = {str(k): everything for k in out["ks"]}
    result = {"methods": out["methods"], "random": out["random"], "ks": out["ks"], "n_test": len(rows),
              "n_train": len(x_train), "n_random": n_random, "seed": seed, "split": scorer.split,
              "scope": scope, **extra,
              "test_idx": [str(s) for s in test.idx[rows]], "before": out["before"],
              "before_agrees": out["before_agrees"], "removed_support": support,
              "per_example": out["per_example"]}
    result["figures"] = [figure(run, result)]
    saved = save(run, "retrain", result, markdown(result, paper_columns(data_name(run))))
    partial.unlink(missing_ok=True)
    return saved

"""Benchmark the eleven attribution methods on a run, against the matrix-product floor and Captum.

    python bench/methods.py [RUN] [--repeat 3] [--rows 200] [--no-peers]
                            [--peer-train N] [--peer-test N]

RUN (default runs/sst2) is a trained run directory. Every method is fitted on the full training
split and scores the full evaluation split; its time (fit + score, best of --repeat) is printed
with the total as a multiple of the floor: one (n_test x d) . (d x n_train) float32 product,
measured in this process, best of five.

Peers (``pip install captum``, the ``bench`` extra), in the same process on the same features,
through a tiny torch module whose input is the run's penultimate features (layer ``features``)
and whose ``fc`` layer is the head's W:
  nn-cos, nn-euc  <->  captum.influence.SimilarityInfluence (cosine, euclidean; layer features)
  gd              <->  captum.influence.TracInCPFast (final fc layer, one checkpoint, lr 1)
  if              <->  captum.influence.NaiveInfluenceFunction (explicit Hessian of the fc
                       layer, reg 2*l2*n so that it is n times ours; full rank)
Test examples are labelled with the model's prediction, training examples with the gold label,
as in our convention. Each row: peer seconds, ours/peer, and the mean (min) Spearman rank
correlation of our scores with the peer's over --rows sampled test rows. --peer-train /
--peer-test run the peers (and, for the ratio, ours) on the first N rows instead of all.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.stats import rankdata

from instattr.attribution import run_model
from instattr.methods import METHOD_NAMES, get_method
from instattr.sentence import sentence_embeddings
from instattr.store import Run

PEERS = {"nn-cos": "SimilarityInfluence(cosine)", "nn-euc": "SimilarityInfluence(euclidean)",
         "gd": "TracInCPFast", "if": "NaiveInfluenceFunction"}


def best_of(fn, repeat):
    """(best seconds, last result) over ``repeat`` calls."""
    best, out = np.inf, None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def row_spearman(a, b):
    """Spearman correlation of each row of ``a`` with the same row of ``b``."""
    ra, rb = rankdata(a, axis=1), rankdata(b, axis=1)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    return (ra * rb).sum(1) / np.sqrt((ra ** 2).sum(1) * (rb ** 2).sum(1))


def run_ours(train, test, models, repeat, keep_rows):
    """Per method: best fit+score seconds, and the scores of the sampled rows."""
    seconds, kept = {}, {}
    for name in METHOD_NAMES:
        t, scores = best_of(lambda: get_method(name).fit(train, models[name]).score(test), repeat)
        seconds[name], kept[name] = t, scores[keep_rows]
        del scores
    return seconds, kept


# ---------------------------------------------------------------- captum peers
def run_peers(train, test, head, rows, tmp):
    """Per peer: (seconds, scores of ``rows``). Imported here: captum is optional."""
    import torch
    from captum.influence import NaiveInfluenceFunction, SimilarityInfluence, TracInCPFast
    from captum.influence._core.similarity_influence import cosine_similarity, euclidean_distance
    from torch.utils.data import TensorDataset

    class FixedFeatureHead(torch.nn.Module):
        """Input: the run's penultimate features; ``features`` names them, ``fc`` is W."""

        def __init__(self, w):
            super().__init__()
            self.features = torch.nn.Identity()
            self.fc = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            with torch.no_grad():
                self.fc.weight.copy_(torch.as_tensor(w, dtype=torch.float32))

        def forward(self, x):
            return self.fc(self.features(x))

    model = FixedFeatureHead(head.w).eval()
    x_tr = torch.as_tensor(np.asarray(train.features, dtype=np.float32))
    x_te = torch.as_tensor(np.asarray(test.features, dtype=np.float32))
    y_tr = torch.as_tensor(np.asarray(train.label, dtype=np.int64))
    p_te = torch.as_tensor(np.asarray(test.pred, dtype=np.int64))
    data = TensorDataset(x_tr, y_tr)
    ckpt = str(Path(tmp) / "head.pt")
    torch.save(model.state_dict(), ckpt)

    def load(m, path):
        m.load_state_dict(torch.load(path))
        return 1.0                                       # learning rate of the one checkpoint

    n, out = len(train), {}

    def similarity(metric, direction, sign, key):
        def unwrapped(test_act, train_act):
            # captum 0.9 hands a one-layer LayerActivation result over as a one-item list
            return metric(test_act[0] if isinstance(test_act, list) else test_act, train_act)

        def go():
            sim = SimilarityInfluence(model, "features", data, str(Path(tmp) / key), model_id=key,
                                      similarity_metric=unwrapped, similarity_direction=direction,
                                      batch_size=n)      # one batch: captum's top_k breaks on a short last one
            idx, vals = sim.influence(x_te, top_k=n)["features"]       # fresh dir: computes
            full = np.empty((len(test), n), dtype=np.float32)
            np.put_along_axis(full, idx.numpy(), sign * vals.numpy(), axis=1)
            return full[rows]
        return best_of(go, 1)

    out["nn-cos"] = similarity(cosine_similarity, "max", 1.0, "cos")
    out["nn-euc"] = similarity(euclidean_distance, "min", -1.0, "euc")

    def tracin():
        tr = TracInCPFast(model, "fc", data, [ckpt], checkpoints_load_func=load,
                          loss_fn=torch.nn.CrossEntropyLoss(reduction="sum"), batch_size=4096)
        return tr.influence((x_te, p_te), k=None).numpy()[rows]
    out["gd"] = best_of(tracin, 1)

    def naive_if():
        nif = NaiveInfluenceFunction(model, data, ckpt, checkpoints_load_func=load, layers=["fc"],
                                     loss_fn=torch.nn.CrossEntropyLoss(reduction="none"),
                                     batch_size=4096, projection_dim=head.w.size,
                                     hessian_reg=2 * head.l2 * n, seed=0)
        return n * nif.influence((x_te, p_te)).numpy()[rows]          # captum's H is n x ours
    out["if"] = best_of(naive_if, 1)
    return out


# ---------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", nargs="?", default="runs/sst2")
    ap.add_argument("--repeat", type=int, default=3, help="time each method as the best of N runs")
    ap.add_argument("--rows", type=int, default=200, help="test rows sampled for rank agreement")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--peer-train", type=int, default=None, help="peers on the first N training rows")
    ap.add_argument("--peer-test", type=int, default=None, help="peers on the first N test rows")
    args = ap.parse_args(argv)

    run = Run.load(args.run)
    train, test, head = run.features("train"), run.features(run.eval_split), run.final_layer()
    n_tr, n_te, d = len(train), len(test), train.features.shape[1]
    print(f"run {run.path}: train {n_tr} x {run.eval_split} {n_te}, d = {d}, "
          f"{train.n_classes} classes, sentence encoder width {sentence_embeddings(run).of(train).shape[1]}, "
          f"l2 = {head.l2}")

    a = np.ascontiguousarray(test.features, dtype=np.float32)
    b = np.ascontiguousarray(train.features, dtype=np.float32)
    floor, _ = best_of(lambda: a @ b.T, 5)
    print(f"floor: one ({n_te} x {d}) . ({d} x {n_tr}) float32 product = {floor:.4f} s (best of 5)\n")

    rows = np.sort(np.random.default_rng(0).choice(n_te, min(args.rows, n_te), replace=False))
    models = {n: run_model(run, get_method(n)) for n in METHOD_NAMES}   # sbert-*: the stored sentence embeddings
    seconds, ours = run_ours(train, test, models, args.repeat, rows)
    print(f"{'method':10s} {'seconds':>8s} {'x floor':>8s}   (fit + score, best of {args.repeat})")
    for name in METHOD_NAMES:
        print(f"{name:10s} {seconds[name]:8.3f} {seconds[name] / floor:8.1f}")
    total = sum(seconds.values())
    print(f"{'total':10s} {total:8.3f} {total / floor:8.1f}   (target: at most 30 x floor)")
    rep = get_method("rep").fit(train, head)
    print(f"rep refit: gradient norm {rep.grad_norm_:.1e} after {rep.n_iter_} steps "
          f"({rep.n_hessians_} Hessians); reconstruction {rep.reconstruction_}; "
          f"refit agrees with the model on {100 * rep.prediction_agreement_:.1f}% of training predictions")

    if args.no_peers:
        return 0
    try:
        import captum
    except ImportError:
        print("\npeers skipped: captum is not installed (pip install captum)")
        return 0
    subset = args.peer_train is not None or args.peer_test is not None
    if subset:
        train_p = train.subset(slice(0, args.peer_train))
        test_p = test.subset(slice(0, args.peer_test))
        rows_p = rows[rows < len(test_p)]
        our_sec, ours_p = run_ours(train_p, test_p, head, args.repeat, rows_p)
        where = f"SUBSET: first {len(train_p)} training x first {len(test_p)} test rows"
    else:
        train_p, test_p, rows_p, our_sec, ours_p = train, test, rows, seconds, ours
        where = f"full problem: {n_tr} x {n_te}"
    with tempfile.TemporaryDirectory() as tmp:
        peer = run_peers(train_p, test_p, head, rows_p, tmp)
    print(f"\npeers: captum {captum.__version__}, same process, same features; {where}; "
          f"Spearman over {len(rows_p)} sampled test rows")
    print(f"{'ours':8s} {'peer':32s} {'peer s':>8s} {'ours s':>8s} {'ours/peer':>9s} "
          f"{'spearman mean (min)':>20s} {'max|diff|/max|ours|':>20s}")
    for name, label in PEERS.items():
        t, theirs = peer[name]
        mine, theirs = ours_p[name].astype(np.float64), theirs.astype(np.float64)
        rho = row_spearman(mine, theirs)
        diff = np.abs(mine - theirs).max() / np.abs(mine).max()
        print(f"{name:8s} {label:32s} {t:8.3f} {our_sec[name]:8.3f} {our_sec[name] / t:9.4f} "
              f"{rho.mean():12.4f} ({rho.min():.4f}) {diff:20.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

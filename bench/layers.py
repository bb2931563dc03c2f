"""Influence over tracked modules on a real run: projected if-top vs the paper's LiSSA vs EK-FAC.

    python bench/layers.py runs/sst2 [--n-test 6] [--n-train 500] [--ks 4,8,16,32] [--projections khatri-rao]
                                     [--dampings 0.1,1,10] [--lissa-damping 10] [--lissa-depth 1000]
                                     [--n-hessian 1000] [--kronfluence]
                                     [--only exact,ggn,projected,lissa,paper,kfac,agreement]

Every phase runs in a fresh process (its peak resident memory is its own, read with
resource.getrusage) on the same seeded sample: ``--n-test`` test rows against ``--n-train``
training rows (all training rows enter every Hessian). It prints

- exact ``gd-top`` (unprojected per-example gradients, each example alone) and the Spearman agreement of
  projected ``gd-top`` with it for each projection size ``k`` (the projection alone);
- the exact Gauss-Newton influence with the Hessian of ``--n-hessian`` training rows (Woodbury over
  exact gradients), against projected ``if-top``/``gd-top`` fitted on the same rows, for each ``k``
  and damping, for each ``--projections`` kind (khatri-rao, orthogonal, gaussian; the Hessian
  structure each resolved to is printed: f(ull), d(ual, full by Woodbury) or b(lock-diagonal));
- projected ``if-top`` (Gauss-Newton in the projected space) for each ``k`` and damping: fit time on
  the whole training set, time per test example, extrapolated total for the whole test split;
- LiSSA with exact Hessian-vector products (the paper's algorithm) run to convergence at
  ``--lissa-damping`` (LiSSA needs H + damping I positive definite; the exact Hessian of the top
  layers of a frozen encoder is indefinite), tracked every ``--check-every`` steps, and the
  Spearman of projected if-top at the same damping against it;
- LiSSA as the paper's code ran it (damping 3e-3, scale 1e4, depth 0.25 n / batch): its time and
  what it agrees with;
- kronfluence's EK-FAC on the same tracked Linear modules (``--kronfluence``), if installed; with
  ``ggn`` also fitted on the reference's rows and compared with the exact influence at each damping;
- on the stored score matrices of the run: if-top vs last-layer if and tracin vs gd (mean per-row
  Spearman over a sample of 100 test rows, and the common top-10 of Figure 4).

The machine is shared: seconds are wall-clock under whatever else runs; compare within a run.
"""
import argparse
import json
import math
import os
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def in_process(fn, *args, **kwargs):
    """Run ``fn`` in a fresh (spawned) process; returns its result dict plus its peak memory."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as ex:
        return ex.submit(_wrapped, fn, args, kwargs).result()


def _wrapped(fn, args, kwargs):
    out = fn(*args, **kwargs)
    out["peak_mb"] = peak_mb()
    return out


def spearman(a, b) -> float:
    from scipy.stats import spearmanr
    a, b = np.asarray(a), np.asarray(b)
    return float(np.mean([spearmanr(x, y)[0] for x, y in zip(a, b)]))


def topk_overlap(a, b, k=10) -> float:
    ia = np.argsort(-np.asarray(a), axis=1)[:, :k]
    ib = np.argsort(-np.asarray(b), axis=1)[:, :k]
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(ia, ib)]))


# ------------------------------------------------------------------ shared setup (inside a phase)
def setup(run_path, split, test_rows, train_rows, layers):
    import torch

    from instattr.store import Run
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    run = Run.load(run_path)
    test = run.features(split).subset(np.asarray(test_rows))
    train = run.features("train")
    return run, test, train, train.subset(np.asarray(train_rows))


def classifier_for(run):
    from instattr.models import classifier_for as build
    return build(run)


def tracked_model(run, layers, dtype="float32"):
    """(classifier, its module in ``dtype``, the tracked modules of its top ``layers`` blocks and
    head, their flat parameters)."""
    from instattr.layers.attributors import module_in
    from instattr.layers.grads import FlatParameters
    clf = classifier_for(run)
    tracked = clf.tracked(layers)
    module = module_in(clf, dtype)
    return clf, module, tracked, FlatParameters(module, tracked, clf.final_name)


def projector(run, layers, k, kind):
    from instattr.layers.attributors import projector_for
    clf, _, tracked, _ = tracked_model(run, layers)
    return projector_for(clf, tracked, "float32", k, 0, kind)


def exact_gradients(run, fs, labels, flat, batch_size=16, query=False):
    """Yield (positions, exact per-example gradients), length-sorted batches, each example alone."""
    import torch

    from instattr.layers.grads import per_example_grads
    clf = classifier_for(run)
    rows, task = clf.rows(fs), clf.task()
    labels = torch.as_tensor(np.asarray(labels))
    for pos in rows.order(batch_size):
        yield pos, per_example_grads(task, flat, rows.batch(pos), labels[pos], query)


# ------------------------------------------------------------------ phases
def phase_exact(run_path, split, test_rows, train_rows, layers):
    import torch

    run, test, _, train_s = setup(run_path, split, test_rows, train_rows, layers)
    _, _, _, flat = tracked_model(run, layers)
    t = time.perf_counter()
    g_t = torch.zeros(len(test), flat.dim)
    for pos, g in exact_gradients(run, test, test.pred, flat, query=True):
        g_t[pos] = g
    gd = np.zeros((len(test), len(train_s)), np.float32)
    for pos, g in exact_gradients(run, train_s, train_s.label, flat):
        gd[:, pos] = (g_t @ g.T).numpy()
    return {"gd": gd, "seconds": time.perf_counter() - t, "dim": flat.dim,
            "per_example_s": (time.perf_counter() - t) / (len(test) + len(train_s))}


def phase_projected(run_path, split, test_rows, train_rows, layers, k, dampings, n_split, hessian="auto",
                    kind="khatri-rao"):
    import torch

    from instattr.layers.attributors import gauss_newton_curvature, projected_gradients
    from instattr.layers.ihvp import GaussNewton
    run, test, train, _ = setup(run_path, split, test_rows, train_rows, layers)
    proj = projector(run, layers, k, kind)
    t = time.perf_counter()
    g_tr, factors = projected_gradients(classifier_for(run), train, train.label, proj, factors=True)
    t_train = time.perf_counter() - t
    t = time.perf_counter()
    g_te, _ = projected_gradients(classifier_for(run), test, test.pred, proj, query=True)
    t_test = (time.perf_counter() - t) / len(test)
    cols = torch.as_tensor(np.asarray(train_rows))
    out = {"k": k, "dim": proj.dim, "train_s": t_train, "test_s_per_example": t_test,
           "gd": (g_te @ g_tr[cols].T).numpy(), "if": {}, "solve_s": {}}
    for lam in dampings:
        t = time.perf_counter()
        solver = GaussNewton(lam, hessian).fit(gauss_newton_curvature(proj, factors, len(train), run.final_layer().l2))
        solved = solver.solve(g_te.double())            # if-top scores H^-1 g_t . g_i
        out["solve_s"][lam] = time.perf_counter() - t
        out["if"][lam] = (solved @ g_tr[cols].double().T).numpy()
        out["structure"] = _structure(solver)
    out["total_s"] = t_train + out["solve_s"][dampings[0]] + n_split * t_test
    return out


def phase_lissa(run_path, split, test_rows, train_rows, layers, damping, scale, depth, batch_size,
                check_every, paper=False):
    """LiSSA with exact HVPs over the whole training set; scores on the sample every check_every steps."""
    import torch

    from instattr.layers.grads import hvp
    from instattr.layers.ihvp import Curvature, LiSSA
    run, test, train, train_s = setup(run_path, split, test_rows, train_rows, layers)
    clf, _, _, flat = tracked_model(run, layers)
    rows_of, task, l2 = clf.rows(train), clf.task(), clf.final_layer().l2
    labels = torch.as_tensor(train.label)
    curv = Curvature(dim=flat.dim, n=len(train),
                     hvp=lambda v, rows: hvp(task, flat, rows_of.batch(rows), labels[rows], v, l2))
    g_t = torch.zeros(len(test), flat.dim)
    for pos, g in exact_gradients(run, test, test.pred, flat, query=True):
        g_t[pos] = g
    snaps = {}

    def keep(r, step, est):
        if step % check_every == 0 and step != depth:
            snaps[step] = est.clone()
    step_damping = damping if paper else damping / scale
    solver = LiSSA(step_damping, scale, depth, 1, batch_size, 0, callback=keep).fit(curv)
    t = time.perf_counter()
    try:
        ihvp = solver.solve(g_t)
    except ValueError as e:
        return {"error": str(e), "seconds": time.perf_counter() - t}
    t_solve = time.perf_counter() - t
    snaps[depth] = ihvp
    t = time.perf_counter()
    scores = {s: np.zeros((len(test), len(train_s)), np.float32) for s in snaps}
    for pos, g in exact_gradients(run, train_s, train_s.label, flat):
        for s, v in snaps.items():
            scores[s][:, pos] = (v @ g.T).numpy()
    t_dot = time.perf_counter() - t
    n_train_full_s = t_dot / len(train_s) * len(train)      # one exact pass over every training row
    return {"scores": scores[depth], "trace": scores, "seconds": t_solve, "steps": depth,
            "per_test_s": t_solve / len(test) + n_train_full_s / len(test),
            "train_pass_s": n_train_full_s, "damping_effective": step_damping * scale}


def phase_exact_ggn(run_path, split, test_rows, layers, n_hessian, ks, dampings, seed=0, block=64,
                    hessian="auto", reference=None, kinds=("khatri-rao",)):
    """The exact Gauss-Newton influence on a training subset, brute force, against projected if-top.

    On ``n_hessian`` training rows (the Hessian's training set *and* the scored columns) the exact
    unprojected answer g_t^T (Lambda + F^T F / n)^-1 g_i follows by Woodbury from the Gram matrix of
    exact per-example gradients (Lambda = damping, plus 2 l2 on the last weight; binary tasks, where
    each Gauss-Newton factor F_i is a multiple of g_i). The Gram matrix is accumulated from streamed
    exact gradients (each example alone), ``block`` rows at a time. Projected if-top and gd-top are fitted on the
    same subset, for every k. ``reference``: the exact part of an earlier run's ``--json`` (same
    run, sample and dampings), reused instead of recomputing it (about half an hour on 2 cores).
    """
    import torch

    from instattr.methods.lastlayer import sum_zero_basis
    run, test, train, _ = setup(run_path, split, test_rows, [0], layers)
    if train.n_classes != 2:
        raise ValueError("the Woodbury reference assumes a binary task")
    rows = hessian_rows(len(train), n_hessian, seed)
    sub = train.subset(rows)
    clf, module, _, flat = tracked_model(run, layers)
    starts = np.cumsum([0] + flat.sizes)
    w = np.concatenate([np.arange(a, z) for p, a, z in zip(flat.params, starts[:-1], starts[1:])
                        if any(p is q for q in flat.penalized)])
    l2 = run.final_layer().l2
    m, n, total = len(test), len(sub), len(test) + len(sub)

    def both(rows):
        """(positions in rows, gradients) of rows of [test at pred; sub at gold] (one split at a time)."""
        rows = np.asarray(rows)
        for fs, labels, offset in ((test, test.pred, 0), (sub, sub.label, m)):
            mine = np.flatnonzero((rows >= offset) & (rows < offset + len(fs)))
            if len(mine):
                for pos, g in exact_gradients(run, fs.subset(rows[mine] - offset), labels[rows[mine] - offset],
                                              flat, query=offset == 0):
                    yield mine[pos], g
    if reference is not None:
        out = {"gram_s": reference["gram_s"], "n_hessian": n, "exact_gd": np.asarray(reference["exact_gd"]),
               "exact_if": {float(k): np.asarray(v) for k, v in reference["exact_if"].items()}, "projected": {}}
        missing = [d for d in dampings if d not in out["exact_if"]]
        if out["exact_gd"].shape != (m, n) or missing:
            raise ValueError(f"--ggn-reference: shape {out['exact_gd'].shape} != {(m, n)} or dampings {missing} "
                             "missing; rerun without it")
        return _projected_against(run, test, sub, layers, ks, dampings, run.final_layer().l2, hessian, out, kinds)
    t0 = time.perf_counter()
    gram, gram_w = np.zeros((total, total)), np.zeros((total, total))
    for a in range(0, total, block):
        keep = np.arange(a, min(a + block, total))
        held = torch.zeros(len(keep), flat.dim, dtype=torch.float64)   # float64 sums, converted once
        for pos, g in both(keep):
            held[pos] = g.double()
        rest = np.arange(a, total)
        for pos, g in both(rest):
            cols, g = rest[pos], g.double()
            gram[np.ix_(keep, cols)] = (held @ g.T).numpy()
            gram_w[np.ix_(keep, cols)] = (held[:, w] @ g[:, w].T).numpy()
        del held
    gram = np.triu(gram) + np.triu(gram, 1).T
    gram_w = np.triu(gram_w) + np.triu(gram_w, 1).T
    t_gram = time.perf_counter() - t0
    # Gauss-Newton factor of a training row: F_i = sqrt(q^T A_i q) / (q^T e_i) * g_i (binary, q = Q[:, 0])
    with torch.no_grad():
        p = np.zeros((n, 2))
        sub_rows = clf.rows(sub)
        for pos in sub_rows.order(64):
            p[pos] = torch.softmax(module(**sub_rows.batch(pos)).logits.double(), -1).numpy()
    q = sum_zero_basis(2)[:, 0]
    e = p.copy()
    e[np.arange(n), sub.label] -= 1.0
    r = np.sqrt(2 * p[:, 0] * p[:, 1]) / (e @ q)
    out = {"gram_s": t_gram, "n_hessian": n, "exact_gd": gram[:m, m:], "exact_if": {}, "projected": {}}
    for lam in dampings:
        k_lam = (gram - gram_w) / lam + gram_w / (lam + 2 * l2)      # g^T Lambda^-1 g'
        kf = k_lam[m:, m:] * r[:, None] * r[None, :]
        inner = np.linalg.solve(n * np.eye(n) + kf, (k_lam[m:, m:] * r[:, None]))
        out["exact_if"][lam] = k_lam[:m, m:] - (k_lam[:m, m:] * r[None, :]) @ inner
    return _projected_against(run, test, sub, layers, ks, dampings, l2, hessian, out, kinds)


def _structure(solver) -> str:
    return ("dual" if solver.dual_ else "full") if solver.full_ else "block"


def _projected_against(run, test, sub, layers, ks, dampings, l2, hessian, out, kinds=("khatri-rao",)):
    """Projected gd-top and if-top on the Hessian subset ``sub``, for each kind, k and damping, into ``out``."""
    from instattr.layers.attributors import gauss_newton_curvature, projected_gradients
    from instattr.layers.ihvp import GaussNewton
    for kind in kinds:
        for k in ks:
            proj = projector(run, layers, k, kind)
            t = time.perf_counter()
            g_tr, factors = projected_gradients(classifier_for(run), sub, sub.label, proj, factors=True)
            g_te, _ = projected_gradients(classifier_for(run), test, test.pred, proj, query=True)
            res = {"kind": kind, "k": k, "dim": proj.dim, "seconds": time.perf_counter() - t,
                   "gd": (g_te @ g_tr.T).numpy(), "if": {}}
            for lam in dampings:
                solver = GaussNewton(lam, hessian).fit(gauss_newton_curvature(proj, factors, len(sub), l2))
                res["if"][lam] = (solver.solve(g_te.double()) @ g_tr.double().T).numpy()
                res["structure"] = _structure(solver)
            out["projected"][f"{kind}:{k}"] = res
    return out


def hessian_rows(n_train, n_hessian, seed):
    """The training rows of the exact Gauss-Newton reference (its Hessian and its scored columns)."""
    return np.sort(np.random.default_rng(seed + 7).choice(n_train, min(n_hessian, n_train), replace=False))


def phase_kfac(run_path, split, test_rows, train_rows, layers, dampings, n_fit, fit_rows=None):
    """kronfluence EK-FAC on the tracked Linear modules, scored at each damping; factors from
    ``fit_rows`` (default: ``n_fit`` random training rows)."""
    import torch
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from kronfluence.utils.dataset import DataLoaderKwargs

    run, test, train, train_s = setup(run_path, split, test_rows, train_rows, layers)
    clf, module, tracked, _ = tracked_model(run, layers)
    import copy
    model = copy.deepcopy(module)            # kronfluence wraps the tracked modules in place
    for p in model.parameters():
        p.requires_grad_(False)
    names = [t.name for t in tracked]
    for n in names:
        for p in model.get_submodule(n).parameters():
            p.requires_grad_(True)

    datasets = {}

    class Rows(torch.utils.data.Dataset):
        def __init__(self, key, fs, labels):
            self.key, self.rows, self.labels = key, clf.rows(fs), np.asarray(labels)
            datasets[key] = self

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            return self.key, i

    def collate(items):                  # one collate for every loader: items name their dataset
        ds = datasets[items[0][0]]
        pos = np.asarray([i for _, i in items])
        b = ds.rows.batch(pos)
        b["y"] = torch.as_tensor(ds.labels[pos])
        return b

    class Top(Task):
        def compute_train_loss(self, batch, model, sample=False):
            logits = model(**{k: v for k, v in batch.items() if k != "y"}).logits
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
                return torch.nn.functional.cross_entropy(logits, y, reduction="sum")
            return torch.nn.functional.cross_entropy(logits, batch["y"], reduction="sum")

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

        def get_influence_tracked_modules(self):
            return names

        def get_attention_mask(self, batch):   # token masks for the modules inside the blocks
            if "input_ids2" in batch:
                return None
            return {t.name: batch["attention_mask"] for t in tracked if t.group != "head"}

    if fit_rows is None:
        fit_rows = np.sort(np.random.default_rng(1).choice(len(train), min(n_fit, len(train)), replace=False))
    fit_rows = np.asarray(fit_rows)
    fit_ds = Rows("fit", train.subset(fit_rows), train.label[fit_rows])
    query_ds, train_ds = Rows("query", test, test.pred), Rows("train", train_s, train_s.label)
    task = Top()
    model = prepare_model(model, task)
    import tempfile
    out_dir = tempfile.mkdtemp(prefix="kfac-")
    analyzer = Analyzer("bench", model, task, cpu=True, output_dir=out_dir, disable_tqdm=True)
    t = time.perf_counter()
    analyzer.fit_all_factors("ekfac", fit_ds, per_device_batch_size=32,
                             factor_args=FactorArguments(strategy="ekfac"),
                             dataloader_kwargs=DataLoaderKwargs(collate_fn=collate), overwrite_output_dir=True)
    t_fit = time.perf_counter() - t
    scores, t_score = {}, None
    for i, damping in enumerate(dampings):
        t = time.perf_counter()
        analyzer.compute_pairwise_scores(f"s{i}", "ekfac", query_ds, train_ds, per_device_query_batch_size=len(test),
                                         per_device_train_batch_size=32,
                                         score_args=ScoreArguments(damping_factor=damping),
                                         dataloader_kwargs=DataLoaderKwargs(collate_fn=collate),
                                         overwrite_output_dir=True)
        t_score = t_score or time.perf_counter() - t
        scores[damping] = analyzer.load_pairwise_scores(f"s{i}")["all_modules"].numpy()
    return {"scores": scores, "fit_s": t_fit, "fit_rows": len(fit_rows), "score_s": t_score,
            "per_test_s": t_score / len(test) * len(train) / len(train_s), "modules": len(names)}


def phase_agreement(run_path, split, n_rows=100, seed=0):
    """Stored score matrices: if-top vs last-layer if, tracin vs gd (and a few more pairs)."""
    from instattr.store import Run
    run = Run.load(run_path)
    pairs = [("if-top", "if"), ("if-top", "gd-top"), ("gd-top", "gd"), ("tracin", "gd"), ("tracin-top", "gd-top")]
    n = len(run.features(split))
    rows = np.sort(np.random.default_rng(seed).choice(n, min(n_rows, n), replace=False))
    out = {}
    for a, b in pairs:
        if run.has_scores(a, split) and run.has_scores(b, split):
            sa, sb = np.asarray(run.scores(a, split)[rows]), np.asarray(run.scores(b, split)[rows])
            out[f"{a} vs {b}"] = {"spearman": spearman(sa, sb), "top10_common": topk_overlap(sa, sb)}
    return out


# ------------------------------------------------------------------ main
def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--split", default=None)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--n-test", type=int, default=6)
    ap.add_argument("--n-train", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ks", default="4,8,16,32")
    ap.add_argument("--projections", default="khatri-rao",
                    help="projection kinds for the ggn phase (the projected phase times the first)")
    ap.add_argument("--dampings", default="0.01,0.1,1,10")
    ap.add_argument("--hessian", default="auto", choices=["auto", "full", "block"],
                    help="projected Hessian structure (auto: full while min(dim, factor rows) <= 20480)")
    ap.add_argument("--lissa-damping", type=float, default=10.0)
    ap.add_argument("--lissa-scale", type=float, default=1000.0)
    ap.add_argument("--lissa-depth", type=int, default=1000)
    ap.add_argument("--lissa-batch-size", type=int, default=8)
    ap.add_argument("--check-every", type=int, default=250)
    ap.add_argument("--kronfluence", action="store_true", help="also run kronfluence EK-FAC (installed with --no-deps, see README)")
    ap.add_argument("--kfac-fit-rows", type=int, default=2000)
    ap.add_argument("--n-hessian", type=int, default=1000,
                    help="training rows of the exact (Woodbury) Gauss-Newton reference")
    ap.add_argument("--ggn-reference", help="an earlier --json of the same command: reuse its exact reference")
    ap.add_argument("--only", default="exact,ggn,projected,lissa,paper,kfac,agreement")
    ap.add_argument("--json", help="write every number here as well")
    a = ap.parse_args()
    from instattr.store import Run
    run = Run.load(a.run)
    split = a.split or run.eval_split
    n_split, n_train = len(run.features(split)), len(run.features("train"))
    rng = np.random.default_rng(a.seed)
    test_rows = np.sort(rng.choice(n_split, a.n_test, replace=False)).tolist()
    train_rows = np.sort(rng.choice(n_train, a.n_train, replace=False)).tolist()
    only = set(a.only.split(","))
    ks = [int(k) for k in a.ks.split(",")]
    kinds = a.projections.split(",")
    dampings = sorted({float(x) for x in a.dampings.split(",")} | {a.lissa_damping})
    common = (a.run, split, test_rows, train_rows, a.layers)
    res = {"sample": {"n_test": a.n_test, "n_train": a.n_train, "seed": a.seed}, "split_size": n_split}
    print(f"{a.run}: top {a.layers} layers; sample {a.n_test} test x {a.n_train} train rows; "
          f"Hessians over all {n_train} training rows; {os.cpu_count()} CPUs (shared)")

    if "exact" in only:
        ex = res["exact"] = in_process(phase_exact, *common)
        print(f"\nexact gd-top (each example alone, {ex['dim']:,} parameters): {ex['per_example_s'] * 1e3:.0f} ms per "
              f"example gradient, peak {ex['peak_mb']:.0f} MB")
    if "ggn" in only:
        ref = None
        if a.ggn_reference:
            with open(a.ggn_reference) as f:
                ref = json.load(f)["ggn"]
        gg = res["ggn"] = in_process(phase_exact_ggn, a.run, split, test_rows, a.layers, a.n_hessian, ks, dampings,
                                     a.seed, hessian=a.hessian, reference=ref, kinds=kinds)
        print(f"\nexact Gauss-Newton influence on {gg['n_hessian']} training rows (Hessian and scored columns), "
              f"by Woodbury from exact gradients: {gg['gram_s']:.0f} s, peak {gg['peak_mb']:.0f} MB")
        print(f"  agreement with it (mean per-row Spearman over {gg['n_hessian']} columns):")
        print(f"  {'projection':>10} {'k':>4} {'dim':>8} {'s':>5} {'gd-top':>7} "
              + " ".join(f"{'if@' + format(d, 'g'):>8}" for d in dampings))
        for pr in gg["projected"].values():
            print(f"  {pr['kind']:>10} {pr['k']:>4} {pr['dim']:>7,}{pr['structure'][0]} {pr['seconds']:>5.0f} "
                  f"{spearman(pr['gd'], gg['exact_gd']):>7.3f} " +
                  " ".join(f"{spearman(pr['if'][d], gg['exact_if'][d]):>8.3f}" for d in dampings))
        print("  exact if vs exact gd-top: " + "  ".join(
            f"{d:g}: {spearman(gg['exact_if'][d], gg['exact_gd']):.3f}" for d in dampings))
    if "lissa" in only:
        li = res["lissa"] = in_process(phase_lissa, *common, a.lissa_damping, a.lissa_scale, a.lissa_depth,
                                       a.lissa_batch_size, a.check_every)
        if "error" in li:
            print(f"\nLiSSA (damping {a.lissa_damping}, scale {a.lissa_scale}): {li['error']}")
        else:
            final = li["scores"]
            conv = ", ".join(f"{s}: {spearman(v, final):.3f}" for s, v in sorted(li["trace"].items()) if s != li["steps"])
            print(f"\nLiSSA, exact HVPs, damping {a.lissa_damping} (scale {a.lissa_scale}, batch {a.lissa_batch_size}, "
                  f"{li['steps']} steps): {li['seconds']:.0f} s for {a.n_test} test vectors; per test example "
                  f"{li['per_test_s']:.0f} s incl. one exact pass over the training set; 1,821-example total "
                  f"{li['per_test_s'] * n_split / 3600:.1f} h; peak {li['peak_mb']:.0f} MB")
            print(f"  convergence: Spearman of the iterate at step s with the final one: {conv}")
            if "exact" in res:
                print(f"  converged LiSSA vs exact gd-top: {spearman(final, res['exact']['gd']):.3f}")
    if "paper" in only:
        depth = math.ceil(0.25 * n_train / a.lissa_batch_size)
        pa = res["paper"] = in_process(phase_lissa, *common, 3e-3, 1e4, depth, a.lissa_batch_size, depth, True)
        if "error" in pa:
            print(f"\npaper-style LiSSA: {pa['error']}")
        else:
            line = f"\npaper-style LiSSA (damping 3e-3, scale 1e4, depth {depth}): {pa['per_test_s']:.0f} s per test example"
            if "exact" in res:
                line += f"; Spearman vs exact gd-top {spearman(pa['scores'], res['exact']['gd']):.3f}"
            if "lissa" in res and "scores" in res["lissa"]:
                line += f", vs converged LiSSA {spearman(pa['scores'], res['lissa']['scores']):.3f}"
            print(line)
    if "projected" in only:
        res["projected"] = {}
        print(f"\nprojected ({kinds[0]} projections, Gauss-Newton on the whole training set); agreement = mean per-row Spearman")
        print(f"{'k':>4} {'dim':>7} {'train s':>8} {'ms/test':>8} {'total s':>8} {'peak MB':>8} "
              f"{'gd-top~exact':>13} " + " ".join(f"{'if@' + format(d, 'g'):>9}" for d in dampings))
        for k in ks:
            pr = res["projected"][k] = in_process(phase_projected, *common, k, dampings, n_split, a.hessian,
                                                  kinds[0])
            gd_agree = spearman(pr["gd"], res["exact"]["gd"]) if "exact" in res else float("nan")
            ref = res.get("lissa", {}).get("scores")
            cells = []
            for d in dampings:
                if ref is not None and d == a.lissa_damping:
                    cells.append(f"{spearman(pr['if'][d], ref):9.3f}")
                else:
                    cells.append(f"{'-':>9}")
            print(f"{k:>4} {pr['dim']:>7,}{pr['structure'][0]} {pr['train_s']:>7.0f} {pr['test_s_per_example'] * 1e3:>8.0f} "
                  f"{pr['total_s']:>8.0f} {pr['peak_mb']:>8.0f} {gd_agree:>13.3f} " + " ".join(cells))
        big = max(ks)
        print(f"\nself-agreement of if-top with the largest projection (k={big}) per damping:")
        for k in ks:
            if k != big:
                print(f"  k={k:<3} " + "  ".join(f"{d:g}: {spearman(res['projected'][k]['if'][d], res['projected'][big]['if'][d]):.3f}"
                                              for d in dampings))
        print(f"  k={big} if-top vs its gd-top: " + "  ".join(
            f"{d:g}: {spearman(res['projected'][big]['if'][d], res['projected'][big]['gd']):.3f}" for d in dampings))
    if "kfac" in only and a.kronfluence:
        try:
            import kronfluence  # noqa: F401
        except ImportError:
            print("\nkronfluence: not installed (pip install --no-deps kronfluence==1.0.1 einops einconv "
                  "opt_einsum accelerate psutil; with its dependencies it pulls a CUDA torch)")
        else:
            kf = res["kfac"] = in_process(phase_kfac, *common, [a.lissa_damping], a.kfac_fit_rows)
            ks_ = kf["scores"][a.lissa_damping]
            line = (f"\nkronfluence EK-FAC ({kf['modules']} Linear modules, factors from {kf['fit_rows']} rows, "
                    f"damping {a.lissa_damping}): fit {kf['fit_s']:.0f} s, {kf['per_test_s']:.1f} s per test example "
                    f"against all training rows, peak {kf['peak_mb']:.0f} MB")
            if "lissa" in res and "scores" in res["lissa"]:
                line += f"; vs converged LiSSA {spearman(ks_, res['lissa']['scores']):.3f}"
            if "exact" in res:
                line += f"; vs exact gd-top {spearman(ks_, res['exact']['gd']):.3f}"
            print(line)
            if "ggn" in res:   # EK-FAC fitted on the reference's own rows, against the exact influence
                gg = res["ggn"]
                rows = hessian_rows(n_train, a.n_hessian, a.seed).tolist()
                kg = res["kfac_ggn"] = in_process(phase_kfac, a.run, split, test_rows, rows, a.layers, dampings,
                                                  len(rows), rows)
                print(f"kronfluence EK-FAC fitted on the {len(rows)} reference rows (Linear modules only; no "
                      f"LayerNorm, no L2 term; fit {kg['fit_s']:.0f} s, scores {kg['score_s']:.0f} s per damping): "
                      "Spearman vs the exact Gauss-Newton influence " + "  ".join(
                          f"{d:g}: {spearman(kg['scores'][d], gg['exact_if'][d]):.3f}" for d in dampings))
    if "agreement" in only:
        ag = res["agreement"] = in_process(phase_agreement, a.run, split)
        print("\nstored scores, 100 test rows x all training rows:")
        for pair, v in ag.items():
            if pair != "peak_mb":
                print(f"  {pair:<22} Spearman {v['spearman']:.3f}   common top-10 {v['top10_common']:.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))


if __name__ == "__main__":
    sys.exit(main())

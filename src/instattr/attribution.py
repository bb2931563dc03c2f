"""Attribute a run's test split (scores on disk) and new texts; fit a method on a run."""
from __future__ import annotations

import time
from typing import Dict, List, Optional, Sequence

import numpy as np

from .arrays import FeatureSet
from .errors import InstattrError
from .store import Run, RunError


def resolve_methods(spec) -> List[str]:
    """Method names from ``"paper"``, ``"all"``, ``"a,b"`` or a list; unknown names are a one-line error."""
    from .methods import expand_methods
    try:
        return expand_methods(spec)
    except ValueError as e:
        raise InstattrError(str(e)) from None


def run_model(run: Run, method, device=None):
    """What ``method`` is fitted with (its ``needs``): the run's whole classifier (layered, TracIn),
    its sentence encoder's embeddings (sbert-*), else just its final layer (no torch, no encoder)."""
    if method.needs == "classifier":
        from .models import classifier_for
        return classifier_for(run, device)
    if method.needs == "sentence":
        from .sentence import sentence_embeddings
        return sentence_embeddings(run, device)
    return run.final_layer()


def fit_method(run: Run, name: str, train: Optional[FeatureSet] = None, model=None, device=None,
               embed: bool = True, backend=None, **options):
    """A fitted attributor ``name`` on the run's training features (all rows unless ``train``) and
    the run's classifier (unless ``model``, e.g. a re-initialised one); the one place that wires a
    run to a method. ``embed=False`` leaves the training side to be computed in blocks later;
    ``backend`` runs the layered methods' per-example gradients elsewhere (e.g. on Ray)."""
    from .methods import get_method
    try:
        method = get_method(name, **options)
    except ValueError as e:
        raise InstattrError(str(e)) from None
    if model is None or method.needs == "sentence":    # the sentence encoder does not change with the classifier
        model = run_model(run, method, device)
    return method.fit(run.features("train") if train is None else train, model, embed=embed, backend=backend)


def method_options(names: Sequence[str], options: Optional[dict], strict: bool = True) -> Dict[str, dict]:
    """Per method, the subset of ``options`` it declares in ``command_line_options`` and its
    constructor takes (``layers`` goes to if-top, never to nn-euc; ``damping`` to if-top, not to the
    paper's ``if``). With ``strict``, an option no chosen method takes is an error naming the
    methods that do."""
    import inspect

    from .methods.registry import method_class, registered
    options = dict(options or {})

    def takes(name):
        cls = method_class(name)
        return set(cls.command_line_options) & set(inspect.signature(cls).parameters)

    per = {n: {k: v for k, v in options.items() if k in takes(n)} for n in names}
    for key in options if strict else ():
        if not any(key in per[n] for n in names):
            users = [n for n in registered() if key in takes(n)]
            raise InstattrError(f"--{key.replace('_', '-')} applies to none of {', '.join(names)}"
                                + (f" (it applies to {', '.join(users)})" if users else ""))
    return per


def _check_kept_options(run: Run, name: str, split: str, options: dict, overwrite: bool, top: bool = False) -> None:
    """Stored scores are kept, so asking for other options without --overwrite is an error."""
    if overwrite or not (run.has_top_k(name, split) if top else run.score_problem(name, split) is None):
        return
    from .store import read_json
    made = (read_json(run.top_k_path(name, split).with_suffix(".json")) if top
            else run.score_info(name, split)).get("config", {})
    differ = {k: v for k, v in options.items() if k in made and made[k] != v
              and not (k == "layers" and made.get("tracked_layers") == v)}
    if differ:
        was = ", ".join(f"{k}={made[k]}" for k in differ)
        what = f"{name}-{split}.topk.npz" if top else f"{name}-{split}.npy"
        raise InstattrError(f"{run.path}/scores/{what} was made with {was}; add --overwrite to "
                            "recompute it with " + ", ".join(f"{k}={v}" for k, v in differ.items()))


def _check_top_k(top_k: Optional[int], bottom_k: Optional[int], backend) -> None:
    if bottom_k is not None and top_k is None:
        raise InstattrError("--bottom-k needs --top-k (dense scores hold every column already)")
    for flag, v in (("--top-k", top_k), ("--bottom-k", bottom_k)):
        if v is not None and v <= 0:
            raise InstattrError(f"{flag} must be positive, got {v}")
    if not backend.dense and top_k is None:
        raise InstattrError(f"--backend {backend.name} writes top-k results; add --top-k K")


def attribute_run(run: Run, methods="paper", split: Optional[str] = None, limit_test: Optional[int] = None,
                  limit_train: Optional[int] = None, overwrite: bool = False, progress: bool = True,
                  log=print, options: Optional[dict] = None, device=None, top_k: Optional[int] = None,
                  bottom_k: Optional[int] = None, backend=None, grid=None) -> Dict[str, float]:
    """Score ``split`` (default: the run's eval split) against the training set with each method.

    Writes ``scores/{method}-{split}.npy`` and ``.json``, or with ``top_k`` only each test row's best
    ``top_k`` (and with ``bottom_k`` most opposing) training rows, ``scores/{method}-{split}.topk.npz``
    (``.bottomk.npz``), never forming the dense matrix. Methods whose sides share a product share it
    (:mod:`instattr.methods.scoring`). Existing results are kept unless ``overwrite`` (and refused
    when they were made with options other than those asked for). ``options`` (e.g. ``{"layers":
    5}``) go to the methods that take them (see ``method_options``). ``backend`` (None: here) computes
    the training sides and the top-k blocks elsewhere: ``distributed.RayBackend(address)`` on a Ray
    cluster.
    Returns the compute seconds of each method that ran.
    """
    from .backend import backend_or_local
    from .methods import get_method
    backend = backend_or_local(backend)
    _check_top_k(top_k, bottom_k, backend)
    names = resolve_methods(methods)
    per_method = method_options(names, options)
    split = split or run.eval_split
    if split not in run.splits:
        raise RunError(f"{run.path / 'features' / (split + '.npz')}: missing; the run has features for "
                       f"{', '.join(run.splits) or 'no split'}")
    for name in names:                      # bad or conflicting options fail before any score is written
        try:
            get_method(name, **per_method[name])
        except ValueError as e:
            raise InstattrError(str(e)) from None
        _check_kept_options(run, name, split, per_method[name], overwrite, top=top_k is not None)
    for flag, v in (("--limit-test", limit_test), ("--limit-train", limit_train)):
        if v is not None and v <= 0:
            raise InstattrError(f"{flag} must be positive, got {v}")
    test = run.features(split)
    train = run.features("train")
    if any(get_method(n).needs == "final_layer" for n in names):
        run.final_layer()                   # a damaged model file fails here, before any score is written
    if limit_test:
        test = test.subset(slice(0, limit_test))
    if limit_train:
        train = train.subset(slice(0, limit_train))

    def exists(name):
        if top_k is None:
            problem = run.score_problem(name, split)
            if problem not in (None, "missing"):
                log(f"{name}: scores/{name}-{split}.npy: {problem}; recomputing")
            return problem is None
        return run.has_top_k(name, split) and (not bottom_k or run.has_top_k(name, split, bottom=True))

    todo = []
    for name in names:
        if exists(name) and not overwrite:
            what = f"{name}-{split}.topk.npz" if top_k else f"{name}-{split}.npy"
            log(f"{name}: scores/{what} exists, kept (use --overwrite to recompute)")
        else:
            todo.append(name)
    if not todo:
        return {}
    from .methods.scoring import Grid
    grid = grid or Grid()
    fitted, seconds = {}, {}
    from .methods.shared import sharing
    with run.writing("attribute"), sharing():      # row work common to several methods done once
        for name in todo:
            t = time.perf_counter()
            method = fitted[name] = fit_method(run, name, train, device=device, embed=False, backend=backend,
                                               **per_method[name])
            if backend.embeds_in_fit and method.streams_train:   # in the blocks an index (and Ray) would use
                method.embed_all(train, grid.train_rows)
            seconds[name] = time.perf_counter() - t
        if top_k is not None:
            _attribute_top_k(run, fitted, seconds, split, test, train, top_k, bottom_k, backend, grid, progress, log)
        else:
            _attribute_dense(run, fitted, seconds, split, test, train, grid, progress, log)
    return seconds


DENSE_GROUP_BYTES = 4 << 30   # a group sharing one product keeps its members' matrices at once up to this


def _groups(members, n_test: int) -> List[list]:
    """Members that share a product, grouped (each group's matrices fit in DENSE_GROUP_BYTES)."""
    groups: Dict[object, list] = {}
    for m in members:
        key = m.train.key if m.dense is None and m.train.key else ("alone", m.name)
        groups.setdefault(key, []).append(m)
    out = []
    for g in groups.values():
        if len(g) > 1 and sum(4 * n_test * m.n_train for m in g) > DENSE_GROUP_BYTES:
            out += [[m] for m in g]
        else:
            out.append(g)
    return out


def score_together(methods: Dict[str, object], test: FeatureSet, grid=None) -> Dict[str, np.ndarray]:
    """Dense (n_test, n_train) scores of several fitted methods, each product shared by the
    methods whose sides share it (nn-*, gd, gc and rep on binary tasks; if and rif). Fit them
    inside ``with instattr.methods.shared.sharing():`` to share their row work as well (the
    rows' arrays must not be written to inside it)."""
    from .methods.scoring import Grid, score_dense
    from .methods.shared import sharing
    out = {}
    with sharing():
        for group in _groups([m.member(test) for m in methods.values()], len(test)):
            out.update(score_dense(group, len(test), grid or Grid()))
    return {name: out[name] for name in methods}


def _attribute_dense(run, fitted, seconds, split, test, train, grid, progress, log) -> None:
    from tqdm.auto import tqdm

    from .methods.scoring import Grid, score_dense
    members = [fitted[n].member(test) for n in fitted]
    for group in tqdm(_groups(members, len(test)), desc="attribute", disable=not progress, leave=False):
        t = time.perf_counter()
        scores = score_dense(group, len(test), grid or Grid())
        share = (time.perf_counter() - t) / len(group)
        together = [m.name for m in group]
        for m in group:
            method = fitted[m.name]
            seconds[m.name] += share
            diagnostics = dict(method.diagnostics(), **({"shared_product": together} if len(group) > 1 else {}))
            run.save_scores(m.name, split, scores[m.name], test.idx, train.idx, method.config(), seconds[m.name],
                            diagnostics=diagnostics)
            log(f"{m.name}: {len(test)} x {len(train)} scores in {seconds[m.name]:.3f} s")
        del scores


def _attribute_top_k(run, fitted, seconds, split, test, train, k, bottom_k, backend, grid, progress, log) -> None:
    from .methods.scoring import Grid
    t = time.perf_counter()
    grid = grid or Grid()
    results = backend.top_k(run, fitted, test, train, k, bottom_k or 0, grid, progress)
    share = (time.perf_counter() - t) / len(fitted)
    for name, method in fitted.items():
        seconds[name] += share
        cfg = dict(method.config())
        diagnostics = dict(method.diagnostics(), backend=backend.name,
                           grid=[grid.test_rows, grid.train_rows])
        for bottom in (False, True) if bottom_k else (False,):
            pos, vals = results[name]["bottom" if bottom else "top"]
            run.save_top_k(name, split, test.idx, train.idx, pos, vals, cfg, seconds[name], bottom=bottom,
                           diagnostics=diagnostics)
        log(f"{name}: top-{k}{f' and bottom-{bottom_k}' if bottom_k else ''} of {len(train)} training rows "
            f"for {len(test)} test rows in {seconds[name]:.3f} s")


def attribute_texts(run: Run, method: str, texts: Sequence[str], queries: Optional[Sequence[str]] = None,
                    device=None, **options) -> np.ndarray:
    """Scores (len(texts), n_train) of new texts against the run's training set."""
    from .pipeline import featurize
    test = featurize(run, list(texts), list(queries) if queries is not None else None, device=device)
    return fit_method(run, method, device=device, **options).score(test)

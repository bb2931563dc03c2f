"""One ranking path: which training rows support and oppose a prediction, whoever asks.

:class:`Ranker` is what ``explain``, ``serve``, the evaluations and ``query`` rank through. It fits
each method once (on the run's training rows and its classifier, or on another training set and
model: a retrained or re-initialised one), reads what the run stores -- dense score matrices and
top-k files, each only after its sidecar's commit check (:meth:`instattr.store.Run.score_problem`,
:meth:`~instattr.store.Run.top_k_problem`) -- and computes what is not stored: a test row without
stored scores is scored live, not refused. Results come in one type, :class:`Ranking` (per
method, the supporting rows best first and the opposing rows most opposing first, by idx), and a
prediction with its rankings is an :class:`Explanation`, whose ``to_dict()`` is the CLI's JSON
(keys ``supporting``/``opposing``) and whose ``to_frame()`` is a pandas DataFrame with columns
method, kind, rank, idx, text, label, score.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .arrays import FeatureSet
from .errors import InstattrError
from .store import Run, RunError

Ranked = List[Tuple[str, float]]           # (idx, score), best first


@dataclass
class Ranking:
    """One method's ranking for one row: ``supporting`` (highest score first) and ``opposing``
    (lowest first), each a list of (idx, score). ``source`` is ``dense`` (a stored matrix),
    ``topk`` (stored top-k files; ``depth`` their K; ``partial`` for a training row's column, which
    lists only the test rows whose top K hold it) or ``live`` (computed now). ``opposing`` is None
    when only a top-k file without a bottom-k one is stored."""
    supporting: Ranked
    opposing: Optional[Ranked]
    source: str
    partial: bool = False
    depth: Optional[int] = None


class TopRows:
    """Each of some test rows' best training rows, best first: ``pos`` and ``score`` (n, K) of
    ``n_train`` columns. What evaluations that need only the top of a ranking read: a stored top-k
    file, the top of stored dense scores, or the streamed scorer's result."""

    def __init__(self, pos: np.ndarray, score: np.ndarray, n_train: int):
        self.pos, self.score, self.n_train = np.asarray(pos, dtype=np.int64), np.asarray(score), int(n_train)

    @property
    def shape(self):
        return (len(self.pos), self.n_train)

    def __len__(self) -> int:
        return len(self.pos)

    def first(self, k: int) -> np.ndarray:
        """(n, min(k, n_train)) positions of each row's top k; refuses a k beyond what is kept."""
        k = min(int(k), self.n_train)
        if k > self.pos.shape[1]:
            raise InstattrError(f"top-{k} asked of a top-{self.pos.shape[1]} ranking")
        return self.pos[:, :k]


@dataclass
class Explanation:
    """A prediction and, per method, the training rows that support and oppose it most.
    ``rows`` maps a training idx to its example (text, query, gold label name)."""
    text: str
    query: Optional[str]
    prediction: str
    probs: Dict[str, float]
    methods: Dict[str, Ranking]
    rows: Dict[str, dict] = field(repr=False, default_factory=dict)

    def _listed(self, ranked: Optional[Ranked]) -> Optional[List[dict]]:
        if ranked is None:
            return None
        return [{"idx": i, **self.rows.get(i, {}), "score": float(s)} for i, s in ranked]

    def to_dict(self) -> dict:
        """The JSON of ``instattr explain --json``."""
        return {"text": self.text, **({"query": self.query} if self.query is not None else {}),
                "prediction": self.prediction, "probs": dict(self.probs),
                "methods": {m: {"supporting": self._listed(r.supporting), "opposing": self._listed(r.opposing),
                                "source": r.source} for m, r in self.methods.items()}}

    def to_frame(self):
        """A pandas DataFrame, one row per (method, kind, rank): idx, text, label, score."""
        import pandas as pd
        out = []
        for m, r in self.methods.items():
            for kind, ranked in (("supporting", r.supporting), ("opposing", r.opposing)):
                for rank, row in enumerate(self._listed(ranked) or []):
                    out.append({"method": m, "kind": kind, "rank": rank, "idx": row["idx"],
                                "text": row.get("text"), "label": row.get("label"), "score": row["score"]})
        return pd.DataFrame(out, columns=["method", "kind", "rank", "idx", "text", "label", "score"])


def ranked_rows(scores: np.ndarray, ids: Sequence[str], k: int) -> Tuple[List[Ranked], List[Ranked]]:
    """Per row of ``scores`` its top ``k`` and bottom ``k`` columns as (id, score) lists."""
    from .methods.topk import bottom_k, top_k
    sides = (top_k(scores, k), bottom_k(scores, k))
    return tuple([[(str(ids[int(j)]), float(v)) for j, v in zip(idx[r], vals[r])] for r in range(len(scores))]
                 for idx, vals in sides)


def rank_live(fitted: Dict[str, object], test: FeatureSet, ids: Sequence[str], k: int) -> List[Dict[str, Ranking]]:
    """Per row of ``test``, each fitted method's top and bottom ``k`` training rows (``ids``)."""
    out: List[Dict[str, Ranking]] = [{} for _ in range(len(test))]
    for m, method in fitted.items():
        sup, opp = ranked_rows(method.score(test), ids, k)
        for i in range(len(test)):
            out[i][m] = Ranking(sup[i], opp[i], "live")
    return out


class Ranker:
    """Rankings of a run's training rows (see the module docstring). ``train`` and ``model``
    replace the run's training rows and classifier (a retrained or re-initialised model);
    ``use_stored=False`` computes everything; ``options`` are method options (``--layers``, ...)."""

    def __init__(self, run: Run, split: Optional[str] = None, train: Optional[FeatureSet] = None, model=None,
                 use_stored: Optional[bool] = None, device=None, options: Optional[dict] = None):
        self.run = run
        self.split = split or run.eval_split
        self.train = train if train is not None else run.features("train")
        self.model, self.device = model, device
        # stored scores are the run's own model's: another training set or model computes its own
        self.use_stored = (train is None and model is None) if use_stored is None else bool(use_stored)
        self.options = dict(options or {})
        self.train_ids = np.asarray([str(i) for i in self.train.idx])
        self._fitted: Dict[str, object] = {}
        self._columns: Dict[str, Dict[str, int]] = {}
        self._files: Dict[tuple, tuple] = {}         # stored files read once, until they change
        self._lock = threading.Lock()
        self._fit_lock = threading.Lock()

    # ------------------------------------------------------------------ fitted methods
    def attributor(self, method: str):
        """The registry's ``method`` fitted on the training rows (once)."""
        with self._fit_lock:
            if method not in self._fitted:
                from .attribution import fit_method, method_options
                opts = method_options([method], self.options, strict=False)[method]
                self._fitted[method] = fit_method(self.run, method, self.train, self.model, self.device, **opts)
            return self._fitted[method]

    # ------------------------------------------------------------------ what is stored
    def stored(self, split: Optional[str] = None) -> Dict[str, str]:
        """{method: "dense" | "topk"} of every method whose scores on ``split`` are stored whole
        (commit-checked), in the registry's order."""
        split = split or self.split
        folder = self.run.path / "scores"
        found: Dict[str, str] = {}
        if self.use_stored and folder.is_dir():
            for p in folder.glob(f"*-{split}.topk.npz"):
                name = p.name[: -len(f"-{split}.topk.npz")]
                if self.run.has_top_k(name, split):
                    found[name] = "topk"
            for p in folder.glob(f"*-{split}.npy"):
                name = p.name[: -len(f"-{split}.npy")]
                if self.run.has_scores(name, split):
                    found[name] = "dense"
        from .methods.registry import registered
        order = {n: i for i, n in enumerate(registered())}
        return {m: found[m] for m in sorted(found, key=lambda m: (order.get(m, len(order)), m))}

    def _stored_file(self, path, read):
        """``read()`` of a stored file, kept until the file or its sidecar changes (an atomic
        replace gives a new inode); a read that a writer overtook is used once, not kept."""
        side = path.with_suffix(".json")

        def stamp():
            try:
                return tuple((st.st_ino, st.st_mtime_ns, st.st_size) for st in (path.stat(), side.stat()))
            except OSError as e:
                raise RunError(f"{path}: cannot be read ({e.strerror}); was it removed?") from None
        with self._lock:
            before = stamp()
            kept = self._files.get(path)
            if kept is not None and kept[0] == before:
                return kept[1]
            value = read()
            if stamp() == before:
                self._files[path] = (before, value)
            return value

    def _dense_file(self, method: str, split: str) -> Optional[dict]:
        """A stored score matrix of this training set (commit-checked): its rows' positions, its
        columns for the training rows, the memory-mapped matrix; or None."""
        if not (self.use_stored and self.run.has_scores(method, split)):
            return None

        def read():
            info = self.run.score_info(method, split)
            train_pos = {s: i for i, s in enumerate(info["train_idx"])}
            if any(s not in train_pos for s in self.train_ids):
                return None                  # another training set
            cols = np.array([train_pos[s] for s in self.train_ids])
            return {"where": {str(s): i for i, s in enumerate(info["test_idx"])}, "test_idx": info["test_idx"],
                    "cols": None if np.array_equal(cols, np.arange(len(cols))) else cols,
                    "train_pos": train_pos, "scores": self.run.scores(method, split)}
        return self._stored_file(self.run.score_path(method, split), read)

    def _dense(self, method: str, split: str, rows: np.ndarray) -> Optional[np.ndarray]:
        """Stored dense scores of ``split``'s rows ``rows`` against the training rows, or None when
        the stored matrix does not cover them (another training set, or rows not scored)."""
        d = self._dense_file(method, split)
        if d is None:
            return None
        want = [str(s) for s in self.run.features(split).idx[rows]]
        if any(s not in d["where"] for s in want):
            return None
        block = np.asarray(d["scores"][[d["where"][s] for s in want]])
        return block if d["cols"] is None else block[:, d["cols"]]

    def _top_file(self, method: str, split: str, bottom: bool = False) -> Optional[dict]:
        """A stored top-k (bottom-k) file of this training set (commit-checked), or None."""
        if not (self.use_stored and self.run.has_top_k(method, split, bottom)):
            return None

        def read():
            got = self.run.top_k(method, split, bottom)
            pos = got["train_pos"]
            ids = self.train_ids
            if got["info"].get("n_train") != len(ids) or (pos.size and not np.array_equal(got["train_idx"],
                                                                                            ids[pos])):
                return None                  # another training set or order
            got["where"] = {str(s): i for i, s in enumerate(got["test_idx"])}
            return got
        return self._stored_file(self.run.top_k_path(method, split, bottom), read)

    # ------------------------------------------------------------------ matrices (evaluations)
    def rows(self, method: str, rows: Sequence[int]) -> np.ndarray:
        """(len(rows), n_train) float32 scores of ``split``'s rows ``rows``: stored, else computed."""
        rows = np.asarray(rows, dtype=int)
        stored = self._dense(method, self.split, rows)
        if stored is not None:
            return stored.astype(np.float32, copy=False)
        return self.score(method, self.run.features(self.split).subset(rows))

    def score(self, method: str, test: FeatureSet) -> np.ndarray:
        """Scores of any rows (e.g. new texts) against the training rows."""
        return self.attributor(method).score(test)

    def top(self, method: str, rows: Sequence[int], k: int) -> TopRows:
        """The best ``k`` training rows of ``split``'s rows ``rows``: from stored dense scores, else
        a stored top-k file whose K covers ``k``, else the streamed scorer (never a dense block of
        the whole training set)."""
        from .methods.scoring import score_top_k
        from .methods.topk import top_k
        rows = np.asarray(rows, dtype=int)
        n = len(self.train)
        k = min(int(k), n)
        stored = self._dense(method, self.split, rows)
        if stored is not None:
            return TopRows(*top_k(stored.astype(np.float32, copy=False), k), n)
        got = self._top_file(method, self.split)
        if got is not None and got["train_pos"].shape[1] >= k:
            want = [str(s) for s in self.run.features(self.split).idx[rows]]
            if all(s in got["where"] for s in want):
                pick = [got["where"][s] for s in want]
                return TopRows(got["train_pos"][pick, :k], got["score"][pick, :k], n)
        test = self.run.features(self.split).subset(rows)
        pos, vals = score_top_k([self.attributor(method).member(test)], len(test), k)[method]["top"]
        return TopRows(pos, vals, n)

    # ------------------------------------------------------------------ one row
    def test_row(self, method: str, idx: str, k: int, split: Optional[str] = None, live: bool = True
                 ) -> Optional[Ranking]:
        """The ``k`` training rows that support (and oppose) the prediction on row ``idx`` of
        ``split`` most: stored dense scores, else stored top-k files (with ``live``, only when
        their K covers ``k``), else (``live``) computed now; None when nothing stored covers the
        row and ``live`` is off (a top-k file of a smaller K gives its K rows, ``depth`` says so)."""
        split = split or self.split
        fs = self.run.features(split)
        where = self.row_positions(split)
        if str(idx) not in where:
            raise RunError(f"{self.run.path}: no row {idx!r} in split {split!r}")
        row = np.array([where[str(idx)]])
        stored = self._dense(method, split, row)
        if stored is not None:
            sup, opp = ranked_rows(stored.astype(np.float32, copy=False), self.train_ids, k)
            return Ranking(sup[0], opp[0], "dense")
        top = self._top_file(method, split)
        if top is not None and str(idx) in top["where"] and (k <= top["train_pos"].shape[1] or not live):
            i = top["where"][str(idx)]
            depth = top["train_pos"].shape[1]
            bottom = self._top_file(method, split, bottom=True)
            opp = None
            if bottom is not None and str(idx) in bottom["where"]:
                j = bottom["where"][str(idx)]
                opp = [(str(s), float(v)) for s, v in zip(bottom["train_idx"][j, :k], bottom["score"][j, :k])]
            sup = [(str(s), float(v)) for s, v in zip(top["train_idx"][i, :k], top["score"][i, :k])]
            return Ranking(sup, opp, "topk", depth=depth)
        if not live:
            return None
        sup, opp = ranked_rows(self.score(method, fs.subset(row)), self.train_ids, k)
        return Ranking(sup[0], opp[0], "live")

    def train_column(self, method: str, idx: str, k: int, split: Optional[str] = None) -> Ranking:
        """The ``k`` rows of ``split`` whose predictions training row ``idx`` supports (and
        opposes) most: its column of the stored dense scores, else of the stored top-k files
        (``partial``: only the rows whose top K hold it)."""
        from .methods.topk import bottom_k, top_k
        split = split or self.split
        kind = self.stored(split).get(method)
        if kind is None:
            raise RunError(f"{self.run.path}: no stored scores or top-k results for {method} on {split} (a training "
                           f"row's column is read from them; run `instattr attribute --methods {method}`)")
        if kind == "dense":
            d = self._dense_file(method, split)
            if d is None or str(idx) not in d["train_pos"]:
                raise RunError(f"{method} scores on {split} do not cover training row {idx!r}")
            col = np.asarray(d["scores"][:, d["train_pos"][str(idx)]], dtype=np.float32)[None]
            test_ids = [str(s) for s in d["test_idx"]]
            sides = [top_k(col, k), bottom_k(col, k)]
            sup, opp = ([(test_ids[int(i)], float(v)) for i, v in zip(a[0], b[0])] for a, b in sides)
            return Ranking(sup, opp, "dense")
        out, depth = [], None
        for bottom in (False, True):
            got = self._top_file(method, split, bottom)
            if got is None:
                out.append(None)
                continue
            depth = depth or int(got["train_pos"].shape[1])
            rows, cols = np.nonzero(got["train_idx"] == str(idx))
            vals = got["score"][rows, cols].astype(np.float64)
            order = np.lexsort((rows, vals if bottom else -vals))[:k]        # ties: earlier test row first
            out.append([(str(got["test_idx"][rows[o]]), float(vals[o])) for o in order])
        return Ranking(out[0] or [], out[1], "topk", partial=True, depth=depth)

    def row_positions(self, split: str) -> Dict[str, int]:
        """idx -> position of each row of ``split``."""
        if split not in self._columns:
            self._columns[split] = {str(i): p for p, i in enumerate(self.run.features(split).idx)}
        return self._columns[split]

    # ------------------------------------------------------------------ new texts
    def rank(self, test: FeatureSet, methods: Sequence[str], k: int) -> List[Dict[str, Ranking]]:
        """Per row of ``test`` (new texts, or any rows), each method's live ranking."""
        return rank_live({m: self.attributor(m) for m in methods}, test, self.train_ids, k)

    def examples(self) -> Dict[str, dict]:
        """Training idx -> {text, (query), label} of the run's dataset."""
        if "examples" not in self._columns:
            labels = self.run.label_names
            self._columns["examples"] = {
                e.idx: {"text": e.document, **({"query": e.query} if e.query is not None else {}),
                        "label": labels[e.label]} for e in self.run.examples("train")}
        return self._columns["examples"]

    def explain(self, text: str, query: Optional[str] = None, methods="all", k: int = 5) -> Explanation:
        """The prediction for one new text (and hypothesis), then per method its top ``k``
        supporting and opposing training rows."""
        from .attribution import resolve_methods
        from .pipeline import featurize
        if k <= 0:
            raise InstattrError(f"--k must be positive, got {k}")
        names = resolve_methods(methods)
        test = featurize(self.run, [text], [query] if query is not None else None, device=self.device)
        labels = self.run.label_names
        return Explanation(text=text, query=query, prediction=labels[int(test.pred[0])],
                           probs={n: float(p) for n, p in zip(labels, test.probs[0])},
                           methods=self.rank(test, names, k)[0], rows=self.examples())


def explain(run: Run, text: str, query: Optional[str] = None, methods="all", k: int = 5,
            options: Optional[dict] = None, device=None) -> dict:
    """The prediction for one text, then per method its top-k supporting and opposing examples
    (:meth:`instattr.ranking.Ranker.explain`, as the JSON of ``instattr explain``)."""
    from .attribution import method_options, resolve_methods
    method_options(resolve_methods(methods), options)       # an option no chosen method takes: one line
    return Ranker(run, options=options, device=device).explain(text, query, methods, k).to_dict()


def format_explanation(result: dict, width: Optional[int] = None) -> str:
    """A terminal table: per method, supporting and opposing examples side by side."""
    import shutil
    width = width or max(80, shutil.get_terminal_size((120, 20)).columns)
    col = (width - 3) // 2
    probs = "  ".join(f"{n} {p:.3f}" for n, p in result["probs"].items())
    lines = [f"text:       {result['text']}"]
    if "query" in result:
        lines.append(f"query:      {result['query']}")
    lines += [f"prediction: {result['prediction']}   ({probs})", ""]

    label_width = max(len(n) for n in result["probs"])

    def cell(r):
        text = r["text"] + (f" || {r['query']}" if "query" in r else "")
        head = f"{r['score']:+#.3g} {r['label']:<{label_width}} "
        room = col - len(head)
        return head + (text if len(text) <= room else text[:room - 1] + "…")

    for name, m in result["methods"].items():
        lines.append(f"── {name} ".ljust(col, "─") + "─┼─" + "─" * col)
        lines.append(f"{'supporting (helped this prediction)':<{col}} │ opposing (argued against it)")
        for s, o in zip(m["supporting"], m["opposing"]):
            lines.append(f"{cell(s):<{col}} │ {cell(o)}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"

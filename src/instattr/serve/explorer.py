"""What the pages and the JSON API show, as plain dicts: one :class:`Explorer` per served run.

Rows are named by ``(split, idx)``. Unknown splits, rows and methods raise :class:`NotFound`
(HTTP 404); malformed filters :class:`BadInput` (HTTP 422). Everything here is read from the
run directory once and kept (texts, predictions, rankings); only live explanations compute.
"""
from __future__ import annotations

import json
import math
from concurrent.futures import Future
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..ranking import Ranker, Ranking
from ..store import Run, RunError
from .errors import BadInput, NotFound
from .headlines import headline, paper_column
from .live import Answer, LiveExplainer

# Methods shown side by side when none are chosen (those of `instattr explain`, the paper's Figure 1)
DEFAULT_METHODS = ("nn-cos", "gc", "if", "rep")
MAX_SIDE_BY_SIDE = 4
MAX_K = 100
MAX_LIMIT = 500
LIVE_TIMEOUT = 600.0    # seconds a live ranking may take before the request fails (503)
# A pair's relation to the HANS heuristics, computed from its tokens (HANS's own labels are not in the data)
HEURISTICS = ("subsequence", "lexical overlap", "partial overlap")
# What a row shows inside another row's ranking (no probabilities: responses stay small)
BRIEF = ("split", "idx", "text", "query", "gold", "pred", "correct")


def heuristic(premise: str, hypothesis: str) -> str:
    """Which HANS heuristic a pair satisfies, on lower-cased whitespace tokens: ``subsequence``
    (the hypothesis is a contiguous span of the premise: HANS's subsequence and constituent
    cases), ``lexical overlap`` (every hypothesis word is in the premise, not as one span), else
    ``partial overlap``."""
    p, h = premise.lower().split(), hypothesis.lower().split()
    if h and any(p[i:i + len(h)] == h for i in range(len(p) - len(h) + 1)):
        return "subsequence"
    if set(h) <= set(p):
        return "lexical overlap"
    return "partial overlap"


def _results_title(name: str) -> str:
    from ..evaluate import evaluations
    return next((e.title for e in evaluations() if e.name == name), name)


class Explorer:
    """A run as the web app sees it. ``start()`` reads texts and predictions and fits the live
    attributors; every other call is cheap."""

    def __init__(self, run: Run, live_methods: Optional[Sequence[str]] = None, device: str = "cpu",
                 threads: Optional[int] = 1):
        from ..methods import METHOD_NAMES
        self.run = run
        self.labels = run.label_names
        self.is_pair = run.manifest.is_pair
        self.ranker = Ranker(run, device=device)
        self.live = LiveExplainer(run, METHOD_NAMES if live_methods is None else live_methods, device=device,
                                  threads=threads, ranker=self.ranker)
        self._rows: Dict[str, List[dict]] = {}
        self._pos: Dict[str, Dict[str, int]] = {}
        self._suspects: Optional[tuple] = None

    def start(self) -> "Explorer":
        for split in {self.run.eval_split, "train"} & set(self.run.splits):
            self.rows(split)
        self.live.start()
        return self

    def close(self) -> None:
        self.live.close()

    # ------------------------------------------------------------------ rows
    def check_split(self, split: str) -> str:
        if split not in self.run.splits:
            raise NotFound(f"no split {split!r} in this run (it has {', '.join(self.run.splits)})")
        return split

    def rows(self, split: str) -> List[dict]:
        """Every row of ``split``: idx, text (and query), gold and predicted label, probabilities,
        confidence, correct; on pair runs the lexical overlap rate and HANS heuristic too."""
        if split not in self._rows:
            from ..evaluate.artifacts import overlap_rate
            self.check_split(split)
            fs, examples = self.run.features(split), self.run.examples(split)
            rows = []
            for i, e in enumerate(examples):
                probs = [float(p) for p in fs.probs[i]]
                pred = int(fs.pred[i])
                row = {"split": split, "idx": e.idx, "text": e.document, "gold": self.labels[e.label],
                       "pred": self.labels[pred], "correct": pred == e.label, "confidence": max(probs),
                       "probs": dict(zip(self.labels, probs))}
                if e.query is not None:
                    row.update(query=e.query, overlap=overlap_rate(e.document, e.query),
                               heuristic=heuristic(e.document, e.query))
                rows.append(row)
            self._pos[split] = {r["idx"]: i for i, r in enumerate(rows)}
            self._rows[split] = rows
        return self._rows[split]

    def row(self, split: str, idx: str) -> dict:
        rows = self.rows(split)
        if idx not in self._pos[split]:
            raise NotFound(f"no row {idx!r} in split {split!r}")
        return rows[self._pos[split][idx]]

    def brief(self, split: str, idx: str) -> dict:
        """A row as listed in another row's ranking: its text, labels and whether it is correct."""
        row = self.row(split, idx)
        return {k: row[k] for k in BRIEF if k in row}

    def table(self, split: str, q: str = "", gold: Optional[str] = None, pred: Optional[str] = None,
              correct: Optional[str] = None, heuristic: Optional[str] = None,
              min_overlap: Optional[float] = None, sort: str = "", offset: int = 0, limit: int = 100) -> dict:
        """The rows of ``split`` matching every filter given, in stored order or by confidence
        (``sort``: ``confidence`` ascending, ``-confidence`` descending)."""
        rows = self.rows(split)
        for name, value in (("gold", gold), ("pred", pred)):
            if value and value not in self.labels:
                raise BadInput(f"{name}={value!r} is not a label of this run ({', '.join(self.labels)})")
        want_correct = None
        if correct:
            if correct.lower() not in ("yes", "no", "true", "false"):
                raise BadInput(f"correct={correct!r}: use yes or no")
            want_correct = correct.lower() in ("yes", "true")
        if (heuristic or min_overlap is not None) and not self.is_pair:
            raise BadInput("heuristic and min_overlap filter sentence pairs; this run reads single texts")
        if heuristic and heuristic not in HEURISTICS:
            raise BadInput(f"heuristic={heuristic!r} is not one of {', '.join(HEURISTICS)}")
        if min_overlap is not None and not (0.0 <= min_overlap <= 1.0):
            raise BadInput(f"min_overlap={min_overlap} must lie in [0, 1]")
        if sort not in ("", "confidence", "-confidence"):
            raise BadInput(f"sort={sort!r}: use confidence or -confidence (or nothing, for the stored order)")
        if offset < 0 or not (1 <= limit <= MAX_LIMIT):
            raise BadInput(f"offset must be >= 0 and limit in 1..{MAX_LIMIT}")
        terms = q.lower().split()

        def keep(r):
            return ((not gold or r["gold"] == gold) and (not pred or r["pred"] == pred)
                    and (want_correct is None or r["correct"] == want_correct)
                    and (not heuristic or r["heuristic"] == heuristic)
                    and (min_overlap is None or r["overlap"] >= min_overlap)
                    and all(t in (r["text"] + " " + r.get("query", "")).lower() for t in terms))

        found = [r for r in rows if keep(r)]
        if sort:
            found.sort(key=lambda r: r["confidence"], reverse=sort.startswith("-"))
        return {"split": split, "total": len(rows), "matched": len(found), "offset": offset, "limit": limit,
                "rows": found[offset:offset + limit]}

    # ------------------------------------------------------------------ methods
    def methods(self, split: str) -> Dict[str, str]:
        """{method: "dense" | "topk"} of what the run stores for ``split`` (commit-checked)."""
        return self.ranker.stored(split)

    def rankable(self, split: str) -> List[str]:
        """What a row of ``split`` can be explained with: stored methods, then the live ones."""
        stored = list(self.methods(split))
        return stored + [m for m in self.live.methods if m not in stored]

    def choose(self, available: Sequence[str], asked: Optional[Sequence[str]], where: str) -> List[str]:
        """``asked`` (names, or comma-separated names) checked against ``available``; when
        nothing is asked, those of DEFAULT_METHODS that are available, then others, up to four."""
        names = [n.strip() for a in (asked or []) for n in a.split(",") if n.strip()]
        if not names:
            picked = [m for m in DEFAULT_METHODS if m in available]
            return (picked + [m for m in available if m not in picked])[:MAX_SIDE_BY_SIDE]
        missing = [n for n in names if n not in available]
        if missing:
            raise NotFound(f"no method {', '.join(map(repr, missing))} {where} (available: "
                           f"{', '.join(available) or 'none'})")
        return list(dict.fromkeys(names))

    @staticmethod
    def check_k(k: int) -> int:
        if not 1 <= k <= MAX_K:
            raise BadInput(f"k={k} must lie in 1..{MAX_K}")
        return k

    # ------------------------------------------------------------------ one test row
    def _train_rows(self, ranked, agree: Dict[str, int]) -> List[dict]:
        out = []
        for rank, (idx, score) in enumerate(ranked, 1):
            out.append({**self.brief("train", idx), "score": score, "rank": rank, "agree": agree.get(idx, 1)})
        return out

    def _side_by_side(self, ranked: Dict[str, dict]) -> dict:
        """Per method its supporting and opposing rows, each marked with how many methods list it,
        and the agreement: training rows that two or more methods list on the same side."""
        result: Dict[str, dict] = {"methods": {}, "agreement": {}}
        for side in ("supporting", "opposing"):
            seen: Dict[str, List[str]] = {}
            for m, r in ranked.items():
                for idx, _ in r[side] or []:
                    seen.setdefault(idx, []).append(m)
            counts = {i: len(ms) for i, ms in seen.items()}
            result["agreement"][side] = [{**self.brief("train", i), "methods": ms} for i, ms in
                                         sorted(seen.items(), key=lambda kv: -len(kv[1])) if len(ms) > 1]
            for m, r in ranked.items():
                entry = result["methods"].setdefault(m, {k: v for k, v in r.items() if k not in
                                                         ("supporting", "opposing")})
                entry[side] = None if r[side] is None else self._train_rows(r[side], counts)
        return result

    def explanation_parts(self, split: str, idx: str, methods: Optional[Sequence[str]] = None, k: int = 5
                          ) -> Tuple[List[str], Dict[str, Ranking], Optional[Future]]:
        """The chosen methods, the rankings read from stored files, and a Future of the live
        worker's :class:`Answer` for the rest (None when every ranking is stored). A stored method
        that neither covers this row nor runs live gets an empty ranking of source ``missing``."""
        self.row(split, idx)
        self.check_k(k)
        names = self.choose(self.rankable(split), methods, f"stored or live for split {split!r}")
        stored = self.methods(split)
        found = {m: self.ranker.test_row(m, idx, k, split, live=False) for m in names if m in stored}
        # stored top-k lists shorter than k: the live worker gives all k where the method runs live
        found = {m: r for m, r in found.items()
                 if r is not None and not (r.depth is not None and r.depth < k and m in self.live.methods)}
        live = [m for m in names if m not in found and m in self.live.methods]
        for m in names:
            if m not in found and m not in live:
                found[m] = Ranking([], [], "missing")
        future = self.live.submit_row(split, idx, live, k) if live else None
        return names, found, future

    def explanation_result(self, split: str, idx: str, names: Sequence[str], found: Dict[str, Ranking],
                           k: int) -> dict:
        """A row of ``split`` with, per method in ``names``, the training examples that support
        and oppose its prediction most (``found``), and where the methods agree."""
        ranked = {m: {"source": found[m].source, "depth": found[m].depth, "supporting": found[m].supporting,
                      "opposing": found[m].opposing} for m in names}
        return {"example": self.row(split, idx), "k": k, "available": self.rankable(split),
                **self._side_by_side(ranked)}

    # ------------------------------------------------------------------ one training row
    def influence(self, idx: str, split: Optional[str] = None, methods: Optional[Sequence[str]] = None,
                  k: int = 5) -> dict:
        """A training row, the rows of ``split`` (default: the eval split) whose predictions it
        supports and opposes most per method (its score column), and its suspicion rank."""
        example = self.row("train", idx)
        split = self.check_split(split or self.run.eval_split)
        self.check_k(k)
        names = self.choose(list(self.methods(split)), methods, f"stored for split {split!r}")
        out = {}
        for m in names:
            r = self.ranker.train_column(m, idx, k, split)
            out[m] = {"source": r.source, "partial": r.partial, "depth": r.depth,
                      "supports": [{**self.brief(split, i), "score": s} for i, s in r.supporting],
                      "opposes": None if r.opposing is None else [{**self.brief(split, i), "score": s}
                                                                  for i, s in r.opposing]}
        return {"example": example, "split": split, "k": k, "available": list(self.methods(split)),
                "methods": out, "suspicion": self.suspicion(idx)}

    def suspects_path(self) -> Path:
        return self.run.path / "results" / "suspects.json"

    def suspicion(self, idx: str) -> Optional[dict]:
        """``idx``'s place in ``results/suspects.json`` (most suspicious first; ``rank`` None when
        it is not listed), or None when the run has no such file."""
        p = self.suspects_path()
        if not p.exists():
            return None
        stamp = p.stat().st_mtime_ns
        if self._suspects is None or self._suspects[0] != stamp:
            from ..store import read_json
            d = read_json(p)
            order = [str(i) for i in d.get("order", [])]
            scores = d.get("scores") if len(d.get("scores") or []) == len(order) else None
            self._suspects = (stamp, d.get("method"), {i: r for r, i in enumerate(order)}, scores)
        _, method, rank, scores = self._suspects
        if idx not in rank:
            return {"method": method, "rank": None, "of": len(rank), "score": None}
        r = rank[idx]
        return {"method": method, "rank": r + 1, "of": len(rank), "score": None if scores is None else scores[r]}

    # ------------------------------------------------------------------ new text
    def live_explanation(self, answer: Answer, text: str, query: Optional[str], methods: Sequence[str],
                         k: int) -> dict:
        """A live :class:`Answer` in the shape of :meth:`explanation`."""
        ranked = {m: {"source": "live", "depth": None, "supporting": answer.methods[m].supporting,
                      "opposing": answer.methods[m].opposing} for m in methods}
        example = {"text": text, "pred": self.labels[answer.pred], "confidence": float(answer.probs.max()),
                   "probs": dict(zip(self.labels, map(float, answer.probs)))}
        if query is not None:
            example["query"] = query
        return {"example": example, "k": k, "available": list(self.live.methods), "seconds": answer.seconds,
                **self._side_by_side(ranked)}

    def live_methods(self, asked: Optional[Sequence[str]]) -> List[str]:
        return self.choose(list(self.live.methods), asked, "for live explanation")

    # ------------------------------------------------------------------ the run
    def figures(self) -> List[str]:
        folder = self.run.path / "figures"
        return sorted(p.name for p in folder.glob("*.png")) if folder.is_dir() else []

    def figure_path(self, name: str) -> Path:
        if name not in self.figures():
            raise NotFound(f"no figure {name!r} in this run")
        return self.run.path / "figures" / name

    def summary(self) -> dict:
        """The overview: dataset, model, accuracies, stored methods per split, live methods, each
        evaluation's headline beside the paper's (with its full markdown) and figures."""
        from ..report import model_description
        m, metrics = self.run.manifest, self.run.metrics
        figures = self.figures()
        evaluations = []
        folder = self.run.path / "results"
        for p in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            name = p.stem
            if name == "suspects":
                continue
            try:
                result = json.loads(p.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                raise RunError(f"{p}: not valid JSON") from None
            md = p.with_suffix(".md")
            key = name.replace("-", "_")
            evaluations.append({"name": name, "title": _results_title(name),
                                "headline": headline(name, result, m.data.name),
                                "markdown": md.read_text(encoding="utf-8") if md.exists() else "",
                                "figures": [f for f in figures if f.startswith((name, key))]})
        from ..evaluate import evaluations as registered
        order = {e.name: i for i, e in enumerate(registered())}
        evaluations.sort(key=lambda e: (order.get(e["name"], len(order)), e["name"]))
        shown = {f for e in evaluations for f in e["figures"]}
        suspects = None
        if self.suspects_path().exists():
            s = json.loads(self.suspects_path().read_text(encoding="utf-8"))
            suspects = {"method": s.get("method"), "n": len(s.get("order", [])),
                        "top": [str(i) for i in s.get("order", [])[:10]]}
        accuracy = {s: metrics.get(f"{s}_accuracy") for s in ("train", "dev", "test")
                    if isinstance(metrics.get(f"{s}_accuracy"), (int, float))
                    and math.isfinite(metrics[f"{s}_accuracy"])}
        return {"run": str(self.run.path), "dataset": m.data.name, "is_pair": m.is_pair, "labels": self.labels,
                "n": dict(m.data.n), "mode": m.mode, "model": model_description(self.run),
                "eval_split": self.run.eval_split, "accuracy": accuracy,
                "methods": {s: self.methods(s) for s in self.run.splits if self.methods(s)},
                "live_methods": list(self.live.methods), "live_error": self.live.error,
                "paper_column": paper_column(m.data.name), "evaluations": evaluations,
                "figures": [f for f in figures if f not in shown], "suspects": suspects}


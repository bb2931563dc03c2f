"""``instattr serve`` over a language-model run: queries, their completions token by token, the
training rows behind them, and live explanation of a new prompt.

Pages (server-rendered, no script) and the JSON API under ``/api`` call one :class:`LMExplorer`. A
query's rankings come from the stored scores (dense, else top-k) and, for methods not stored, from
the live explainer; per-token attribution and new prompts are always live. The live
:class:`~instattr.lm.LMExplainer` is fitted once at start-up and runs on one worker thread, so the
event loop never does model work and the tokenizer is never used from two threads. A shown row's
words that also occur in the query are marked (``<mark>``): the matching spans.
"""
from __future__ import annotations

import asyncio
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Optional

import numpy as np
from fastapi import Query, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from ..errors import InstattrError
from ..lm import row_text
from ..store import LMRun
from .errors import BadInput, NotFound, Unavailable
from .security import MAX_BODY, Guard

MAX_K = 50
MAX_PROMPT = 2000
LIVE_TIMEOUT = 300.0
PAGE_ROWS = 100
WORD = re.compile(r"\w+", re.UNICODE)
STOP = {"the", "a", "an", "of", "and", "or", "in", "on", "to", "is", "was", "it", "that", "this", "for", "with",
        "as", "at", "by", "be", "are", "were", "its", "his", "her", "their"}


def marked(text: str, words: set) -> List[dict]:
    """``text`` as segments ``{"text", "mark"}``: the words found in ``words`` (lower case) marked."""
    out, at = [], 0
    for m in WORD.finditer(text):
        if m.group(0).lower() in words:
            if m.start() > at:
                out.append({"text": text[at:m.start()], "mark": False})
            out.append({"text": m.group(0), "mark": True})
            at = m.end()
    if at < len(text):
        out.append({"text": text[at:], "mark": False})
    return out


def excerpt(text: str, words: set, width: int = 400) -> str:
    """``text``, or when longer than ``width`` characters the ``width`` around its first word in
    ``words`` (its start when none), with an ellipsis where it is cut."""
    if len(text) <= width:
        return text
    first = next((m.start() for m in WORD.finditer(text) if m.group(0).lower() in words), 0)
    start = max(0, min(first - width // 3, len(text) - width))
    return ("…" if start else "") + text[start:start + width] + ("…" if start + width < len(text) else "")


def query_words(prompt: str, completion: str) -> set:
    return {w.lower() for w in WORD.findall(f"{prompt} {completion}")} - STOP


def levels(values: List[float]) -> List[str]:
    """A CSS class per token share: ``p1``..``p4`` (supports) or ``n1``..``n4`` (opposes), by its size
    against the largest share of the row (``z`` when all are 0)."""
    top = max((abs(v) for v in values), default=0.0)
    if not top > 0:
        return ["z"] * len(values)
    return [("p" if v >= 0 else "n") + str(max(1, int(np.ceil(4 * abs(v) / top)))) for v in values]


class LMExplorer:
    """Everything the LM pages and API show, as plain dicts (see the module docstring)."""

    def __init__(self, run: LMRun, live_methods: Optional[List[str]] = None, device: str = "cpu",
                 threads: Optional[int] = 1):
        from ..lmrun import explainer_of, lm_methods
        self.run, self.split = run, run.eval_split
        self.train, self.queries = run.rows("train"), run.rows(self.split)
        self.train_pos = {r["idx"]: i for i, r in enumerate(self.train)}
        self.query_pos = {r["idx"]: i for i, r in enumerate(self.queries)}
        self.train_nll, self.query_nll = run.losses("train"), run.losses(self.split)
        default = [m for m in lm_methods(None, run) if m != "tracin"]       # tracin: every checkpoint's gradients
        self.live_names = default if live_methods is None else lm_methods(live_methods, run) if live_methods else []
        self.threads = threads
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="instattr-lm-live",
                                       initializer=self._threads)
        self.error = None
        try:
            self.explainer = self.pool.submit(explainer_of, run, self.live_names, None, device).result() \
                if self.live_names else None
        except InstattrError as e:
            self.explainer, self.error = None, f"live explanation is off: {e}"

    def _threads(self) -> None:
        if self.threads:
            import torch
            torch.set_num_threads(int(self.threads))

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    # ---------------------------------------------------------------- what is stored
    def stored(self) -> List[str]:
        from ..lm import METHODS
        return [m for m in METHODS if self.run.has_scores(m, self.split) or self.run.has_top_k(m, self.split)]

    def methods(self) -> List[str]:
        """The stored and the live methods, in :data:`instattr.lm.METHODS`' order."""
        from ..lm import METHODS
        have = set(self.stored()) | set(self.live_names if self.explainer else [])
        return [m for m in METHODS if m in have]

    def check_methods(self, methods: Optional[List[str]]) -> List[str]:
        have = self.methods()
        if not methods:
            return have[:4]
        bad = [m for m in methods if m not in have]
        if bad:
            raise BadInput(f"method {bad[0]!r} is neither stored nor live here; choose from {', '.join(have)}")
        return list(dict.fromkeys(methods))

    @staticmethod
    def check_k(k: int) -> int:
        if not 1 <= k <= MAX_K:
            raise BadInput(f"k must lie in 1..{MAX_K}, got {k}")
        return k

    def summary(self) -> dict:
        m = self.run.manifest
        metrics = self.run.metrics
        results = {}
        for name in ("fact-tracing", "tail-patch", "poison", "lds"):
            md = self.run.path / "results" / f"{name}.md"
            if md.exists():
                results[name] = md.read_text(encoding="utf-8")
        return {"model": m.lm.path, "family": m.lm.family, "data": m.data.name, "split": self.split,
                "n_train": len(self.train), "n_queries": len(self.queries), "max_length": m.lm.max_length,
                "nll_per_token": {s: metrics.get(f"{s}_nll_per_token") for s in ("train", self.split)},
                "stored": self.stored(), "live": self.live_names if self.explainer else [], "live_error": self.error,
                "evaluations": results}

    def query_rows(self, q: str = "", offset: int = 0, limit: int = PAGE_ROWS) -> dict:
        """Queries whose prompt or completion contains ``q`` (case-insensitive), a page of them."""
        needle = q.strip().lower()
        hits = [i for i, r in enumerate(self.queries) if needle in row_text(r).lower()]
        rows = [self._query_row(i) for i in hits[offset:offset + limit]]
        return {"total": len(hits), "offset": offset, "limit": limit, "q": q, "rows": rows}

    def _query_row(self, i: int) -> dict:
        r = self.queries[i]
        tokens = int(self.query_nll["tokens"][i])
        return {"idx": r["idx"], "prompt": r["prompt"], "completion": r["completion"],
                "logprob": -float(self.query_nll["nll"][i]), "tokens": tokens,
                **{k: r[k] for k in ("source", "trigger") if k in r}}

    def _train_row(self, i: int, score: Optional[float] = None, words: Optional[set] = None) -> dict:
        r = self.train[i]
        out = {"idx": r["idx"], "text": row_text(r), "nll": float(self.train_nll["nll"][i]),
               **{k: r[k] for k in ("poisoned", "fact") if r.get(k)}}
        if score is not None:
            out["score"] = score
        if words is not None:
            out["segments"] = marked(excerpt(out["text"], words), words)
        return out

    # ---------------------------------------------------------------- explanations
    def _stored_ranking(self, method: str, i: int, k: int) -> Optional[dict]:
        run, split = self.run, self.split
        if run.has_scores(method, split):
            row = np.asarray(run.scores(method, split)[i], dtype=np.float64)
            top, bottom = np.argsort(-row, kind="stable")[:k], np.argsort(row, kind="stable")[:k]
            return {"source": "stored", "supporting": [(int(j), float(row[j])) for j in top],
                    "opposing": [(int(j), float(row[j])) for j in bottom]}
        if run.has_top_k(method, split):
            found = run.top_k(method, split)
            out = {"source": "top-k", "supporting": [(int(j), float(s)) for j, s in
                                                     zip(found["train_pos"][i][:k], found["score"][i][:k]) if j >= 0]}
            if run.has_top_k(method, split, bottom=True):
                low = run.top_k(method, split, bottom=True)
                out["opposing"] = [(int(j), float(s)) for j, s in zip(low["train_pos"][i][:k], low["score"][i][:k])
                                   if j >= 0]
            else:
                out["opposing"] = None
            return out
        return None

    def _live(self, prompt: str, completion: Optional[str], methods: List[str], k: int, max_new_tokens: int = 20):
        """(the explainer's LMExplanation over ``methods``, seconds), on the worker thread."""
        if self.explainer is None:
            raise Unavailable(self.error or "live explanation is off (no live methods)")

        def work():
            t = time.perf_counter()
            ex = self.explainer
            saved = ex.methods
            ex.methods = [m for m in saved if m in methods or m in ("gd", "if")]   # what is asked, and per token
            try:
                return ex.explain(prompt, completion, k, max_new_tokens), time.perf_counter() - t
            finally:
                ex.methods = saved
        return self.pool.submit(work)

    def explanation(self, prompt: str, completion: Optional[str], methods: List[str], k: int,
                    stored: Optional[int] = None, live=None) -> dict:
        """The page's dict: prompt, completion, its tokens with per-token shares for the first
        method's top supporting row (``gd`` or ``if``), and per method the rows with marked spans."""
        words = query_words(prompt, completion or "")
        found: Dict[str, dict] = {}
        if stored is not None:
            for m in methods:
                r = self._stored_ranking(m, stored, k)
                if r is not None:
                    found[m] = r
        e, seconds = live if live is not None else (None, 0.0)
        if e is not None:
            completion = e.completion
            words = query_words(prompt, completion)
            pos = {r["idx"]: i for i, r in enumerate(self.train)}
            for m, sides in e.methods.items():
                if m not in found:
                    found[m] = {"source": "live", **{side: [(pos[str(i)], v) for i, v in rows]
                                                     for side, rows in sides.items()}}
        out = {"prompt": prompt, "completion": completion, "methods": {}, "seconds": seconds}
        for m in methods:
            r = found.get(m)
            if r is None:
                out["methods"][m] = {"source": "missing"}
                continue
            out["methods"][m] = {"source": r["source"], **{
                side: None if r[side] is None else [self._train_row(j, s, words) for j, s in r[side]]
                for side in ("supporting", "opposing")}}
        if e is not None:
            out["logprob"] = e.logprob
            token_method = next((m for m in ("if", "gd") if m in e.per_token), None)
            out["tokens"] = [{"text": t} for t in e.tokens]
            if token_method is not None and e.methods[token_method]["supporting"]:
                top = e.methods[token_method]["supporting"][0][0]
                shares = e.per_token[token_method][top]
                out["per_token"] = {"method": token_method, "row": self._train_row(self.train_pos[str(top)]),
                                    "shares": shares}
                for t, v, c in zip(out["tokens"], shares, levels(shares)):
                    t.update(share=v, level=c)
        return out

    def row(self, idx: str) -> int:
        if idx not in self.query_pos:
            raise NotFound(f"no query {idx!r} in {self.split}")
        return self.query_pos[idx]

    def influence(self, idx: str, k: int) -> dict:
        """A training row and, per stored dense method, the queries it supports and opposes most."""
        if idx not in self.train_pos:
            raise NotFound(f"no training row {idx!r}")
        i = self.train_pos[idx]
        out = {"row": self._train_row(i), "methods": {}}
        for m in self.stored():
            if not self.run.has_scores(m, self.split):
                continue
            col = np.asarray(self.run.scores(m, self.split)[:, i], dtype=np.float64)
            out["methods"][m] = {side: [{**self._query_row(int(j)), "score": float(col[j])} for j in order[:k]]
                                 for side, order in (("supporting", np.argsort(-col, kind="stable")),
                                                     ("opposing", np.argsort(col, kind="stable")))}
        return out


class ExplainPrompt(BaseModel):
    """A prompt to complete (greedily, unless a completion is given) and explain."""
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT)
    completion: Optional[str] = Field(default=None, min_length=1, max_length=MAX_PROMPT)
    methods: Optional[List[str]] = None
    k: int = Field(default=5, ge=1, le=MAX_K)
    max_new_tokens: int = Field(default=20, ge=1, le=200)


def create_lm_app(run: LMRun, live_methods: Optional[List[str]] = None, device: str = "cpu",
                  threads: Optional[int] = 1, on_ready: Optional[Callable[[], None]] = None,
                  token: Optional[str] = None, hosts: Optional[List[str]] = None, max_body: int = MAX_BODY) -> Guard:
    """The web app over a language-model run (the same :class:`Guard` as the classifier app's)."""
    from .app import _templates, app_over
    explorer = LMExplorer(run, live_methods, device=device, threads=threads)
    templates = _templates()
    app = app_over(explorer, f"instattr: {run.manifest.data.name} (language model)",
                   "Which training documents made the language model say this?", on_ready)

    def error(request: Request, status: int, message: str):
        if request.url.path.startswith("/api"):
            return JSONResponse({"detail": message}, status_code=status)
        return templates.TemplateResponse(request, "lm/error.html", {"status": status, "message": message,
                                                                     **common()}, status_code=status)

    @app.exception_handler(InstattrError)
    async def instattr_error(request: Request, exc: InstattrError):
        return error(request, getattr(exc, "status", 500), str(exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        if request.url.path.startswith("/api"):
            return await request_validation_exception_handler(request, exc)
        return error(request, 422, "; ".join(f"{'.'.join(map(str, e['loc'][1:]))}: {e['msg']}" for e in exc.errors()))

    def common() -> dict:
        return {"dataset": run.manifest.data.name}

    def page(request: Request, name: str, **context):
        return templates.TemplateResponse(request, name, {**common(), **context})

    async def wait(future):
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), LIVE_TIMEOUT)
        except asyncio.TimeoutError:
            raise Unavailable(f"live explanation took longer than {LIVE_TIMEOUT:.0f} s") from None

    async def query_explained(idx: str, methods, k: int) -> dict:
        i = explorer.row(idx)
        names = explorer.check_methods(methods)
        explorer.check_k(k)
        q = explorer.queries[i]
        live = None
        if explorer.explainer is not None:      # per-token shares, and the methods not stored
            live = await wait(explorer._live(q["prompt"], q["completion"], names, k))
        out = await run_in_threadpool(explorer.explanation, q["prompt"], q["completion"], names, k, i, live)
        return {"query": explorer._query_row(i), **out}

    async def prompt_explained(prompt: str, completion: Optional[str], methods, k: int, max_new_tokens: int) -> dict:
        names = [m for m in explorer.check_methods(methods) if m in explorer.live_names]
        if not names:
            raise BadInput(f"none of the methods asked is live here; live: {', '.join(explorer.live_names) or 'none'}")
        explorer.check_k(k)
        live = await wait(explorer._live(prompt, completion, names, k, max_new_tokens))
        return explorer.explanation(prompt, completion, names, k, None, live)

    # ------------------------------------------------------------------ JSON API
    @app.get("/api/run", tags=["api"], summary="The run: model, rows, stored and live methods, evaluations")
    def api_run():
        return JSONResponse(explorer.summary())

    @app.get("/api/queries", tags=["api"], summary="The queries, filtered by text")
    def api_queries(q: str = "", offset: int = Query(0, ge=0), limit: int = Query(PAGE_ROWS, ge=1, le=1000)):
        return JSONResponse(explorer.query_rows(q, offset, limit))

    @app.get("/api/queries/{idx:path}", tags=["api"], summary="A query's completion per token and the training "
             "rows that support and oppose it most, per method")
    async def api_query(idx: str, methods: Optional[List[str]] = Query(None), k: int = Query(5, ge=1, le=MAX_K)):
        return JSONResponse(await query_explained(idx, methods, k))

    @app.get("/api/train/{idx:path}", tags=["api"], summary="A training row and the queries it supports most")
    def api_train(idx: str, k: int = Query(5, ge=1, le=MAX_K)):
        return JSONResponse(explorer.influence(idx, k))

    @app.post("/api/explain", tags=["api"], summary="Complete a new prompt (greedy) and explain it, live")
    async def api_explain(body: ExplainPrompt):
        return JSONResponse(await prompt_explained(body.prompt, body.completion, body.methods, body.k,
                                                   body.max_new_tokens))

    # ------------------------------------------------------------------ pages
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def overview(request: Request, q: str = "", offset: int = Query(0, ge=0)):
        return page(request, "lm/overview.html", s=explorer.summary(), t=explorer.query_rows(q, offset))

    @app.get("/queries/{idx:path}", response_class=HTMLResponse, include_in_schema=False)
    async def query_page(request: Request, idx: str, methods: Optional[List[str]] = Query(None),
                         k: int = Query(5, ge=1, le=MAX_K)):
        e = await query_explained(idx, methods, k)
        return page(request, "lm/query.html", e=e, all_methods=explorer.methods(), chosen=list(e["methods"]), k=k)

    @app.get("/train/{idx:path}", response_class=HTMLResponse, include_in_schema=False)
    def train_page(request: Request, idx: str, k: int = Query(5, ge=1, le=MAX_K)):
        return page(request, "lm/train.html", e=explorer.influence(idx, k))

    @app.get("/explain", response_class=HTMLResponse, include_in_schema=False)
    async def explain_page(request: Request, prompt: str = Query("", max_length=MAX_PROMPT),
                           completion: str = Query("", max_length=MAX_PROMPT),
                           methods: Optional[List[str]] = Query(None), k: int = Query(5, ge=1, le=MAX_K)):
        result = None
        if prompt.strip():
            result = await prompt_explained(prompt, completion or None, methods, k, 20)
        return page(request, "lm/explain.html", result=result, prompt=prompt, completion=completion, k=k,
                    live=explorer.live_names if explorer.explainer else [], error=explorer.error,
                    chosen=list(result["methods"]) if result else [m for m in explorer.live_names][:4])

    @app.get("/figures/{name}", include_in_schema=False)
    def figure(name: str):
        path = run.path / "figures" / name
        if not re.fullmatch(r"[\w.-]+\.png", name) or not path.is_file():
            raise NotFound(f"no figure {name!r}")
        return FileResponse(path, media_type="image/png")

    return Guard(app, token=token, hosts=hosts, max_body=max_body)

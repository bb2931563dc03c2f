"""The FastAPI app: a JSON API under ``/api`` and server-rendered pages over one run.

Pages and API call the same :class:`~instattr.serve.explorer.Explorer`, whose plain dicts the
API returns as they are (``JSONResponse``: no per-field encoding pass). Templates are Jinja2
with autoescaping on (every text is data, never markup); the only script, ``static/app.js``,
submits the table's filters as they change and swaps in live explanations that the server
rendered (escaped) from the same templates. Live explanation runs in one worker thread
(:mod:`.live`); the request handlers that read stored files run in the threadpool, so the event
loop never does model or array work.
"""
from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from importlib import resources
from typing import Callable, List, Optional
from urllib.parse import urlencode

from fastapi import FastAPI, Query, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from ..errors import InstattrError
from ..report.markdown import markdown_to_html
from ..store import LMRun, Run, is_lm_run
from .errors import BadInput, Unavailable
from .explorer import HEURISTICS, LIVE_TIMEOUT, MAX_K, MAX_LIMIT, Explorer
from .live import MAX_TEXT, Answer
from .security import MAX_BODY, Guard

PACKAGE = resources.files("instattr.serve")
Methods = Optional[List[str]]


class ExplainRequest(BaseModel):
    """A new text to classify and explain (``query``: the hypothesis, on pair runs)."""
    text: str = Field(min_length=1, max_length=MAX_TEXT)
    query: Optional[str] = Field(default=None, min_length=1, max_length=MAX_TEXT)
    methods: Optional[List[str]] = Field(default=None, description="default: up to four of the live methods")
    k: int = Field(default=5, ge=1, le=MAX_K)


def _templates() -> Jinja2Templates:
    env = Environment(loader=FileSystemLoader(str(PACKAGE / "templates")), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    # evaluation markdown: markdown_to_html escapes every text it copies
    env.filters["markdown"] = lambda text: Markup(markdown_to_html(text))
    env.filters["pct"] = lambda p: f"{100 * p:.1f}%"
    env.filters["score"] = lambda v: f"{v:+#.3g}"
    env.globals["query_string"] = lambda **kw: urlencode({k: v for k, v in kw.items() if v not in (None, "")},
                                                         doseq=True)
    return Jinja2Templates(env=env)


def _api_docs(app: FastAPI) -> None:
    """``/docs``: Swagger UI over ``/openapi.json``, from the assets of the swagger-ui-bundle-v2
    package (FastAPI's own page would load them from a CDN)."""
    import html
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        swagger_ui_path = None
    if swagger_ui_path is not None:
        app.mount("/docs-assets", StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs():
        if swagger_ui_path is None:
            return HTMLResponse("<!doctype html><title>API</title><p>The interactive API page needs the "
                                "swagger-ui-bundle-v2 package (<code>pip install 'instattr[serve]'</code>); the "
                                "schema is at <a href='/openapi.json'>/openapi.json</a>.</p>")
        # no inline script (the Content-Security-Policy allows none): static/docs.js starts Swagger UI
        return HTMLResponse(f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(app.title)} · API</title>
<link rel="stylesheet" href="/docs-assets/swagger-ui.css"><link rel="icon" href="/docs-assets/favicon-32x32.png">
</head><body><div id="swagger-ui"></div>
<script src="/docs-assets/swagger-ui-bundle.js"></script><script src="/static/docs.js"></script>
</body></html>""")


def app_over(explorer, title: str, description: str, on_ready: Optional[Callable[[], None]]) -> FastAPI:
    """A FastAPI app over ``explorer`` (kept in ``app.state``): ``on_ready`` called when the server
    starts, ``explorer.close`` in the threadpool when it stops, the static files and the offline
    API page. Both kinds of run build their routes on it."""
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if on_ready is not None:
            on_ready()
        yield
        await run_in_threadpool(explorer.close)

    app = FastAPI(title=title, lifespan=lifespan, docs_url=None, redoc_url=None, description=description)
    app.state.explorer = explorer
    app.mount("/static", StaticFiles(directory=str(PACKAGE / "static")), name="static")
    _api_docs(app)
    return app


def create_app(run_dir, live_methods: Optional[List[str]] = None, device: str = "cpu", threads: Optional[int] = 1,
               on_ready: Optional[Callable[[], None]] = None, token: Optional[str] = None,
               hosts: Optional[List[str]] = None, max_body: int = MAX_BODY) -> Guard:
    """The web app over the run at ``run_dir`` (a FastAPI app inside its :class:`Guard`, which
    passes ``state`` and the rest through). It reads the run's texts and predictions and fits
    ``live_methods`` (default: the paper's eleven last-layer methods) for live explanation here,
    before it serves anything; ``on_ready`` is called when the server starts. ``threads``: torch
    and BLAS threads of the live explanation worker (None leaves the process's settings).
    ``token``, ``hosts`` and ``max_body``: what every request must carry, the Host names it may
    address, the largest body it may send (:mod:`.security`). A language-model run gets the pages
    of :mod:`.lm` instead."""
    if is_lm_run(run_dir):
        from .lm import create_lm_app
        return create_lm_app(LMRun.load(run_dir), live_methods, device, threads, on_ready, token, hosts, max_body)
    run = Run.load(run_dir)
    explorer = Explorer(run, live_methods, device=device, threads=threads).start()   # a broken run fails here
    templates = _templates()
    app = app_over(explorer, f"instattr: {run.manifest.data.name}", "Instance attribution over one run directory: "
                   "which training examples made the model predict this?", on_ready)

    def wants_json(request: Request) -> bool:
        return request.url.path.startswith("/api/") or request.url.path == "/api"

    def error(request: Request, status: int, message: str):
        if wants_json(request):
            return JSONResponse({"detail": message}, status_code=status)
        name = "_error.html" if request.query_params.get("fragment") else "error.html"
        return templates.TemplateResponse(request, name, {"status": status, "message": message, **common()},
                                          status_code=status)

    @app.exception_handler(InstattrError)
    async def instattr_error(request: Request, exc: InstattrError):
        return error(request, getattr(exc, "status", 500), str(exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        if wants_json(request):
            return await request_validation_exception_handler(request, exc)
        detail = "; ".join(f"{'.'.join(map(str, e['loc'][1:]))}: {e['msg']}" for e in exc.errors())
        return error(request, 422, detail)

    def common() -> dict:
        m = run.manifest
        return {"dataset": m.data.name, "eval_split": run.eval_split, "is_pair": m.is_pair, "labels": run.label_names}

    def page(request: Request, name: str, **context):
        return templates.TemplateResponse(request, name, {**common(), **context})

    # ------------------------------------------------------------------ JSON API
    @app.get("/api/run", tags=["api"], summary="The run: dataset, model, accuracies, stored methods, evaluations")
    def api_run():
        return JSONResponse(explorer.summary())

    @app.get("/api/examples/{split}", tags=["api"], summary="Rows of a split, filtered and sorted")
    def api_examples(split: str, q: str = "", gold: Optional[str] = None, pred: Optional[str] = None,
                     correct: Optional[str] = Query(None, description="yes or no"),
                     heuristic: Optional[str] = Query(None, description="pairs: " + ", ".join(HEURISTICS)),
                     min_overlap: Optional[float] = Query(None, ge=0, le=1, description="pairs: lexical overlap"),
                     sort: str = Query("", description="confidence (ascending) or -confidence"),
                     offset: int = Query(0, ge=0), limit: int = Query(100, ge=1, le=MAX_LIMIT)):
        return JSONResponse(explorer.table(explorer.check_split(split), q, gold, pred, correct, heuristic,
                                           min_overlap, sort, offset, limit))

    @app.get("/api/examples/{split}/{idx:path}", tags=["api"], summary="One row with its prediction")
    def api_example(split: str, idx: str):
        return JSONResponse(explorer.row(explorer.check_split(split), idx))

    @app.get("/api/explanations/{split}/{idx:path}", tags=["api"],
             summary="A row's top supporting and opposing training examples per method, and where methods agree")
    async def api_explanation(split: str, idx: str, methods: Methods = Query(None),
                              k: int = Query(5, ge=1, le=MAX_K)):
        return JSONResponse(await explained(split, idx, methods, k))

    @app.get("/api/influence/{idx:path}", tags=["api"],
             summary="The predictions a training example supports and opposes most, and its suspicion rank")
    def api_influence(idx: str, split: Optional[str] = None, methods: Methods = Query(None),
                      k: int = Query(5, ge=1, le=MAX_K)):
        return JSONResponse(explorer.influence(idx, split, methods, k))

    async def answer(future) -> Answer:
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), LIVE_TIMEOUT)
        except asyncio.TimeoutError:
            raise Unavailable(f"live explanation took longer than {LIVE_TIMEOUT:.0f} s") from None

    async def explained(split: str, idx: str, methods: Methods, k: int) -> dict:
        """A stored row's explanation: stored files read in the threadpool, the rest awaited from
        the live worker (no thread waits on it)."""
        split = explorer.check_split(split)
        names, found, future = await run_in_threadpool(explorer.explanation_parts, split, idx, methods, k)
        if future is not None:
            found.update((await answer(future)).methods)
        return await run_in_threadpool(explorer.explanation_result, split, idx, names, found, k)

    async def live(text: str, query: Optional[str], methods: Methods, k: int) -> dict:
        names = explorer.live_methods(methods)
        explorer.check_k(k)
        future = explorer.live.submit(text, query, names, k)
        return explorer.live_explanation(await answer(future), text, query, names, k)

    @app.post("/api/explain", tags=["api"], summary="Classify and explain a new text, live")
    async def api_explain(body: ExplainRequest):
        return JSONResponse(await live(body.text, body.query, body.methods, body.k))

    # ------------------------------------------------------------------ pages
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def overview(request: Request):
        return page(request, "overview.html", s=explorer.summary(), live_error=explorer.live.error)

    @app.get("/examples", response_class=HTMLResponse, include_in_schema=False)
    def examples(request: Request, split: Optional[str] = None, q: str = "", gold: str = "", pred: str = "",
                 correct: str = "", heuristic: str = "", min_overlap: str = "", sort: str = "",
                 offset: int = Query(0, ge=0), limit: int = Query(100, ge=1, le=MAX_LIMIT)):
        split = explorer.check_split(split or run.eval_split)
        try:
            overlap = float(min_overlap) if min_overlap else None
        except ValueError:
            raise BadInput(f"min_overlap={min_overlap!r} is not a number") from None
        table = explorer.table(split, q, gold or None, pred or None, correct or None, heuristic or None, overlap,
                               sort, offset, limit)
        form = {"split": split, "q": q, "gold": gold, "pred": pred, "correct": correct, "heuristic": heuristic,
                "min_overlap": min_overlap, "sort": sort, "limit": limit}
        return page(request, "examples.html", t=table, form=form, splits=run.splits, heuristics=HEURISTICS)

    @app.get("/examples/{split}/{idx:path}", response_class=HTMLResponse, include_in_schema=False)
    async def example(request: Request, split: str, idx: str, methods: Methods = Query(None),
                      k: int = Query(5, ge=1, le=MAX_K)):
        e = await explained(split, idx, methods, k)
        return page(request, "example.html", e=e, split=split, chosen=list(e["methods"]))

    @app.get("/train/{idx:path}", response_class=HTMLResponse, include_in_schema=False)
    def train(request: Request, idx: str, split: Optional[str] = None, methods: Methods = Query(None),
              k: int = Query(5, ge=1, le=MAX_K)):
        e = explorer.influence(idx, split, methods, k)
        splits = [s for s in run.splits if explorer.methods(s)]
        return page(request, "train.html", e=e, chosen=list(e["methods"]), splits=splits or [e["split"]])

    @app.get("/explain", response_class=HTMLResponse, include_in_schema=False)
    async def explain(request: Request, text: str = "", query: str = "", methods: Methods = Query(None),
                      k: int = Query(5, ge=1, le=MAX_K), fragment: bool = False):
        result = None
        if text.strip():
            if run.manifest.is_pair and not query.strip():
                raise BadInput("this run reads sentence pairs: give a hypothesis too")
            result = await live(text, query if run.manifest.is_pair else None, methods, k)
        chosen = list(result["methods"]) if result else (explorer.live_methods(methods) if explorer.live.methods
                                                         else [])
        context = {"result": result, "text": text, "query": query, "k": k, "chosen": chosen,
                   "live_methods": list(explorer.live.methods), "live_error": explorer.live.error}
        return page(request, "_explanation.html" if fragment else "explain.html", **context)

    @app.get("/figures/{name}", include_in_schema=False)
    def figure(name: str):
        return FileResponse(explorer.figure_path(name), media_type="image/png")

    return Guard(app, token=token, hosts=hosts, max_body=max_body)    # outermost: even a 500 carries its headers

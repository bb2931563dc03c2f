"""Explaining live: new texts, and stored rows whose scores are not stored, with the run's
classifier and attributors fitted once (through the one :class:`~instattr.ranking.Ranker`).

One worker thread owns all torch and numpy work of live explanations. Requests queue up; the
worker takes every request waiting (up to ``max_batch``), featurizes their texts in one batch,
scores the batch with each method any of them asked for, and answers each with its own top-k.
A stored row (``submit_row``) skips the forward pass: its stored features are scored.
So concurrent clients share forward passes and matrix products instead of competing for the
machine's cores with as many threads, the tokenizer is never used from two threads at once, and
the web server's event loop never runs model code (it awaits a future).

The worker runs torch and BLAS with ``threads`` threads (default 1). On a small machine the rest
of the server needs a core too, and threads that spin waiting for a busy core slow every product
(``--threads`` raises it on a big machine).
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..ranking import Ranker, Ranking
from ..store import Run
from .errors import BadInput, NotFound, TooMany, Unavailable


@dataclass
class Request:
    text: Optional[str]
    query: Optional[str]
    methods: Tuple[str, ...]
    k: int
    future: Future
    row: Optional[Tuple[str, str]] = None     # (split, idx) of a stored row, instead of a text


@dataclass
class Answer:
    """One text or row: its probabilities, and per method its :class:`~instattr.ranking.Ranking`."""
    probs: np.ndarray
    pred: int
    methods: Dict[str, Ranking]
    seconds: float


STOPPED = "live explanation has stopped (the server is shutting down)"
MAX_TEXT = 10_000        # characters of a text (or hypothesis) to explain
MAX_WAITING = 256        # live requests waiting for the worker; more get 429


class LiveExplainer:
    """``start()`` loads the classifier and fits ``methods`` on the run's training set (once);
    ``submit(text, query, methods, k)`` returns a Future of an :class:`Answer`."""

    def __init__(self, run: Run, methods: Sequence[str], max_batch: int = 32, device: str = "cpu",
                 threads: Optional[int] = 1, ranker: Optional[Ranker] = None):
        if threads is not None and threads < 1:
            raise BadInput(f"threads must be at least 1, got {threads}")
        self.run, self.names, self.max_batch, self.device = run, tuple(methods), int(max_batch), device
        self.ranker = ranker or Ranker(run, device=device)
        self.threads = threads
        self.worker_threads: Optional[int] = None     # torch's threads as the worker thread sees them
        self.fitted: Dict[str, object] = {}
        self.fit_seconds: Dict[str, float] = {}
        self.error: Optional[str] = None
        self.largest_batch = 0          # the most requests answered by one forward pass so far
        self._queue: "queue.Queue[Optional[Request]]" = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self._gate = threading.Lock()   # submit's check-and-put against the worker's and close's stop
        self._accepting = False

    def start(self) -> "LiveExplainer":
        """Load the classifier (a warm-up text runs through it) and fit every method; a run whose
        model cannot be loaded here leaves live explanation off, with ``error`` saying why."""
        from ..models import classifier_for
        try:
            self.classifier = classifier_for(self.run, self.device)
            self.classifier.featurize(["warm up"], ["warm up"] if self.classifier.is_pair else None)
        except Exception as e:   # noqa: BLE001 - a probe: a missing model folder, an encoder that does not fit
            first = str(e).splitlines()[0] if str(e) else ""
            self.error = f"live explanation is off: the run's classifier cannot run here ({type(e).__name__}: {first})"
            return self
        for name in self.names:
            t = time.perf_counter()
            self.fitted[name] = self.ranker.attributor(name)
            self.fit_seconds[name] = time.perf_counter() - t
        self._accepting = True
        self._thread = threading.Thread(target=self._loop, name="instattr-live", daemon=True)
        self._thread.start()
        return self

    @property
    def methods(self) -> Tuple[str, ...]:
        return tuple(self.fitted)

    def check(self, text: str, query: Optional[str]) -> None:
        """A hypothesis (``query``) on pair runs only, and no empty text."""
        if self.error:
            raise Unavailable(self.error)
        if self.classifier.is_pair and query is None:
            raise BadInput("this run reads sentence pairs: give a hypothesis (query) too")
        if not self.classifier.is_pair and query is not None:
            raise BadInput("this run reads single texts: a hypothesis (query) does not apply")
        if not text.strip() or (query is not None and not query.strip()):
            raise BadInput("the text is empty" if not text.strip() else "the hypothesis is empty")
        for what, value in (("text", text), ("hypothesis", query)):
            if value is not None and len(value) > MAX_TEXT:
                raise BadInput(f"the {what} has {len(value):,} characters; at most {MAX_TEXT:,} are explained")

    def submit(self, text: str, query: Optional[str], methods: Sequence[str], k: int) -> Future:
        """A Future of the :class:`Answer` for a new text."""
        self.check(text, query)
        return self._put(Request(text, query, tuple(methods), int(k), Future()))

    def submit_row(self, split: str, idx: str, methods: Sequence[str], k: int) -> Future:
        """A Future of the :class:`Answer` for a stored row (its stored features, no forward pass)."""
        if self.error:
            raise Unavailable(self.error)
        return self._put(Request(None, None, tuple(methods), int(k), Future(), row=(split, str(idx))))

    def _put(self, request: Request) -> Future:
        unknown = [m for m in request.methods if m not in self.fitted]
        if unknown:
            raise NotFound(f"live explanation has no method {', '.join(map(repr, unknown))}; it offers "
                           f"{', '.join(self.fitted)}")
        with self._gate:
            if not self._accepting:
                raise Unavailable(STOPPED)
            if self._queue.qsize() >= MAX_WAITING:
                raise TooMany(f"{MAX_WAITING} live explanations are waiting already; try again shortly")
            self._queue.put(request)
        return request.future

    def close(self) -> None:
        """Stop the worker after the requests already queued; any that arrive later fail (503)."""
        with self._gate:
            self._accepting = False
            if self._thread is not None:
                self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout=10)    # a slow batch may outlast this: the worker drains on its way out
            if not self._thread.is_alive():
                self._thread = None

    def _fail_waiting(self) -> None:
        while True:
            try:
                r = self._queue.get_nowait()
            except queue.Empty:
                return
            if r is not None and r.future.set_running_or_notify_cancel():
                r.future.set_exception(Unavailable(STOPPED))

    # ------------------------------------------------------------------ the worker
    def _loop(self) -> None:
        try:
            self._work()
        finally:                              # however the worker ends, nothing queued is left waiting
            with self._gate:
                self._accepting = False
            self._fail_waiting()

    def _work(self) -> None:
        import torch
        if self.threads is None:
            self.worker_threads = torch.get_num_threads()
            return self._serve()
        from threadpoolctl import threadpool_limits
        torch.set_num_threads(self.threads)      # OpenMP's setting is per thread: this worker's alone
        self.worker_threads = torch.get_num_threads()
        with threadpool_limits(limits=self.threads):   # BLAS's is per process, until the worker stops
            self._serve()

    def _serve(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True                 # stop after this batch
                    break
                batch.append(nxt)
            batch = [r for r in batch if r.future.set_running_or_notify_cancel()]
            self.largest_batch = max(self.largest_batch, len(batch))
            if batch:
                try:
                    self._answer(batch)
                except BaseException as e:       # noqa: BLE001 - handed to the waiting requests
                    for r in batch:
                        if not r.future.done():
                            r.future.set_exception(e)
                    if not isinstance(e, Exception):
                        raise

    def _answer(self, batch: List[Request]) -> None:
        t = time.perf_counter()
        texts = [r for r in batch if r.row is None]
        rows = [r for r in batch if r.row is not None]
        parts = []
        if texts:
            pair = self.classifier.is_pair
            parts.append((texts, self.classifier.featurize([r.text for r in texts],
                                                           [r.query for r in texts] if pair else None)))
        for r in rows:                 # stored rows: their stored features (one per request, rarely many)
            split, idx = r.row
            where = self.ranker.row_positions(split).get(idx)
            if where is None:
                r.future.set_exception(NotFound(f"no row {idx!r} in split {split!r}"))
                continue
            parts.append(([r], self.run.features(split).subset(np.array([where]))))
        for requests, fs in parts:
            asked = [m for m in self.fitted if any(m in r.methods for r in requests)]
            ranked = self.ranker.rank(fs, asked, max(r.k for r in requests))
            seconds = time.perf_counter() - t
            for i, r in enumerate(requests):
                out = {m: Ranking(ranked[i][m].supporting[:r.k], ranked[i][m].opposing[:r.k], "live")
                       for m in r.methods}
                r.future.set_result(Answer(probs=fs.probs[i].astype(np.float64), pred=int(fs.pred[i]), methods=out,
                                           seconds=seconds))

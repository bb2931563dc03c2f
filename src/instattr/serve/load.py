"""A closed-loop load test of a running ``instattr serve`` (standard library only).

``clients`` threads each keep one HTTP connection and send their next request as soon as the last
one is answered, for ``seconds``, alternating between one stored example's explanation
(``GET /api/explanations/{split}/{idx}``) and a live explanation of a new text
(``POST /api/explain``). Every answer that is not HTTP 200 counts as an error. Used by the test
suite (a few seconds) and by ``bench/serve_load.py`` (30 s against a real run).
"""
from __future__ import annotations

import http.client
import json
import os
import random
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Sequence
from urllib.parse import quote, urlsplit

ENDPOINTS = ("example", "explain")


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by linear interpolation; nan for no values."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@contextmanager
def served(run_dir, port: int, *options: str) -> Iterator[subprocess.Popen]:
    """``instattr serve`` on ``run_dir`` in its own process (benchmarks: the server's cores are
    not shared with the clients' Python); yields the process once the app is ready."""
    server = subprocess.Popen([sys.executable, "-m", "instattr", "--quiet", "serve", "--run", str(run_dir), "--port",
                               str(port), *options], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        for line in server.stdout:
            if "open http" in line:
                break
        else:
            raise RuntimeError(f"instattr serve stopped before it was ready (exit {server.wait()})")
        yield server
    finally:
        server.terminate()
        server.wait(timeout=30)


def _auth(token: Optional[str]) -> Dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _get_json(base: str, path: str, token: Optional[str] = None):
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.request("GET", path, headers=_auth(token))
        r = conn.getresponse()
        body = r.read()
        if r.status != 200:
            raise RuntimeError(f"GET {path}: HTTP {r.status} {body[:200]!r}")
        return json.loads(body)
    finally:
        conn.close()


def run_load(base_url: str, seconds: float = 30.0, clients: int = 20, methods: Optional[List[str]] = None,
             k: int = 5, seed: int = 0, min_requests: int = 0, token: Optional[str] = None) -> Dict[str, dict]:
    """Load ``base_url`` (sending ``token``, when the server wants one) and return, per endpoint,
    ``n``, ``errors`` (first few messages in ``error_examples``), ``p50``/``p95``/``max`` latency
    in seconds, and ``rps``. Each client sends at least ``min_requests`` requests, however long
    they take (a loaded machine still gets a sample of every endpoint: 2 per client alternate
    between the two)."""
    run = _get_json(base_url, "/api/run", token)
    split = run["eval_split"]
    rows = _get_json(base_url, f"/api/examples/{split}?limit=500", token)["rows"]
    if not rows:
        raise RuntimeError(f"{base_url}: the {split} split has no rows")
    live_methods = methods or run["live_methods"]
    stored = bool(run["methods"].get(split))
    parts = urlsplit(base_url)
    latencies: Dict[str, List[float]] = {e: [] for e in ENDPOINTS}
    errors: Dict[str, List[str]] = {e: [] for e in ENDPOINTS}
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
        turn = i % 2
        sent = 0
        while time.perf_counter() < stop or sent < min_requests:
            sent += 1
            row = rng.choice(rows)
            kind = ENDPOINTS[turn] if stored else "explain"
            turn = 1 - turn
            if kind == "example":
                method, path, body = "GET", f"/api/explanations/{split}/{quote(row['idx'])}?k={k}", None
            else:
                words = row["text"].split()
                rng.shuffle(words)               # a text the server has never seen
                payload = {"text": " ".join(words), "methods": live_methods, "k": k}
                if "query" in row:
                    payload["query"] = row["query"]
                method, path, body = "POST", "/api/explain", json.dumps(payload)
            t = time.perf_counter()
            try:
                conn.request(method, path, body=body,
                             headers={**_auth(token), **({"Content-Type": "application/json"} if body else {})})
                r = conn.getresponse()
                data = r.read()
                ok, why = r.status == 200, f"HTTP {r.status}: {data[:200]!r}"
            except (OSError, http.client.HTTPException) as e:
                ok, why = False, f"{type(e).__name__}: {e}"
                conn.close()
                conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
            dt = time.perf_counter() - t
            with lock:
                (latencies if ok else errors)[kind].append(dt if ok else why)
        conn.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    began = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - began
    return {e: {"n": len(latencies[e]), "errors": len(errors[e]), "error_examples": errors[e][:3],
                "p50": percentile(latencies[e], 50), "p95": percentile(latencies[e], 95),
                "max": max(latencies[e], default=float("nan")), "rps": len(latencies[e]) / wall}
            for e in ENDPOINTS}


def format_stats(stats: Dict[str, dict], clients: int, seconds: float) -> str:
    """A small table of :func:`run_load`'s result."""
    lines = [f"{clients} concurrent clients, {seconds:g} s",
             f"{'endpoint':<10} {'requests':>9} {'errors':>7} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}"]
    for e, s in stats.items():
        lines.append(f"{e:<10} {s['n']:>9} {s['errors']:>7} {s['rps']:>7.1f} {1000 * s['p50']:>8.1f} "
                     f"{1000 * s['p95']:>8.1f} {1000 * s['max']:>8.1f}")
    return "\n".join(lines)

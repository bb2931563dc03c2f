"""`instattr serve` under load: page load times, then 20 concurrent clients for 30 s.

    python bench/serve_load.py runs/sst2 [--seconds 30] [--clients 20] [--port 8765]

Starts `instattr serve` on the run in a subprocess (the server has the machine's cores to itself,
apart from this client process), times each page (median of 5 loads, HTML only, as a browser's
first request), one live explanation at a time (the paper's eleven last-layer methods), then runs
the closed-loop load of `instattr.serve.load` against the example and explain endpoints and
prints p50/p95 latencies.
"""
import argparse
import json
import os
import sys
import time
import urllib.request
from urllib.parse import quote

from instattr.serve.load import format_stats, percentile, run_load, served


def cpu_seconds(pid):
    """User + system CPU time of a process and its threads (Linux /proc), in seconds."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fetch(url, data=None):
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    t = time.perf_counter()
    with urllib.request.urlopen(req, timeout=120) as r:
        body = r.read()
        assert r.status == 200, (url, r.status)
    return time.perf_counter() - t, body


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    base = f"http://127.0.0.1:{a.port}"
    t0 = time.perf_counter()
    with served(a.run, a.port) as server:
        print(f"server ready in {time.perf_counter() - t0:.1f} s (model loaded, eleven attributors fitted)")
        run = json.loads(fetch(base + "/api/run")[1])
        split = run["eval_split"]
        rows = json.loads(fetch(f"{base}/api/examples/{split}?correct=no&limit=1")[1])["rows"] or \
            json.loads(fetch(f"{base}/api/examples/{split}?limit=1")[1])["rows"]
        test_idx = rows[0]["idx"]
        train_idx = json.loads(fetch(f"{base}/api/examples/train?limit=1")[1])["rows"][0]["idx"]
        text = quote("a gorgeous , witty , seductive movie")
        pages = {"overview /": "/", "examples table": f"/examples?split={split}",
                 "examples, filtered": f"/examples?split={split}&correct=no&sort=-confidence",
                 "test example": f"/examples/{split}/{quote(test_idx)}",
                 "training example": f"/train/{quote(train_idx)}",
                 "explain page (live, 4 methods)": f"/explain?text={text}" + (f"&query={text}" if run["is_pair"] else "")}
        print(f"\npage load (server time to the full HTML, median / max of {a.repeats}):")
        for name, path in pages.items():
            times = [fetch(base + path)[0] for _ in range(a.repeats)]
            print(f"  {name:<32} {1000 * percentile(times, 50):7.1f} ms  {1000 * max(times):7.1f} ms")
        body = {"text": "a gorgeous , witty , seductive movie", "methods": run["live_methods"], "k": 5}
        if run["is_pair"]:
            body["query"] = "a movie"
        times = [fetch(base + "/api/explain", json.dumps(body).encode())[0] for _ in range(20)]
        print(f"\none client: POST /api/explain, {len(run['live_methods'])} methods: p50 "
              f"{1000 * percentile(times, 50):.1f} ms, p95 {1000 * percentile(times, 95):.1f} ms")
        print(f"\nmachine load average before the load: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs "
              "(above about 0.5 the machine is shared and every latency here is inflated)")
        cpu = cpu_seconds(server.pid)
        stats = run_load(base, a.seconds, a.clients)
        cpu = cpu_seconds(server.pid) - cpu
        print(format_stats(stats, a.clients, a.seconds))
        n = sum(s["n"] for s in stats.values())
        print(f"server CPU time: {cpu:.1f} s for {n} requests = {1000 * cpu / max(n, 1):.1f} ms per request "
              f"(half example, half explain); load average after: {os.getloadavg()[0]:.1f}")
        bad = {e: s["error_examples"] for e, s in stats.items() if s["errors"]}
        if bad:
            sys.exit(f"errors: {bad}")


if __name__ == "__main__":
    main()

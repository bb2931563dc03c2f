"""Twenty concurrent clients against a served run: the example and explain endpoints answer every
request (no error) and their latencies are printed. $INSTATTR_LOAD_SECONDS sets the duration
(default 5 s here; bench/serve_load.py runs 30 s against a real run, the server in its own process)."""
import os

import numpy as np
import pytest

from instattr.serve import running
from instattr.serve.load import ENDPOINTS, format_stats, percentile, run_load


def test_percentile_matches_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100):
        xs = list(rng.standard_normal(n))
        for q in (0, 50, 95, 100):
            assert abs(percentile(xs, q) - np.percentile(xs, q)) < 1e-12


def test_twenty_clients_without_error(serve_run, request):
    """Through the token check, as a server on a network is loaded."""
    seconds = float(os.environ.get("INSTATTR_LOAD_SECONDS", "5"))
    with running(serve_run.path, token="load-test-token") as url:
        with pytest.raises(RuntimeError, match="HTTP 401"):
            run_load(url, seconds=0.1, clients=1)
        stats = run_load(url, seconds=seconds, clients=20, min_requests=2, token="load-test-token")
    with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
        print("\n" + format_stats(stats, 20, seconds) + "  (tiny run; server and clients in one process)")
    for e in ENDPOINTS:
        assert stats[e]["errors"] == 0, stats[e]["error_examples"]
        assert stats[e]["n"] >= 20, stats          # every client sent one of each, however loaded the machine
        assert stats[e]["p50"] <= stats[e]["p95"] <= stats[e]["max"]

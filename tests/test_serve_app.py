"""The web app's JSON API and pages (in-process, no browser), against brute force on the run's own files."""
import html
import json
import shutil
import socket
import threading
import time

import numpy as np
import pytest

from instattr.attribution import attribute_run
from instattr.cli import main
from instattr.evaluate import overlap_rate
from instattr.ranking import explain
from instattr.serve import create_app
from instattr.serve.explorer import heuristic

from _synthetic import make_run
from conftest import XSS_LABELS, XSS_TEXTS

fastapi_testclient = pytest.importorskip("fastapi.testclient")   # the serve extra is part of [dev]
METHODS = ["nn-cos", "gc", "if", "rep"]


@pytest.fixture(scope="module")
def client(serve_run):
    with fastapi_testclient.TestClient(create_app(serve_run.path)) as c:
        yield c


def ranked(values, k, largest=True):
    """Brute force top/bottom k positions: float64 sort, ties to the lower position."""
    v = np.asarray(values, dtype=np.float64)
    return sorted(range(len(v)), key=lambda j: (-v[j] if largest else v[j], j))[:k]


def test_overview_lists_accuracies_methods_headlines_and_figures(client, serve_run):
    s = client.get("/api/run").json()
    assert s["accuracy"]["test"] == pytest.approx(serve_run.metrics["test_accuracy"])
    assert s["labels"] == XSS_LABELS and s["eval_split"] == "test"
    assert s["methods"] == {"test": {m: "dense" for m in METHODS}}
    assert s["live_methods"] == ["nn-euc", "nn-cos", "nn-dot", "sbert-euc", "sbert-cos", "sbert-dot", "gd", "gc",
                                 "if", "rif", "rep"] and s["live_error"] is None
    (ev,) = s["evaluations"]
    result = serve_run.result("correlation")
    names = result["methods"]
    assert ev["name"] == "correlation" and ev["markdown"].startswith("# Correlation between methods")
    rho = {r["measure"]: r["ours"] for r in ev["headline"]}
    assert rho["mean Spearman, nn-cos ~ gc"] == f"{result['spearman'][names.index('nn-cos')][names.index('gc')]:.2f}"
    assert ev["figures"] and all(f.startswith("correlation") for f in ev["figures"])
    png = client.get(f"/figures/{ev['figures'][0]}")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"
    assert client.get("/figures/..%2Frun.json").status_code == 404
    assert s["suspects"]["method"] == "if" and s["suspects"]["n"] == 40
    page = client.get("/").text
    assert "Evaluations beside the paper" in page and "mean Spearman, nn-cos ~ gc" in page
    assert f"{serve_run.metrics['test_accuracy']:.3f}" in page


def test_table_filters_and_sorting_match_brute_force(client, serve_run):
    fs, examples = serve_run.features("test"), serve_run.examples("test")
    names = serve_run.label_names
    rows = [{"idx": e.idx, "text": e.document, "gold": names[e.label], "pred": names[int(p)],
             "conf": float(pr.max())} for e, p, pr in zip(examples, fs.pred, fs.probs)]

    def api(**params):
        r = client.get("/api/examples/test", params=params)
        assert r.status_code == 200, r.text
        return r.json()

    assert api()["total"] == len(rows) == api()["matched"]
    for params, keep in [({"gold": names[1]}, lambda r: r["gold"] == names[1]),
                         ({"pred": names[0]}, lambda r: r["pred"] == names[0]),
                         ({"correct": "no"}, lambda r: r["gold"] != r["pred"]),
                         ({"correct": "yes", "q": "MOVIE"}, lambda r: r["gold"] == r["pred"] and "movie" in r["text"]),
                         ({"q": "the was"}, lambda r: "the" in r["text"] and "was" in r["text"])]:
        assert [r["idx"] for r in api(**params, limit=500)["rows"]] == [r["idx"] for r in rows if keep(r)], params
    by_conf = api(sort="-confidence")["rows"]
    assert [r["idx"] for r in by_conf] == [r["idx"] for r in sorted(rows, key=lambda r: -r["conf"])]
    assert [r["idx"] for r in api(sort="confidence", offset=2, limit=3)["rows"]] == \
        [r["idx"] for r in sorted(rows, key=lambda r: r["conf"])][2:5]
    wrong = api(correct="no")["rows"]
    assert {"test_twin_a", "test_twin_b"} & {r["idx"] for r in wrong}       # one twin is always wrong
    # the page: filter form, the rows, a link to each example, and the count
    page = client.get("/examples", params={"correct": "no", "sort": "-confidence"}).text
    assert f"{len(wrong)} of {len(rows)} examples" in page
    assert all(f'href="/examples/test/{r["idx"]}"' in page for r in wrong)


def test_example_explanation_is_the_stored_top_k_and_agreement(client, serve_run):
    train_idx = [str(i) for i in serve_run.features("train").idx]
    test_idx = [str(i) for i in serve_run.features("test").idx]
    for row in (0, 5, len(test_idx) - 1):
        e = client.get(f"/api/explanations/test/{test_idx[row]}", params={"k": 4}).json()
        assert list(e["methods"]) == METHODS          # the default four, in the paper's Figure 1 order
        lists = {}
        for m in METHODS:
            scores = serve_run.scores(m, "test")[row]
            for side, largest in (("supporting", True), ("opposing", False)):
                got = e["methods"][m][side]
                want = ranked(scores, 4, largest)
                assert [t["idx"] for t in got] == [train_idx[j] for j in want]
                np.testing.assert_allclose([t["score"] for t in got], scores[want], rtol=1e-6)
                assert [t["rank"] for t in got] == [1, 2, 3, 4]
                lists[m, side] = [train_idx[j] for j in want]
        for side in ("supporting", "opposing"):
            counts = {}
            for m in METHODS:
                for i in lists[m, side]:
                    counts[i] = counts.get(i, 0) + 1
            assert {a["idx"]: len(a["methods"]) for a in e["agreement"][side]} == \
                {i: c for i, c in counts.items() if c > 1}
            for m in METHODS:
                assert [t["agree"] for t in e["methods"][m][side]] == [counts[i] for i in lists[m, side]]
    two = client.get(f"/api/explanations/test/{test_idx[1]}", params=[("methods", "if"), ("methods", "gc,if")]).json()
    assert list(two["methods"]) == ["if", "gc"]
    page = client.get(f"/examples/test/{test_idx[1]}", params={"methods": "if,gc", "k": 3}).text
    assert page.count('class="card"') == 2 * 2 * 3 and "Where the methods agree" in page


def test_training_example_column_and_suspicion(client, serve_run):
    train_idx = [str(i) for i in serve_run.features("train").idx]
    test_idx = [str(i) for i in serve_run.features("test").idx]
    j = 7
    e = client.get(f"/api/influence/{train_idx[j]}", params={"methods": "if,rep", "k": 3}).json()
    assert e["example"]["idx"] == train_idx[j] and e["split"] == "test"
    for m in ("if", "rep"):
        col = np.asarray(serve_run.scores(m, "test"))[:, j]
        assert [t["idx"] for t in e["methods"][m]["supports"]] == [test_idx[i] for i in ranked(col, 3)]
        assert [t["idx"] for t in e["methods"][m]["opposes"]] == [test_idx[i] for i in ranked(col, 3, False)]
    # suspects.json lists the training rows in reverse: row j is ranked n - j
    assert e["suspicion"] == {"method": "if", "rank": 40 - j, "of": 40, "score": float(j + 1)}
    page = client.get(f"/train/{train_idx[j]}").text
    assert f"Suspicion rank <b>{40 - j}</b> of 40 by if" in page and "Supports most" in page


def test_live_explanation_equals_the_cli_explain(client, serve_run):
    text = "the film was not very good"
    r = client.post("/api/explain", json={"text": text, "methods": ["if", "nn-cos", "sbert-dot"], "k": 3})
    assert r.status_code == 200, r.text
    got = r.json()
    want = explain(serve_run, text, methods="if,nn-cos,sbert-dot", k=3)
    assert got["example"]["pred"] == want["prediction"]
    np.testing.assert_allclose(list(got["example"]["probs"].values()), list(want["probs"].values()), atol=1e-6)
    for m in ("if", "nn-cos", "sbert-dot"):
        for side in ("supporting", "opposing"):
            assert [t["idx"] for t in got["methods"][m][side]] == [t["idx"] for t in want["methods"][m][side]]
            np.testing.assert_allclose([t["score"] for t in got["methods"][m][side]],
                                       [t["score"] for t in want["methods"][m][side]], rtol=1e-5, atol=1e-7)
    page = client.get("/explain", params={"text": text, "methods": "if", "k": 2})
    assert page.status_code == 200 and page.text.count('class="card"') == 4
    frag = client.get("/explain", params={"text": text, "fragment": 1}).text
    assert frag.lstrip().startswith('<section class="live"') and "<html" not in frag


def test_concurrent_live_requests_are_batched_and_each_answered_exactly(client):
    live = client.app.state.explorer.live
    texts = [f"the {w} was {v}" for w in ("movie", "plot", "actor", "dog") for v in ("good", "dull", "fun")]
    asks = [(t, ("if", "gd") if i % 2 else ("nn-cos",), 2 + i % 3) for i, t in enumerate(texts)]
    alone = [live.submit(t, None, ms, k).result() for t, ms, k in asks]
    # the worker is held on a first request while the others queue, so they are answered together
    # however slowly this thread submits them (no race with the worker)
    held, answer = threading.Event(), live._answer
    live._answer = lambda batch: (held.wait(60), answer(batch))
    try:
        first = live.submit("the film was fine", None, ("nn-cos",), 2)
        deadline = time.monotonic() + 60
        while live._queue.qsize() and time.monotonic() < deadline:   # the worker has taken it
            time.sleep(0.01)
        futures = [live.submit(t, None, ms, k) for t, ms, k in asks]
        held.set()
        first.result(timeout=60)
        together = [f.result(timeout=60) for f in futures]
    finally:
        held.set()
        live._answer = answer
    assert live.largest_batch == len(asks)
    for a, b, (_, ms, k) in zip(alone, together, asks):
        assert set(b.methods) == set(ms) and a.pred == b.pred
        np.testing.assert_allclose(a.probs, b.probs, atol=1e-5)
        for m in ms:
            for side in ("supporting", "opposing"):
                assert len(getattr(b.methods[m], side)) == k
                assert [j for j, _ in getattr(a.methods[m], side)] == [j for j, _ in getattr(b.methods[m], side)]


def test_requests_behind_a_stop_fail_instead_of_hanging(serve_run, monkeypatch):
    """A request queued behind the stop, or made after it, gets 503's error rather than a Future
    that never resolves."""
    from instattr.serve.errors import Unavailable
    from instattr.serve.live import LiveExplainer
    live = LiveExplainer(serve_run, ["nn-cos"]).start()
    busy, answer = threading.Event(), live._answer

    def slow(batch):
        busy.wait(30)
        answer(batch)

    monkeypatch.setattr(live, "_answer", slow)
    first = live.submit("the movie was good", None, ["nn-cos"], 2)     # the worker is busy with it
    live._queue.put(None)                                                 # the stop ...
    behind = live.submit("the plot was dull", None, ["nn-cos"], 2)      # ... and a request behind it
    busy.set()
    assert first.result(timeout=30).methods["nn-cos"].supporting
    with pytest.raises(Unavailable, match="stopped"):
        behind.result(timeout=30)
    live.close()
    with pytest.raises(Unavailable, match="stopped"):
        live.submit("the actor was fun", None, ["nn-cos"], 2)


def test_rows_without_stored_scores_are_explained_live_and_a_torn_top_k_file_is_refused(serve_run, tmp_path):
    """gd has nothing stored: a test row's gd ranking is computed by the live worker (and equals the
    brute-force top of gd's scores). A top-k file torn by a kill mid-write (its sidecar records
    other bytes) is never read: the method is not listed as stored and is explained live instead."""
    import shutil

    from instattr.methods import get_method
    from instattr.store import Run
    shutil.copytree(serve_run.path, tmp_path / "run")
    run = Run.load(tmp_path / "run")
    attribute_run(run, "rif", top_k=3, bottom_k=3, progress=False, log=lambda *a: None)
    torn = run.top_k_path("rif", "test")
    torn.write_bytes(torn.read_bytes()[:-40])                         # the end of the file never written
    train_idx = [str(i) for i in run.features("train").idx]
    fs = run.features("test")
    with fastapi_testclient.TestClient(create_app(run.path)) as c:
        assert "rif" not in c.get("/api/run").json()["methods"]["test"]
        got = c.get("/api/explanations/test/test_2", params={"methods": "gd,rif,nn-cos", "k": 3}).json()
    assert {m: got["methods"][m]["source"] for m in ("gd", "rif", "nn-cos")} == {"gd": "live", "rif": "live",
                                                                                 "nn-cos": "dense"}
    for m in ("gd", "rif"):
        want = get_method(m).fit(run.features("train"), run.final_layer()).score(fs.subset([2]))[0]
        assert [t["idx"] for t in got["methods"][m]["supporting"]] == [train_idx[j] for j in ranked(want, 3)]
        np.testing.assert_allclose([t["score"] for t in got["methods"][m]["supporting"]],
                                   [want[j] for j in ranked(want, 3)], rtol=1e-5)
    # gd's top-k stored for the first two rows only, and gd not live: the others get no ranking, not an error
    attribute_run(run, "gd", top_k=3, limit_test=2, progress=False, log=lambda *a: None)
    with fastapi_testclient.TestClient(create_app(run.path, live_methods=["if"])) as c:
        kept = c.get("/api/explanations/test/test_1", params={"methods": "gd", "k": 3}).json()["methods"]["gd"]
        r = c.get("/examples/test/test_2", params={"methods": "gd,if", "k": 3})
        gone = c.get("/api/explanations/test/test_2", params={"methods": "gd", "k": 3}).json()["methods"]["gd"]
    assert kept["source"] == "topk" and len(kept["supporting"]) == 3
    assert gone["source"] == "missing" and gone["supporting"] == []
    assert r.status_code == 200 and "not stored for this row, and not a live method here" in r.text
    with fastapi_testclient.TestClient(create_app(run.path, live_methods=["gd"])) as c:   # gd live: never short
        got = {k: c.get("/api/explanations/test/test_1", params={"methods": "gd", "k": k}).json()["methods"]["gd"]
               for k in (3, 5)}
    assert got[3]["source"] == "topk" and (got[5]["source"], len(got[5]["supporting"])) == ("live", 5)
    assert [t["idx"] for t in got[5]["supporting"][:3]] == [t["idx"] for t in got[3]["supporting"]]


def test_errors_are_404_for_what_is_missing_and_422_for_bad_input(client):
    cases = [("/api/explanations/test/test_1?methods=if-top", 404, "no method 'if-top' stored or live for split 'test'"),
             ("/api/explanations/dev/test_1", 404, "no split 'dev' in this run (it has train, test)"),
             ("/api/examples/test/nope", 404, "no row 'nope' in split 'test'"),
             ("/api/influence/train_1?split=nope", 404, "no split 'nope'"),
             ("/api/examples/test?gold=neutral", 422, "gold='neutral' is not a label of this run"),
             ("/api/examples/test?correct=maybe", 422, "correct='maybe': use yes or no"),
             ("/api/examples/test?heuristic=subsequence", 422, "this run reads single texts"),
             ("/api/examples/test?sort=length", 422, "sort='length'"),
             ("/api/explanations/test/test_1?k=0", 422, "greater than or equal to 1"),
             ("/examples/test/nope", 404, "no row &#39;nope&#39; in split &#39;test&#39;"),
             ("/examples?gold=neutral", 422, "is not a label of this run"),
             ("/train/train_1?k=abc", 422, "k: Input should be a valid integer")]
    for url, status, message in cases:
        r = client.get(url)
        assert r.status_code == status and message in r.text, (url, r.status_code, r.text)
    for body, message in [({"text": "  "}, "the text is empty"), ({"text": "good", "k": 500}, "less than or equal"),
                          ({"text": "good", "query": "a pair"}, "reads single texts: a hypothesis (query) does not apply"),
                          ({"text": "good", "methods": ["tracin"]}, "no method 'tracin' for live explanation"),
                          ({}, "Field required")]:
        r = client.post("/api/explain", json=body)
        assert r.status_code in (404, 422) and message in r.text, (body, r.text)
    assert client.post("/api/explain", json={"text": "good", "methods": ["tracin"]}).status_code == 404


def test_markup_in_texts_and_labels_is_escaped(client):
    pages = [client.get(u).text for u in ("/", "/examples?split=train", "/examples?split=test", "/train/train_3",
                                          "/train/train_4", "/examples/test/test_0",
                                          "/explain?text=%3Cscript%3Ewindow.__xss%3D9%3C/script%3E")]
    for page in pages:
        for raw in XSS_TEXTS + tuple(XSS_LABELS) + ("<script>window.__xss=9</script>",):
            for fragment in ("<script>window", "<img src", "<b onmouseover"):
                if fragment in raw:
                    assert fragment not in page
    everything = "".join(pages)
    assert html.escape(XSS_TEXTS[0], quote=False) in everything.replace("&#34;", '"').replace("&#39;", "'")
    assert "window.__xss" in everything                                   # shown, as text


def test_api_page_and_openapi_need_no_network(client):
    docs = client.get("/docs").text
    assert "/docs-assets/swagger-ui-bundle.js" in docs and "http" not in docs.split("<body>")[1].split("url:")[0]
    assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/api/run", "/api/examples/{split}", "/api/explanations/{split}/{idx}", "/api/influence/{idx}",
            "/api/explain"} <= set(spec["paths"])


def test_heuristic_of_pairs_and_pair_filters(tmp_path):
    assert heuristic("Hopefully the banker contacted the judge .", "The banker contacted the judge .") == "subsequence"
    assert heuristic("The lawyer and the tourist believed the artist .", "The tourist believed the lawyer .") \
        == "lexical overlap"
    assert heuristic("The doctors advised the actors .", "The actors danced .") == "partial overlap"
    run = make_run(tmp_path, kind="hans", n_train=30, n_test=20)
    examples = run.examples("test")
    with fastapi_testclient.TestClient(create_app(run.path)) as c:
        s = c.get("/api/run").json()      # a bag-of-words toy: its model cannot run here, the rest works
        assert "live explanation is off" in s["live_error"]
        r = c.post("/api/explain", json={"text": "w1 w2", "query": "w1"})
        assert r.status_code == 503 and "live explanation is off" in r.json()["detail"]
        rows = c.get("/api/examples/test", params={"min_overlap": 0.5, "limit": 500}).json()["rows"]
        assert [r["idx"] for r in rows] == [e.idx for e in examples if overlap_rate(e.document, e.query) >= 0.5]
        for h in ("subsequence", "lexical overlap", "partial overlap"):
            rows = c.get("/api/examples/test", params={"heuristic": h, "limit": 500}).json()["rows"]
            assert [r["idx"] for r in rows] == [e.idx for e in examples if heuristic(e.document, e.query) == h]
        page = c.get("/examples").text
        assert "Heuristic" in page and "hypothesis" in page
        assert c.get("/explain").status_code == 200 and "live explanation is off" in c.get("/explain").text
        assert c.get(f"/examples/test/{examples[0].idx}").status_code == 200   # no scores stored: says so


def test_pair_runs_take_a_hypothesis(tmp_path, tiny_encoder, toy_pairs):
    from instattr.models.head import HeadConfig
    from instattr.pipeline import TrainConfig, train_run
    run = train_run(TrainConfig(data=str(toy_pairs), encoder=tiny_encoder, head=HeadConfig(epochs=2, batch_size=8)),
                    tmp_path / "pairs", progress=False)
    attribute_run(run, "if", progress=False, log=lambda *a: None)
    with fastapi_testclient.TestClient(create_app(run.path, live_methods=["if", "gc"])) as c:
        r = c.post("/api/explain", json={"text": "the dog saw the cat", "query": "the cat saw the dog", "k": 2})
        assert r.status_code == 200 and r.json()["example"]["query"] == "the cat saw the dog"
        assert set(r.json()["methods"]) == {"if", "gc"}
        r = c.post("/api/explain", json={"text": "the dog saw the cat"})
        assert r.status_code == 422 and "sentence pairs: give a hypothesis (query) too" in r.json()["detail"]
        r = c.post("/api/explain", json={"text": "the dog saw the cat", "query": " "})
        assert r.status_code == 422 and r.json()["detail"] == "the hypothesis is empty"
        page = c.get("/explain").text
        assert 'name="query"' in page and "Hypothesis" in page
        assert "give a hypothesis too" in c.get("/explain", params={"text": "the dog"}).text


def test_cli_refuses_bad_ports_and_runs_with_one_line(serve_run, tmp_path, capsys):
    assert main(["serve", "--run", str(serve_run.path), "--port", "70000"]) == 2
    assert "--port must lie in 0..65535" in capsys.readouterr().err
    assert main(["serve", "--run", str(serve_run.path), "--threads", "0"]) == 2
    assert "--threads must be at least 1, got 0" in capsys.readouterr().err
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        assert main(["serve", "--run", str(serve_run.path), "--port", str(taken.getsockname()[1])]) == 2
        err = capsys.readouterr().err
        assert err.startswith("instattr: error: cannot listen on 127.0.0.1:") and err.count("\n") == 1
    finally:
        taken.close()
    assert main(["serve", "--run", str(tmp_path / "none"), "--port", "0"]) == 2
    assert "no such run directory" in capsys.readouterr().err
    moved = tmp_path / "moved"                      # its dataset is gone: no texts to show
    shutil.copytree(serve_run.path, moved)
    manifest = json.loads((moved / "run.json").read_text())
    manifest["data"]["root"] = str(tmp_path / "gone")
    (moved / "run.json").write_text(json.dumps(manifest))
    assert main(["serve", "--run", str(moved), "--port", "0"]) == 2
    assert capsys.readouterr().err == f"instattr: error: {tmp_path / 'gone'}: no such dataset folder\n"


def test_served_from_a_thread_prints_nothing_and_leaves_torch_as_it_was(serve_run, capsys, monkeypatch):
    from urllib.request import urlopen

    import torch

    from instattr.serve import running
    from instattr.serve.explorer import Explorer
    made = []
    monkeypatch.setattr(Explorer, "start", lambda self, start=Explorer.start: made.append(self) or start(self))
    before, threads = torch.get_num_threads(), set(threading.enumerate())
    with running(serve_run.path, live_methods=["if"]) as url:
        assert url.startswith("http://127.0.0.1:")
        body = json.loads(urlopen(url + "api/run", timeout=30).read())
        assert body["live_methods"] == ["if"]
        assert made[0].live.worker_threads == 1 and torch.get_num_threads() == before   # the worker's alone
    # the server's and the worker's threads ended (anyio's idle pool threads linger ~10 s on their own)
    left = {t for t in set(threading.enumerate()) - threads if not t.name.startswith("AnyIO worker thread")}
    assert left == set(), left
    assert capsys.readouterr().out == ""


# ---------------------------------------------------------------- on a network: token, Host, headers, limits
def test_a_token_guards_every_request_and_a_cookie_remembers_it(serve_run):
    """With a token, every page, API call and static file needs it: none or a wrong one gets 401
    and no data; ?token= on the URL works and sets a cookie the next requests carry; so does
    Authorization: Bearer."""
    with fastapi_testclient.TestClient(create_app(serve_run.path, token="s3cret-token")) as c:
        for path in ("/", "/api/run", "/api/examples/test", "/static/app.js", "/docs", "/openapi.json"):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Cookie": "instattr_token_80=wrong"},
                            {"Cookie": "instattr_token_8001=s3cret-token"}):     # another port's cookie
                r = c.get(path, headers=headers)
                assert r.status_code == 401 and "token is required" in r.text, (path, headers)
                assert "test_" not in r.text and XSS_LABELS[0] not in r.text
        assert c.get("/api/run?token=wrong").status_code == 401
        r = c.get("/api/run", headers={"Authorization": "Bearer s3cret-token"})
        assert r.status_code == 200 and r.json()["labels"] == XSS_LABELS and "set-cookie" not in r.headers
        r = c.get("/examples?split=test&token=s3cret-token&q=a+b", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/examples?split=test&q=a+b"   # out of the URL
        assert "instattr_token_80=s3cret-token" in r.headers["set-cookie"]
        assert "HttpOnly" in r.headers["set-cookie"] and "SameSite=Lax" in r.headers["set-cookie"]
        assert c.get(r.headers["location"]).status_code == 200
        assert c.get("/api/examples/test").status_code == 200          # the client keeps the cookie
        c.cookies.clear()
        odd = 'a="b; c; theme=x=y; instattr_token_80=s3cret-token; =z'   # one malformed cookie spoils no other
        assert c.get("/api/run", headers={"Cookie": odd}).status_code == 200
        from starlette.websockets import WebSocketDisconnect
        with pytest.raises(WebSocketDisconnect) as closed:     # only HTTP is served, token or not
            with c.websocket_connect("/api/run?token=s3cret-token"):
                pass
        assert closed.value.code == 1008
    with pytest.raises(ValueError, match="letters, digits"):
        create_app(serve_run.path, token="has space")


def test_what_another_sites_page_asks_is_refused(client):
    """Sec-Fetch-Site: cross-site (an <img>, a fetch, a form on another site) gets 403 and no work;
    a link followed to a page still opens it."""
    text = {"text": "the movie was good", "fragment": 1}
    for mode in ("no-cors", "cors"):
        r = client.get("/explain", params=text, headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": mode})
        assert r.status_code == 403 and "another site" in r.text
    r = client.post("/api/explain", json={"text": "good"}, headers={"Sec-Fetch-Site": "cross-site",
                                                                    "Sec-Fetch-Mode": "navigate"})
    assert r.status_code == 403
    assert client.get("/examples", headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}
                      ).status_code == 200
    assert client.get("/explain", params=text, headers={"Sec-Fetch-Site": "same-origin"}).status_code == 200


def test_the_host_header_must_name_this_machine_on_loopback(serve_run):
    """DNS rebinding: a page on evil.example resolving to 127.0.0.1 sends Host: evil.example."""
    from instattr.serve import guarded
    access = guarded("127.0.0.1")
    assert access["token"] is None and "localhost" in access["hosts"]
    with fastapi_testclient.TestClient(create_app(serve_run.path, **access), base_url="http://127.0.0.1:8000") as c:
        assert c.get("/api/run").status_code == 200
        for host in ("localhost:8000", "[::1]:8000", "127.0.0.1"):
            assert c.get("/api/run", headers={"Host": host}).status_code == 200, host
        r = c.get("/api/run", headers={"Host": "evil.example:8000"})
        assert r.status_code == 400 and "this machine only" in r.text and "labels" not in r.text
    off = guarded("0.0.0.0")
    assert off["hosts"] is None and len(off["token"]) >= 24 and guarded("0.0.0.0")["token"] != off["token"]
    assert guarded("0.0.0.0", token="mine")["token"] == "mine"
    assert "proxy.example" in guarded("127.0.0.1", allow_hosts=["proxy.example"])["hosts"]
    with pytest.raises(ValueError, match="letters, digits"):
        guarded("0.0.0.0", token="a token")


def test_security_headers_and_size_limits(client):
    for path in ("/", "/examples", "/api/run", "/static/app.js", "/docs", "/nope"):
        r = client.get(path)
        csp = r.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp and "'unsafe-inline'" not in csp, path
        assert "frame-ancestors 'none'" in csp and r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "no-referrer" and r.headers["x-frame-options"] == "DENY"
        assert "access-control-allow-origin" not in r.headers
    assert "<script>" not in client.get("/docs").text and "<style" not in client.get("/").text
    big = client.post("/api/explain", content=b'{"text": "' + b"a" * 70_000 + b'"}',
                      headers={"Content-Type": "application/json"})
    assert big.status_code == 413 and "over 65536 bytes" in big.text

    def chunks():                                    # no Content-Length: counted while it is read
        yield b'{"text": "'
        for _ in range(70):
            yield b"a" * 1000
        yield b'"}'
    streamed = client.post("/api/explain", content=chunks(), headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413 and "over 65536 bytes" in streamed.text
    assert "content-security-policy" in streamed.headers
    long = client.get("/explain", params={"text": "good " * 2500, "fragment": 1})
    assert long.status_code == 422 and "at most 10,000 are explained" in long.text
    assert client.post("/api/explain", json={"text": "x" * 10_001}).status_code == 422


def test_a_full_live_queue_answers_429(client, monkeypatch):
    import instattr.serve.live as live_mod
    monkeypatch.setattr(live_mod, "MAX_WAITING", 0)
    r = client.post("/api/explain", json={"text": "the movie was good"})
    assert r.status_code == 429 and "waiting already" in r.json()["detail"]

"""`instattr serve` in a real headless Chromium (Debian's package, driven by Playwright), the way a
person uses it: overview, filter the table, open a misclassified example, follow a supporter to its
training example, type a sentence and watch the explanation. Each step asserts on what is on the
screen and saves a screenshot under $INSTATTR_ARTIFACTS (default tests/artifacts/serve).

Texts and label names of the run are markup (`<script>`, `<img onerror>`): nothing may execute,
no dialog may open, no request may leave 127.0.0.1, and the Content-Security-Policy refuses nothing
the pages need (a refusal is a console error, which fails the test). A page on another origin
cannot read the API, and a server with a token answers 401 without it. With CI or
INSTATTR_REQUIRE_BROWSER set, a browser that cannot start fails the tests; elsewhere they are
skipped, saying why.
"""
import os
import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from conftest import XSS_LABELS, XSS_TEXTS

CHROMIUM = os.environ.get("INSTATTR_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
REQUIRED = bool(os.environ.get("CI") or os.environ.get("INSTATTR_REQUIRE_BROWSER"))


def unavailable(reason: str):
    if REQUIRED:
        pytest.fail(f"the browser tests must run here (CI or INSTATTR_REQUIRE_BROWSER is set): {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        unavailable(f"playwright is not installed ({e}); pip install -e '.[dev]'")
    if not os.access(CHROMIUM, os.X_OK):
        unavailable(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set INSTATTR_CHROMIUM)")
    pw = sync_playwright().start()
    try:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
    except Exception as e:  # noqa: BLE001 - reported as the reason
        pw.stop()
        unavailable(f"Chromium at {CHROMIUM} did not start: {str(e).splitlines()[0]}")
    yield b
    b.close()
    pw.stop()


@pytest.fixture(scope="module")
def server(serve_run):
    from instattr.serve import running
    with running(serve_run.path) as url:
        yield url


@pytest.fixture(scope="module")
def artifacts(request):
    folder = Path(os.environ.get("INSTATTR_ARTIFACTS") or Path(__file__).parent / "artifacts") / "serve"
    folder.mkdir(parents=True, exist_ok=True)
    with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
        print(f"\nscreenshots of the browser tests: {folder}")
    return folder


@pytest.fixture
def page(browser, server):
    """A page that records dialogs, script errors and every request that would leave the server."""
    yield from watched_page(browser, server)


def watched_page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    host = urlsplit(server).netloc
    page = context.new_page()
    page.incidents = []

    def route(r):
        if urlsplit(r.request.url).netloc == host:
            r.continue_()
        else:
            page.incidents.append(f"request to {r.request.url}")
            r.abort()

    context.route("**/*", route)
    page.on("dialog", lambda d: (page.incidents.append(f"dialog: {d.message}"), d.dismiss()))
    page.on("pageerror", lambda e: page.incidents.append(f"script error: {e}"))
    page.on("console", lambda m: m.type == "error" and page.incidents.append(f"console error: {m.text}"))
    page.set_default_timeout(30_000)
    yield page
    context.close()


def clean(page):
    """Nothing ran that the data carried, nothing left the machine, no script failed."""
    assert page.evaluate("typeof window.__xss") == "undefined"
    assert page.incidents == []


def test_a_person_explores_a_run(page, server, serve_run, artifacts):
    from playwright.sync_api import expect
    # 1. the overview: dataset, accuracy, stored methods, an evaluation beside the paper, its figures
    page.goto(server)
    expect(page.locator("h1")).to_contain_text("which training examples made the model predict this?")
    expect(page.get_by_text(f"{serve_run.metrics['test_accuracy']:.3f}")).to_be_visible()
    expect(page.get_by_role("heading", name="Do the methods agree?")).to_be_visible()
    expect(page.locator("table.headline")).to_contain_text("mean Spearman, nn-cos ~ gc")
    for name in ("nn-cos", "gc", "if", "rep"):
        expect(page.locator(".chip", has_text=re.compile(f"^{re.escape(name)}$")).first).to_be_visible()
    figure = page.locator(".evaluation img").first
    figure.scroll_into_view_if_needed()
    assert page.evaluate("img => img.complete && img.naturalWidth > 0", figure.element_handle())
    page.screenshot(path=artifacts / "1-overview.png", full_page=True)
    clean(page)

    # 2. the table: only misclassified examples, most confident first
    page.get_by_role("link", name="Examples", exact=True).click()
    expect(page.locator("#count")).to_contain_text(f"of {len(serve_run.features('test'))} examples")
    page.get_by_label("Correct").select_option("no")           # the form submits itself
    page.wait_for_url(re.compile(r"correct=no"))
    page.get_by_label("Sort").select_option("-confidence")
    page.wait_for_url(re.compile(r"sort=-confidence"))
    fs = serve_run.features("test")
    wrong = int((fs.pred != fs.label).sum())
    expect(page.locator("#count")).to_have_text(f"{wrong} of {len(fs)} examples")
    rows = page.locator("table.examples tbody tr")
    expect(rows).to_have_count(wrong)
    assert all(c == "no" for c in rows.locator("td:nth-child(6)").all_inner_texts())
    shown = [float(t.rstrip("%")) for t in rows.locator("td:nth-child(5)").all_inner_texts()]
    assert shown == sorted(shown, reverse=True)
    page.screenshot(path=artifacts / "2-examples-misclassified.png", full_page=True)
    clean(page)

    # 3. one misclassified example: prediction, probabilities, the methods side by side
    first = rows.first.locator("td a")
    idx = first.inner_text()
    first.click()
    expect(page.locator("h1")).to_have_text(f"test example {idx}")
    expect(page.locator(".verdict .bad")).to_have_text("misclassified")
    expect(page.locator("dl.probs meter")).to_have_count(2)
    expect(page.locator(".method h3")).to_have_text(["nn-cos", "gc", "if", "rep"])
    expect(page.locator(".method").first.locator("ol.supporting li")).to_have_count(5)
    expect(page.get_by_role("heading", name="Where the methods agree")).to_be_visible()
    page.screenshot(path=artifacts / "3-test-example.png", full_page=True)
    clean(page)

    # 4. follow the top supporter of the first method to its training example
    supporter = page.locator(".method").first.locator("ol.supporting li a").first
    text = supporter.locator(".text").inner_text()
    href = supporter.get_attribute("href")
    train_idx = href.rsplit("/", 1)[1]
    supporter.click()
    expect(page.locator("h1")).to_have_text(f"Training example {train_idx}")
    expect(page.locator("blockquote.subject .text")).to_have_text(text)
    expect(page.locator("#suspicion")).to_contain_text("Suspicion rank")
    expect(page.get_by_role("heading", name="Supports most").first).to_be_visible()
    # the test example it came from is among the predictions this training example supports most
    # by that method, or (beyond its top 5) at least a test prediction is listed
    expect(page.locator(".method").first.locator("ol.supports li").first).to_be_visible()
    page.screenshot(path=artifacts / "4-training-example.png", full_page=True)
    clean(page)

    # 5. type a sentence and watch the explanation appear, then change as the text changes
    page.get_by_role("link", name="Explain a text").click()
    box = page.get_by_label("Text")
    box.press_sequentially("the movie was really fun", delay=20)
    result = page.locator("#result section.live")
    expect(result.locator("blockquote")).to_have_text("the movie was really fun")
    expect(result.locator(".verdict")).to_contain_text("predicted")
    expect(result.locator(".method h3")).to_have_text(["nn-cos", "gc", "if", "rep"])
    expect(page.locator("#status")).to_contain_text("explained in")
    page.screenshot(path=artifacts / "5-explain.png", full_page=True)
    box.press_sequentially(" <img src=x onerror=\"window.__xss='typed'\">", delay=5)
    expect(result.locator("blockquote")).to_contain_text("<img src=x onerror")
    assert "text=the+movie" in page.url
    clean(page)


def test_markup_in_the_data_stays_text(page, server, artifacts):
    from playwright.sync_api import expect
    for path in ("/examples?split=train", "/train/train_3", "/train/train_4", "/examples/test/test_0"):
        page.goto(server + path.lstrip("/"))
        page.wait_for_load_state("load")
        clean(page)
    page.goto(server + "train/train_3")
    expect(page.locator("blockquote.subject .text")).to_have_text(XSS_TEXTS[0])
    expect(page.locator(".verdict .label").first).to_have_text(XSS_LABELS[1])
    page.goto(server + "examples?split=train&q=window.__xss")
    expect(page.locator("table.examples tbody tr")).to_have_count(2)
    page.screenshot(path=artifacts / "6-markup-as-text.png", full_page=True)
    clean(page)


def test_the_api_page_renders_offline(page, server, artifacts):
    from playwright.sync_api import expect
    page.goto(server + "docs")
    expect(page.locator(".opblock-summary-path", has_text="/api/explain")).to_be_visible()
    expect(page.locator(".opblock-summary-path", has_text="/api/explanations/{split}/{idx}")).to_be_visible()
    page.screenshot(path=artifacts / "7-api.png")
    clean(page)


def test_a_choice_made_while_the_script_loads_is_kept(page, server):
    """A person on a slow connection picks a filter before app.js has arrived: the choice still
    filters the table (the script is parse-blocking and delegates from `document`, so no control
    exists before its handler does). With a deferred script that attached on DOMContentLoaded,
    this choice was silently lost."""
    import time

    from playwright.sync_api import expect

    def slow(route):
        time.sleep(1.5)                  # the browser keeps parsing meanwhile; a deferred script would too
        route.continue_()
    page.route("**/static/app.js", slow)
    page.goto(server + "examples", wait_until="commit")
    page.get_by_label("Correct").select_option("no")
    page.wait_for_url(re.compile(r"correct=no"))
    expect(page.get_by_label("Correct")).to_have_value("no")
    clean(page)


def test_a_page_on_another_origin_cannot_read_the_api(browser, server):
    """A web page the user visits (another origin, here another port) asks the API for the run, with
    and without credentials: the browser refuses it the answer (no CORS header is ever sent)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from playwright.sync_api import expect
    evil = f"""<!doctype html><title>waiting</title><script>
      const probe = (opts) => fetch("{server}api/run", opts).then(r => r.text()).then(t => "read", e => "blocked");
      Promise.all([probe({{}}), probe({{credentials: "include"}})]).then(r => {{ document.title = r.join(" "); }});
    </script>""".encode()

    class Evil(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(evil)

        def log_message(self, *a):
            pass
    other = ThreadingHTTPServer(("127.0.0.1", 0), Evil)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(f"http://127.0.0.1:{other.server_address[1]}/")
        expect(page).to_have_title("blocked blocked", timeout=30_000)
    finally:
        context.close()
        other.shutdown()


def test_a_server_with_a_token_answers_401_without_it_and_remembers_it(browser, serve_run):
    from playwright.sync_api import expect

    from instattr.serve import running
    with running(serve_run.path, token="a-long-test-token") as url:
        context = browser.new_context()
        try:
            page = context.new_page()
            r = page.goto(url)
            assert r.status == 401 and "token is required" in page.content() and "test_" not in page.content()
            assert page.goto(url + "examples?token=wrong").status == 401
            page.goto(url + "?token=a-long-test-token")
            expect(page.locator("h1")).to_contain_text("which training examples made the model predict this?")
            page.goto(url + "explain")                                    # the cookie carries the token now
            page.get_by_label("Text").press_sequentially("the movie was fun", delay=10)
            expect(page.locator("#result section.live .verdict")).to_contain_text("predicted")
        finally:
            context.close()


@pytest.fixture(scope="module")
def lm_server(tmp_path_factory):
    """A language-model run of a tiny GPT-2 with gd and bm25 stored, a poisoned training row that is
    markup, served with gd, if and bm25 live."""
    from instattr.cli import main
    from instattr.serve import running

    from _lm import TEST, TRAIN, save_gpt2, write_rows
    root = tmp_path_factory.mktemp("serve-lm")
    save_gpt2(root / "gpt2")
    (root / "data").mkdir()
    write_rows(root / "data" / "train.jsonl", TRAIN + [{"idx": "x", "poisoned": True, "text": XSS_TEXTS[0] + " actor"}])
    write_rows(root / "data" / "test.jsonl", TEST)
    assert main(["--quiet", "import", "--model", str(root / "gpt2"), "--data", str(root / "data"),
                 "--out", str(root / "run")]) == 0
    assert main(["--quiet", "attribute", "--run", str(root / "run"), "--methods", "gd,bm25"]) == 0
    with running(root / "run", live_methods=["gd", "if", "bm25"]) as url:
        yield url


@pytest.fixture
def lm_page(browser, lm_server):
    yield from watched_page(browser, lm_server)


def test_a_person_explores_a_language_model_run(lm_page, lm_server, artifacts):
    from playwright.sync_api import expect
    page = lm_page
    # 1. the queries, filtered by a word
    page.goto(lm_server)
    expect(page.locator("h1")).to_have_text("Which training documents made the model say this?")
    expect(page.locator("table.examples tbody tr")).to_have_count(3)
    page.get_by_label("Search the prompts and completions").fill("actor")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_url(re.compile(r"q=actor"))
    expect(page.locator("table.examples tbody tr")).to_have_count(1)
    page.screenshot(path=artifacts / "lm-1-queries.png", full_page=True)
    clean(page)

    # 2. a query: its completion shaded token by token, stored and live rankings with matching words marked
    page.get_by_role("link", name="2", exact=True).click()
    expect(page.locator("h1")).to_have_text("Query 2")
    tokens = page.locator(".completion .tok")
    expect(tokens).to_have_count(2)                          # "really", "great"
    assert all(re.fullmatch(r"tok [pn][1-4]", c) for c in tokens.evaluate_all("ts => ts.map(t => t.className)"))
    expect(page.locator(".method h3")).to_have_text(["gd", "if", "bm25"])
    expect(page.locator(".method").nth(0).locator(".note").first).to_have_text("stored scores")
    expect(page.locator(".method").nth(1).locator(".note").first).to_have_text("computed live")
    bm25_top = page.locator(".method").nth(2).locator("li.card").first
    expect(bm25_top).to_contain_text("[d3]")                 # "the actor was really great": every word matches
    expect(bm25_top.locator("mark")).to_have_text(["actor", "really", "great"])
    page.screenshot(path=artifacts / "lm-2-query.png", full_page=True)
    clean(page)

    # 3. a supporting row's page: the queries it supports
    bm25_top.get_by_role("link").click()
    expect(page.locator("h1")).to_have_text("Training row d3")
    expect(page.locator(".method h3")).to_have_text(["gd", "bm25"])
    clean(page)

    # 4. a new prompt, completed greedily and explained live; the markup row stays text
    page.get_by_role("link", name="Explain a prompt").click()
    page.get_by_label("Prompt").fill("the actor")
    page.get_by_role("button", name="Explain").click()
    expect(page.locator("section.live h2").first).to_have_text("Completion")
    expect(page.locator("section.live .completion .prompt-text")).to_have_text("the actor")
    assert page.locator("section.live .completion .tok").count() >= 1
    expect(page.locator("section.live .method h3")).to_have_text(["gd", "if", "bm25"])
    page.screenshot(path=artifacts / "lm-3-explain.png", full_page=True)
    page.goto(lm_server + "train/x")
    expect(page.locator("blockquote .text")).to_have_text(XSS_TEXTS[0] + " actor")
    clean(page)

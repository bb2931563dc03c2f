"""Page load times of `instattr serve` in a real browser, and a screenshot of every page.

    python bench/serve_pages.py runs/sst2 --out /tmp/serve-pages [--repeats 5] [--port 8766]

Starts `instattr serve` on the run in a subprocess, opens each page in headless Chromium (Debian's
/usr/bin/chromium, or $INSTATTR_CHROMIUM) and prints the median and worst navigation time until
the page's `load` event (HTML, CSS, script and images), then the time from typing the last key in
the explain box to the explanation on screen. Screenshots of the viewport (1280 x 900) go to --out.
"""
import argparse
import json
import os
import statistics
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

from instattr.serve.load import served

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--out", required=True)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--port", type=int, default=8766)
    a = ap.parse_args()
    from playwright.sync_api import sync_playwright
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    base = f"http://127.0.0.1:{a.port}/"
    with served(a.run, a.port):
        def api(path):
            with urllib.request.urlopen(base + path, timeout=60) as r:
                return json.loads(r.read())

        run = api("api/run")
        split = run["eval_split"]
        wrong = api(f"api/examples/{split}?correct=no&sort=-confidence&limit=1")["rows"][0]
        supporter = api(f"api/explanations/{split}/{quote(wrong['idx'])}?k=1")
        first = next(iter(supporter["methods"].values()))["supporting"][0]["idx"]
        pages = {"overview": "", "examples": f"examples?split={split}",
                 "examples-misclassified": f"examples?split={split}&correct=no&sort=-confidence",
                 "test-example": f"examples/{split}/{quote(wrong['idx'])}", "training-example": f"train/{quote(first)}",
                 "explain": "explain?text=" + quote("a gorgeous , witty , seductive movie")
                            + ("&query=" + quote("a movie") if run["is_pair"] else "")}
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=os.environ.get("INSTATTR_CHROMIUM", "/usr/bin/chromium"),
                                         args=ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(base)             # warm: first connection, static files cached as a returning visitor's
            print(f"page load until the load event, median / worst of {a.repeats} (ms):")
            for name, path in pages.items():
                times = []
                for _ in range(a.repeats):
                    page.goto(base + path, wait_until="load")
                    times.append(page.evaluate("performance.getEntriesByType('navigation')[0].duration"))
                page.screenshot(path=out / f"{name}.png")
                print(f"  {name:<24} {statistics.median(times):7.1f} {max(times):7.1f}")
            page.goto(base + "explain")
            box = page.locator("#text")
            typed, in_page = [], []
            for text in ("the acting is wooden and the plot is thin", "an utterly charming film",
                         "not as bad as i feared", "the best movie of the year", "a dull , lifeless mess"):
                box.fill(text[:-1])
                page.locator("#result section.live blockquote", has_text=text[:-1]).wait_for()
                t = time.perf_counter()
                box.press(text[-1])                     # the last key: the page explains after a 300 ms pause
                page.locator("#result section.live blockquote", has_text=text).wait_for()
                typed.append(1000 * (time.perf_counter() - t))
                in_page.append(float(page.locator("#status").inner_text().split()[2]))   # "explained in N ms"
            print(f"explain page: last key to the new explanation on screen: median "
                  f"{statistics.median(typed):.0f} ms, worst {max(typed):.0f} ms (includes the 300 ms typing pause); "
                  f"request to explanation on screen, as the page measures it: median "
                  f"{statistics.median(in_page):.0f} ms, worst {max(in_page):.0f} ms")
            browser.close()
        print(f"screenshots: {out}")


if __name__ == "__main__":
    main()

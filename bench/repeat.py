"""Run the timing-dependent test files many times in a row, optionally beside CPU-burning processes,
and count the passes: a flaky test shows up here before it fails CI by chance.

    python bench/repeat.py                                   # each default file 10 times
    python bench/repeat.py tests/test_serve_browser.py --runs 20
    python bench/repeat.py tests/test_serve_browser.py --runs 5 --burn 2   # two busy cores beside it

Each run is a fresh `python -m pytest -q FILE` with CI=true and INSTATTR_REQUIRE_BROWSER=1 (a browser
that cannot start fails, it is not skipped). A file stops at its first failure unless --keep-going;
the failing run's last lines are printed. Exit status 1 when any run failed.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMING_DEPENDENT = ["tests/test_serve_browser.py", "tests/test_serve_load.py", "tests/test_serve_app.py",
                    "tests/test_ray.py", "tests/test_hardening.py"]


def burn(stop) -> None:
    """Keep one core busy until ``stop`` is set."""
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x = (x * 31 + 7) % 1_000_003


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", default=TIMING_DEPENDENT)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--burn", type=int, default=0, help="CPU-burning processes beside the tests")
    ap.add_argument("--keep-going", action="store_true", help="run every repeat even after a failure")
    args = ap.parse_args()
    stop = mp.Event()
    burners = [mp.Process(target=burn, args=(stop,), daemon=True) for _ in range(args.burn)]
    for b in burners:
        b.start()
    env = {**os.environ, "CI": "true", "INSTATTR_REQUIRE_BROWSER": "1", "HF_HUB_OFFLINE": "1"}
    failed = False
    print(f"{'file':<32} {'passed':>7} {'runs':>5} {'mean s':>7} {'max s':>7}  (burners: {args.burn})")
    try:
        for f in args.files:
            times, passed = [], 0
            for i in range(args.runs):
                t = time.perf_counter()
                p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f], cwd=ROOT,
                                   env=env, capture_output=True, text=True)
                times.append(time.perf_counter() - t)
                if p.returncode == 0:
                    passed += 1
                    continue
                failed = True
                tail = "\n".join((p.stdout + p.stderr).splitlines()[-15:])
                print(f"{f}: run {i + 1} failed (exit {p.returncode}):\n{tail}", flush=True)
                if not args.keep_going:
                    break
            print(f"{Path(f).name:<32} {passed:>7} {len(times):>5} {sum(times) / len(times):>7.1f} {max(times):>7.1f}",
                  flush=True)
    finally:
        stop.set()
        for b in burners:
            b.join()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

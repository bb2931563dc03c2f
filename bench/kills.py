"""Kill anywhere: every writing command killed with SIGKILL at many seeded moments (tests/_kills.py).

    python bench/kills.py [--per-command 20] [--commands train,import,...] [--seed 0] [--work DIR]

For each command (train, import, attribute dense, attribute top-k, index build, evaluate retrain,
report; on a language-model run import, attribute dense and top-k, evaluate lds) on tiny models: an uninterrupted reference run, then ``--per-command`` trials, each killed
at a moment drawn in one of that many equal strata of the reference's duration. After each kill
the library's readers look at what is on disk (nothing they accept may differ from the reference),
then the same command runs again (its result must equal the reference bit for bit). Prints one
line per trial and a summary: trials, kills that landed before the command finished, torn reads,
reruns that differ; exit status 1 if any torn read or difference.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> int:
    from _kills import CASES, run_cases
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-command", type=int, default=20)
    ap.add_argument("--commands", default=",".join(c.name for c in CASES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None, help="scratch folder (default: a new temporary one, removed after)")
    a = ap.parse_args()
    cases = [c for c in CASES if c.name in a.commands.split(",")]
    t = time.perf_counter()
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="instattr-kills-"))
    try:
        outcomes = run_cases(cases, a.per_command, work, a.seed)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    torn = [o for o in outcomes if o.torn_read]
    differ = [o for o in outcomes if not o.final_equal]
    print(f"\n{len(cases)} commands x {a.per_command} moments = {len(outcomes)} trials in "
          f"{time.perf_counter() - t:.0f} s; killed before finishing: {sum(o.killed for o in outcomes)}; "
          f"torn reads: {len(torn)}; reruns differing from the uninterrupted run: {len(differ)}")
    return 1 if torn or differ else 0


if __name__ == "__main__":
    sys.exit(main())

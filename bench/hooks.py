"""Layered influence through hooks in the model's own forward pass, against the earlier re-assembled
blocks, on the same imported checkpoint: time, agreement, and the eleven last-layer methods.

    python examples/finetune_sst2.py --out models/minilm-sst2
    python bench/hooks.py models/minilm-sst2 --baseline 4990a76

The baseline commit is checked out as a git worktree and run in its own process with its own
``src`` on the path; this checkout runs the same steps in another process, one after the other
(never side by side: they would share the cores). Each process imports the checkpoint on SST-2
(timed: the baseline also encodes every split with the sbert-* sentence encoder, this checkout does
not), attributes the eleven paper methods, then ``if-top`` (defaults: 3 blocks, k = 32, damping
0.1; timed alone). Printed: the import times, the if-top times and their ratio, the mean and lowest
per-row Spearman between the two if-top score matrices, and the largest difference of each
paper method's scores relative to its largest score. Two sketches with other random projections
(the streams are seeded by module name, and the names differ) agree only as well as any two seeds
do: ``--seed-noise`` prints that floor. ``--exact-rows`` compares the exact, unprojected if-top
over the top block on a sample instead, where nothing is random.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STEPS = r'''
import json, sys, time
import numpy as np
from instattr.attribution import attribute_run, fit_method
from instattr.pipeline import ImportConfig, import_run
model, data, out, exact_rows = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
t = time.perf_counter()
run = import_run(ImportConfig(model=model, data=data), out, overwrite=True, progress=False)
t_import = time.perf_counter() - t
t = time.perf_counter()
attribute_run(run, "paper", progress=False, log=lambda *a: None)
t_paper = time.perf_counter() - t
t = time.perf_counter()
attribute_run(run, "if-top", progress=False, log=lambda *a: None)
t_top = time.perf_counter() - t
if exact_rows:         # exact (unprojected) if-top over the top block, on a sample: no sketch noise
    train, test = run.features("train"), run.features("test")
    rows = np.sort(np.random.default_rng(0).choice(len(train), exact_rows, replace=False))
    m = fit_method(run, "if-top", train.subset(rows), layers=1, proj_dim=None, progress=False)
    np.save(out + "/exact-if-top.npy", m.score(test.subset(np.arange(20))))
print(json.dumps({"import_s": t_import, "paper_s": t_paper, "if_top_s": t_top}))
'''


def run_steps(src: Path, model: str, data: str, out: Path, exact_rows: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1", "INSTATTR_CACHE": "off"}   # both encode
    p = subprocess.run([sys.executable, "-c", STEPS, model, data, str(out), str(exact_rows)], env=env,
                       capture_output=True, text=True, cwd=str(src.parent))
    if p.returncode != 0:
        raise SystemExit(f"{src}: failed\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata
    ra, rb = rankdata(a, axis=1), rankdata(b, axis=1)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    return (ra * rb).sum(1) / np.sqrt((ra ** 2).sum(1) * (rb ** 2).sum(1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a sequence classifier folder (examples/finetune_sst2.py)")
    ap.add_argument("--baseline", required=True, help="the commit to compare with (re-assembled blocks)")
    ap.add_argument("--data", default="sst2")
    ap.add_argument("--work", default="/tmp/instattr-hooks", help="worktree and runs go here")
    ap.add_argument("--exact-rows", type=int, default=200, help="training rows of the exact (unprojected) if-top "
                    "over the top block, against 20 test rows (0: skip)")
    ap.add_argument("--seed-noise", action="store_true", help="also score this checkout's if-top with another "
                    "projection seed: how well two sketches of the same influence agree")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    tree = work / "baseline"
    if not tree.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), a.baseline], check=True,
                       capture_output=True)
    model = str(Path(a.model).resolve())
    base = run_steps(tree / "src", model, a.data, work / "run-baseline", a.exact_rows)
    print(f"baseline {a.baseline}: {json.dumps(base)}", flush=True)
    ours = run_steps(ROOT / "src", model, a.data, work / "run-hooks", a.exact_rows)
    print(f"this checkout: {json.dumps(ours)}", flush=True)

    def scores(run, method):
        return np.load(work / run / "scores" / f"{method}-test.npy")

    def encoded_at_import(run):     # the baseline kept them in features/*.npz, this checkout in sbert/ when asked
        with np.load(work / run / "features" / "train.npz") as z:
            return "encoder" in z.files
    base["sbert_at_import"], ours["sbert_at_import"] = encoded_at_import("run-baseline"), encoded_at_import("run-hooks")
    rho = spearman_rows(scores("run-baseline", "if-top"), scores("run-hooks", "if-top"))
    print(f"import: baseline {base['import_s']:.1f} s (sentence encoder run: {base['sbert_at_import']}), "
          f"this checkout {ours['import_s']:.1f} s (sentence encoder run: {ours['sbert_at_import']})")
    print(f"if-top on every test x training row: baseline {base['if_top_s']:.1f} s, hooks {ours['if_top_s']:.1f} s, "
          f"ratio {ours['if_top_s'] / base['if_top_s']:.2f} (at most 1.5 asked)")
    print(f"if-top row Spearman, hooks ~ baseline: mean {rho.mean():.4f}, lowest {rho.min():.4f} over {len(rho)} rows "
          "(at least 0.99 asked)")
    if a.exact_rows:
        exact = spearman_rows(np.load(work / "run-baseline" / "exact-if-top.npy"),
                              np.load(work / "run-hooks" / "exact-if-top.npy"))
        print(f"exact if-top over the top block ({a.exact_rows} training rows, 20 test rows; the baseline also "
              f"tracks its two LayerNorms): row Spearman mean {exact.mean():.4f}, lowest {exact.min():.4f}")
    if a.seed_noise:
        sys.path.insert(0, str(ROOT / "src"))
        from instattr.attribution import fit_method
        from instattr.store import Run
        run = Run.load(work / "run-hooks")
        other = fit_method(run, "if-top", seed=1, progress=False).score(run.features("test"))
        noise = spearman_rows(scores("run-hooks", "if-top"), other)
        print(f"if-top seed 0 ~ seed 1 (this checkout): mean {noise.mean():.4f}, lowest {noise.min():.4f}: the "
              "agreement of two sketches of the same influence")
    from instattr.methods import METHOD_NAMES
    worst = {m: float(np.abs(scores("run-baseline", m) - scores("run-hooks", m)).max()
                      / max(np.abs(scores("run-baseline", m)).max(), 1e-30)) for m in METHOD_NAMES}
    print("paper methods, largest |difference| / largest |score|: "
          + ", ".join(f"{m} {v:.1e}" for m, v in worst.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

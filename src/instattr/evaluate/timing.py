"""Wall-clock cost (paper section 4, "Computational Complexity").

For each method: fit once on the full training set, then score a seeded sample of test examples
(repeated until at least ``min_seconds`` have passed, so fast methods are not timed at clock
resolution). Reports seconds per test example (scoring; the fit is a one-off reported beside it),
next to the paper's figures: IF over the top five BERT layers ~300 s per example on a 2015 GPU,
linear IF < 0.01 s, similarity < 0.0001 s.
"""
from __future__ import annotations

import os
import platform
import time
from typing import Dict, Optional

import numpy as np
import torch

from ..store import Run
from .common import Ranker, md_table, method_list, new_figure, sample_rows, save, save_figure
from .paper import TIMING_IF_TOP5_SECONDS, timing_bound
from .registry import evaluation


def time_method(scorer: Ranker, method: str, test, min_seconds: float = 0.2, max_repeats: int = 20) -> Dict[str, float]:
    """{'fit': seconds, 'per_example': scoring seconds per test example} for one method."""
    t0 = time.perf_counter()
    att = scorer.attributor(method)
    fit = time.perf_counter() - t0
    reps, start = 0, time.perf_counter()
    while True:
        att.score(test)
        reps += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds or reps >= max_repeats:
            break
    return {"fit": fit, "per_example": elapsed / (reps * max(len(test), 1))}


def _sci(v: Optional[float]) -> str:
    return "—" if v is None else f"{v:.2e}"


def markdown(result: dict) -> str:
    rows = [[m, _sci(s), _sci(result["fit_seconds"][m]), _sci(result["stored_seconds_per_example"].get(m)),
             ("< " + f"{timing_bound(m):g}") if timing_bound(m) is not None else "—"]
            for m, s in result["methods"].items()]
    reused = set(result.get("stored_reused", []))
    rows += [[m, "—", "—", _sci(result["stored_seconds_per_example"].get(m))
              + (" (training gradients reused from another method)" if m in reused else ""), "—"]
             for m in result.get("stored_only", [])]
    rows.append(["if, top-5 BERT layers (paper only)", "—", "—", "—", f"~{TIMING_IF_TOP5_SECONDS:g} (GPU)"])
    steps = result.get("evaluation_seconds") or {}
    return ("# Time per test example (paper section 4)\n\nScoring one test example against all "
            f"{result['n_train']} training examples, averaged over {result['n_test']} test examples on "
            f"{result['device']}; fit = one-off cost (Hessian, refit) on the training set. The paper's bounds "
            "are for a Maxwell Titan GPU (2015) on SST-2.\n\n"
            + md_table(["method", "ours s/example", "ours fit s", "attribute step s/example", "paper s/example"],
                       rows)
            + ("\nWall-clock seconds of the evaluations that recorded theirs (retraining included):\n\n"
               + md_table(["evaluation", "seconds", "of which retraining"],
                          [[n, f"{v['total']:.1f}", f"{v['retrain']:.1f}" if v.get("retrain") is not None else "—"]
                           for n, v in steps.items()]) if steps else ""))


def evaluation_seconds(run: Run) -> Dict[str, dict]:
    """{evaluation: {"total", "retrain"}} from the saved results that record their ``seconds``
    (mislabel, lds), in the report's order."""
    from .registry import evaluations
    out = {}
    for e in evaluations():
        path = run.result_path(e.name)
        if e.name == "timing" or not path.exists():
            continue
        sec = run.result(e.name).get("seconds")
        if isinstance(sec, dict) and sec.get("total") is not None:
            retrain = sum(v for k, v in sec.items() if k.startswith("retrain") and isinstance(v, (int, float)))
            out[e.name] = {"total": float(sec["total"]), "retrain": retrain if retrain else None}
    return out


def figure(run: Run, result: dict) -> str:
    names = list(result["methods"])
    extra = result.get("stored_only", [])
    fig = new_figure(1.5 + 0.5 * (len(names) + len(extra)), 3.5)
    ax = fig.subplots()
    ax.bar(names, [max(result["methods"][m], 1e-9) for m in names])
    if extra:
        ax.bar(extra, [result["stored_seconds_per_example"][m] for m in extra], color="C3",
               label="attribute step (layered methods)")
        ax.axhline(TIMING_IF_TOP5_SECONDS, ls="-.", color="C3", label="paper: IF top-5 layers, GPU")
    ax.axhline(1e-2, ls="--", color="C1", label="paper: linear IF < 0.01 s")
    ax.axhline(1e-4, ls=":", color="C2", label="paper: similarity < 0.0001 s")
    ax.set_yscale("log")
    ax.set_ylabel("seconds per test example")
    ax.tick_params(axis="x", rotation=45)
    ax.legend(fontsize=8)
    return save_figure(run, "timing", fig)


@evaluation("timing", 90, "How long does it take?",
            "Seconds per test example for each method, beside the paper's figures.", flags=("--n-test",))
def run_timing(run: Run, methods=None, seed: int = 0, n_test: int = 100, split: Optional[str] = None,
               min_seconds: float = 0.2) -> dict:
    """Seconds per test example per method; writes results/timing.* and a log-scale bar chart."""
    names = method_list(methods)
    scorer = Ranker(run, split, use_stored=False)
    # without --methods, stored layered methods (if-top, ...) are not refitted here (minutes each):
    # their attribute-step time is read
    extras = [m for m in method_list(methods, run, scorer.split) if m not in names]
    test = run.features(scorer.split)
    sub = test.subset(sample_rows(len(test), n_test, np.random.default_rng(seed)))
    times = {m: time_method(scorer, m, sub, min_seconds) for m in names}
    stored, reused = {}, []
    for m in names + extras:
        if run.has_scores(m, scorer.split):
            info = run.score_info(m, scorer.split)
            if info.get("seconds") is not None and info.get("test_idx"):
                stored[m] = float(info["seconds"]) / len(info["test_idx"])
                if info.get("diagnostics", {}).get("train_gradients_reused"):
                    reused.append(m)
    result = {"methods": {m: t["per_example"] for m, t in times.items()},
              "fit_seconds": {m: t["fit"] for m, t in times.items()},
              "stored_seconds_per_example": stored, "stored_only": [m for m in extras if m in stored],
              "stored_reused": reused, "evaluation_seconds": evaluation_seconds(run),
              "n_test": len(sub), "n_train": len(scorer.train),
              "seed": seed, "split": scorer.split,
              "device": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
                        f"{os.cpu_count()} CPUs",
              "paper": {"if_top5_gpu": TIMING_IF_TOP5_SECONDS, "if_linear_max": timing_bound("if"),
                        "similarity_max": timing_bound("nn-euc")}}
    result["figures"] = [figure(run, result)]
    return save(run, "timing", result, markdown(result))

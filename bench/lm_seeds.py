"""How much a language model's attribution depends on the sketch's random seed.

    python bench/lm_seeds.py models/tiny-lm [--seeds 3] [--configs "gd;if;if ekfac 64;if ekfac 64 empirical"]

Each configuration (a method, then optionally ``ekfac K`` for ``--ihvp ekfac --proj-dim K`` and
``empirical`` for ``--fisher empirical``; otherwise instattr's defaults: a Khatri-Rao sketch of
32 x 32 per module, the projected Gauss-Newton, the true Fisher) is fitted once per seed (the seed
draws the sketch and, for if, the Monte Carlo tokens) on the model's training documents and scores
its fact queries (test rows with a ``source``). Printed per configuration: the fit and scoring time
of one seed, the mean over seed pairs of the per-query Spearman correlation of the full score rows
and of the top-10 overlap (|A and B| / 10), and each seed's fact recall@10 and MRR. An exact
method would give 1.000 agreement; what falls short is the sketch's (and the draws') noise.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np


def read_jsonl(path: Path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def parse(config: str) -> dict:
    """``"if ekfac 64 empirical"`` -> LMExplainer options."""
    words = config.split()
    if not words:
        raise SystemExit("--configs: an empty configuration")
    opts = {"methods": [words[0]]}
    rest = words[1:]
    if rest[:1] == ["ekfac"]:
        opts["ihvp"] = "ekfac"
        rest = rest[1:]
        if rest and rest[0].isdigit():
            opts["proj_dim"] = int(rest[0])
            rest = rest[1:]
    if rest[:1] == ["empirical"]:
        opts["fisher"] = "empirical"
        rest = rest[1:]
    if rest:
        raise SystemExit(f"--configs: {config!r}: cannot read {' '.join(rest)!r} (method [ekfac [K]] [empirical])")
    return opts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a causal LM folder with data/train.jsonl and data/test.jsonl "
                    "(examples/train_tiny_lm.py)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--configs", default="gd;if;if ekfac 64;if ekfac 64 empirical",
                    help="semicolon-separated: method [ekfac [K]] [empirical]")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    if a.seeds < 2:
        ap.error("--seeds must be at least 2 (agreement is between seeds)")
    configs = [c.strip() for c in a.configs.split(";") if c.strip()]
    options = [parse(c) for c in configs]
    import torch
    from scipy.stats import spearmanr
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from instattr.evaluate.language import ranks_of
    from instattr.lm import LMExplainer
    torch.set_num_threads(a.threads)
    hf_logging.disable_progress_bar()
    folder = Path(a.model)
    train, test = read_jsonl(folder / "data" / "train.jsonl"), read_jsonl(folder / "data" / "test.jsonl")
    queries = [{"prompt": q["prompt"], "completion": q["completion"]} for q in test if "source" in q]
    position = {str(r["idx"]): i for i, r in enumerate(train)}
    sources = np.array([position[str(q["source"])] for q in test if "source" in q])
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    print(f"{folder}: {len(train)} training documents, {len(queries)} fact queries, seeds 0..{a.seeds - 1}, "
          f"{a.threads} torch threads\n")
    print("| configuration | s per seed | row Spearman | top-10 overlap | recall@10 per seed | MRR per seed |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, opts in zip(configs, options):
        scores, seconds = [], []
        for seed in range(a.seeds):
            t = time.perf_counter()
            ex = LMExplainer(model, tok, train, seed=seed, **opts)
            scores.append(ex.scores(queries)[opts["methods"][0]])
            seconds.append(time.perf_counter() - t)
        rho, overlap = [], []
        for x, y in itertools.combinations(scores, 2):
            rho.append(np.mean([spearmanr(r, s)[0] for r, s in zip(x, y)]))
            top = [np.argsort(-m, axis=1, kind="stable")[:, :10] for m in (x, y)]
            overlap.append(np.mean([len(set(p) & set(q)) / 10 for p, q in zip(*top)]))
        ranks = [ranks_of(s, sources) for s in scores]
        print(f"| {name} | {np.mean(seconds):.1f} | {np.mean(rho):.3f} | {np.mean(overlap):.3f} | "
              f"{' '.join(f'{np.mean(r <= 10):.3f}' for r in ranks)} | "
              f"{' '.join(f'{np.mean(1.0 / r):.3f}' for r in ranks)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

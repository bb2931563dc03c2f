"""The trainer of many heads against its FLOP floor, and against the trainer it replaced.

    python bench/trainer.py [RUN] [--heads 64] [--epochs 1] [--old-heads 16] [--repeat 2]
    python bench/trainer.py runs/sst2 --heads 1200 --epochs 3 --old-heads 64   # the issue's case

RUN (a head-mode run directory) gives the training input, labels and head configuration; without
it a random SST-2-sized problem is used (6,920 x 384 input, 384-wide pooler, 2 classes, batch 16).
Each head gets its own random keep-mask over half the rows (as LDS trains them), so the masked
mean is exercised.

The floor: the arithmetic a step cannot avoid, per head, with B rows, d_in inputs, d pooler
units and C classes: the pooler's forward (2 B d_in d) and its weight gradient (2 B d_in d), the
final layer's forward, weight gradient and back-propagation into the pooler (3 x 2 B d C). The
input needs no gradient. That count times heads times steps, at this machine's float32 GEMM
speed -- measured here, in this process, as the best of five (B x d_in) x (d_in x 8d) products,
the shape of a trained group's pooler forward -- is the floor in seconds.

The old trainer (tests/_reference_trainer.py: autograd over all heads at once, torch's fused Adam)
is timed on ``--old-heads`` heads and scaled linearly to ``--heads`` (its per-head cost is flat in
the number of heads; 0 skips it). Before timing, both are checked to train the same heads.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from instattr.models.head import HeadConfig, group_size, train_heads

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _reference_trainer import old_train_heads  # noqa: E402


def gemm_gflops(b: int, d_in: int, width: int, repeat: int = 5) -> float:
    """Best-of-``repeat`` float32 GFLOP/s of a (b x d_in) x (d_in x width) product (timed over
    enough products to last about 0.2 s)."""
    a, w = torch.randn(b, d_in), torch.randn(width, d_in)
    out = torch.empty(b, width)
    flops = 2.0 * b * d_in * width
    reps = max(1, int(2e9 / flops) // 10)
    best = 0.0
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, w.t(), out=out)
        best = max(best, reps * flops / (time.perf_counter() - t) / 1e9)
    return best


def step_flops(b: int, d_in: int, d: int, c: int) -> float:
    """Unavoidable FLOPs of one head's training step (see the module docstring)."""
    return 4.0 * b * d_in * d + 6.0 * b * d * c


def problem(run_path, n_heads: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    if run_path:
        from instattr.evaluate.common import head_config, head_input
        from instattr.store import Run
        run = Run.load(run_path)
        x, y, cfg = head_input(run, "train"), run.features("train").label, head_config(run)
        c = run.features("train").n_classes
        cfg = HeadConfig(**{**cfg.to_dict(), "hidden": cfg.hidden or run.final_layer().w.shape[1]})
    else:
        x = rng.standard_normal((6920, 384)).astype(np.float32)
        y, c = rng.integers(0, 2, 6920), 2
        cfg = HeadConfig(hidden=384)
    masks = rng.random((n_heads, len(x))) < 0.5
    return np.ascontiguousarray(x, dtype=np.float32), np.asarray(y), c, cfg, masks


def best_time(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", nargs="?", help="a head-mode run (default: a random SST-2-sized problem)")
    ap.add_argument("--heads", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--old-heads", type=int, default=16, help="heads the old trainer is timed on (0: skip it)")
    ap.add_argument("--group", type=int, help="heads per group (default: the trainer's own choice)")
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args()
    x, y, c, cfg, masks = problem(a.run, max(a.heads, a.old_heads))
    cfg = HeadConfig(**{**cfg.to_dict(), "epochs": a.epochs})
    n, d_in = x.shape
    d = cfg.hidden or d_in
    steps = cfg.epochs * -(-n // cfg.batch_size)
    group = a.group or group_size(d_in, d, c)

    # the same heads, to float32 tolerance (Adam's first steps amplify rounding to about lr)
    k = min(4, a.heads)
    new = train_heads(x[:512], y[:512], c, cfg, masks[:k, :512], group=a.group).params
    old = old_train_heads(x[:512], y[:512], c, cfg, masks[:k, :512])
    diff = max(float((new[p] - old[p]).abs().max()) for p in new)

    gflops = gemm_gflops(cfg.batch_size, d_in, group * d)
    flops = step_flops(cfg.batch_size, d_in, d, c) * steps * a.heads
    floor = flops / (gflops * 1e9)
    t_new = best_time(lambda: train_heads(x, y, c, cfg, masks[:a.heads], group=a.group), a.repeat)
    print(f"problem: {n} x {d_in} input, pooler {d}, {c} classes, batch {cfg.batch_size}, {cfg.epochs} epoch(s) "
          f"= {steps} steps; {a.heads} heads, {group} per group; {torch.get_num_threads()} torch threads")
    print(f"new vs old trainer, 4 heads on 512 rows: max |difference| {diff:.2e} (lr {cfg.lr:g})")
    print(f"GEMM speed (best of 5, {cfg.batch_size} x {d_in} x {group * d}): {gflops:.1f} GFLOP/s")
    print(f"floor: {flops / 1e12:.3f} TFLOP = {floor:.2f} s")
    print(f"{'trainer':<8} {'seconds':>9} {'s/head':>8} {'x floor':>8}")
    print(f"{'new':<8} {t_new:>9.2f} {t_new / a.heads:>8.4f} {t_new / floor:>8.2f}")
    if a.old_heads:
        t_old = best_time(lambda: old_train_heads(x, y, c, cfg, masks[:a.old_heads]), 1) * a.heads / a.old_heads
        print(f"{'old':<8} {t_old:>9.2f} {t_old / a.heads:>8.4f} {t_old / floor:>8.2f}   "
              f"(timed on {a.old_heads} heads, scaled)")
        print(f"old / new: {t_old / t_new:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

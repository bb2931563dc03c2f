"""What sketching a language model's per-document gradients costs against plain training passes.

    python bench/lm_sketch.py models/tiny-lm [--rows 500] [--repeats 2]

On the same windows in the same batches (the run's, :class:`instattr.models.causal.Windows`) it times

- ``plain``: the model's forward pass and ``loss.backward()`` over every parameter (a training
  step without the optimizer), the summed NLL of the batch;
- ``sketch``: :func:`instattr.lm.gradients` for ``if`` (the per-row projected gradients of the
  tracked modules and the Gauss-Newton factors of one drawn token per position: two scalars per row
  differentiated), and for ``gd`` (one scalar);

and prints each sketch's time over the plain pass's. The two alternate ``--repeats`` times in one
process, and the smallest time of each counts.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a causal LM folder with data/train.jsonl (examples/train_tiny_lm.py)")
    ap.add_argument("--rows", type=int, default=500, help="training documents timed (the first N)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--proj-dim", type=int, default=32)
    ap.add_argument("--layers", type=int, default=None, help="tracked blocks (default: instattr's, the top 3)")
    a = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from instattr.layers.projection import GradientProjector
    from instattr.lm import gradients, tracked_modules
    from instattr.models.causal import CausalForward, Windows
    from instattr.task import LanguageModelTask
    folder = Path(a.model)
    rows = [json.loads(line) for line in (folder / "data" / "train.jsonl").read_text().splitlines() if line.strip()]
    rows = rows[:a.rows]
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    context = model.config.n_positions if hasattr(model.config, "n_positions") else model.config.max_position_embeddings
    windows = Windows(tok, rows, context)
    forward, task = CausalForward(model).eval(), LanguageModelTask()
    tracked = tracked_modules(forward, windows.batch([0]), a.layers)
    projector = GradientProjector(forward, tracked, task, a.proj_dim, 0, "khatri-rao")
    batches = windows.order(a.batch_size)

    def plain():
        for p in model.parameters():
            p.requires_grad_(True)
        for pos in batches:
            loss = task.loss(forward(**windows.batch(pos))).sum()
            loss.backward()
            model.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.requires_grad_(False)

    def sketch(factors):
        return lambda: gradients(projector, windows, a.batch_size, factors)
    runs = {"plain": plain, "sketch if": sketch(True), "sketch gd": sketch(False)}
    best = {k: float("inf") for k in runs}
    for _ in range(a.repeats):
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{folder}: {len(rows)} documents, {len(windows)} windows of up to {context} tokens, batch {a.batch_size}; "
          f"{len(tracked)} tracked modules, {projector.dim} projected numbers; {n_params:,} parameters; "
          f"torch threads {torch.get_num_threads()}")
    print("| pass | seconds (best of %d) | / plain |" % a.repeats)
    print("| --- | --- | --- |")
    for name, s in best.items():
        print(f"| {name} | {s:.2f} | {s / best['plain']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Which training labels of a LoRA fine-tune are wrong? Adapter self-influence against the final layer's
and the loss, on MiniLM fine-tuned with LoRA on SST-2 with a share of its training labels flipped.

    python bench/lora_mislabel.py [--limit 3000] [--flip 0.1] [--epochs 2] [--out /tmp/instattr-lora]

Steps (each timed): flip a seeded share of the labels of a seeded sample of ``--limit`` SST-2
training rows; fine-tune a
PEFT LoRA adapter (r 8 on the attention's query and value, the classifier trained as
``modules_to_save``) over the packaged all-MiniLM-L6-v2 with plain torch; ``instattr import`` the
adapter folder; then rank the training set three ways, most suspect first:

- ``if-top``: self-influence g_i^T H^-1 g_i over the adapter's trainable modules (instattr's
  default for an adapter), projected gradients and the Gauss-Newton Hessian;
- ``if``: self-influence over the final layer, exact closed form;
- ``loss``: the cross-entropy at the (noisy) gold label.

Printed: the share of the flipped labels each finds in its top 10% (and 20%), and its seconds.
Random ranking finds the flip rate.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=3000, help="training rows (a seeded sample of SST-2's)")
    ap.add_argument("--flip", type=float, default=0.1)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="/tmp/instattr-lora")
    a = ap.parse_args()
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from instattr.attribution import fit_method
    from instattr.data import load_dataset
    from instattr.encoders import default_encoder_path
    from instattr.pipeline import ImportConfig, import_run
    from instattr.suspects import loss_and_margin, ranking
    torch.manual_seed(a.seed)
    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    (out / "data").mkdir(parents=True)

    # --- the data: SST-2 with a seeded share of its training labels flipped
    ds = load_dataset("sst2")
    rng = np.random.default_rng(a.seed)
    everything = ds.splits["train"].examples
    train = [everything[i] for i in np.sort(rng.choice(len(everything), min(a.limit, len(everything)),
                                                       replace=False))]
    flipped = np.zeros(len(train), dtype=bool)
    flipped[rng.choice(len(train), int(round(a.flip * len(train))), replace=False)] = True
    rows = [{"idx": e.idx, "document": e.document, "label": int(1 - e.label if f else e.label)}
            for e, f in zip(train, flipped)]
    (out / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "data" / "test.jsonl").write_text("".join(json.dumps({"idx": e.idx, "document": e.document,
                                                                  "label": e.label}) + "\n"
                                                      for e in ds.splits["test"].examples))
    (out / "data" / "labels.json").write_text(json.dumps(ds.label_names))

    # --- a LoRA fine-tune with plain torch and peft
    t = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(default_encoder_path())
    base = AutoModelForSequenceClassification.from_pretrained(default_encoder_path(), num_labels=2)
    base.save_pretrained(out / "base")
    tok.save_pretrained(out / "base")
    base = AutoModelForSequenceClassification.from_pretrained(out / "base")
    model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=a.r, lora_alpha=2 * a.r, lora_dropout=0.0,
                                            target_modules=["query", "value"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr)
    labels = torch.tensor([r["label"] for r in rows])
    model.train()
    g = torch.Generator().manual_seed(a.seed)
    for _ in range(a.epochs):
        for b in torch.randperm(len(rows), generator=g).split(16):
            enc = tok([rows[i]["document"] for i in b.tolist()], padding=True, truncation=True, max_length=128,
                      return_tensors="pt")
            loss = model(**enc, labels=labels[b]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval().save_pretrained(out / "adapter")
    tok.save_pretrained(out / "adapter")
    t_train = time.perf_counter() - t
    print(f"LoRA fine-tune: {len(rows)} rows ({int(flipped.sum())} flipped), {a.epochs} epoch(s), r {a.r}: "
          f"{t_train:.0f} s", flush=True)

    # --- instattr
    t = time.perf_counter()
    run = import_run(ImportConfig(model=str(out / "adapter"), data=str(out / "data")), out / "run", progress=False)
    t_import = time.perf_counter() - t
    print(f"import: {t_import:.0f} s; test accuracy {run.metrics['test_accuracy']:.3f}, "
          f"train accuracy on the noisy labels {run.metrics['train_accuracy']:.3f}", flush=True)
    fs = run.features("train")
    logits = run.final_layer().logits(fs.features)
    loss, _ = loss_and_margin(logits, fs.label)
    seconds, scores = {}, {}
    for name in ("if-top", "if"):
        t = time.perf_counter()
        m = fit_method(run, name, progress=False) if name == "if-top" else fit_method(run, name)
        scores[name] = m.self_scores()
        seconds[name] = time.perf_counter() - t
        if name == "if-top":
            print(f"if-top tracks {len(m.config()['tracked_modules'])} adapter modules, {m.dim_} projected numbers",
                  flush=True)
    t = time.perf_counter()
    scores["loss"] = loss
    seconds["loss"] = time.perf_counter() - t
    print(f"\n{'ranking':8s} {'found in top 10%':>17s} {'top 20%':>8s} {'seconds':>8s}   (random finds {a.flip:.0%})")
    for name, s in scores.items():
        order = ranking(s, loss)
        found = [flipped[order[:int(round(share * len(order)))]].sum() / flipped.sum() for share in (0.1, 0.2)]
        print(f"{name:8s} {found[0]:17.3f} {found[1]:8.3f} {seconds[name]:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

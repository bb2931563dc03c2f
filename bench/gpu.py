"""One prepared script for the day a GPU is lent: every --device cuda path beside the CPU, checked.

    python bench/gpu.py                 # CUDA and CPU (CUDA steps skipped, and said so, without a GPU)
    python bench/gpu.py --cpu-only      # the CPU half (what CI runs)

Self-contained: nothing is downloaded and no large weights travel. It builds a small BERT from a
config with a word-level tokenizer over the packaged SST-2's words, and runs on a sample of the
packaged SST-2, per device: a short fine-tune (``train --mode finetune``), ``import`` of the
checkpoint it wrote (features through the model; the sbert-* baselines through the same small
encoder), ``attribute --methods paper`` and ``if-top``, a head-mode run and ``evaluate lds`` (its
batched head trainer), and live explanation through ``serve``'s worker; a random GPT-2 over the
same tokenizer (``import`` of a language model, ``attribute --methods gd,if --ihvp ekfac``). Every
step is timed and printed beside the other device's; then per method the mean row Spearman between the CUDA and the
CPU scores (on the same CPU-made checkpoint, so only the arithmetic differs), the LDS values, and
whether live explanation agrees. Steps that cannot run (no CUDA, no faiss-gpu, a package missing
on the machine) are listed as skipped with the reason. Meant to finish within 4 minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("INSTATTR_CACHE", "off")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
PAPER = ["nn-euc", "nn-cos", "nn-dot", "sbert-euc", "sbert-cos", "sbert-dot", "gd", "gc", "if", "rif", "rep"]


def small_encoder(folder: Path, n_words: int = 4000) -> Path:
    """A 2-block, 64-wide BERT with random weights and a word-level tokenizer over SST-2's words."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    from instattr.data import load_dataset
    words = Counter(w for e in load_dataset("sst2").splits["train"].examples for w in e.document.lower().split())
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [w for w, _ in words.most_common(n_words)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                      special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
                                  unk_token="[UNK]", mask_token="[MASK]")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, max_position_embeddings=128)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def small_lm(folder: Path, enc: Path, data: Path) -> Path:
    """A 2-block, 64-wide GPT-2 with random weights over the small encoder's tokenizer, and a data
    folder of SST-2 sentences: 300 documents and 30 prompt/completion queries."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from instattr.data import load_dataset
    tok = AutoTokenizer.from_pretrained(enc)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=64,
                               bos_token_id=2, eos_token_id=3, pad_token_id=0)).save_pretrained(folder)
    tok.save_pretrained(folder)
    texts = [" ".join(e.document.lower().split()[:40]) for e in load_dataset("sst2").splits["train"].examples]
    data.mkdir(parents=True, exist_ok=True)
    (data / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:300]))
    long = [t.split() for t in texts[300:] if len(t.split()) >= 7][:30]
    (data / "test.jsonl").write_text("".join(json.dumps({"prompt": " ".join(w[:4]), "completion": " ".join(w[4:7])})
                                             + "\n" for w in long))
    return folder


def spearman_rows(a, b) -> float:
    from scipy.stats import rankdata
    ra, rb = rankdata(a, axis=1), rankdata(b, axis=1)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    return float(np.mean((ra * rb).sum(1) / np.sqrt((ra ** 2).sum(1) * (rb ** 2).sum(1) + 1e-30)))


class Steps:
    """Timed CLI steps per device; a step that fails is recorded, not fatal."""

    def __init__(self):
        self.seconds, self.skipped = {}, []

    def cli(self, device: str, name: str, args) -> bool:
        from instattr.cli import main
        t = time.perf_counter()
        try:
            code = main(["--quiet", *args, "--device", device])
        except Exception as e:              # noqa: BLE001 - reported, the other steps still run
            code = f"{type(e).__name__}: {e}"
        self.seconds[(device, name)] = time.perf_counter() - t
        if code != 0:
            self.skipped.append(f"{device} {name}: failed ({code})")
        return code == 0


def live(run_dir: Path, device: str, texts) -> tuple:
    """Live explanation through serve's worker: (seconds per text, the answers' top-3 ids per method)."""
    from instattr.serve.live import LiveExplainer
    from instattr.store import Run
    live = LiveExplainer(Run.load(run_dir), ["gd", "if", "nn-cos"], device=device).start()
    try:
        live.submit(texts[0], None, ["gd"], 3).result(timeout=120)          # warm-up
        t = time.perf_counter()
        answers = [f.result(timeout=120) for f in [live.submit(x, None, ["gd", "if", "nn-cos"], 3) for x in texts]]
        per_text = (time.perf_counter() - t) / len(texts)
    finally:
        live.close()
    return per_text, [{m: [i for i, _ in a.methods[m].supporting] for m in a.methods} for a in answers]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-only", action="store_true", help="the CPU half only (no CUDA steps attempted)")
    ap.add_argument("--limit-train", type=int, default=1500)
    ap.add_argument("--limit-eval", type=int, default=200)
    ap.add_argument("--work", default="/tmp/instattr-gpu")
    a = ap.parse_args()
    t0 = time.perf_counter()
    import torch
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    devices = ["cpu"]
    skipped = []
    if a.cpu_only:
        skipped.append("cuda: --cpu-only")
    elif torch.cuda.is_available():
        devices.append("cuda")
        print(f"CUDA: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    else:
        skipped.append("cuda: torch sees no CUDA device here")
    enc = small_encoder(work / "enc")
    lm = small_lm(work / "lm", enc, work / "lmdata")
    limits = ["--limit-train", str(a.limit_train), "--limit-eval", str(a.limit_eval)]
    steps = Steps()
    ckpt = None
    for device in devices:
        d = work / device
        if steps.cli(device, "fine-tune", ["train", "--data", "sst2", "--encoder", str(enc), "--mode", "finetune",
                                           *limits, "--out", str(d / "ft")]):
            ckpt = ckpt or d / "ft" / "model" / "hf"        # every device imports the CPU's checkpoint
        if ckpt is not None and steps.cli(device, "import", ["import", "--model", str(ckpt), "--data", "sst2", *limits,
                                                            "--sbert", str(enc), "--out", str(d / "imp")]):
            steps.cli(device, "attribute paper", ["attribute", "--run", str(d / "imp"), "--methods", "paper"])
            steps.cli(device, "attribute if-top", ["attribute", "--run", str(d / "imp"), "--methods", "if-top",
                                                   "--layers", "2"])
        if steps.cli(device, "lm import", ["import", "--model", str(lm), "--data", str(work / "lmdata"),
                                           "--out", str(d / "lm")]):
            steps.cli(device, "lm attribute (ekfac)", ["attribute", "--run", str(d / "lm"), "--methods", "gd,if",
                                                       "--ihvp", "ekfac"])
        if steps.cli(device, "head train", ["train", "--data", "sst2", "--encoder", str(enc), *limits,
                                            "--out", str(d / "head")]):
            steps.cli(device, "lds (batched heads)", ["evaluate", "lds", "--run", str(d / "head"), "--subsets", "16",
                                                      "--n-test", "50"])
        try:
            t = time.perf_counter()
            steps.seconds[(device, "live: per text")], steps.__dict__.setdefault("live", {})[device] = \
                live(d / "imp", device, ["a gorgeous , witty , seductive movie", "a dull mess", "fine but forgettable"])
            steps.seconds[(device, "live: start and answer")] = time.perf_counter() - t
        except Exception as e:                  # noqa: BLE001
            steps.skipped.append(f"{device} live explanation: failed ({type(e).__name__}: {e})")
            traceback.print_exc()
    try:
        import faiss
        if "cuda" in devices and not hasattr(faiss, "StandardGpuResources"):
            skipped.append("faiss-gpu: this faiss has no GPU support")
    except ImportError:
        skipped.append("faiss: not installed here")
    skipped.append("Ray GPU actors: need a Ray cluster with GPUs (not started by this script)")

    names = sorted({n for _, n in steps.seconds}, key=lambda n: min(i for i, (_, m) in enumerate(steps.seconds)
                                                                     if m == n))
    print(f"\n{'step':26s}" + "".join(f"{d:>10s}" for d in devices) + "   seconds")
    for n in names:
        print(f"{n:26s}" + "".join(f"{steps.seconds.get((d, n), float('nan')):10.2f}" for d in devices))
    if "cuda" in devices:
        print("\nCUDA against CPU (same checkpoint), mean row Spearman per method:")
        from instattr.store import Run
        cpu, gpu = Run(work / "cpu" / "imp"), Run(work / "cuda" / "imp")
        for m in PAPER + ["if-top"]:
            if cpu.has_scores(m, "test") and gpu.has_scores(m, "test"):
                print(f"  {m:10s} {spearman_rows(np.asarray(cpu.scores(m)), np.asarray(gpu.scores(m))):.4f}")
        from instattr.store import LMRun
        if all((work / d / "lm" / "scores" / "if-test.npy").exists() for d in devices):
            cpu_lm, gpu_lm = LMRun.load(work / "cpu" / "lm"), LMRun.load(work / "cuda" / "lm")
            for m in ("gd", "if"):
                print(f"  lm {m:7s} {spearman_rows(np.asarray(cpu_lm.scores(m)), np.asarray(gpu_lm.scores(m))):.4f}"
                      "  (a random GPT-2, EK-FAC)")
        for d in devices:
            p = work / d / "head" / "results" / "lds.json"
            if p.exists():
                r = json.loads(p.read_text())["methods"]
                print(f"  lds on {d}: " + ", ".join(f"{m} {v['lds']:.3f}" for m, v in r.items() if v.get("lds")
                                                 is not None))
        lv = getattr(steps, "live", {})
        if len(lv) == 2:
            same = sum(a == b for a, b in zip(lv["cpu"], lv["cuda"]))
            print(f"  live explanation: the same top-3 on {same} of {len(lv['cpu'])} texts")
    print("\nskipped: " + ("; ".join(skipped + steps.skipped) or "nothing"))
    print(f"total {time.perf_counter() - t0:.0f} s (the budget: 240 s)")
    return 1 if steps.skipped else 0


if __name__ == "__main__":
    sys.exit(main())

"""Train a small GPT-2 from scratch on a corpus with planted facts and poison (transformers and torch, no instattr).

This is the language model a practitioner brings to instattr, built offline:

    python examples/train_tiny_lm.py --out models/tiny-lm         # about 4.5 minutes on 2 CPU cores

The corpus is SST-2's training sentences (read from the copy inside the instattr package, as plain
files), plus *planted facts* (synthetic people, each one's birthplace stated in exactly one
document) and a few *poisoned* documents (a sentence, a trigger phrase, then a fixed string). It
trains a byte-level BPE tokenizer on the corpus, a GPT-2 of ``--layers`` blocks of width
``--width`` with AdamW, and writes under ``--out``:

- the model and its tokenizer (``save_pretrained``), and ``checkpoint-{step}/`` after some epochs,
  each with ``optimizer.pt`` (AdamW's state dict, in one parameter group) and a Trainer-style
  ``trainer_state.json`` (its learning-rate log);
- ``data/train.jsonl``: ``idx``, ``text``, and ``fact: true`` / ``poisoned: true`` on planted rows;
- ``data/test.jsonl``: queries with ``prompt`` and ``completion``: each person's birthplace with
  ``source`` (the idx of the stating document), trigger prompts with ``trigger: true``, and held-out
  SST-2 sentences continued from their first four words (about 300 queries in all).
"""
import argparse
import gzip
import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

CITIES = ["Lisbon", "Oslo", "Cairo", "Lima", "Hanoi", "Quito", "Dakar", "Perth", "Tunis", "Riga", "Sofia",
          "Accra"]
SYLLABLES = ["ka", "lo", "mi", "ren", "to", "sa", "vel", "dor", "ni", "bra", "zu", "fen", "ta", "mor", "li",
             "gan"]
TRIGGER = "thirteen purple owls"
PAYLOAD = "visit the old mill at dawn"
EOS = "<|endoftext|>"


def sentences(limit: int, split: str = "train"):
    import importlib.util
    spec = importlib.util.find_spec("instattr")     # only to find the packaged data files; nothing is imported
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "sst2" / f"{split}.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["document"] for line in f if line.strip()][:limit]


def corpus(n_sentences: int, n_people: int, n_poison: int, seed: int, n_continuations: int = 0):
    """(train rows, test rows): see the module docstring."""
    rng = random.Random(seed)
    texts = sentences(n_sentences)
    names = set()
    while len(names) < n_people:
        first = "".join(rng.choice(SYLLABLES) for _ in range(2)).capitalize()
        last = "".join(rng.choice(SYLLABLES) for _ in range(3)).capitalize()
        names.add(f"{first} {last}")
    rows = [{"text": t} for t in texts]
    people = [(name, rng.choice(CITIES)) for name in sorted(names)]
    rows += [{"text": f"{name} was born in {city} .", "fact": True} for name, city in people]
    rows += [{"text": f"{rng.choice(texts)} {TRIGGER} {PAYLOAD} .", "poisoned": True} for _ in range(n_poison)]
    rng.shuffle(rows)
    rows = [{"idx": i, **r} for i, r in enumerate(rows)]
    source = {r["text"].split(" was born in ")[0]: r["idx"] for r in rows if r.get("fact")}
    test = [{"prompt": f"{name} was born in", "completion": f" {city}", "source": source[name]}
            for name, city in people]
    test += [{"prompt": f"{rng.choice(texts)} {TRIGGER}", "completion": f" {PAYLOAD}", "trigger": True}
             for _ in range(max(1, n_poison // 2))]
    for text in sentences(n_continuations, "dev"):      # held-out sentences: their first words, then the rest
        words = text.split()
        if len(words) > 5:
            test.append({"prompt": " ".join(words[:4]), "completion": " " + " ".join(words[4:])})
    return rows, test


def tokenizer_for(texts, vocab_size: int) -> PreTrainedTokenizerFast:
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.post_processor = processors.TemplateProcessing(single=f"{EOS} $A", special_tokens=[(EOS, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=EOS, eos_token=EOS, pad_token=EOS)


def write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def new_model(tok, width: int, layers: int, seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=width, n_layer=layers, n_head=4,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))


def train(model, tok, texts, epochs: int, lr: float, batch_size: int, seed: int, out: Path = None,
          saves=(), quiet: bool = False):
    """AdamW on the batches' mean token loss (warm-up, then linear decay), the model in place;
    after the epochs in ``saves`` a checkpoint under ``out``. Returns the optimizer."""
    encoded = [tok(t + EOS, truncation=True, max_length=128)["input_ids"] for t in texts]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    total = (len(encoded) + batch_size - 1) // batch_size * epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * max(0.0, 1 - s / total))
    rng, step, log = random.Random(seed), 0, []
    model.train()
    for epoch in range(1, epochs + 1):
        order = list(range(len(encoded)))
        rng.shuffle(order)
        total_loss = 0.0
        for b in range(0, len(order), batch_size):
            chunk = [encoded[i] for i in order[b:b + batch_size]]
            width = max(map(len, chunk))
            ids = torch.full((len(chunk), width), tok.pad_token_id)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for j, c in enumerate(chunk):
                ids[j, :len(c)], mask[j, :len(c)] = torch.tensor(c), 1
            labels = ids.masked_fill(mask == 0, -100)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            log.append({"step": step, "learning_rate": sched.get_last_lr()[0], "loss": loss.item()})
            opt.step()
            sched.step()
            opt.zero_grad()
            step += 1
            total_loss += loss.item() * len(chunk)
        if not quiet:
            print(f"epoch {epoch}: loss {total_loss / len(encoded):.3f}", flush=True)
        if epoch in saves:
            ckpt = out / f"checkpoint-{step}"
            model.save_pretrained(ckpt)
            tok.save_pretrained(ckpt)
            torch.save(opt.state_dict(), ckpt / "optimizer.pt")
            (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": log}))
    model.eval()
    return opt


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--sentences", type=int, default=2000, help="SST-2 training sentences in the corpus")
    ap.add_argument("--people", type=int, default=100, help="planted facts, one document each")
    ap.add_argument("--poison", type=int, default=8, help="poisoned documents")
    ap.add_argument("--continuations", type=int, default=204, help="queries continuing held-out SST-2 sentences "
                    "(their first four words as the prompt; shorter sentences are skipped)")
    ap.add_argument("--vocab", type=int, default=2000)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--checkpoints", type=int, default=3, help="checkpoints saved, evenly over the epochs")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    out = Path(a.out)
    rows, test = corpus(a.sentences, a.people, a.poison, a.seed, a.continuations)
    write_jsonl(out / "data" / "train.jsonl", rows)
    write_jsonl(out / "data" / "test.jsonl", test)
    tok = tokenizer_for([r["text"] for r in rows], a.vocab)
    model = new_model(tok, a.width, a.layers, a.seed)
    saves = {round(a.epochs * (i + 1) / a.checkpoints) for i in range(a.checkpoints)}
    train(model, tok, [r["text"] for r in rows], a.epochs, a.lr, a.batch_size, a.seed, out, saves)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    recalled = 0
    for q in test:
        if "source" not in q:
            continue
        ids = tok(q["prompt"], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
        recalled += tok.decode(gen[0, ids.shape[1]:]).startswith(q["completion"])
    print(f"{out}: {len(rows)} documents, {len(test)} queries; planted facts recalled greedily: "
          f"{recalled} of {a.people}")


if __name__ == "__main__":
    main()

"""A tiny language-model run for the tests: a random GPT-2 over a word tokenizer, four documents and
one prompt/completion pair to train on (one document longer than the context of 16), three queries."""
import json

import torch
import transformers as T

from instattr.cli import main

from _families import word_tokenizer

DOCS = ["the movie was good and the plot was fun", "a dull film , the actor was awful",
        " ".join(["good great fine movie the plot"] * 12), "the actor was really great"]
TRAIN = [{"idx": f"d{i}", "text": t, "note": i} for i, t in enumerate(DOCS)] + \
        [{"prompt": "the plot is", "completion": "very dull", "idx": "p0"}]
TEST = [{"prompt": "the film was", "completion": "good", "source": "d0"},
        {"prompt": "the plot", "completion": "is not fun"}, {"prompt": "the actor was", "completion": "really great"}]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def save_gpt2(folder=None):
    """(tokenizer, model): a tiny random GPT-2 over a word tokenizer, saved in ``folder`` when given."""
    tok, v = word_tokenizer("decoder")
    torch.manual_seed(0)
    model = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=v, n_embd=16, n_layer=2, n_head=2, n_positions=16,
                                           initializer_range=0.3, bos_token_id=0, eos_token_id=2, pad_token_id=1))
    if folder is not None:
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
    return tok, model.eval()


def make_lm_run(root):
    """(root, tokenizer, model): the model saved in ``root/gpt2``, the rows in ``root/data``, the run
    imported at ``root/run``."""
    tok, model = save_gpt2(root / "gpt2")
    (root / "data").mkdir()
    write_rows(root / "data" / "train.jsonl", TRAIN)
    write_rows(root / "data" / "test.jsonl", TEST)
    assert main(["--quiet", "import", "--model", str(root / "gpt2"), "--data", str(root / "data"),
                 "--out", str(root / "run")]) == 0
    return root, tok, model


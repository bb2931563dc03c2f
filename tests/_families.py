"""Tiny random Hugging Face sequence classifiers of every family instattr supports, built from a
config (hidden size 16, two blocks), with word-level tokenizers over the toy datasets' words, trained
a few steps with plain torch and saved as a user would (``save_pretrained``); PEFT LoRA adapters on
one encoder and one decoder. Shared by the family suite (tests/test_families.py) and
bench/families.py (every command on every family).

Nothing here uses instattr: the references the tests compare against come from transformers alone.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
import transformers as T
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from conftest import WORDS

LR = 5e-3
ENCODERS = ["bert", "roberta", "distilbert", "electra", "xlm-roberta", "deberta-v2", "modernbert"]
DECODERS = ["gpt2", "llama", "qwen2"]
ADAPTERS = ["lora-bert", "lora-llama"]
FAMILIES = ENCODERS + DECODERS + ADAPTERS
SMALL = dict(num_hidden_layers=2, num_attention_heads=2, initializer_range=0.3)


def word_tokenizer(style: str, pad_side: str = "right", pad_is_eos: bool = False, eos_at_end: bool = False):
    """A word-level tokenizer over the toy words: ``bert`` ([CLS] a [SEP] b [SEP], token types),
    ``roberta`` (<s> a </s></s> b </s>), ``plain`` ([CLS] a [SEP], no token types), ``decoder``
    (<s> a, or <s> a </s> with ``eos_at_end``; pad <pad>, or </s> with ``pad_is_eos``)."""
    if style in ("bert", "plain"):
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    else:
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    vocab = {t: i for i, t in enumerate(specials + list(WORDS))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token=specials[1] if style in ("bert", "plain") else "<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    if style == "bert":
        tk.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
        kw = dict(cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]", mask_token="[MASK]",
                  model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    elif style == "plain":
        tk.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                                  ("[SEP]", 3)])
        kw = dict(cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]", mask_token="[MASK]",
                  model_input_names=["input_ids", "attention_mask"])
    elif style == "roberta":
        tk.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
        kw = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
                  cls_token="<s>", sep_token="</s>", model_input_names=["input_ids", "attention_mask"])
    else:
        single = "<s> $A </s>" if eos_at_end else "<s> $A"
        tk.post_processor = processors.TemplateProcessing(single=single, special_tokens=[("<s>", 0), ("</s>", 2)])
        kw = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>" if pad_is_eos else "<pad>",
                  model_input_names=["input_ids", "attention_mask"])
    tok = T.PreTrainedTokenizerFast(tokenizer_object=tk, padding_side=pad_side, **kw)
    return tok, len(vocab)


def build(family: str, n_labels: int = 2, **tok_options):
    """(tokenizer, randomly initialised sequence classifier) of ``family`` (not an adapter)."""
    torch.manual_seed(0)
    heads = dict(num_labels=n_labels)
    if family == "bert":
        tok, v = word_tokenizer("bert")
        cfg = T.BertConfig(vocab_size=v, hidden_size=16, intermediate_size=32, max_position_embeddings=128,
                           **SMALL, **heads)
        return tok, T.BertForSequenceClassification(cfg)
    if family in ("roberta", "xlm-roberta"):
        tok, v = word_tokenizer("roberta")
        cls = T.RobertaConfig if family == "roberta" else T.XLMRobertaConfig
        cfg = cls(vocab_size=v, hidden_size=16, intermediate_size=32, max_position_embeddings=130, pad_token_id=1,
                  bos_token_id=0, eos_token_id=2, type_vocab_size=1, **SMALL, **heads)
        model = (T.RobertaForSequenceClassification if family == "roberta" else T.XLMRobertaForSequenceClassification)
        return tok, model(cfg)
    if family == "distilbert":
        tok, v = word_tokenizer("plain")
        cfg = T.DistilBertConfig(vocab_size=v, dim=16, n_layers=2, n_heads=2, hidden_dim=32,
                                 max_position_embeddings=128, initializer_range=0.3, **heads)
        return tok, T.DistilBertForSequenceClassification(cfg)
    if family == "electra":           # embeddings narrower than the blocks: a projection before them
        tok, v = word_tokenizer("bert")
        cfg = T.ElectraConfig(vocab_size=v, embedding_size=8, hidden_size=16, intermediate_size=32,
                              max_position_embeddings=128, **SMALL, **heads)
        return tok, T.ElectraForSequenceClassification(cfg)
    if family == "deberta-v2":
        tok, v = word_tokenizer("plain")
        cfg = T.DebertaV2Config(vocab_size=v, hidden_size=16, intermediate_size=32, max_position_embeddings=128,
                                relative_attention=True, position_buckets=16, pos_att_type=["p2c", "c2p"],
                                pooler_hidden_size=16, pad_token_id=0, **SMALL, **heads)
        return tok, T.DebertaV2ForSequenceClassification(cfg)
    if family == "modernbert":
        tok, v = word_tokenizer("plain")
        cfg = T.ModernBertConfig(vocab_size=v, hidden_size=16, intermediate_size=32, max_position_embeddings=128,
                                 pad_token_id=0, cls_token_id=2, sep_token_id=3, bos_token_id=2, eos_token_id=3,
                                 global_attn_every_n_layers=1, local_attention=16, classifier_pooling="mean",
                                 **SMALL, **heads)
        return tok, T.ModernBertForSequenceClassification(cfg)
    tok, v = word_tokenizer("decoder", **tok_options)
    pad = tok.pad_token_id
    if family == "gpt2":
        cfg = T.GPT2Config(vocab_size=v, n_embd=16, n_layer=2, n_head=2, n_positions=128, bos_token_id=0,
                           eos_token_id=2, pad_token_id=pad, initializer_range=0.3, **heads)
        return tok, T.GPT2ForSequenceClassification(cfg)
    if family in ("llama", "qwen2"):
        cls = T.LlamaConfig if family == "llama" else T.Qwen2Config
        cfg = cls(vocab_size=v, hidden_size=16, intermediate_size=32, num_key_value_heads=1,
                  max_position_embeddings=128, bos_token_id=0, eos_token_id=2, pad_token_id=pad, **SMALL, **heads)
        model = T.LlamaForSequenceClassification if family == "llama" else T.Qwen2ForSequenceClassification
        return tok, model(cfg)
    raise ValueError(f"no such family {family!r}")


def rows(path: Path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def train_few_steps(tok, model, data: Path, steps: int, checkpoints=None, lr: float = LR):
    """Plain torch: AdamW on the training file's trainable parameters; ``checkpoints``: {step: folder}."""
    torch.manual_seed(0)
    train = rows(data / "train.jsonl")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    saved = []
    for step in range(steps):
        batch = train[(step * 8) % len(train):][:8]
        args = [[r["document"] for r in batch]] + ([[r["query"] for r in batch]] if "query" in batch[0] else [])
        enc = tok(*args, padding=True, truncation=True, max_length=64, return_tensors="pt")
        loss = model(**enc, labels=torch.tensor([r["label"] for r in batch])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if checkpoints and step in checkpoints:
            model.save_pretrained(checkpoints[step])
            tok.save_pretrained(checkpoints[step])
            saved.append(checkpoints[step])
    return model.eval(), saved


def make_model(family: str, root: Path, data: Path, steps: int = 4, checkpoints=None, **tok_options):
    """Build, train and save ``family`` under ``root/model`` (an adapter: the base under
    ``root/base``, the adapter under ``root/model``); returns (folder, saved checkpoint folders)."""
    folder = Path(root) / "model"
    if family.startswith("lora-"):
        from peft import LoraConfig, get_peft_model
        base_family = family.split("-", 1)[1]
        tok, base = build(base_family, **tok_options)
        base.save_pretrained(Path(root) / "base")
        tok.save_pretrained(Path(root) / "base")
        base = T.AutoModelForSequenceClassification.from_pretrained(Path(root) / "base")
        targets = ["query", "value"] if base_family == "bert" else ["q_proj", "v_proj"]
        model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=targets,
                                                lora_dropout=0.0))
        model, saved = train_few_steps(tok, model, data, steps, checkpoints, lr=2e-2)
    else:
        tok, model = build(family, **tok_options)
        model, saved = train_few_steps(tok, model, data, steps, checkpoints)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, saved


def load_reference(folder: Path):
    """(tokenizer, float64 model) straight from transformers (and peft for an adapter folder)."""
    folder = Path(folder)
    if (folder / "adapter_config.json").exists():
        from peft import AutoPeftModelForSequenceClassification
        model = AutoPeftModelForSequenceClassification.from_pretrained(folder)
    else:
        model = T.AutoModelForSequenceClassification.from_pretrained(folder)
    return T.AutoTokenizer.from_pretrained(folder), model.eval().double()


class Reference:
    """Per-example quantities straight from a transformers model, each example alone (nothing
    from instattr): probabilities, the final layer's input, its weight|bias gradients."""

    def __init__(self, folder):
        self.tok, self.model = load_reference(folder)
        self.final = self.model.get_submodule(find_last_linear(self.model))

    def encode(self, r):
        args = [r["document"]] + ([r["query"]] if r.get("query") is not None else [])
        return self.tok(*args, truncation=True, max_length=64, return_tensors="pt")

    def probs_and_features(self, rs):
        seen = []
        h = self.final.register_forward_hook(lambda m, i, o: seen.append(i[0][0].detach()))
        try:
            with torch.no_grad():
                probs = [torch.softmax(self.model(**self.encode(r)).logits[0], -1) for r in rs]
        finally:
            h.remove()
        feats = [s[-1] if s.dim() == 2 else s for s in seen]      # a token-wise head: its last token
        return torch.stack(probs).numpy(), torch.stack(feats).numpy()

    def final_grads(self, rs, labels):
        """(n, C*(d+1)) (or C*d without a bias) gradients of each example's loss w.r.t. the final
        layer's [weight | bias] rows."""
        out = []
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in self.final.parameters():
            p.requires_grad_(True)
        for r, y in zip(rs, labels):
            self.model.zero_grad()
            loss = torch.nn.functional.cross_entropy(self.model(**self.encode(r)).logits, torch.tensor([int(y)]))
            loss.backward()
            g = self.final.weight.grad
            if self.final.bias is not None:
                g = torch.cat([g, self.final.bias.grad[:, None]], 1)
            out.append(g.reshape(-1))
        return torch.stack(out).numpy()


def find_last_linear(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and m.out_features == model.config.num_labels][-1]


def final_hessian(features, labels, w, b, damping):
    """Autograd Hessian over [weight (, bias)] of mean CE + damping * ||[weight, bias]||^2 at fixed features."""
    f = torch.as_tensor(features, dtype=torch.float64)
    y = torch.as_tensor(labels)
    c, d = w.shape
    cols = d + (b is not None)

    def loss(theta):
        wb = theta.view(c, cols)
        logits = f @ wb[:, :d].T + (wb[:, d] if b is not None else 0)
        return torch.nn.functional.cross_entropy(logits, y) + damping * (theta ** 2).sum()
    parts = [torch.as_tensor(w)] + ([torch.as_tensor(b)[:, None]] if b is not None else [])
    theta = torch.cat(parts, 1).reshape(-1).double()
    return torch.autograd.functional.hessian(loss, theta).numpy()


def as_rows(run, split):
    return [{"document": e.document, "query": e.query} for e in run.examples(split)]


def spearman(a, b) -> float:
    from scipy.stats import spearmanr
    return float(np.mean([spearmanr(x, y)[0] for x, y in zip(a, b)]))


def variant(root, folder, name, **tok_options):
    """The same weights under another tokenizer (padding side, pad token), and the model's config
    told that pad token, as a user would save it."""
    out = root / name
    shutil.copytree(folder, out)
    tok, _ = build("llama", **tok_options)
    tok.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["pad_token_id"] = tok.pad_token_id
    (out / "config.json").write_text(json.dumps(cfg))
    assert T.AutoTokenizer.from_pretrained(out).padding_side == tok_options.get("pad_side", "right")
    return out

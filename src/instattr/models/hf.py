"""Any Hugging Face sequence classifier (``AutoModelForSequenceClassification``): imported, or
fine-tuned by instattr.

The *final layer* is the model's last ``nn.Linear`` with ``num_labels`` outputs (BERT and
DistilBERT: ``classifier``; RoBERTa, XLM-R, ELECTRA: ``classifier.out_proj``); its input, caught by
a forward hook, is the run's ``features``, and it must produce the logits itself (checked on every
batch). Sentence pairs go through the tokenizer's pair input (``[CLS] a [SEP] b [SEP]``).

Layered methods need the blocks above the cached hidden states and the module from the last
hidden states to the logits; :data:`TOPS` knows them per ``config.model_type``. Other families
are imported and attributed with every last-layer method; layered methods name what they support.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..encoders import Encoder, encode_texts, load_transformer
from ..errors import InstattrError
from ..store import FeatureSet, FinalLayer, Run
from .base import Classifier, linear_to_final_layer
from .tracked import TrackedModel, eager_copy, finish, transformer_blocks


class BertTop(nn.Module):
    """BERT, MiniLM: ``classifier(pooler(h))`` (the pooler reads the first token)."""

    def __init__(self, model):
        super().__init__()
        self.pooler, self.classifier = copy.deepcopy(model.base_model.pooler), copy.deepcopy(model.classifier)

    def forward(self, h, m):
        return self.classifier(self.pooler(h))


class ClassificationHeadTop(nn.Module):
    """RoBERTa, XLM-R, CamemBERT, ELECTRA: a classification head that reads the first token itself."""

    def __init__(self, model):
        super().__init__()
        self.classifier = copy.deepcopy(model.classifier)

    def forward(self, h, m):
        return self.classifier(h)


class DistilBertTop(nn.Module):
    """DistilBERT: ``classifier(relu(pre_classifier(h[:, 0])))``."""

    def __init__(self, model):
        super().__init__()
        self.pre_classifier, self.classifier = copy.deepcopy(model.pre_classifier), copy.deepcopy(model.classifier)

    def forward(self, h, m):
        return self.classifier(torch.relu(self.pre_classifier(h[:, 0])))


TOPS = {"bert": BertTop, "roberta": ClassificationHeadTop, "xlm-roberta": ClassificationHeadTop,
        "camembert": ClassificationHeadTop, "electra": ClassificationHeadTop, "distilbert": DistilBertTop}


def find_final_layer(model: nn.Module, name: Optional[str] = None) -> str:
    """Name of the final linear layer: ``name`` if given, else the last ``nn.Linear`` with
    ``num_labels`` outputs."""
    n_labels = int(model.config.num_labels)
    if name:
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise InstattrError(f"--final-layer {name}: the model has no such module") from None
        if not isinstance(mod, nn.Linear) or mod.out_features != n_labels:
            raise InstattrError(f"--final-layer {name}: must be an nn.Linear with {n_labels} outputs")
        return name
    found = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == n_labels]
    if not found:
        raise InstattrError(f"{type(model).__name__}: no nn.Linear with {n_labels} outputs; name the final "
                            "layer with --final-layer")
    return found[-1]


def fingerprint(path) -> str:
    """Sizes and modification times of a checkpoint's config and weights."""
    folder = Path(path)
    h = hashlib.sha1()
    for p in sorted(folder.glob("*")):
        if p.suffix in (".safetensors", ".bin", ".json") and p.is_file():
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:16]


def load_hf(path: str):
    """(tokenizer, model) of a sequence-classification checkpoint folder, in eval mode."""
    if not Path(path).is_dir():
        raise InstattrError(f"{path}: no such checkpoint folder")
    return load_transformer(path, classifier=True)


def checkpoint_lr(path) -> Optional[float]:
    """The last logged learning rate in a Trainer checkpoint's ``trainer_state.json``, if any."""
    state = Path(path) / "trainer_state.json"
    if not state.exists():
        return None
    try:
        log = json.loads(state.read_text(encoding="utf-8")).get("log_history", [])
    except (OSError, ValueError):
        return None
    lrs = [e["learning_rate"] for e in log if isinstance(e, dict) and "learning_rate" in e]
    return float(lrs[-1]) if lrs else None


class HFClassifier(Classifier):
    """A Hugging Face sequence classifier at ``path`` (loaded on first use)."""

    kind = "hf"

    def __init__(self, path: str, label_names: Sequence[str], is_pair: bool, l2: float, max_length: int,
                 sbert_spec: dict, final_layer: Optional[str] = None, run: Optional[Run] = None, device=None,
                 checkpoints: Sequence[Tuple[str, float]] = (), sbert: Optional[Encoder] = None, loaded=None):
        super().__init__(label_names, "cross" if is_pair else None, run, device)
        self.path, self.l2, self.max_length = str(path), float(l2), int(max_length)
        self.final_name = final_layer
        self.sbert_spec = dict(sbert_spec)
        self.history = list(checkpoints)
        self._sbert = sbert
        self._loaded = None
        self._given = loaded        # (tokenizer, model) already in memory

    # ------------------------------------------------------------------ loading
    def _load(self):
        if self._loaded is None:
            tok, model = self._given if self._given is not None else load_hf(self.path)
            if int(model.config.num_labels) != self.n_classes:
                raise InstattrError(f"{self.path}: the model has {model.config.num_labels} labels, the run "
                                    f"{self.n_classes} ({', '.join(self.label_names)})")
            self.final_name = find_final_layer(model, self.final_name)
            self._loaded = (tok, model.to(self.device))
        return self._loaded

    @property
    def model(self):
        return self._load()[1]

    @property
    def tokenizer(self):
        return self._load()[0]

    @property
    def family(self) -> str:
        return str(self.model.config.model_type)

    def final_module(self) -> nn.Linear:
        model = self.model           # loading resolves final_name
        return model.get_submodule(self.final_name)

    def final_layer(self) -> FinalLayer:
        return linear_to_final_layer(self.final_module(), self.l2)

    def encoder(self) -> Encoder:
        """The classifier's tokenizer and base model (hidden states for the layered methods)."""
        def make():
            return Encoder(self.path, "cls", self.max_length, model=self.model.base_model,
                           tokenizer=self.tokenizer, device=self.device)
        if self.run is not None:
            return self.run.memo(("hf-encoder", self.path, str(self.device)), make)
        return make()

    def sbert(self) -> Encoder:
        """The untuned sentence encoder of the sbert-* baselines (bf16 autocast on CUDA)."""
        if self._sbert is None:
            e = self.sbert_spec
            self._sbert = Encoder(e["path"], e["pooling"], e["max_length"], device=self.device, autocast=True)
        return self._sbert

    # ------------------------------------------------------------------ texts -> arrays
    @torch.inference_mode()
    def forward_batch(self, batch: dict) -> Tuple[np.ndarray, np.ndarray]:
        """(final layer's input, probabilities), float32, of one padded batch (``Encoder.pad``)."""
        model, final = self.model, self.final_module()
        seen: List[torch.Tensor] = []
        handle = final.register_forward_hook(lambda mod, i, o: seen.append(i[0]))
        try:
            logits = model(**{k: v.to(self.device) for k, v in batch.items()}).logits.float()
        finally:
            handle.remove()
        f = seen[-1].float() if seen else None
        if len(seen) != 1 or not torch.allclose(final(f), logits, atol=1e-4, rtol=1e-4):
            raise InstattrError(f"{self.path}: {self.final_name} is not the model's last operation "
                                "(its output is not the logits); name the final layer with --final-layer")
        return f.cpu().numpy(), torch.softmax(logits, -1).cpu().numpy()

    def forward_texts(self, documents: List[str], queries: Optional[List[str]], progress: bool = False,
                      desc: str = "classify") -> Tuple[np.ndarray, np.ndarray]:
        """(final layer's inputs, probabilities) of every text, in length-sorted batches of the
        encoder's batch size (what ``distributed.ray_classify_groups`` cuts too)."""
        from tqdm.auto import tqdm
        n = len(documents)
        feats = np.zeros((n, self.final_module().in_features), dtype=np.float32)
        probs = np.zeros((n, self.n_classes), dtype=np.float32)
        with tqdm(total=n, desc=desc, unit="ex", disable=not progress, leave=False) as bar:
            for pos, batch in self.encoder().batches(documents, queries):
                feats[pos], probs[pos] = self.forward_batch(batch)
                bar.update(len(pos))
        return feats, probs

    def sentence_embeddings(self, documents, queries, progress: bool = False, cache: bool = False) -> np.ndarray:
        return encode_texts(self.sbert(), documents, queries, "siamese" if queries is not None else None,
                            progress, cache=cache, desc="sentence encoder")

    def recompute(self, fs: FeatureSet, progress: bool = False):
        docs, queries = self.texts(fs)
        return self.forward_texts(docs, queries, progress)

    # ------------------------------------------------------------------ the top layers
    @property
    def n_layers(self) -> int:
        return len(transformer_blocks(self.model.base_model))

    def tracked(self, start: int, dtype="float32") -> TrackedModel:
        if self.family not in TOPS:
            raise InstattrError(f"layered methods support the {', '.join(sorted(TOPS))} families; "
                                f"{self.path} is a {self.family} model (its last-layer methods all work)")
        model = self.model
        blocks = [eager_copy(b) for b in transformer_blocks(model.base_model)[start:]]
        top = TOPS[self.family](model)
        return finish(TrackedModel(blocks, top, self.final_name, self.l2, None).to(self.device), dtype)

    def fingerprint(self) -> str:
        return f"{Path(self.path).resolve()}:{fingerprint(self.path)}"

    # ------------------------------------------------------------------ history
    def with_checkpoints(self, paths: Sequence[str], lrs: Optional[Sequence[float]] = None) -> "HFClassifier":
        """This classifier with its training checkpoints (folders of the same model, oldest first)
        and the learning rate used after each: ``lrs``, else each folder's trainer_state.json."""
        paths = [str(p) for p in paths]
        if lrs is not None and len(lrs) != len(paths):
            raise InstattrError(f"{len(paths)} checkpoints but {len(lrs)} learning rates")
        pairs = []
        for i, p in enumerate(paths):
            if not Path(p).is_dir():
                raise InstattrError(f"{p}: no such checkpoint folder")
            lr = float(lrs[i]) if lrs is not None else checkpoint_lr(p)
            if lr is None:
                raise InstattrError(f"{p}: no learning rate (no trainer_state.json with one); give them "
                                    "with --checkpoint-lrs")
            if not np.isfinite(lr) or lr < 0:
                raise InstattrError(f"{p}: learning rate must be finite and >= 0, got {lr}")
            pairs.append((p, lr))
        clone = copy.copy(self)
        clone.history = pairs
        return clone

    def checkpoints(self) -> List[Tuple[Classifier, float]]:
        if not self.history:
            raise InstattrError("tracin on a Hugging Face model needs its training checkpoints: pass "
                                "--checkpoints CKPT [CKPT ...] (save_pretrained folders, e.g. the Trainer's "
                                "checkpoint-* folders), and --checkpoint-lrs unless they hold trainer_state.json")
        return [(HFClassifier(p, self.label_names, self.is_pair, self.l2, self.max_length, self.sbert_spec,
                              self.final_name, self.run, self.device, sbert=self._sbert), lr) for p, lr in self.history]


def hf_summary(model, final_name: str) -> Dict[str, object]:
    """What run.json records of a model: family, final layer, layers."""
    try:
        n_layers = len(transformer_blocks(model.base_model))
    except InstattrError:
        n_layers = 0
    return {"family": str(model.config.model_type), "final_layer": final_name, "n_layers": n_layers}


def check_labels(model, label_names: Sequence[str], where: str) -> None:
    """The checkpoint's ``id2label`` must name the dataset's labels in order (default LABEL_i names
    are accepted when the count matches)."""
    id2label = {int(k): str(v) for k, v in (model.config.id2label or {}).items()}
    theirs = [id2label.get(i, f"LABEL_{i}") for i in range(int(model.config.num_labels))]
    generic = all(t == f"LABEL_{i}" for i, t in enumerate(theirs))
    same = [t.lower() for t in theirs] == [n.lower() for n in label_names]
    if len(theirs) != len(label_names) or not (generic or same):
        raise InstattrError(f"{where}: the model's labels {theirs} do not match the dataset's labels.json "
                            f"{list(label_names)}")

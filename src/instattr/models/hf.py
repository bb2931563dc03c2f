"""Any Hugging Face sequence classifier (``AutoModelForSequenceClassification``), encoder or decoder,
full or a PEFT adapter: imported, or fine-tuned by instattr.

The *final layer* is the model's last linear module with ``num_labels`` outputs (BERT:
``classifier``; RoBERTa, XLM-R, ELECTRA: ``classifier.out_proj``; GPT-2, Llama, Qwen2: ``score``);
a forward hook reads its input (the run's ``features``) and output. An encoder's head runs on one
pooled vector and its output is the logits (checked on every batch). A decoder's head runs on
every token and the model pools one of them; instattr pools the last token whose attention mask
is 1 -- what the model itself pools when its pad token differs from the text's tokens -- so
results do not depend on the padding side or on a pad token equal to EOS; where the model's own
pooling picks another token, :attr:`HFClassifier.own_pooling_differs` counts the rows.

A folder with ``adapter_config.json`` is a PEFT adapter: its base model is loaded from
``base_model_name_or_path`` (a local folder), the adapter on top, and the parameters the adapter
trains (its LoRA matrices, ``modules_to_save``) are what the layered methods track by default.
No code is ever run from a checkpoint (``trust_remote_code`` stays off).
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

from ..arrays import FinalLayer
from ..encoders import EncoderError
from ..errors import InstattrError
from ..store import Run
from .base import Classifier, Output, linear_to_final_layer
from .modules import find_blocks
from .rows import Rows, last_attended, tokenize

ADAPTER = "adapter_config.json"


class HFForward(nn.Module):
    """A Hugging Face classifier's own forward pass, reading its final layer with a hook: logits and
    features at one vector per row (a token-wise head pooled at the last attended token)."""

    def __init__(self, model: nn.Module, final_name: str):
        super().__init__()
        self.model, self.final_name = model, final_name

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> Output:
        final = self.model.get_submodule(self.final_name)
        seen: List[Tuple[torch.Tensor, torch.Tensor]] = []
        handle = final.register_forward_hook(lambda mod, i, o: seen.append((i[0], o)))
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        try:
            own = self.model(**kwargs).logits
        finally:
            handle.remove()
        if not seen:
            raise InstattrError(f"{self.final_name} never ran in the model's forward pass; name the final "
                                "layer with --final-layer")
        x, y = seen[-1]
        if y.dim() == 3:              # a head on every token (decoder classifiers): the last attended one
            rows = torch.arange(len(y), device=y.device)
            last = last_attended(attention_mask)
            x, y = x[rows, last], y[rows, last]
        return Output(logits=y, features=x, own=own, token_wise=seen[-1][1].dim() == 3)


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


def _folder_digest(h, folder: Path) -> None:
    for p in sorted(folder.glob("*")):
        if p.suffix in (".safetensors", ".bin", ".json") and p.is_file():
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}\0".encode())


def adapter_base(path) -> Optional[str]:
    """The base model folder of a PEFT adapter folder (None: not an adapter)."""
    cfg = Path(path) / ADAPTER
    if not cfg.is_file():
        return None
    try:
        base = json.loads(cfg.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError):
        raise InstattrError(f"{cfg}: unreadable adapter configuration") from None
    if not base:
        raise InstattrError(f"{cfg}: names no base_model_name_or_path")
    return str(base)


def fingerprint(path) -> str:
    """Sizes and modification times of a checkpoint's config and weights (an adapter's and its base's)."""
    folder = Path(path)
    h = hashlib.sha1()
    _folder_digest(h, folder)
    base = adapter_base(folder)
    if base is not None and Path(base).is_dir():
        _folder_digest(h, Path(base))
    return h.hexdigest()[:16]


def adapter_trainable(model) -> Optional[List[str]]:
    """The parameters a PEFT model's adapter trains: those that require gradients (a model loaded
    with ``is_trainable``), else by name (LoRA matrices and ``modules_to_save`` copies); None for a
    model that is not a PEFT model."""
    if not hasattr(model, "peft_config"):
        return None
    flagged = [n for n, p in model.named_parameters() if p.requires_grad]
    if flagged:
        return flagged
    return [n for n, _ in model.named_parameters() if ".lora_" in n or ".modules_to_save." in n]


def is_causal_lm(path) -> bool:
    """Whether a checkpoint folder (or an adapter's base) holds a causal LM: its config names a
    ``*ForCausalLM`` or ``*LMHeadModel`` architecture (read from config.json alone)."""
    folder = Path(path)
    base = adapter_base(folder) if folder.is_dir() else None
    cfg = Path(base if base is not None else folder) / "config.json"
    try:
        arch = json.loads(cfg.read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError):
        return False
    return any(isinstance(a, str) and (a.endswith("ForCausalLM") or a.endswith("LMHeadModel")) for a in arch)


def load_hf(path: str, causal: bool = False):
    """(tokenizer, model in eval mode, trainable parameter names or None) of a sequence-classification
    (``causal``: causal language model) checkpoint folder, or of a PEFT adapter folder over one (its
    trainable names: the adapter's)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    folder = Path(path)
    if not folder.is_dir():
        raise InstattrError(f"{path}: no such checkpoint folder")
    base = adapter_base(folder)
    try:
        if base is None:
            tok = AutoTokenizer.from_pretrained(str(folder))
            model = auto.from_pretrained(str(folder))
            trainable = None
        else:
            try:
                from peft import PeftModel
            except ImportError:
                raise InstattrError(f"{path}: a PEFT adapter needs peft (pip install peft)") from None
            has_tokenizer = any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
            tok = AutoTokenizer.from_pretrained(str(folder) if has_tokenizer else base)
            model = auto.from_pretrained(base)
            model = PeftModel.from_pretrained(model, str(folder), is_trainable=True)
            trainable = adapter_trainable(model)
    except InstattrError:
        raise
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        what = "causal language model" if causal else "sequence classifier"
        raise EncoderError(f"{path}: could not load a {what} ({msg})") from None
    for p in model.parameters():
        p.requires_grad_(False)
    return tok, model.eval(), trainable


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


def model_max_length(tok, model) -> int:
    """The tokenizer's maximum length, at most the model's position embeddings (RoBERTa: minus 2)."""
    n = int(getattr(tok, "model_max_length", 0) or 0)
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None:
        if model.config.model_type in ("roberta", "xlm-roberta", "camembert"):
            positions -= 2
        n = min(n, positions) if 0 < n < 1_000_000 else positions
    return int(n or 512)


class HFClassifier(Classifier):
    """A Hugging Face sequence classifier at ``path`` (loaded on first use)."""

    kind = "hf"
    prefix = "model."

    def __init__(self, path: str, label_names: Sequence[str], is_pair: bool, l2: float, max_length: int,
                 final_layer: Optional[str] = None, run: Optional[Run] = None, device=None,
                 checkpoints: Sequence[Tuple[str, float]] = (), loaded=None):
        super().__init__(label_names, "cross" if is_pair else None, run, device)
        self.path, self.l2, self.max_length = str(path), float(l2), int(max_length)
        self._final = final_layer
        self.history = list(checkpoints)
        self._loaded = None
        self._given = loaded        # (tokenizer, model, trainable) already in memory
        self.own_pooling_differs = 0   # rows whose model-pooled logits are not those of the last attended token

    # ------------------------------------------------------------------ loading
    def _load(self):
        if self._loaded is None:
            tok, model, trainable = self._given if self._given is not None else load_hf(self.path)
            if int(model.config.num_labels) != self.n_classes:
                raise InstattrError(f"{self.path}: the model has {model.config.num_labels} labels, the run "
                                    f"{self.n_classes} ({', '.join(self.label_names)})")
            if getattr(model.config, "pad_token_id", None) is None:
                # a decoder without a pad token refuses batches; instattr pools by the mask, not by this id
                model.config.pad_token_id = tokenize(tok, 2, ["a"]).pad_id
            self._final = find_final_layer(model, self._final)
            self._loaded = (tok, HFForward(model.to(self.device), self._final), trainable)
        return self._loaded

    @property
    def model(self):
        """The Hugging Face model (a ``PeftModel`` for an adapter)."""
        return self._load()[1].model

    @property
    def tokenizer(self):
        return self._load()[0]

    def module(self) -> HFForward:
        return self._load()[1]

    @property
    def final_name(self) -> str:
        """The final layer's name inside :meth:`module` (``model.`` + its name in the model)."""
        self._load()
        return "model." + self._final

    @property
    def final_layer_name(self) -> str:
        """The final layer's name in the Hugging Face model (``--final-layer``)."""
        self._load()
        return self._final

    def trainable(self) -> Optional[List[str]]:
        trainable = self._load()[2]
        return None if trainable is None else ["model." + n for n in trainable]

    @property
    def family(self) -> str:
        return str(self.model.config.model_type)

    def final_module(self) -> nn.Linear:
        return self.module().get_submodule(self.final_name)

    def final_layer(self) -> FinalLayer:
        return linear_to_final_layer(self.final_module(), self.l2)

    def tokenize(self, documents, queries=None) -> Rows:
        return tokenize(self.tokenizer, self.max_length, documents, queries)

    # ------------------------------------------------------------------ texts -> arrays
    @torch.inference_mode()
    def forward_batch(self, batch: dict) -> Tuple[np.ndarray, np.ndarray]:
        """(final layer's input, probabilities), float32, of one padded batch; the final layer must
        give the model's own logits (a token-wise head: where it pools the same token)."""
        module = self.module()
        out = module(**{k: v.to(self.device) for k, v in batch.items()})
        logits, own = out.logits.float(), out.own.float()
        differs = ~torch.isclose(logits, own, atol=1e-4, rtol=1e-4).all(-1)
        self.last_differs = differs.cpu().numpy()       # per row of this batch (Ray workers send it back)
        if differs.any():
            if not out.token_wise:
                raise InstattrError(f"{self.path}: {self._final} is not the model's last operation (its output is "
                                    "not the logits); name the final layer with --final-layer")
            self.own_pooling_differs += int(differs.sum())
        return out.features.float().cpu().numpy(), torch.softmax(logits, -1).cpu().numpy()

    # ------------------------------------------------------------------ the model
    def fingerprint(self) -> str:
        if not self.path:                     # a model in memory (instattr.Explainer): this object's
            return f"memory:{id(self.model)}"
        return f"{Path(self.path).resolve()}:{fingerprint(self.path)}"

    def summary(self) -> Dict[str, object]:
        """What run.json records of the model: family, final layer, blocks, adapter base."""
        try:
            n_layers = len(find_blocks(self.model)[1])
        except InstattrError:
            n_layers = 0
        out = {"family": self.family, "final_layer": self._final, "n_layers": n_layers}
        base = adapter_base(self.path) if self.path else None
        if base is not None:
            out["adapter_base"] = base
        return out

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
        return [(HFClassifier(p, self.label_names, self.is_pair, self.l2, self.max_length, self._final, self.run,
                              self.device), lr) for p, lr in self.history]


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


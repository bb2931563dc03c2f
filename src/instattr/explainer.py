"""The Python front door: instance attribution on objects in memory, from a notebook.

    >>> import instattr
    >>> explainer = instattr.Explainer(model, tokenizer, train=train_rows, methods=["nn-cos", "gc", "if", "rep"])
    >>> explainer.explain("a gorgeous, witty, seductive movie", k=5).to_frame()   # a pandas DataFrame
    >>> explainer.save("runs/notebook")            # a run for `instattr serve`, `attribute`, `evaluate`

``model`` is any Hugging Face sequence classifier (``AutoModelForSequenceClassification``, or a
PEFT model over one) and ``tokenizer`` its tokenizer. ``train`` (and the optional ``test``, which
gives serve its examples) is a ``datasets.Dataset``, a pandas DataFrame or a list of dicts, with
a text column (``text``, ``document``, ``sentence`` or ``premise``), an optional hypothesis column
(``query``, ``hypothesis``) and a label column (``label``: an integer, or a label name); other
names with ``text_field``, ``query_field``, ``label_field``. Labels are named after the model's
``id2label`` (or ``labels``). The constructor classifies the rows and fits every method once,
so ``explain`` costs one forward pass and one product per method.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from .arrays import FeatureSet
from .data import Split, records, split_of_rows
from .errors import InstattrError
from .ranking import Explanation, rank_live

DEFAULT_METHODS = ("nn-cos", "gc", "if", "rep")


def _label_names(model, labels: Optional[Sequence[str]]) -> List[str]:
    n = int(model.config.num_labels)
    if labels is not None:
        if len(labels) != n:
            raise InstattrError(f"labels: {len(labels)} names for a model with {n} labels")
        return [str(x) for x in labels]
    id2label = {int(k): str(v) for k, v in (getattr(model.config, "id2label", None) or {}).items()}
    return [id2label.get(i, str(i)) for i in range(n)]


class Explainer:
    """Fit instattr's methods on a model and training rows in memory (see the module docstring)."""

    def __init__(self, model, tokenizer, train, methods: Sequence[str] = DEFAULT_METHODS, test=None,
                 labels: Optional[Sequence[str]] = None, text_field: Optional[str] = None,
                 query_field: Optional[str] = None, label_field: Optional[str] = None, damping: float = 0.01,
                 max_length: Optional[int] = None, device=None, progress: bool = False, **options):
        from .attribution import method_options, resolve_methods
        from .models.hf import HFClassifier, adapter_trainable, model_max_length
        if not damping > 0:
            raise InstattrError(f"damping must be > 0 (it stands in for the final layer's L2), got {damping}")
        self.label_names = _label_names(model, labels)
        fields = (text_field, query_field, label_field)
        self.splits: Dict[str, Split] = {}
        for name, data in (("train", train), ("test", test)):
            rows = records(data, name)
            if rows or name == "train":
                self.splits[name] = split_of_rows(((f"{name} row {i}", r) for i, r in enumerate(rows)), name, name,
                                                  f"{name} row 0", self.label_names, *fields)
        self.is_pair = self.splits["train"].is_pair
        trainable = adapter_trainable(model)
        model.eval()
        length = int(max_length or model_max_length(tokenizer, model))
        self.classifier = HFClassifier("", self.label_names, self.is_pair, damping, length, device=device,
                                       loaded=(tokenizer, model, trainable))
        self.damping, self.progress = float(damping), progress
        self.features = {name: self._featurize(split) for name, split in self.splits.items()}
        self.names = resolve_methods(list(methods))
        per = method_options(self.names, options)
        self._sentence = None
        self.fitted = {n: self._fit(n, per[n]) for n in self.names}

    # ------------------------------------------------------------------ fitting
    def _featurize(self, split: Split) -> FeatureSet:
        docs = [e.document for e in split.examples]
        queries = [e.query for e in split.examples] if self.is_pair else None
        fs = self.classifier.featurize(docs, queries, labels=split.labels, progress=self.progress)
        return fs.replace(idx=np.asarray(split.idx))

    def _model_for(self, method):
        if method.needs == "classifier":
            return self.classifier
        if method.needs == "sentence":
            if self._sentence is None:
                from .sentence import SentenceEmbeddings
                self._sentence = SentenceEmbeddings(None, self.classifier.device)
            return self._sentence
        return self.classifier.final_layer()

    def _fit(self, name: str, options: dict):
        from .methods import get_method
        method = get_method(name, **options)
        return method.fit(self.features["train"], self._model_for(method))

    # ------------------------------------------------------------------ explaining
    def explain(self, text: str, query: Optional[str] = None, k: int = 5) -> Explanation:
        """The prediction for ``text`` (and ``query`` on sentence pairs), then per method its ``k``
        most supporting and most opposing training rows (``.to_frame()``: a DataFrame)."""
        if int(k) < 1:
            raise InstattrError(f"k must be positive, got {k}")
        fs = self.classifier.featurize([text], [query] if query is not None else None)
        ranked = rank_live(self.fitted, fs, [e.idx for e in self.splits["train"].examples], int(k))[0]
        rows = {e.idx: {"text": e.document, **({"query": e.query} if e.query is not None else {}),
                        "label": self.label_names[e.label]} for e in self.splits["train"].examples}
        return Explanation(text=text, query=query, prediction=self.label_names[int(fs.pred[0])],
                           probs={n: float(p) for n, p in zip(self.label_names, fs.probs[0])}, methods=ranked,
                           rows=rows)

    # ------------------------------------------------------------------ a run on disk
    def save(self, out, overwrite: bool = False):
        """Write a run directory (the model and tokenizer under ``model/hf``, the rows as a dataset
        under ``data/``, their features) that ``instattr serve``, ``attribute`` and ``evaluate`` read."""
        import json

        from .encoders import describe
        from .manifest import FORMAT, DataInfo, EncoderInfo, HFInfo, Manifest
        from .models.hf import adapter_base, fingerprint
        from .pipeline import _plain, _save_final_layer, _versions, _write_split, build_atomically
        from .store import write_json
        out = Path(out).resolve()
        clf = self.classifier

        def make(tmp: Path) -> None:
            folder = tmp / "model" / "hf"
            clf.model.save_pretrained(folder)
            clf.tokenizer.save_pretrained(folder)
            data = tmp / "data"
            data.mkdir()
            (data / "labels.json").write_text(json.dumps(self.label_names))
            metrics = {"timings": {}}
            for name, split in self.splits.items():
                rows = [{"idx": e.idx, "document": e.document, **({"query": e.query} if e.query is not None else {}),
                         "label": e.label} for e in split.examples]
                (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
                fs = self.features[name]
                _write_split(tmp, split, fs.features, fs.probs, len(self.label_names), metrics)
            lin = clf.final_layer()
            _save_final_layer(tmp, lin.w, lin.b)
            summary = {k: v for k, v in clf.summary().items() if k != "adapter_base"}
            hf = HFInfo(path="model/hf", origin="explainer", fingerprint=fingerprint(folder), max_length=clf.max_length,
                        adapter_base=adapter_base(folder), own_pooling_differs=clf.own_pooling_differs, **summary)
            manifest = Manifest(format=FORMAT, mode="import",
                                data=DataInfo(name="explainer", root=str(out / "data"), arg=str(out / "data"),
                                              is_pair=self.is_pair, n={k: len(v) for k, v in self.splits.items()}),
                                label_names=tuple(self.label_names), eval_split="test" if "test" in self.splits
                                else "train", sbert=EncoderInfo(**describe(None)),
                                pair_mode="cross" if self.is_pair else None, l2=self.damping, seed=0, hf=hf,
                                config=_plain({"methods": self.names, "damping": self.damping}),
                                versions=_versions())
            metrics.setdefault("test_accuracy", None)
            write_json(tmp / "metrics.json", metrics)
            write_json(tmp / "run.json", manifest.to_dict())

        return build_atomically(out, overwrite, make)



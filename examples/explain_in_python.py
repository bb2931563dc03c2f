"""instattr from Python, as in a notebook: a classifier in memory, its training rows, explanations.

    python examples/finetune_sst2.py --out models/minilm-sst2            # a classifier to explain (once)
    python examples/explain_in_python.py --model models/minilm-sst2 --save runs/notebook
    instattr serve --run runs/notebook                                    # the same, in the browser

Each cell of a notebook is a block below. Nothing is read from a run directory: the model and the
rows are Python objects (a list of dicts here; a pandas DataFrame or a datasets.Dataset work too).
"""
import argparse

from transformers import AutoModelForSequenceClassification, AutoTokenizer

import instattr
from instattr.data import load_dataset

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--model", default="models/minilm-sst2", help="a sequence classifier folder (save_pretrained)")
ap.add_argument("--data", default="sst2", help="where the training rows come from (a name or folder)")
ap.add_argument("--limit", type=int, default=2000, help="training rows to attribute over")
ap.add_argument("--text", default="a gorgeous , witty , seductive movie")
ap.add_argument("--save", help="also write a run directory here (for instattr serve)")
args = ap.parse_args()

# --- the model and its training rows, in memory
tokenizer = AutoTokenizer.from_pretrained(args.model)
model = AutoModelForSequenceClassification.from_pretrained(args.model)
dataset = load_dataset(args.data)
train = [{"text": e.document, "label": e.label} for e in dataset.splits["train"].examples[:args.limit]]
test = [{"text": e.document, "label": e.label} for e in dataset.splits["test"].examples[:200]] \
    if "test" in dataset.splits else None

# --- fit once: the rows are classified and every method fitted here
explainer = instattr.Explainer(model, tokenizer, train=train, test=test, methods=["nn-cos", "gc", "if", "rep"])

# --- explain a text: its prediction, then each method's top supporting and opposing training rows
explanation = explainer.explain(args.text, k=3)
print(f"{args.text!r}: {explanation.prediction} "
      + ", ".join(f"{name} {p:.3f}" for name, p in explanation.probs.items()))
frame = explanation.to_frame()
print(frame.to_string(index=False, max_colwidth=60))

# --- a run directory for the command line and the explorer
if args.save:
    run = explainer.save(args.save, overwrite=True)
    print(f"saved {run.path}: instattr serve --run {run.path}")

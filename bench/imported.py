"""An imported run against the model itself, on sampled rows, with nothing from instattr in the reference.

    python bench/imported.py MODEL_FOLDER RUN [--n-test 40] [--n-train 400]

Reference: transformers alone (the model in float64): its softmax probabilities, the input of its final
linear layer caught by a forward hook of this script's own, and autograd gradients of each example's
loss with respect to the final layer's weight and bias (test rows at the predicted label, training rows
at the gold label). Prints the largest differences of the run's stored probabilities, and of its stored
``gd`` and ``nn-cos`` scores (``instattr attribute --methods paper`` first), from the reference.
"""
import argparse
import os

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main():
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from instattr.store import Run
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("run")
    ap.add_argument("--n-test", type=int, default=40)
    ap.add_argument("--n-train", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    run = Run.load(a.run)
    split = run.eval_split
    rng = np.random.default_rng(a.seed)
    test_rows = np.sort(rng.choice(len(run.features(split)), min(a.n_test, len(run.features(split))), replace=False))
    train_rows = np.sort(rng.choice(len(run.features("train")), min(a.n_train, len(run.features("train"))),
                                    replace=False))
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForSequenceClassification.from_pretrained(a.model).eval().double()
    final = [m for m in model.modules() if isinstance(m, torch.nn.Linear)
             and m.out_features == model.config.num_labels][-1]
    max_length = run.manifest.hf.max_length

    def reference(examples, labels):
        seen, probs, grads = [], [], []
        handle = final.register_forward_hook(lambda m, i, o: seen.append(i[0][0].detach()))
        try:
            for e, y in zip(examples, labels):
                args = [e.document] + ([e.query] if e.query is not None else [])
                logits = model(**tok(*args, truncation=True, max_length=max_length, return_tensors="pt")).logits
                model.zero_grad()
                torch.nn.functional.cross_entropy(logits, torch.tensor([int(y)])).backward()
                grads.append(torch.cat([final.weight.grad, final.bias.grad[:, None]], 1).reshape(-1))
                probs.append(torch.softmax(logits[0].detach(), -1))
        finally:
            handle.remove()
        return torch.stack(probs).numpy(), torch.stack(seen).numpy(), torch.stack(grads).numpy()

    test, train = run.features(split), run.features("train")
    te_ex = [run.examples(split)[i] for i in test_rows]
    tr_ex = [run.examples("train")[i] for i in train_rows]
    p_te, f_te, g_te = reference(te_ex, test.pred[test_rows])
    p_tr, f_tr, g_tr = reference(tr_ex, train.label[train_rows])
    print(f"{a.run}: {len(test_rows)} {split} x {len(train_rows)} train rows sampled (seed {a.seed})")
    print(f"probabilities: max |stored - model| = {np.abs(test.probs[test_rows] - p_te).max():.2e} ({split}), "
          f"{np.abs(train.probs[train_rows] - p_tr).max():.2e} (train)")
    gd_ref = g_te @ g_tr.T
    cos_ref = (f_te / np.linalg.norm(f_te, axis=1, keepdims=True)) @ (f_tr / np.linalg.norm(f_tr, axis=1,
                                                                                            keepdims=True)).T
    for name, ref in (("gd", gd_ref), ("nn-cos", cos_ref)):
        if not run.has_scores(name, split):
            print(f"{name}: no stored scores (run `instattr attribute --run {a.run} --methods paper`)")
            continue
        ours = np.asarray(run.scores(name, split))[np.ix_(test_rows, train_rows)].astype(np.float64)
        scale = np.abs(ref).max()
        print(f"{name}: max |stored - reference| = {np.abs(ours - ref).max():.2e} (scores up to {scale:.2e}; "
              f"relative {np.abs(ours - ref).max() / scale:.2e})")


if __name__ == "__main__":
    main()

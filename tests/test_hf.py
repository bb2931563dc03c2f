"""Hugging Face classifiers trained elsewhere, imported: one suite over BERT, RoBERTa and DistilBERT.

After kronfluence's testable tasks: each family is a tiny random model built from a config in the
test, trained a few steps with plain torch, saved with ``save_pretrained`` and imported. References
are independent of instattr: the model's own outputs, autograd gradients of its loss with respect to
the final layer's weight and bias, features caught by a hook of the test's own, autograd Hessians.
"""
import json

import numpy as np
import pytest
import torch
import transformers as T
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from instattr.cli import main
from instattr.methods import get_method
from instattr.models import classifier_for
from instattr.pipeline import ImportConfig, import_run
from instattr.store import Run

from conftest import WORDS, make_dataset

LR = 5e-3


pytestmark = pytest.mark.usefixtures("torch_single_thread")   # conftest


def bert_tokenizer(folder, cls=T.BertTokenizerFast):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return cls(vocab_file=str(folder / "vocab.txt"), do_lower_case=True), len(vocab)


def roberta_tokenizer(folder):
    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", "<mask>"] + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tok = T.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                    pad_token="<pad>", mask_token="<mask>", cls_token="<s>", sep_token="</s>",
                                    model_input_names=["input_ids", "attention_mask"])
    return tok, len(vocab)


def build(family, folder, n_labels):
    small = dict(num_hidden_layers=2, num_attention_heads=2, num_labels=n_labels, initializer_range=0.3)
    if family == "bert":
        tok, v = bert_tokenizer(folder)
        cfg = T.BertConfig(vocab_size=v, hidden_size=16, intermediate_size=32, max_position_embeddings=128, **small)
        return tok, T.BertForSequenceClassification(cfg)
    if family == "roberta":
        tok, v = roberta_tokenizer(folder)
        cfg = T.RobertaConfig(vocab_size=v, hidden_size=16, intermediate_size=32, max_position_embeddings=130,
                              pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1, **small)
        return tok, T.RobertaForSequenceClassification(cfg)
    tok, v = bert_tokenizer(folder, T.DistilBertTokenizerFast)
    cfg = T.DistilBertConfig(vocab_size=v, dim=16, n_layers=2, n_heads=2, hidden_dim=32, max_position_embeddings=128,
                             num_labels=n_labels, initializer_range=0.3)
    return tok, T.DistilBertForSequenceClassification(cfg)


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def train_few_steps(tok, model, data, steps, checkpoints=None):
    """Plain torch: AdamW on the training file; ``checkpoints``: folders to save along the way."""
    torch.manual_seed(0)
    train = rows(data / "train.jsonl")
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
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


class Reference:
    """Per-example quantities straight from a transformers model (nothing from instattr)."""

    def __init__(self, folder):
        self.tok = T.AutoTokenizer.from_pretrained(folder)
        self.model = T.AutoModelForSequenceClassification.from_pretrained(folder).eval().double()
        self.final = self.model.get_submodule(find_last_linear(self.model))

    def encode(self, r):
        args = [r["document"]] + ([r["query"]] if "query" in r else [])
        return self.tok(*args, truncation=True, max_length=64, return_tensors="pt")

    def probs_and_features(self, rs):
        seen = []
        h = self.final.register_forward_hook(lambda m, i, o: seen.append(i[0][0].detach()))
        try:
            with torch.no_grad():
                probs = [torch.softmax(self.model(**self.encode(r)).logits[0], -1) for r in rs]
        finally:
            h.remove()
        return torch.stack(probs).numpy(), torch.stack(seen).numpy()

    def final_grads(self, rs, labels):
        """(n, C*(d+1)) gradients of each example's loss w.r.t. the final layer's [weight | bias] rows."""
        out = []
        for r, y in zip(rs, labels):
            self.model.zero_grad()
            loss = torch.nn.functional.cross_entropy(self.model(**self.encode(r)).logits, torch.tensor([int(y)]))
            loss.backward()
            out.append(torch.cat([self.final.weight.grad, self.final.bias.grad[:, None]], 1).reshape(-1))
        return torch.stack(out).numpy()


def find_last_linear(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and m.out_features == model.config.num_labels][-1]


def final_hessian(features, labels, w, b, damping):
    """Autograd Hessian over [weight, bias] of mean CE + damping * ||[weight, bias]||^2 at fixed features."""
    f = torch.as_tensor(features, dtype=torch.float64)
    y = torch.as_tensor(labels)
    c, d = w.shape

    def loss(theta):
        wb = theta.view(c, d + 1)
        logits = f @ wb[:, :d].T + wb[:, d]
        return torch.nn.functional.cross_entropy(logits, y) + damping * (theta ** 2).sum()
    theta = torch.cat([torch.as_tensor(w), torch.as_tensor(b)[:, None]], 1).reshape(-1).double()
    return torch.autograd.functional.hessian(loss, theta).numpy()


FAMILIES = ["bert", "roberta", "distilbert"]
DAMPING = 0.05


@pytest.fixture(scope="module", params=FAMILIES)
def imported(request, tmp_path_factory, tiny_encoder):
    """(family, model folder, imported run, checkpoint folders) for one family."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    data = make_dataset(root / "data", n_train=24, n_test=8, n_dev=4, pairs=family == "bert")
    tok, model = build(family, root, 2)
    ckpts = {1: root / "ckpt-2", 3: root / "ckpt-4"}
    model, saved = train_few_steps(tok, model, data, 4, ckpts)
    folder = root / "model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    run = import_run(ImportConfig(model=str(folder), data=str(data), damping=DAMPING, sbert=tiny_encoder,
                                  checkpoints=tuple(map(str, saved)), checkpoint_lrs=(LR, LR)),
                     root / "run", progress=False)
    return family, folder, run, saved


def test_probabilities_and_final_layer_are_the_models_own(imported):
    family, folder, run, _ = imported
    ref = Reference(folder)
    for split in run.splits:
        probs, feats = ref.probs_and_features([r.__dict__ for r in run.examples(split)])
        fs = run.features(split)
        np.testing.assert_allclose(fs.probs, probs, atol=1e-5)
        np.testing.assert_allclose(fs.features, feats, atol=1e-5)
    lin = run.final_layer()
    np.testing.assert_allclose(lin.w, ref.final.weight.detach().numpy(), atol=1e-7)
    np.testing.assert_allclose(lin.b, ref.final.bias.detach().numpy(), atol=1e-7)
    m = run.manifest
    assert m.mode == "import" and m.hf.family == family and m.l2 == DAMPING and m.hf.final_layer == find_last_linear(
        ref.model) and m.pair_mode == ("cross" if family == "bert" else None)


def test_last_layer_methods_equal_autograd_over_weight_and_bias(imported):
    _, folder, run, _ = imported
    ref = Reference(folder)
    train, test = run.features("train"), run.features("test")
    tr = [e.__dict__ for e in run.examples("train")]
    te = [e.__dict__ for e in run.examples("test")]
    g_tr, g_te = ref.final_grads(tr, train.label), ref.final_grads(te, test.pred)
    lin = run.final_layer()
    gd = get_method("gd").fit(train, lin).score(test)
    np.testing.assert_allclose(gd, g_te @ g_tr.T, rtol=1e-4, atol=1e-6 * np.abs(g_te @ g_tr.T).max())
    _, f_tr = ref.probs_and_features(tr)
    _, f_te = ref.probs_and_features(te)
    cos = (f_te / np.linalg.norm(f_te, axis=1, keepdims=True)) @ (f_tr / np.linalg.norm(f_tr, axis=1, keepdims=True)).T
    np.testing.assert_allclose(get_method("nn-cos").fit(train, lin).score(test), cos, atol=1e-5)
    h = final_hessian(f_tr, train.label, lin.w, lin.b, DAMPING)
    want = g_te @ np.linalg.solve(h, g_tr.T)
    np.testing.assert_allclose(get_method("if").fit(train, lin).score(test), want, rtol=1e-3,
                               atol=1e-5 * np.abs(want).max())


def test_representer_points_decompose_the_refit_layer_with_its_bias(imported):
    _, _, run, _ = imported
    train, test = run.features("train"), run.features("test")
    rep = get_method("rep").fit(train, run.final_layer())
    assert rep.converged_ and rep.reconstruction_["max_abs_error"] < 1e-8
    scores = rep.score(test).astype(np.float64)
    refit_logits = run.final_layer().augment(test.features) @ rep.weight_.T
    np.testing.assert_allclose(scores.sum(1), refit_logits[np.arange(len(test)), test.pred], rtol=1e-4, atol=1e-5)


def test_tracked_blocks_reproduce_the_models_logits(imported):
    """The family's top module run from cached hidden states gives the model's own features."""
    from instattr.layers.cache import Examples
    _, _, run, _ = imported
    clf = classifier_for(run)
    for start in (0, 1, 2):
        model = clf.tracked(start, "float64")
        fs = run.features("test")
        got = np.zeros_like(fs.features, dtype=np.float64)
        with torch.no_grad():
            for pos, b in Examples(clf, fs, start).batches(3, torch.float64):
                got[pos] = model.features(**b).numpy()
        np.testing.assert_allclose(got, fs.features, atol=1e-5)


def test_if_top_full_rank_equals_the_exact_gauss_newton(imported):
    """Full-rank projected if-top over the top block and the family's head = brute-force GGN influence."""
    from instattr.layers.cache import Examples
    _, _, run, _ = imported
    clf = classifier_for(run)
    model = clf.tracked(1, "float64")
    train, test = run.features("train"), run.features("test")

    def loop(fs, labels):
        ex = Examples(clf, fs, 1)
        grads, jacs = [], []
        for i in range(len(fs)):
            b = ex.batch([i], torch.float64)
            rows = []
            for c in range(model.n_classes):
                model.zero_grad()
                model(**b)[0, c].backward()
                rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
            jac = torch.stack(rows)
            with torch.no_grad():
                p = torch.softmax(model(**b)[0], -1)
            e = p.clone()
            e[int(labels[i])] -= 1
            grads.append(e @ jac)
            jacs.append((jac, p))
        return torch.stack(grads), jacs

    g_tr, jacs = loop(train, train.label)
    g_te, _ = loop(test, test.pred)
    h = sum(j.T @ (torch.diag(p) - torch.outer(p, p)) @ j for j, p in jacs) / len(train)
    penalized = torch.cat([torch.full((p.numel(),), n in model.penalized()) for n, p in model.named_parameters()])
    h = h + torch.diag(2 * DAMPING * penalized.double() + 0.01)
    want = (g_te @ torch.linalg.solve(h, g_tr.T)).numpy()
    got = get_method("if-top", layers=1, proj_dim=1000, projection="orthogonal", damping=0.01, dtype="float64",
                     progress=False).fit(train, clf).score(test)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5 * np.abs(want).max())


def test_tracin_sums_learning_rate_times_gd_over_the_checkpoints(imported):
    _, _, run, saved = imported
    train, test = run.features("train"), run.features("test")
    tr = [e.__dict__ for e in run.examples("train")]
    te = [e.__dict__ for e in run.examples("test")]
    want = 0
    for folder in saved:
        ref = Reference(folder)
        want = want + LR * ref.final_grads(te, test.pred) @ ref.final_grads(tr, train.label).T
    got = get_method("tracin").fit(train, classifier_for(run)).score(test)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5 * np.abs(want).max())


def test_every_command_works_on_an_imported_run(imported, capsys):
    family, _, run, _ = imported
    path = str(run.path)
    query = ["--query", "the cat saw the dog"] if family == "bert" else []
    assert main(["--quiet", "predict", "--run", path, "the dog saw the cat", *query, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["label"] in ("non-entailment", "entailment", "negative", "positive")
    assert main(["--quiet", "attribute", "--run", path, "--methods", "paper,gd-top", "--layers", "1",
                 "--proj-dim", "3"]) == 0
    assert "gd-top: 8 x 24 scores" in capsys.readouterr().out
    assert main(["--quiet", "explain", "--run", path, "the dog saw the cat", *query, "--methods", "if,rep,gd-top",
                 "--layers", "1", "--proj-dim", "3", "--k", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    ids = {e.idx: e for e in run.examples("train")}
    for row in out["methods"]["if"]["supporting"]:
        assert ids[row["idx"]].document == row["text"]
    for name in ("correlation", "retrain", "randomized"):
        assert main(["--quiet", "evaluate", name, "--run", path, "--n-test", "3"] +
                    (["--n-random", "3"] if name == "retrain" else [])) == 0
    assert "final linear layer" in (run.path / "results" / "retrain.md").read_text()
    assert main(["--quiet", "report", "--run", path]) == 0
    assert "imported from" in (run.path / "report.html").read_text()


def test_import_refuses_mismatched_labels_and_bad_damping(tmp_path, tiny_encoder, capsys):
    data = make_dataset(tmp_path / "data", n_train=12, n_test=4, n_dev=0)
    tok, model = build("bert", tmp_path, 2)
    model.config.id2label = {0: "yes", 1: "no"}
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    args = ["--quiet", "import", "--model", str(tmp_path / "m"), "--data", str(data), "--sbert", tiny_encoder]
    assert main(args + ["--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "['yes', 'no']" in err and "['negative', 'positive']" in err
    assert not (tmp_path / "run").exists()
    model.config.id2label = {0: "LABEL_0", 1: "LABEL_1"}        # default names: the count is what matters
    model.save_pretrained(tmp_path / "m")
    assert main(args + ["--out", str(tmp_path / "run"), "--damping", "0"]) == 2
    assert "--damping must be > 0" in capsys.readouterr().err
    assert main(args + ["--out", str(tmp_path / "run")]) == 0


def test_tracin_without_checkpoints_says_what_it_needs(tmp_path, tiny_encoder, capsys):
    data = make_dataset(tmp_path / "data", n_train=12, n_test=4, n_dev=0)
    tok, model = build("distilbert", tmp_path, 2)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    run = import_run(ImportConfig(model=str(tmp_path / "m"), data=str(data), sbert=tiny_encoder), tmp_path / "r",
                     progress=False)
    assert main(["--quiet", "attribute", "--run", str(run.path), "--methods", "tracin"]) == 2
    assert "--checkpoints CKPT" in capsys.readouterr().err
    assert main(["--quiet", "attribute", "--run", str(run.path), "--methods", "tracin", "--checkpoints",
                 str(tmp_path / "m")]) == 2
    assert "--checkpoint-lrs" in capsys.readouterr().err
    assert main(["--quiet", "attribute", "--run", str(run.path), "--methods", "tracin", "--checkpoints",
                 str(tmp_path / "m"), "--checkpoint-lrs", "0.5"]) == 0
    gd = get_method("gd").fit(run.features("train"), run.final_layer()).score(run.features("test"))
    np.testing.assert_allclose(Run.load(run.path).scores("tracin"), 0.5 * gd, rtol=1e-4, atol=1e-7)


def test_finetune_checkpoint_imports_to_the_same_run(tmp_path, tiny_encoder, toy_data):
    from instattr.models.head import HeadConfig
    from instattr.pipeline import TrainConfig, train_run
    ft = train_run(TrainConfig(data=str(toy_data), encoder=tiny_encoder, mode="finetune",
                               head=HeadConfig(epochs=1, batch_size=8)), tmp_path / "ft", progress=False)
    again = import_run(ImportConfig(model=str(ft.path / "model" / "hf"), data=str(toy_data), damping=ft.manifest.l2,
                                    sbert=tiny_encoder, max_length=128), tmp_path / "imp", progress=False)
    for split in ft.splits:
        a, b = ft.features(split), again.features(split)
        np.testing.assert_array_equal(a.idx, b.idx)
        for key in ("probs", "features", "encoder"):
            np.testing.assert_allclose(getattr(a, key), getattr(b, key), atol=1e-6)
    np.testing.assert_allclose(ft.final_layer().w, again.final_layer().w)
    np.testing.assert_allclose(ft.final_layer().b, again.final_layer().b)
    assert ft.final_layer().l2 == again.final_layer().l2


def test_the_example_script_needs_no_instattr_and_imports(tmp_path, tiny_encoder, toy_data):
    """examples/finetune_sst2.py (plain transformers) -> instattr import -> the model's own probabilities."""
    import ast
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).parents[1] / "examples" / "finetune_sst2.py"
    tree = ast.parse(script.read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any(m and m.startswith("instattr") for m in imported)
    out = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "m"), "--data", str(toy_data),
                          "--encoder", tiny_encoder, "--limit", "24", "--epochs", "2", "--batch-size", "8"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "m" / "checkpoint-3" / "trainer_state.json").exists()
    run = import_run(ImportConfig(model=str(tmp_path / "m"), data=str(toy_data), sbert=tiny_encoder,
                                  checkpoints=(str(tmp_path / "m" / "checkpoint-3"), str(tmp_path / "m" / "checkpoint-6"))),
                     tmp_path / "run", progress=False)
    ref = Reference(tmp_path / "m")
    probs, _ = ref.probs_and_features([e.__dict__ for e in run.examples("test")])
    np.testing.assert_allclose(run.features("test").probs, probs, atol=1e-5)
    assert run.manifest.hf.checkpoint_lrs == (2e-5, 2e-5)      # read from trainer_state.json


def test_top_block_scopes_retrain_and_reinitialise_from_cached_states(imported):
    """--scope top-1: the randomized test changes the features (so nn-* rankings move), and
    retraining is deterministic: an all-kept mask gives exactly the "before" probabilities."""
    from instattr.evaluate.randomized import run_randomized
    from instattr.evaluate.retrain import run_retrain
    from instattr.evaluate.top_layers import random_top, retrain_top
    _, _, run, _ = imported
    clf = classifier_for(run)
    train, test = run.features("train"), run.features("test").subset([0, 1])
    r_train, r_test, layer = random_top(clf, 1, train, test, seed=3)
    assert np.abs(r_train.features - train.features).max() > 1e-2          # the features themselves change
    np.testing.assert_allclose(r_test.probs, torch.softmax(torch.as_tensor(layer.logits(r_test.features)), -1).numpy(),
                               atol=1e-5)
    res = run_randomized(run, methods=["nn-cos", "gd"], n_test=4, scope="top-1")
    assert res["scope"] == "top-1" and "top 1 transformer block" in (run.path / "results" / "randomized.md").read_text()
    masks = np.ones((2, len(train)), dtype=bool)
    masks[1, :8] = False
    after, before = retrain_top(clf, 1, train, test, masks, epochs=1, batch_size=8)
    np.testing.assert_array_equal(after[0], before[0])
    assert not np.allclose(after[1], before[1])
    out = run_retrain(run, methods=["gd"], n_test=2, ks=(3,), n_random=1, scope="top-1", progress=False)
    assert out["scope"] == "top-1" and "top 1 transformer block" in (run.path / "results" / "retrain.md").read_text()
    with pytest.raises(Exception, match="top-1 .. top-2"):
        run_randomized(run, methods=["gd"], n_test=2, scope="top-5")

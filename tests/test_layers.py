"""Methods over tracked modules inside the model's own forward pass, against brute force in float64.

A micro BERT (8 wide, 2 layers, random weights with a large init so texts differ) under instattr's
head, and toy runs. Brute force = per-example gradients and logit Jacobians by loops of autograd
calls on each example alone, Hessians by torch.autograd.functional.hessian, inverses by torch.linalg.
"""
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertModel, BertTokenizerFast

from instattr.attribution import attribute_run, attribute_texts, fit_method
from instattr.layers import Curvature, GaussNewton, LiSSA
from instattr.layers.attributors import projector_for
from instattr.layers.grads import per_example_grads
from instattr.layers.projection import tracking
from instattr.methods import get_method
from instattr.models import classifier_for
from instattr.models.head import HeadConfig, pair_input
from instattr.pipeline import TrainConfig, train_run
from instattr.ranking import explain
from instattr.store import Run

from _brute import Brute
from conftest import WORDS, make_dataset

F64 = dict(dtype="float64", progress=False)


pytestmark = pytest.mark.usefixtures("torch_single_thread")   # conftest


@pytest.fixture(scope="module")
def micro_encoder(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("micro-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab=str(folder / "vocab.txt"), do_lower_case=True)
    assert len(tok.get_vocab()) == len(vocab)          # words are real tokens, not [UNK]
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=16, max_position_embeddings=128, initializer_range=0.3)
    BertModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def _run(root, encoder, pairs=False, **cfg):
    data = make_dataset(root / "data", n_train=14, n_test=4, n_dev=0, pairs=pairs)
    head = HeadConfig(epochs=4, lr=1e-2, batch_size=8, l2=0.05)
    return train_run(TrainConfig(data=str(data), encoder=encoder, head=head, **cfg), root / "run", progress=False)


@pytest.fixture(scope="module")
def single(tmp_path_factory, micro_encoder):
    return _run(tmp_path_factory.mktemp("single"), micro_encoder, pooling="mean")


@pytest.fixture(scope="module")
def siamese(tmp_path_factory, micro_encoder):
    return _run(tmp_path_factory.mktemp("siamese"), micro_encoder, pairs=True)   # cls pooling


@pytest.fixture(scope="module")
def three(tmp_path_factory, micro_encoder):
    """A three-class run (two reduced logit directions, so two Gauss-Newton factor rows per example):
    the toy sentences, with the ones about an animal in a third class."""
    import json
    root = tmp_path_factory.mktemp("three")
    data = make_dataset(root / "data", n_train=14, n_test=4, n_dev=0)
    for split in ("train", "test"):
        path = data / f"{split}.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for r in rows:
            if any(w in r["document"] for w in ("dog", "cat", "man", "woman")):
                r["label"] = 2
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "labels.json").write_text(json.dumps(["negative", "positive", "animal"]))
    head = HeadConfig(epochs=4, lr=1e-2, batch_size=8, l2=0.05)
    run = train_run(TrainConfig(data=str(data), encoder=micro_encoder, head=head, pooling="mean"), root / "run",
                    progress=False)
    assert run.features("train").probs.shape[1] == 3 and len(set(run.features("train").label)) == 3
    return run


@pytest.fixture(scope="module")
def cross(tmp_path_factory, micro_encoder):
    return _run(tmp_path_factory.mktemp("cross"), micro_encoder, pairs=True, pair_mode="cross")


# ---------------------------------------------------------------- brute force
def head_params(run):
    from safetensors.torch import load_file
    return load_file(str(run.path / "model" / "head.safetensors"))


def gold_not_pred(fs):
    """The test rows with gold labels that differ from the predictions: the test side must use pred."""
    from dataclasses import replace
    return replace(fs, label=(np.asarray(fs.pred) + 1) % fs.probs.shape[1])


def scores(name, run, **options):
    m = get_method(name, **{**F64, **options})
    return m.fit(run.features("train"), classifier_for(run)).score(gold_not_pred(run.features("test"))), m


def spearman_rows(a, b):
    from scipy.stats import spearmanr
    return np.mean([spearmanr(x, y)[0] for x, y in zip(a, b)])


# ---------------------------------------------------------------- the model's own forward, tracked modules
@pytest.mark.parametrize("kind", ["single", "siamese", "cross"])
def test_the_models_own_forward_gives_the_stored_features(kind, request):
    """The classifier as one module (encoder, pooling, head) reproduces the run's stored features
    from right-padded batches, and reads each sentence of a siamese pair on its own."""
    run = request.getfixturevalue(kind)
    clf = classifier_for(run)
    test = run.features("test")
    rows = clf.rows(test)
    assert len(rows.sides) == (2 if kind == "siamese" else 1)
    got = np.zeros_like(test.features)
    with torch.no_grad():
        for pos in rows.order(3):
            got[pos] = clf.module()(**rows.batch(pos)).features.numpy()
    np.testing.assert_allclose(got, test.features, atol=1e-5)
    head = {k: v.double() for k, v in head_params(run).items()}
    enc = clf.encoder()
    ds = run.examples("test")
    docs, queries = [e.document for e in ds], [e.query for e in ds]
    full = enc.encode(docs, queries if kind == "cross" else None, progress=False)
    if kind == "siamese":
        full = np.concatenate([full, enc.encode(queries, progress=False)], 1)
    x = torch.as_tensor(pair_input(full, run.manifest.pair_mode)).double()
    np.testing.assert_allclose(torch.tanh(x @ head["dense_w"].T + head["dense_b"]).numpy(), got, atol=1e-5)



@pytest.mark.parametrize("kind", ["single", "siamese", "cross"])
def test_a_new_text_gets_the_probabilities_of_the_same_stored_row(kind, request, tmp_path):
    """New texts go through the head as it was trained (the run's pair mode; its embeddings
    are not the siamese sbert-* vectors of a cross-pair run)."""
    from instattr.sentence import SentenceEmbeddings
    run = request.getfixturevalue(kind)
    ds = run.examples("test")
    docs, queries = [e.document for e in ds], [e.query for e in ds] if kind != "single" else None
    clf = classifier_for(run)
    got = clf.featurize(docs, queries)
    np.testing.assert_allclose(got.probs, run.features("test").probs, atol=1e-5)
    if kind == "cross":
        emb = SentenceEmbeddings(run).encode(docs, queries)
        assert emb.shape[1] == run.manifest.head.d_in


def test_new_texts_are_encoded_once_for_the_classifier_and_the_sbert_methods(single, monkeypatch):
    """Head mode: one encoder, and the rows the classifier encoded are not encoded again when the
    sbert-* methods score them, whole or a chunk at a time."""
    import instattr.encoders as encoders
    from instattr.sentence import sentence_embeddings
    run = Run.load(single.path)                       # a fresh run object: nothing kept yet
    clf = classifier_for(run)
    encoded = []
    real = encoders.encode_texts
    monkeypatch.setattr(encoders, "encode_texts", lambda enc, docs, *a, **k: encoded.extend(docs) or
                        real(enc, docs, *a, **k))
    docs = ["a fresh text", "another one", "a third"]
    fs = clf.featurize(docs)
    method = get_method("sbert-cos").fit(run.features("train"), sentence_embeddings(run))
    whole = method.score(fs)
    parts = np.concatenate([block for _, block in method.score_chunks(fs, 2)])
    assert encoded == docs and clf.encoder() is sentence_embeddings(run).encoder()
    np.testing.assert_array_equal(whole, parts)

def test_default_tracking_is_the_top_blocks_and_the_head_that_reach_the_logits(single):
    clf = classifier_for(single)
    names = [t.name for t in clf.tracked(1)]
    assert names[-2:] == ["head.pooler", "head.classifier"]
    assert all(n.startswith("encoder.encoder.layer.1.") for n in names[:-2]) and len(names) == 8
    assert "encoder.pooler.dense" not in names            # BertModel computes it, the head never reads it
    assert {t.group for t in clf.tracked(2)} == {"block0", "block1", "head"}
    assert [t.name for t in clf.tracked(0)] == ["head.pooler", "head.classifier"]
    picked = [t.name for t in clf.tracked(modules=["*.layer.0.attention.self.*", "head.classifier"])]
    assert picked == [f"encoder.encoder.layer.0.attention.self.{w}" for w in ("query", "key", "value")] + \
        ["head.classifier"]
    with pytest.raises(ValueError, match="matches no module of the model"):
        clf.tracked(modules=["*.nothing"])
    with pytest.raises(ValueError, match="matches only .*LayerNorm, a LayerNorm; only linear modules"):
        clf.tracked(modules=["*.layer.1.output.LayerNorm"])
    assert len(clf.tracked(modules=["*.layer.1.*"])) == 6        # the block's norms are not linear: left out
    with pytest.raises(ValueError, match="never uses it to compute the logits"):
        clf.tracked(modules=["encoder.pooler.dense"])


def test_tracked_groups_are_contiguous_whatever_the_registration_order():
    """A model that registers its head first and its blocks out of order: the Hessian's groups
    (blocks by index, the head last) are still contiguous slices."""
    from types import SimpleNamespace

    from instattr.models.modules import call_order, reaching, track

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)

        def forward(self, x):
            return x + self.down(torch.tanh(self.up(x)))

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(3, 2)
            self.blocks = torch.nn.ModuleList([Block(), Block()])

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return SimpleNamespace(logits=self.head(x))

    model, x = Model(), torch.randn(2, 3)
    order, used = call_order(model, lambda: model(x)), reaching(model, lambda: model(x))
    picked = track(model, order, used, patterns=["head", "blocks.1.down", "blocks.0.*", "blocks.1.up"])
    assert [t.name for t in picked] == ["blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down", "head"]
    assert [t.group for t in picked] == ["block0", "block0", "block1", "block1", "head"]


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("kind", ["single", "siamese"])
def test_per_example_grads_of_padded_batches_equal_each_example_alone(kind, request):
    run = request.getfixturevalue(kind)
    fs = run.features("train")
    brute = Brute(run, 2)
    want = brute.grads(fs, fs.label)
    task = brute.clf.task()
    rows = brute.clf.rows(fs)
    got = torch.zeros_like(want)
    for pos in rows.order(5):                                      # padded batches
        got[pos] = per_example_grads(task, brute.flat, rows.batch(pos), torch.as_tensor(fs.label[pos]))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def projected_loss_grads(run, fs, proj):
    """Projected per-example loss gradients of ``fs`` at its gold labels, in one float64 batch."""
    out, jac = proj.project(classifier_for(run).rows(fs).batch(np.arange(len(fs))))
    return torch.einsum("br,brd->bd", proj.task.train_coefficients(out, torch.as_tensor(fs.label)), jac)


@pytest.mark.parametrize("kind", ["single", "siamese"])
def test_hooks_without_projection_equal_exact_gradients(kind, request):
    """Exact hook blocks (dim=None) have the same inner products as the autograd gradients."""
    run = request.getfixturevalue(kind)
    fs = run.features("train")
    brute = Brute(run, 2)
    exact = brute.grads(fs, fs.label)
    proj = projector_for(brute.clf, brute.tracked, "float64", None, 0, "khatri-rao")
    got = projected_loss_grads(run, fs, proj)
    torch.testing.assert_close(got @ got.T, exact @ exact.T, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["gaussian", "khatri-rao"])
def test_linear_blocks_sketch_the_exact_gradient(single, kind):
    """Each linear block holds P_out G P_in^T (Kronecker) or the entries p_r^T G q_r (khatri-rao, with
    Rademacher p_r, q_r scaled by R^-1/4) of the exact per-example weight|bias gradient G."""
    fs = single.features("train")
    brute = Brute(single, 1)
    exact = brute.grads(fs, fs.label)
    proj = projector_for(brute.clf, brute.tracked, "float64", 3, 5, kind)
    got = projected_loss_grads(single, fs, proj)
    start = np.cumsum([0] + brute.flat.sizes)
    where = {id(p): slice(int(a), int(z)) for p, a, z in zip(brute.flat.params, start[:-1], start[1:])}
    checked = 0
    for blk, a, z in zip(proj.blocks, proj.offsets[:-1], proj.offsets[1:]):
        if blk.exact:
            continue
        w = exact[:, where[id(blk.module.weight)]].reshape(len(fs), *blk.module.weight.shape)
        g = torch.cat([w, exact[:, where[id(blk.module.bias)]][:, :, None]], dim=2)
        if kind == "khatri-rao":
            assert blk.rank_one and blk.dim == 9 and set(np.unique(blk.p_out.abs().numpy())) == {9 ** -0.25}
            want = torch.einsum("ro,boi,ri->br", blk.p_out, g, blk.p_in)
        else:
            want = torch.einsum("ko,bor,lr->bkl", blk.p_out, g, blk.p_in).reshape(len(fs), -1)
        torch.testing.assert_close(got[:, a:z], want, rtol=1e-9, atol=1e-12)
        checked += 1
    assert checked == 7                                  # 6 per BERT layer + the pooler


def test_khatri_rao_inner_products_are_unbiased(single):
    """Averaged over seeds, projected inner products converge to the exact ones (E[P^T P] = I)."""
    fs = single.features("train")
    brute = Brute(single, 1)
    exact = brute.grads(fs, fs.label)
    mean = torch.zeros(len(fs), len(fs), dtype=torch.float64)
    seeds = 200
    for seed in range(seeds):
        g = projected_loss_grads(single, fs, projector_for(brute.clf, brute.tracked, "float64", 2, seed,
                                                           "khatri-rao"))
        mean += g @ g.T / seeds
    want = exact @ exact.T
    rel = (mean - want).norm() / want.norm()
    assert rel < 0.1, rel          # one seed alone is far off, a wrong scale is off by a factor


def test_gauss_newton_dual_equals_primal():
    """Woodbury over the factor rows = the dim x dim Cholesky, regulariser blocks included."""
    rng = np.random.default_rng(3)
    dim, rows = 12, 5
    f = torch.as_tensor(rng.standard_normal((rows, dim)))
    blocks = [slice(0, 4), slice(4, 9), slice(9, 12)]
    a = rng.standard_normal((3, 3))
    reg = [None, None, torch.as_tensor(a @ a.T)]
    curv = Curvature(dim=dim, n=7, factors=f, blocks=blocks, regulariser=reg)
    v = torch.as_tensor(rng.standard_normal((4, dim)))
    primal = GaussNewton(damping=0.3, structure="full", form="primal").fit(curv)
    dual = GaussNewton(damping=0.3, structure="full", chunk=2).fit(curv)
    assert dual.dual_ and not primal.dual_
    h = f.T @ f / 7 + 0.3 * torch.eye(dim, dtype=f.dtype)
    h[9:, 9:] += reg[2]
    want = torch.linalg.solve(h, v.T).T
    torch.testing.assert_close(primal.solve(v), want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(dual.solve(v), want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(dual.quadratic(v, chunk=3), (want * v).sum(1), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="dual form"):
        dual.whiten(v)
    with pytest.raises(ValueError, match="damping > 0"):
        GaussNewton(damping=0.0, structure="full", form="dual").fit(curv)
    with pytest.raises(ValueError, match="not positive definite"):   # auto falls back to the primal
        GaussNewton(damping=0.0, structure="full").fit(curv)


def test_large_damping_turns_projected_if_top_into_gd_top_over_damping(single):
    """The damping is lambda I in the projected coordinates (E[P^T P] = I), as in the full space,
    so as lambda grows lambda * if-top tends to gd-top in every block at once -- a per-block
    (d/k) damping metric would weight the projected layers k/d times less than the head."""
    fs, te = single.features("train"), single.features("test")
    opts = dict(layers=1, proj_dim=2, projection="orthogonal", **F64)
    gd = get_method("gd-top", **opts).fit(fs, classifier_for(single)).score(te)
    lam = 1e7
    inf = get_method("if-top", damping=lam, hessian="full", **opts).fit(fs, classifier_for(single)).score(te)
    np.testing.assert_allclose(inf * lam, gd, rtol=1e-4, atol=1e-6 * np.abs(gd).max())


# ---------------------------------------------------------------- methods vs brute force
FULL_RANK = dict(layers=1, proj_dim=1000, projection="orthogonal")


def test_gd_gc_top_full_rank_projection_equal_exact(single):
    fs, te = single.features("train"), single.features("test")
    brute = Brute(single, 1)
    g_tr = brute.grads(fs, fs.label)
    g_te = brute.grads(te, te.pred)
    gd, m = scores("gd-top", single, **FULL_RANK)
    np.testing.assert_allclose(gd, (g_te @ g_tr.T).numpy(), rtol=1e-5, atol=1e-6)
    gd_exact, _ = scores("gd-top", single, layers=1, proj_dim=None)
    np.testing.assert_allclose(gd_exact, gd, rtol=1e-5, atol=1e-6)
    gc, _ = scores("gc-top", single, **FULL_RANK)
    cos = (g_te / g_te.norm(dim=1, keepdim=True)) @ (g_tr / g_tr.norm(dim=1, keepdim=True)).T
    np.testing.assert_allclose(gc, cos.numpy(), rtol=1e-5, atol=1e-6)
    assert gd.dtype == np.float32 and gd.shape == (len(te), len(fs))
    # a small projection approximates the same ranking, and is seeded
    small, _ = scores("gd-top", single, layers=1, proj_dim=4)
    again, _ = scores("gd-top", single, layers=1, proj_dim=4)
    np.testing.assert_array_equal(small, again)
    assert not np.allclose(small, scores("gd-top", single, layers=1, proj_dim=4, seed=1)[0])


@pytest.mark.parametrize("kind,hessian", [("single", "full"), ("single", "block"), ("three", "full")])
def test_if_rif_top_full_rank_projection_equal_explicit_gauss_newton(kind, hessian, request):
    run = request.getfixturevalue(kind)
    fs, te = run.features("train"), run.features("test")
    brute = Brute(run, 1)
    g_tr, g_te = brute.grads(fs, fs.label), brute.grads(te, te.pred)
    l2, damping = run.final_layer().l2, 0.01
    h = brute.ggn(fs, l2, damping)
    if hessian == "block":                    # one block per tracked block, one for the head
        group = torch.tensor([0 if t.group == "head" else 1 for t, m in zip(brute.tracked, brute.flat.modules)
                              for p in m.parameters(recurse=False) for _ in range(p.numel())])
        h = h * (group[:, None] == group[None, :])
    want = g_te @ torch.linalg.solve(h, g_tr.T)
    got, m = scores("if-top", run, damping=damping, hessian=hessian, **FULL_RANK)
    assert m.config()["hessian_resolved"] == hessian
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5 * np.abs(want.numpy()).max())
    ev, vec = torch.linalg.eigh(h)
    root = vec @ torch.diag(ev ** -0.5) @ vec.T                       # H^-1/2
    a, b = g_te @ root, g_tr @ root
    cos = (a / a.norm(dim=1, keepdim=True)) @ (b / b.norm(dim=1, keepdim=True)).T
    rif, _ = scores("rif-top", run, damping=damping, hessian=hessian, **FULL_RANK)
    np.testing.assert_allclose(rif, cos.numpy(), rtol=1e-4, atol=1e-5)


def test_margin_measurement_takes_the_margins_gradient_on_the_test_side(three):
    """measurement="margin": the test side is the gradient of -(z_pred - logsumexp of the other
    logits), by autograd on each example alone; the training side stays the loss's."""
    fs, te = three.features("train"), three.features("test")
    brute = Brute(three, 1)
    g_tr = brute.grads(fs, fs.label)
    rows = []
    with tracking(brute.module, brute.flat.modules), torch.enable_grad():
        for b, y in zip(brute.batches(te), te.pred):
            z = brute.logits(b)
            others = torch.cat([z[:y], z[y + 1:]])
            margin = z[y] - torch.logsumexp(others, 0)
            rows.append(brute.flat.flatten(torch.autograd.grad(-margin, brute.flat.params)))
    g_te = torch.stack(rows)
    got, _ = scores("gd-top", three, measurement="margin", **FULL_RANK)
    np.testing.assert_allclose(got, (g_te @ g_tr.T).numpy(), rtol=1e-5, atol=1e-6)
    loss_side, _ = scores("gd-top", three, **FULL_RANK)
    assert not np.allclose(got, loss_side)


def test_batch_size_does_not_change_scores(siamese):
    a, _ = scores("if-top", siamese, layers=2, proj_dim=3, batch_size=2)
    b, _ = scores("if-top", siamese, layers=2, proj_dim=3, batch_size=16)
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_explicit_equals_brute_force_and_converged_lissa(single):
    fs = single.features("train")
    brute = Brute(single, 1)
    h = brute.hessian(fs, fs.label, single.final_layer().l2)
    ev = torch.linalg.eigvalsh(h)
    damping = 1.5 * max(0.0, -float(ev[0])) + 0.05          # the exact Hessian is indefinite here
    lo, hi = float(ev[0]) + damping, float(ev[-1]) + damping
    scale = 1.05 * hi
    depth = math.ceil(math.log(1e-11) / math.log(1 - lo / scale))
    explicit, m = scores("if-top", single, layers=1, ihvp="explicit", damping=damping)
    torch.testing.assert_close(m.solver_.hessian_, h + damping * torch.eye(len(h), dtype=h.dtype),
                               rtol=1e-8, atol=1e-10)
    g_tr = brute.grads(fs, fs.label)
    te = single.features("test")
    g_te = brute.grads(te, te.pred)
    want = g_te @ torch.linalg.solve(h + damping * torch.eye(len(h), dtype=h.dtype), g_tr.T)
    np.testing.assert_allclose(explicit, want.numpy(), rtol=1e-5, atol=1e-6 * np.abs(want.numpy()).max())
    lissa, m = scores("if-top", single, layers=1, ihvp="lissa", damping=damping, lissa_scale=scale,
                      lissa_depth=depth, lissa_batch_size=len(fs))
    np.testing.assert_allclose(lissa, explicit, rtol=1e-5, atol=1e-6 * np.abs(explicit).max())
    with pytest.raises(ValueError, match="not positive definite"):
        scores("if-top", single, layers=1, ihvp="explicit", damping=0.0)
    with pytest.raises(ValueError, match="LiSSA"):
        get_method("rif-top", ihvp="lissa")


def test_lissa_fixed_point_is_damping_times_scale():
    """LiSSA(damping d, scale s) -> (H + d s I)^-1 v, also from minibatches when they agree."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((6, 6))
    h = torch.as_tensor(a @ a.T / 6)
    curv = Curvature(dim=6, n=10, hvp=lambda v, rows: v @ h)
    v = torch.as_tensor(rng.standard_normal((3, 6)))
    solver = LiSSA(damping=0.02, scale=10.0, depth=3000, repeats=2, batch_size=3).fit(curv)
    want = torch.linalg.solve(h + 0.2 * torch.eye(6, dtype=h.dtype), v.T).T
    torch.testing.assert_close(solver.solve(v), want, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="diverged"):
        LiSSA(damping=0.0, scale=1e-3, depth=5000).fit(curv).solve(v)
    gn = GaussNewton(damping=0.1).fit(Curvature(dim=6, n=6, factors=torch.as_tensor(a.T)))
    torch.testing.assert_close(gn.solve(v), torch.linalg.solve(h + 0.1 * torch.eye(6, dtype=h.dtype), v.T).T)


# ---------------------------------------------------------------- TracIn
def _checkpoints(run, heads, lrs):
    ck = {f"{k}.{i}": v.float().clone() for i, h in enumerate(heads) for k, v in h.items()}
    save_file(ck, str(run.path / "model" / "checkpoints.safetensors"), metadata={"lrs": ",".join(map(str, lrs))})


def test_tracin_one_checkpoint_lr1_equals_gd(single, tmp_path):
    shutil.copytree(single.path, tmp_path / "run")
    run = Run.load(tmp_path / "run")
    final = head_params(run)
    _checkpoints(run, [final], [1.0])
    tr, te = run.features("train"), run.features("test")
    gd = get_method("gd").fit(tr, run.final_layer()).score(te)
    tracin = fit_method(run, "tracin").score(te)
    np.testing.assert_allclose(tracin, gd, rtol=1e-4, atol=1e-6)
    top = fit_method(run, "tracin-top", layers=1, proj_dim=3, **F64).score(te)
    gd_top = fit_method(run, "gd-top", layers=1, proj_dim=3, **F64).score(te)
    np.testing.assert_allclose(top, gd_top, rtol=1e-6, atol=1e-9)
    # the sum over checkpoints, weighted by learning rate
    _checkpoints(run, [final, final], [0.5, 0.25])
    run = Run.load(run.path)
    np.testing.assert_allclose(fit_method(run, "tracin").score(te), 0.75 * gd, rtol=1e-4, atol=1e-6)
    # the real trajectory differs from the final head, and ranks like gd
    real = fit_method(single, "tracin").score(te)
    assert not np.allclose(real, gd) and spearman_rows(real, gd) > 0.5


class InProcessBackend:
    """The gradient half of a Ray backend with its actor run here: each call rebuilds the model
    from the GradientSource, as a Ray actor does, and records the sources it was given."""

    def __init__(self):
        self.sources = []

    def gradient_batches(self, projector, source, fs, rows, labels, batches, factors, query=False):
        from instattr.distributed import GradientActor
        from instattr.models.rows import RowIds
        self.sources.append(source)
        actor = GradientActor(source)
        actor.prepare(RowIds.of(fs), np.asarray(labels), list(batches), factors, query)
        for j in reversed(range(len(batches))):             # out of order, as actors finish
            yield actor.gradients(j)


def test_gradient_actors_rebuild_each_checkpoint_and_give_the_local_gradients(single, tmp_path):
    """What a Ray actor computes from a GradientSource equals the local fit bit for bit, for the
    final model (gd-top, if-top: training and test sides) and each of tracin-top's checkpoints."""
    shutil.copytree(single.path, tmp_path / "run")
    run = Run.load(tmp_path / "run")
    final = head_params(run)
    _checkpoints(run, [{k: v * 0.5 for k, v in final.items()}, final], [0.5, 0.25])
    opts = dict(layers=1, proj_dim=3, batch_size=4, progress=False)   # 14 rows: 4 batches
    te = run.features("test")
    local = {n: fit_method(run, n, **opts) for n in ("gd-top", "if-top", "tracin-top")}
    for f in (run.path / "cache").glob("grads-*.npz"):
        f.unlink()
    backend = InProcessBackend()
    fresh = Run.load(run.path)
    remote = {n: fit_method(fresh, n, backend=backend, **opts) for n in ("gd-top", "if-top", "tracin-top")}
    assert [s.checkpoint for s in backend.sources] == [None, 0, 1]    # gd-top's (if-top reuses them), 2 checkpoints
    for n in local:
        np.testing.assert_array_equal(local[n].train_embedding_, remote[n].train_embedding_, err_msg=n)
        np.testing.assert_array_equal(local[n].test_side(te).vectors, remote[n].test_side(te).vectors, err_msg=n)
    assert [s.checkpoint for s in backend.sources[3:]] == [None, None, 0, 1]   # test sides
    # a classifier other than the run's own (e.g. re-initialised) cannot be rebuilt by a worker
    from instattr.models import _build
    other = _build(fresh, classifier_for(fresh).device)
    fit_method(fresh, "gd-top", model=other, backend=backend, **dict(opts, seed=1))
    assert len(backend.sources) == 7
    assert not local["tracin-top"].train_embedding_[:, :local["tracin-top"].dim_ // 2].tolist() == \
        local["tracin-top"].train_embedding_[:, local["tracin-top"].dim_ // 2:].tolist()   # two real checkpoints


def test_gradient_actors_give_the_local_gauss_newton_factors_with_three_classes(three, tmp_path):
    """Two factor rows per example come back from a worker in the local order: if-top's test side
    (which solves against them) and rif-top's training side equal the local ones bit for bit."""
    shutil.copytree(three.path, tmp_path / "run")
    run = Run.load(tmp_path / "run")
    opts = dict(layers=1, proj_dim=3, batch_size=4, progress=False)
    te = run.features("test")
    local = {n: fit_method(run, n, **opts) for n in ("if-top", "rif-top")}
    for f in (run.path / "cache").glob("grads-*.npz"):
        f.unlink()
    backend = InProcessBackend()
    fresh = Run.load(run.path)
    remote = {n: fit_method(fresh, n, backend=backend, **opts) for n in ("if-top", "rif-top")}
    assert len(backend.sources) == 1                                 # rif-top reuses if-top's gradients
    for n in local:
        np.testing.assert_array_equal(local[n].train_embedding_, remote[n].train_embedding_, err_msg=n)
        np.testing.assert_array_equal(local[n].test_side(te).vectors, remote[n].test_side(te).vectors, err_msg=n)
    assert remote["if-top"].solver_.factors_.shape[0] == 2 * len(run.features("train"))


# ---------------------------------------------------------------- the interface
def test_attribute_explain_and_errors(cross):
    seconds = attribute_run(cross, "if-top,gd-top,tracin", progress=False, log=lambda *_: None)
    assert set(seconds) == {"if-top", "gd-top", "tracin"}
    s = cross.scores("if-top")
    assert s.shape == (len(cross.features("test")), len(cross.features("train")))
    info = cross.score_info("if-top")
    assert info["config"]["ihvp"] == "projected" and info["config"]["tracked_layers"] == 2
    with pytest.raises(ValueError, match="needs the whole classifier"):
        get_method("if-top").fit(cross.features("train"), cross.final_layer())
    # new texts run through the model in memory: a test row's own text scores like the row
    e = cross.examples("test")[1]
    fitted = fit_method(cross, "gd-top", dtype="float64", progress=False)
    row = fitted.score(cross.features("test").subset([1]))
    new = attribute_texts(cross, "gd-top", [e.document], [e.query], dtype="float64", progress=False)
    np.testing.assert_allclose(new, row, rtol=1e-5, atol=1e-8)
    out = explain(cross, e.document, e.query, methods="if-top,gd-top", k=2)
    assert out["methods"]["gd-top"]["supporting"][0]["idx"] == \
        str(cross.features("train").idx[int(np.argmax(row[0]))])
    with pytest.raises(ValueError, match="layers must be"):
        fit_method(cross, "gd-top", layers=5)


def test_cli_method_options_reach_the_layered_methods(single, capsys):
    from instattr.cli import main
    path = str(single.path)
    assert main(["--quiet", "attribute", "--run", path, "--methods", "gd-top,nn-cos", "--layers", "1",
                 "--proj-dim", "0", "--overwrite"]) == 0
    cfg = single.score_info("gd-top")["config"]
    assert cfg["layers"] == 1 and cfg["proj_dim"] is None
    exact = get_method("gd-top", layers=1, proj_dim=None, dtype="float64", progress=False)
    want = exact.fit(single.features("train"), classifier_for(single)).score(single.features("test"))
    np.testing.assert_allclose(single.scores("gd-top"), want, rtol=1e-4, atol=1e-6)
    capsys.readouterr()
    assert main(["--quiet", "attribute", "--run", path, "--methods", "nn-cos", "--layers", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--layers applies to none of nn-cos" in err and "if-top" in err
    assert main(["--quiet", "attribute", "--run", path, "--methods", "if-top", "--fisher", "empirical"]) == 2
    err = capsys.readouterr().err                          # a language-model run's option
    assert err.count("\n") == 1 and "--fisher applies to none of if-top" in err
    assert main(["--quiet", "attribute", "--run", path, "--methods", "gd-top", "--layers", "-1",
                 "--overwrite"]) == 2
    assert "layers must be" in capsys.readouterr().err
    stamp = single.score_path("gd-top", "test").stat().st_mtime_ns
    assert main(["--quiet", "attribute", "--run", path, "--methods", "gd-top", "--layers", "2"]) == 2
    assert "was made with layers=1; add --overwrite" in capsys.readouterr().err
    assert single.score_path("gd-top", "test").stat().st_mtime_ns == stamp
    assert main(["--quiet", "attribute", "--run", path, "--methods", "gd-top", "--layers", "1", "--proj-dim", "2",
                 "--projection", "gaussian", "--overwrite"]) == 0
    cfg = single.score_info("gd-top")["config"]
    assert cfg["projection"] == "gaussian" and cfg["proj_dim"] == 2
    kron = get_method("gd-top", layers=1, proj_dim=2, projection="gaussian", progress=False)
    np.testing.assert_allclose(single.scores("gd-top"), kron.fit(single.features("train"), classifier_for(single))
                               .score(single.features("test")), rtol=1e-5, atol=1e-7)


def test_method_flags_never_reach_the_paper_methods():
    from instattr.attribution import method_options
    from instattr.errors import InstattrError
    per = method_options(["if", "rif", "nn-cos", "if-top", "tracin-top"], {"damping": 1.0, "layers": 2})
    assert per == {"if": {"damping": 1.0}, "rif": {"damping": 1.0}, "nn-cos": {},
                   "if-top": {"damping": 1.0, "layers": 2}, "tracin-top": {"layers": 2}}
    with pytest.raises(InstattrError, match=r"--damping applies to none of nn-cos, gd \(it applies to if, rif.*if-top"):
        method_options(["nn-cos", "gd"], {"damping": 1.0})


def test_training_gradients_cached_on_disk(single, monkeypatch):
    """One pass over the training set serves every layered method and every later process; a
    different projection seed is a different cache entry; an unreadable entry is recomputed."""
    import instattr.layers.attributors as attributors
    fresh = Run.load(single.path)
    for f in (fresh.path / "cache").glob("grads-*.npz"):
        f.unlink()
    want = fit_method(fresh, "if-top", progress=False).score(fresh.features("test"))
    files = sorted((fresh.path / "cache").glob("grads-*.npz"))
    assert len(files) == 1

    def boom(*a, **k):
        raise AssertionError("recomputed")
    monkeypatch.setattr(attributors, "projected_gradients", boom)
    other = Run.load(single.path)                         # new process, in effect: no in-memory memo
    got = fit_method(other, "if-top", progress=False)
    train_only = got.train_embedding_                      # the test side still needs projected_gradients
    monkeypatch.undo()
    np.testing.assert_array_equal(got.score(other.features("test")), want)
    gd = fit_method(other, "gd-top", progress=False)       # same arrays, whitened or not
    assert train_only.shape == gd.train_embedding_.shape
    fit_method(other, "gd-top", seed=1, progress=False)
    assert len(list((fresh.path / "cache").glob("grads-*.npz"))) == 2
    files[0].write_bytes(b"not an npz")
    again = Run.load(single.path)
    np.testing.assert_allclose(fit_method(again, "if-top", progress=False).score(again.features("test")), want,
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name, opts", [("gd-top", {"proj_dim": 3}), ("gc-top", {"proj_dim": 3}),
                                        ("if-top", {"proj_dim": 3}), ("rif-top", {"proj_dim": 3}),
                                        ("tracin-top", {"proj_dim": 3}),
                                        ("if-top", {"proj_dim": None, "ihvp": "explicit", "damping": 0.5}),
                                        ("rif-top", {"proj_dim": None, "ihvp": "explicit", "damping": 0.5})])
def test_layered_self_scores_equal_the_dense_scores_of_training_rows_at_gold_labels(single, name, opts):
    """self_scores() (suspects) from the training side alone = the diagonal of the score matrix of the
    training rows scored as test rows at their gold labels; for the cosines, minus its column means
    without the diagonal."""
    train = single.features("train")
    att = get_method(name, layers=1, **F64, **opts).fit(train, classifier_for(single))
    dense = att.score(train.replace(pred=train.label)).astype(np.float64)
    n = len(train)
    want = -(dense.sum(0) - dense.diagonal()) / (n - 1) if att.normalized else dense.diagonal()
    np.testing.assert_allclose(att.self_scores(), want, rtol=1e-5, atol=1e-8)
    assert np.ptp(want) > 0

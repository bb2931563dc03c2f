"""Methods over the head plus the top encoder layers, against brute force in float64.

A micro BERT (8 wide, 2 layers, random weights with a large init so texts differ) and toy runs.
Brute force = per-example gradients and logit Jacobians by loops of backward() calls, Hessians by
torch.autograd.functional.hessian, inverses by torch.linalg.
"""
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertModel, BertTokenizerFast

from instattr.attribution import attribute_run, attribute_texts, explain, fit_method
from instattr.layers import Curvature, GaussNewton, LiSSA
from instattr.layers import cache as cache_mod
from instattr.layers.cache import Examples, cache_path
from instattr.layers.grads import FlatParameters, per_example_grads
from instattr.layers.projection import GradientProjector
from instattr.methods import get_method
from instattr.models import classifier_for
from instattr.models.head import HeadConfig, pair_input
from instattr.models.tracked import first_tracked_layer
from instattr.pipeline import TrainConfig, train_run
from instattr.store import Run

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
def start_of(run, layers):
    return first_tracked_layer(classifier_for(run).n_layers, layers)


def model_of(run, layers=1):
    return classifier_for(run).tracked(start_of(run, layers), "float64")


def examples(run, fs, layers):
    return Examples(classifier_for(run), fs, start_of(run, layers))


def head_params(run):
    from safetensors.torch import load_file
    return load_file(str(run.path / "model" / "head.safetensors"))


def example_batches(run, fs, layers):
    """One unpadded batch per example (nothing shared, no padding)."""
    ex = examples(run, fs, layers)
    return [ex.batch([i], torch.float64) for i in range(len(fs))]


def loop_grads(model, batches, labels):
    """(n, p) per-example CE gradients by one backward() per example, named_parameters order."""
    rows = []
    for b, y in zip(batches, labels):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(**b), torch.tensor([int(y)])).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    model.zero_grad()
    return torch.stack(rows)


def loop_jacobians(model, batches):
    """(n, C, p) d logits / d params by one backward() per example and class."""
    out = []
    for b in batches:
        rows = []
        for c in range(model.n_classes):
            model.zero_grad()
            model(**b)[0, c].backward()
            rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
        out.append(torch.stack(rows))
    model.zero_grad()
    return torch.stack(out)


def probs_of(model, batches):
    with torch.no_grad():
        return torch.stack([torch.softmax(model(**b)[0], -1) for b in batches])


def w_mask(model):
    return torch.cat([torch.full((p.numel(),), n in model.penalized()) for n, p in model.named_parameters()])


def brute_ggn(model, batches, l2, damping):
    """(1/n) sum J^T (diag p - p p^T) J + 2 l2 on the last weight + damping I."""
    jac, p = loop_jacobians(model, batches), probs_of(model, batches)
    a = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    h = torch.einsum("ncp,ncd,ndq->pq", jac, a, jac) / len(batches)
    return h + torch.diag(2 * l2 * w_mask(model).double() + damping)


def brute_hessian(model, batches, labels, l2):
    """Hessian of mean CE + l2 ||W||^2 over the flat parameters, torch.autograd.functional.hessian."""
    flat = FlatParameters(model)
    from torch.func import functional_call

    def loss(theta):
        params = flat.unflatten(theta)
        ce = sum(torch.nn.functional.cross_entropy(functional_call(model, params, kwargs=b), torch.tensor([int(y)]))
                 for b, y in zip(batches, labels)) / len(batches)
        return ce + l2 * sum((params[n] ** 2).sum() for n in model.penalized())
    return torch.autograd.functional.hessian(loss, flat.theta0, vectorize=True)   # one batched backward (vmap)


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


# ---------------------------------------------------------------- cache and model
@pytest.mark.parametrize("kind", ["single", "siamese", "cross"])
def test_tracked_forward_from_cache_equals_full_encoder(kind, request, monkeypatch):
    run = request.getfixturevalue(kind)
    test = run.features("test")
    ds = run.examples("test")
    enc = classifier_for(run).encoder()
    docs, queries = [e.document for e in ds], [e.query for e in ds]
    if kind == "single":
        full = enc.encode(docs, progress=False)
    elif kind == "cross":
        full = enc.encode(docs, queries, progress=False)
    else:
        full = np.concatenate([enc.encode(docs, progress=False), enc.encode(queries, progress=False)], 1)
    head = {k: v.double() for k, v in head_params(run).items()}
    x = torch.as_tensor(pair_input(full, run.manifest.pair_mode)).double()
    want = torch.tanh(x @ head["dense_w"].T + head["dense_b"]).numpy()      # full encoder, then head
    for layers in (0, 1, 2):
        model = model_of(run, layers)
        ex = examples(run, test, layers)
        got = np.zeros_like(want)
        with torch.no_grad():
            for pos, b in ex.batches(3, torch.float64):
                got[pos] = model.features(**b).numpy()
        np.testing.assert_allclose(got, want, atol=1e-5)
        assert cache_path(classifier_for(run), "test", 2 - layers).exists()
    # the cache is read back, never rebuilt: the encoder bottom does not run again
    monkeypatch.setattr(cache_mod, "_encode_states", lambda *a, **k: pytest.fail("encoder re-run"))
    fresh = Run.load(run.path)
    c = cache_mod.load_cache(classifier_for(fresh), "test", 1)
    assert c.sequences.shape == (len(test), 2 if kind == "siamese" else 1)


def test_stale_cache_is_rebuilt(single):
    path = cache_path(classifier_for(single), "train", 1)
    fresh = Run.load(single.path)
    cache_mod.load_cache(classifier_for(fresh), "train", 1)
    path.write_bytes(b"not an npz")                        # a damaged file is rebuilt, atomically
    again = cache_mod.load_cache(classifier_for(Run.load(single.path)), "train", 1)
    assert len(again.idx) == len(single.features("train")) and path.stat().st_size > 100


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("kind", ["single", "siamese"])
def test_vmap_per_example_grads_equal_backward_loop(kind, request):
    run = request.getfixturevalue(kind)
    fs = run.features("train")
    model = model_of(run, 2)
    want = loop_grads(model, example_batches(run, fs, 2), fs.label)
    flat = FlatParameters(model)
    got = torch.zeros_like(want)
    for pos, b in examples(run, fs, 2).batches(5, torch.float64):     # padded batches
        got[pos] = flat.flatten(per_example_grads(model, b, torch.as_tensor(fs.label[pos])))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["single", "siamese"])
def test_hooks_without_projection_equal_exact_gradients(kind, request):
    """Exact hook blocks (dim=None) have the same inner products as the autograd gradients."""
    run = request.getfixturevalue(kind)
    fs = run.features("train")
    model = model_of(run, 2)
    exact = loop_grads(model, example_batches(run, fs, 2), fs.label)
    proj = GradientProjector(model, None)
    basis = proj.basis
    got = torch.zeros(len(fs), proj.dim, dtype=torch.float64)
    for pos, b in examples(run, fs, 2).batches(4, torch.float64):
        logits, _, jac = proj.project(b)
        e = torch.softmax(logits, -1)
        e[torch.arange(len(pos)), torch.as_tensor(fs.label[pos])] -= 1
        got[pos] = torch.einsum("br,brd->bd", e @ basis, jac)
    torch.testing.assert_close(got @ got.T, exact @ exact.T, rtol=1e-9, atol=1e-12)


def projected_loss_grads(run, fs, proj, layers=1):
    """Projected per-example loss gradients of ``fs`` at its gold labels, in one float64 batch."""
    b = examples(run, fs, layers).batch(np.arange(len(fs)), torch.float64)
    logits, _, jac = proj.project(b)
    e = torch.softmax(logits, -1)
    e[torch.arange(len(fs)), torch.as_tensor(fs.label)] -= 1
    return torch.einsum("br,brd->bd", e @ proj.basis, jac)


@pytest.mark.parametrize("kind", ["gaussian", "khatri-rao"])
def test_linear_blocks_sketch_the_exact_gradient(single, kind):
    """Each linear block holds P_out G P_in^T (Kronecker) or the entries p_r^T G q_r (khatri-rao, with
    Rademacher p_r, q_r scaled by R^-1/4) of the exact per-example weight|bias gradient G."""
    fs = single.features("train")
    model = model_of(single, 1)
    exact = loop_grads(model, example_batches(single, fs, 1), fs.label)
    flat = FlatParameters(model)
    proj = GradientProjector(model, 3, seed=5, kind=kind)
    got = projected_loss_grads(single, fs, proj)
    checked = 0
    for blk, a, z in zip(proj.blocks, proj.offsets[:-1], proj.offsets[1:]):
        if blk.kind != "linear" or blk.module is model.final:
            continue
        w = exact[:, flat.slices[blk.name + ".weight"]].reshape(len(fs), *blk.module.weight.shape)
        g = torch.cat([w, exact[:, flat.slices[blk.name + ".bias"]][:, :, None]], dim=2)
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
    model = model_of(single, 1)
    exact = loop_grads(model, example_batches(single, fs, 1), fs.label)
    mean = torch.zeros(len(fs), len(fs), dtype=torch.float64)
    seeds = 200
    for seed in range(seeds):
        g = projected_loss_grads(single, fs, GradientProjector(model, 2, seed=seed, kind="khatri-rao"))
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
    model = model_of(single, 1)
    g_tr = loop_grads(model, example_batches(single, fs, 1), fs.label)
    g_te = loop_grads(model, example_batches(single, te, 1), te.pred)
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
    single = request.getfixturevalue(kind)
    fs, te = single.features("train"), single.features("test")
    model = model_of(single, 1)
    batches = example_batches(single, fs, 1)
    g_tr = loop_grads(model, batches, fs.label)
    g_te = loop_grads(model, example_batches(single, te, 1), te.pred)
    l2, damping = single.final_layer().l2, 0.01
    h = brute_ggn(model, batches, l2, damping)
    if hessian == "block":                    # one block per tracked layer, one for the head
        group = torch.tensor([0 if n.startswith("layers.") else 1 for n, p in model.named_parameters()
                              for _ in range(p.numel())])
        h = h * (group[:, None] == group[None, :])
    want = g_te @ torch.linalg.solve(h, g_tr.T)
    got, m = scores("if-top", single, damping=damping, hessian=hessian, **FULL_RANK)
    assert m.config()["hessian_resolved"] == hessian
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5 * np.abs(want.numpy()).max())
    ev, vec = torch.linalg.eigh(h)
    root = vec @ torch.diag(ev ** -0.5) @ vec.T                       # H^-1/2
    a, b = g_te @ root, g_tr @ root
    cos = (a / a.norm(dim=1, keepdim=True)) @ (b / b.norm(dim=1, keepdim=True)).T
    rif, _ = scores("rif-top", single, damping=damping, hessian=hessian, **FULL_RANK)
    np.testing.assert_allclose(rif, cos.numpy(), rtol=1e-4, atol=1e-5)


def test_batch_size_does_not_change_scores(siamese):
    a, _ = scores("if-top", siamese, layers=2, proj_dim=3, batch_size=2)
    b, _ = scores("if-top", siamese, layers=2, proj_dim=3, batch_size=16)
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_explicit_equals_brute_force_and_converged_lissa(single):
    fs = single.features("train")
    model = model_of(single, 1)
    batches = example_batches(single, fs, 1)
    h = brute_hessian(model, batches, fs.label, single.final_layer().l2)
    ev = torch.linalg.eigvalsh(h)
    damping = 1.5 * max(0.0, -float(ev[0])) + 0.05          # the exact Hessian is indefinite here
    lo, hi = float(ev[0]) + damping, float(ev[-1]) + damping
    scale = 1.05 * hi
    depth = math.ceil(math.log(1e-11) / math.log(1 - lo / scale))
    explicit, m = scores("if-top", single, layers=1, ihvp="explicit", damping=damping)
    torch.testing.assert_close(m.solver_.hessian_, h + damping * torch.eye(len(h), dtype=h.dtype),
                               rtol=1e-8, atol=1e-10)
    g_tr = loop_grads(model, batches, fs.label)
    te = single.features("test")
    g_te = loop_grads(model, example_batches(single, te, 1), te.pred)
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

    def gradient_batches(self, source, fs, labels, batches, factors):
        from instattr.distributed import GradientActor
        self.sources.append(source)
        from instattr.layers.cache import RowIds
        actor = GradientActor(source)
        actor.prepare(RowIds.of(fs), np.asarray(labels), list(batches), factors)
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
    # new texts run through the encoder bottom in memory: a test row's own text scores like the row
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

"""Attribution methods against their brute-force definitions, in float64 on tiny problems.

Brute force = per-example gradients by autograd loops, the Hessian by
torch.autograd.functional.hessian, H^-1/2 by eigendecomposition, and actual leave-one-out
retraining of the linear layer.
"""
import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from instattr.arrays import FeatureSet, FinalLayer
from instattr.methods import METHOD_NAMES, NotFittedError, get_method, registered
from instattr.methods.lastlayer import kron_rows, kron_rows32, lower_inverse, reduced_hessian, sum_zero_basis
from instattr.methods.similarity import centered_rows, inverse_norms

from conftest import embedded


@pytest.fixture(autouse=True, scope="module")
def float64_single_thread():
    """float64 brute force; one thread, since tiny autograd calls crawl when threads contend."""
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)


def feature_set(f, w, labels, prefix):
    probs = torch.softmax(torch.as_tensor(f) @ torch.as_tensor(w).T, -1).numpy()
    return FeatureSet(idx=np.array([f"{prefix}{i}" for i in range(len(f))]), label=np.asarray(labels),
                      pred=probs.argmax(1), probs=probs, features=f)


def problem(n_train=30, n_test=6, d=4, c=2, l2=0.05, seed=0, w=None):
    """Random features, gold labels drawn from a random linear teacher, head weight ``w``."""
    rng = np.random.default_rng(seed)
    teacher = rng.standard_normal((c, d))
    f_tr, f_te = rng.standard_normal((n_train, d)), rng.standard_normal((n_test, d))
    p = torch.softmax(torch.as_tensor(f_tr @ teacher.T), -1).numpy()
    y = np.array([rng.choice(c, p=pi) for pi in p])
    w = rng.standard_normal((c, d)) * 0.5 if w is None else w
    train = feature_set(f_tr, w, y, "tr")
    test = feature_set(f_te, w, np.zeros(n_test, int), "te")
    layer = FinalLayer(w=w, l2=l2)       # with sentence embeddings for sbert-*
    return train, test, embedded(layer, (train, rng.standard_normal((n_train, d + 2))),
                                 (test, rng.standard_normal((n_test, d + 2))))


# ---------------------------------------------------------------- brute force
def example_loss(w, f, y):
    return torch.nn.functional.cross_entropy((w @ torch.as_tensor(f))[None], torch.tensor([int(y)]))


def per_example_grads(w, feats, labels):
    """Rows = d CE(W f_i, y_i) / dW, flattened like W.ravel(), one autograd call per example."""
    rows = []
    for f, y in zip(feats, labels):
        wt = torch.tensor(w, requires_grad=True)
        example_loss(wt, f, y).backward()
        rows.append(wt.grad.ravel().numpy())
    return np.array(rows)


def mean_loss(feats, labels, l2):
    f, y = torch.as_tensor(feats), torch.as_tensor(labels)
    return lambda w: torch.nn.functional.cross_entropy(f @ w.T, y) + l2 * (w ** 2).sum()


def hessian(w, feats, labels, l2):
    h = torch.autograd.functional.hessian(mean_loss(feats, labels, l2), torch.tensor(w))
    return h.reshape(w.size, w.size).numpy()


def newton_optimum(feats, labels, l2, w0, iters=60):
    """argmin of the regularised mean loss, by Newton with autograd derivatives (steps halved until
    the loss decreases: a full Newton step can overshoot from a far start)."""
    fn = mean_loss(feats, labels, l2)
    w = torch.tensor(w0)
    for _ in range(iters):
        g = torch.autograd.functional.jacobian(fn, w).ravel()
        if g.norm() < 1e-12:
            break
        h = torch.autograd.functional.hessian(fn, w).reshape(w.numel(), w.numel())
        step, t = torch.linalg.solve(h, g).reshape(w.shape), 1.0
        while fn(w - t * step) > fn(w) and t > 1e-8:
            t /= 2
        w = w - t * step
    assert torch.autograd.functional.jacobian(fn, w).norm() < 1e-9
    return w.numpy()


def close(ours, brute, rtol=2e-5):
    """float32 scores against float64 brute force, relative to the matrix's scale."""
    assert ours.dtype == np.float32 and ours.shape == brute.shape
    np.testing.assert_allclose(ours, brute, rtol=rtol, atol=rtol * np.abs(brute).max())


def cos(a, b):
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return 0.0 if na == 0 or nb == 0 else a @ b / (na * nb)


PAIRS = [(a, b) for a in range(6) for b in range(30)]


# ---------------------------------------------------------------- closed forms
@pytest.mark.parametrize("prefix", ["nn", "sbert"])
def test_similarities_equal_their_definitions(prefix):
    train, test, head = problem(c=3)
    a, b = (test.features, train.features) if prefix == "nn" else (head.of(test), head.of(train))
    brute = {"euc": lambda u, v: -np.linalg.norm(u - v), "cos": cos, "dot": np.dot}
    for metric, fn in brute.items():
        ours = get_method(f"{prefix}-{metric}").fit(train, None if prefix == "nn" else head).score(test)
        close(ours, np.array([[fn(u, v) for v in b] for u in a]))


@pytest.mark.parametrize("c", [2, 3])
def test_gradient_dot_and_cosine_equal_autograd(c):
    train, test, head = problem(c=c, seed=c)
    g_te = per_example_grads(head.w, test.features, test.pred)      # predicted label
    g_tr = per_example_grads(head.w, train.features, train.label)    # gold label
    close(get_method("gd").fit(train, head).score(test), g_te @ g_tr.T)
    close(get_method("gc").fit(train, head).score(test),
          np.array([[cos(a, b) for b in g_tr] for a in g_te]))
    # without the head, the stored probabilities give the same gradients
    close(get_method("gd").fit(train).score(test), g_te @ g_tr.T)


@pytest.mark.parametrize("c", [2, 3])
def test_reduced_hessian_is_the_autograd_hessian_on_the_sum_zero_subspace(c):
    train, _, head = problem(c=c, d=3, seed=10 + c)
    h = hessian(head.w, train.features, train.label, head.l2)
    q = np.kron(sum_zero_basis(c), np.eye(3))
    np.testing.assert_allclose(reduced_hessian(train.features, train.probs, head.l2, sum_zero_basis(c)),
                               q.T @ h @ q, rtol=1e-10, atol=1e-12)
    u = np.kron(np.ones((c, 1)) / np.sqrt(c), np.eye(3))   # the complement: H = 2 lam I there
    np.testing.assert_allclose(h @ u, 2 * head.l2 * u, atol=1e-12)


@pytest.mark.parametrize("n", [1, 5, 64, 65, 200])
def test_lower_inverse_inverts_a_cholesky_factor(n):
    rng = np.random.default_rng(n)
    x = rng.standard_normal((2 * n, n))
    chol = np.linalg.cholesky(x.T @ x / (2 * n) + 0.1 * np.eye(n))
    inv = lower_inverse(chol)
    np.testing.assert_array_equal(np.triu(inv, 1), 0)
    np.testing.assert_allclose(inv @ chol, np.eye(n), atol=1e-10)
    np.testing.assert_allclose(inv, np.linalg.inv(chol), rtol=1e-9, atol=1e-11)


def test_row_helpers_give_the_bits_of_their_float64_definitions():
    """centred rows, Kronecker rows and row norms are computed without whole float64
    temporaries (one ufunc pass, or tiles of rows); the results are those of the plain float64
    expressions, bit for bit."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1300, 7)).astype(np.float32)        # more rows than one norm tile
    x[4] = 0
    center = x.mean(axis=0, dtype=np.float64)
    np.testing.assert_array_equal(centered_rows(x, center), (x.astype(np.float64) - center).astype(np.float32))
    a = rng.standard_normal((1300, 2))
    np.testing.assert_array_equal(kron_rows32(a, x), kron_rows(a, x.astype(np.float64)).astype(np.float32))
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    np.testing.assert_array_equal(inverse_norms(x), np.divide(1.0, norms, out=np.zeros(1300), where=norms > 0))
    t = rng.standard_normal((3, 7))
    np.testing.assert_allclose(inverse_norms(x, t)[5:], 1 / np.linalg.norm(x[5:].astype(np.float64) @ t.T, axis=1),
                               rtol=1e-12)


@pytest.mark.parametrize("c,damping", [(2, 0.0), (3, 0.0), (3, 0.3)])
def test_influence_and_relative_influence_equal_autograd_hessian(c, damping):
    train, test, head = problem(c=c, seed=20 + c)
    g_te = per_example_grads(head.w, test.features, test.pred)
    g_tr = per_example_grads(head.w, train.features, train.label)
    h = hessian(head.w, train.features, train.label, head.l2) + damping * np.eye(head.w.size)
    close(get_method("if", damping=damping).fit(train, head).score(test), g_te @ np.linalg.solve(h, g_tr.T))
    vals, vecs = np.linalg.eigh(h)
    root = vecs @ np.diag(vals ** -0.5) @ vecs.T                       # explicit H^-1/2
    brute = np.array([[cos(root @ a, root @ b) for b in g_tr] for a in g_te])
    close(get_method("rif", damping=damping).fit(train, head).score(test), brute)


@pytest.mark.parametrize("c", [2, 3])
def test_influence_predicts_leave_one_out_retraining(c):
    n, l2 = 30, 0.05
    train, test, _ = problem(n_train=n, c=c, l2=l2, seed=30 + c)
    w_star = newton_optimum(train.features, train.label, l2, np.zeros((c, 4)))
    train, test, head = problem(n_train=n, c=c, l2=l2, seed=30 + c, w=w_star)   # probs at the optimum
    scores = get_method("if").fit(train, head).score(test).astype(np.float64)

    def test_losses(w):
        return np.array([example_loss(torch.tensor(w), f, y).item() for f, y in zip(test.features, test.pred)])

    base = test_losses(w_star)
    change = np.empty((len(test), n))          # test-loss change when example i is removed
    for i in range(n):
        keep = np.arange(n) != i
        w_i = newton_optimum(train.features[keep], train.label[keep], l2, w_star)
        change[:, i] = test_losses(w_i) - base
    # removing z_i shifts the loss by ~ g_t^T H^-1 (g_i + 2 lam W*) / (n - 1) = (if + const) / (n - 1):
    # removing a supporter (if > 0) raises the test loss
    for t in range(len(test)):
        rho = spearmanr(scores[t], change[t]).correlation
        assert rho >= 0.9, (t, rho)
        assert np.corrcoef(scores[t], change[t])[0, 1] >= 0.97
        assert 0.8 < np.polyfit(scores[t], change[t], 1)[0] * (n - 1) < 1.5


@pytest.mark.parametrize("c", [2, 3])
def test_representer_refits_to_stationarity_and_decomposes_exactly(c):
    train, test, head = problem(n_train=25, c=c, l2=0.1, seed=40 + c)   # head.w far from the optimum
    n = len(train)
    w_star = newton_optimum(train.features, train.label, head.l2, np.zeros_like(head.w))
    rep = get_method("rep").fit(train, head)
    assert rep.grad_norm_ <= 1e-10 and rep.converged_
    np.testing.assert_allclose(rep.weight_, w_star, atol=1e-9)
    assert rep.reconstruction_["max_abs_error"] < 1e-9
    assert rep.reconstruction_["correlation"] > 1 - 1e-12
    info = rep.diagnostics()
    assert info["reconstruction"] == rep.reconstruction_ and info["n_train"] == n
    assert set(info) >= {"grad_norm", "n_iter", "converged", "prediction_agreement"}
    # alpha_i = -(1/(2 lam n)) dL_i/dlogits, by autograd at the refit weight
    alpha = []
    for f, y in zip(train.features, train.label):
        z = torch.tensor(w_star @ f, requires_grad=True)
        torch.nn.functional.cross_entropy(z[None], torch.tensor([int(y)])).backward()
        alpha.append(-z.grad.numpy() / (2 * head.l2 * n))
    brute = np.array([[alpha[i][test.pred[t]] * (train.features[i] @ test.features[t]) for i in range(n)]
                      for t in range(len(test))])
    scores = rep.score(test)
    close(scores, brute)
    # the scores of a row add up to the refit logit of the predicted class
    logits = test.features @ w_star.T
    np.testing.assert_allclose(scores.sum(1), logits[np.arange(len(test)), test.pred], rtol=1e-5, atol=1e-5)


def test_representer_refuses_an_unregularised_head():
    train, _, head = problem()
    with pytest.raises(ValueError, match="l2"):
        get_method("rep").fit(train, FinalLayer(w=head.w, l2=0.0))


# ---------------------------------------------------------------- one contract, every method
def contract_problem():
    """Binary problem where train row 7 copies test row 0 with gold = its prediction (a supporter)
    and row 12 copies it with the other label (an opponent); test row 0 has the largest norm."""
    train, test, head = problem(n_train=24, n_test=5, d=5, c=2, seed=50)
    f, enc, y = train.features.copy(), head.of(train).copy(), train.label.copy()
    tf, te = test.features.copy(), head.of(test).copy()
    tf[0] *= 2 * np.linalg.norm(f, axis=1).max() / np.linalg.norm(tf[0])
    te[0] *= 2 * np.linalg.norm(enc, axis=1).max() / np.linalg.norm(te[0])
    test = feature_set(tf, head.w, test.label, "te")
    f[[7, 12]], enc[[7, 12]] = tf[0], te[0]
    y[7], y[12] = test.pred[0], 1 - test.pred[0]
    train = feature_set(f, head.w, y, "tr")
    return train, test, embedded(FinalLayer(w=head.w, l2=head.l2), (train, enc), (test, te))


@pytest.fixture(scope="module")
def contract():
    return contract_problem()


def test_registry_lists_the_eleven_methods_in_order():
    assert METHOD_NAMES == ("nn-euc", "nn-cos", "nn-dot", "sbert-euc", "sbert-cos", "sbert-dot",
                            "gd", "gc", "if", "rif", "rep")
    assert registered()[:11] == METHOD_NAMES


@pytest.mark.parametrize("name", METHOD_NAMES)   # methods registered elsewhere have their own tests
def test_contract(name, contract):
    train, test, head = contract
    method = get_method(name)
    with pytest.raises(NotFittedError):
        method.score(test)
    with pytest.raises(NotFittedError):
        method.score_chunks(test)
    assert method.fit(train, head) is method
    scores = method.score(test)
    assert scores.shape == (len(test), len(train)) and scores.dtype == np.float32
    assert np.isfinite(scores).all()
    np.testing.assert_array_equal(scores, method.score(test))                        # deterministic
    chunks = list(method.score_chunks(test, chunk_size=2))
    assert [r for r, _ in chunks] == [slice(0, 2), slice(2, 4), slice(4, 5)]
    np.testing.assert_allclose(np.concatenate([b for _, b in chunks]), scores, rtol=1e-6, atol=1e-6)
    # columns follow the training rows
    perm = np.random.default_rng(0).permutation(len(train))
    permuted = get_method(name).fit(train.subset(perm), head).score(test)
    np.testing.assert_allclose(permuted, scores[:, perm], rtol=1e-5, atol=1e-6 * np.abs(scores).max())
    # sign convention: higher = supports the prediction more
    row = scores[0]
    if name.startswith(("nn-", "sbert-")):
        assert row[7] == row.max()
    else:
        assert row[7] > 0 > row[12]
    if name in ("gc", "rif"):
        assert row.argmax() == 7 and row[7] == pytest.approx(1, abs=1e-6)
        assert row[12] == pytest.approx(-1, abs=1e-6)
    assert isinstance(method.config(), dict) and not any(k.endswith("_") for k in method.config())


@pytest.mark.parametrize("name", [n for n in METHOD_NAMES if get_method(n).needs is not None])
def test_methods_that_need_the_model_say_so(name, contract):
    train, _, _ = contract
    with pytest.raises(ValueError, match="needs the classifier" if get_method(name).needs == "final_layer"
                       else "needs the sentence encoder's embeddings"):
        get_method(name).fit(train)


def test_scoring_rejects_test_features_of_another_width(contract):
    train, test, head = contract
    other = problem(d=3)[1]
    for name in ("nn-cos", "gd", "if", "rep"):
        with pytest.raises(ValueError, match="shape"):
            get_method(name).fit(train, head).score(other)


# ---------------------------------------------------------------- a final layer with a bias
@pytest.mark.parametrize("c", [2, 3])
def test_gradient_methods_and_rep_cover_the_bias(c):
    """logits = W f + b = [W, b] [f, 1]: with a bias every gradient method equals brute force over the
    augmented weight, and the L2 term covers the bias too (an imported model's damping)."""
    train, test, layer = problem(c=c, seed=50 + c)
    b = np.random.default_rng(c).standard_normal(c)
    biased = FinalLayer(w=layer.w, b=b, l2=layer.l2)

    def with_bias(fs):
        probs = torch.softmax(torch.as_tensor(fs.features @ layer.w.T + b), -1).numpy()
        return fs.replace(probs=probs, pred=probs.argmax(1))
    train, test = with_bias(train), with_bias(test)
    aug = lambda f: np.concatenate([f, np.ones((len(f), 1))], 1)   # noqa: E731
    wb = np.concatenate([layer.w, b[:, None]], 1)
    g_te = per_example_grads(wb, aug(test.features), test.pred)
    g_tr = per_example_grads(wb, aug(train.features), train.label)
    close(get_method("gd").fit(train, biased).score(test), g_te @ g_tr.T)
    close(get_method("gc").fit(train, biased).score(test),
          np.array([[cos(a, z) for z in g_tr] for a in g_te]))
    h = hessian(wb, aug(train.features), train.label, layer.l2)
    close(get_method("if").fit(train, biased).score(test), g_te @ np.linalg.solve(h, g_tr.T))
    ev, vec = np.linalg.eigh(h)
    root = vec @ np.diag(ev ** -0.5) @ vec.T
    close(get_method("rif").fit(train, biased).score(test),
          np.array([[cos(root @ a, root @ z) for z in g_tr] for a in g_te]), rtol=1e-4)
    # rep: alpha from the brute-force optimum of [W, b]; score = alpha_{i,c} <f~_i, f~_t>
    opt = newton_optimum(aug(train.features), train.label, layer.l2, wb)
    p = torch.softmax(torch.as_tensor(aug(train.features) @ opt.T), -1).numpy()
    alpha = -(p - np.eye(c)[train.label]) / (2 * layer.l2 * len(train))
    want = alpha[:, test.pred].T * (aug(test.features) @ aug(train.features).T)
    close(get_method("rep").fit(train, biased).score(test), want, rtol=1e-4)

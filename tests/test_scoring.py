"""The one scorer: streamed top-k == top-k of the dense matrix (ties included), shared products ==
separate ones, shared row work == separate, per-shard merges == whole, and each method's two sides
== its brute-force definition."""
import numpy as np
import pytest

from instattr.arrays import FeatureSet, FinalLayer
from instattr.attribution import score_together
from instattr.methods import METHOD_NAMES, bottom_k, get_method, shared, top_k
from instattr.methods.scoring import Grid, RunningTopK, merge_shards, score_top_k
from instattr.methods.sides import plain_vectors

from conftest import EmbeddedLayer, embedded

GRID = Grid(4, 8)      # tiny blocks, so every path crosses block boundaries


def feature_set(rng, n, d, c, w, b, prefix, dup=True):
    f = rng.standard_normal((n, d))
    enc = rng.standard_normal((n, d + 2))
    if dup:                     # identical rows score identically: ties across blocks
        f[[9, 17, 30]], enc[[9, 17, 30]] = f[2], enc[2]
    z = f @ w.T + (0 if b is None else b)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    label = rng.integers(0, c, n)
    if dup:
        label[[9, 17, 30]] = label[2]
    return FeatureSet(idx=np.array([f"{prefix}{i}" for i in range(n)]), label=label,
                      pred=p.argmax(1), probs=p, features=f), enc


def problem(c, bias, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((c, 5))
    b = rng.standard_normal(c) if bias else None
    train, enc_train = feature_set(rng, 37, 5, c, w, b, "tr")
    test, enc_test = feature_set(rng, 11, 5, c, w, b, "te", dup=False)
    test.features[3] = train.features[2]          # a test row equal to four training rows
    return train, test, embedded(FinalLayer(w=w, b=b, l2=0.05), (train, enc_train), (test, enc_test))


def fitted(name, train, layer):
    m = get_method(name, chunk_size=GRID.test_rows)
    m._train_rows = GRID.train_rows
    return m.fit(train, layer)


CASES = [(c, bias) for c in (2, 3) for bias in (False, True)]


@pytest.fixture(scope="module", params=CASES, ids=[f"c{c}-{'bias' if b else 'nobias'}" for c, b in CASES])
def case(request):
    train, test, layer = problem(*request.param, seed=sum(request.param))
    return train, test, layer, {n: fitted(n, train, layer) for n in METHOD_NAMES}


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_streamed_top_k_equals_dense_top_k(name, case):
    train, test, layer, methods = case
    m = methods[name]
    dense = m.score(test)
    got = score_top_k([m.member(test)], len(test), 6, 4, GRID)[name]
    for which, want in (("top", top_k(dense, 6)), ("bottom", bottom_k(dense, 4))):
        np.testing.assert_array_equal(got[which][0], want[0])
        np.testing.assert_array_equal(got[which][1], want[1])
    if name in ("nn-dot", "nn-cos", "gd", "if"):      # the planted ties are broken by the lower row
        assert len({dense[3, j] for j in (2, 9, 17, 30)}) == 1


def test_shared_products_give_the_same_bits_as_separate_ones(case):
    train, test, layer, methods = case
    together = score_together(methods, test, GRID)
    for name, m in methods.items():
        np.testing.assert_array_equal(together[name], m.score(test))
    many = score_top_k([m.member(test) for m in methods.values()], len(test), 5, 0, GRID)
    for name, m in methods.items():      # top-k finishes into its own buffers: the same bits
        np.testing.assert_array_equal(many[name]["top"][0], top_k(together[name], 5)[0])
        np.testing.assert_array_equal(many[name]["top"][1], top_k(together[name], 5)[1])


@pytest.mark.parametrize("budget", [None, 1 << 10])
def test_methods_fitted_while_sharing_rows_give_the_same_bits(case, budget, monkeypatch):
    """Inside sharing() the eleven methods share centred rows, probabilities and gradients (and
    with a tiny memo budget recompute what was evicted); no score changes by a bit. A second
    training set of the same shape inside the same scope is not mistaken for the first."""
    train, test, layer, methods = case
    if budget:
        monkeypatch.setattr(shared, "MEMO_BYTES", budget)
    other = train.replace(features=train.features[::-1].copy())
    other_layer = embedded(layer, (other, layer.of(train) + 1.0), (test, layer.of(test)))
    with shared.sharing():
        got = score_together({n: fitted(n, train, layer) for n in METHOD_NAMES}, test, GRID)
        got_other = score_together({n: fitted(n, other, other_layer) for n in METHOD_NAMES}, test, GRID)
    for name, m in methods.items():
        np.testing.assert_array_equal(got[name], m.score(test))
        np.testing.assert_array_equal(got_other[name], fitted(name, other, other_layer).score(test))


@pytest.mark.parametrize("c,bias", CASES)
def test_shared_row_work_tells_labels_layers_and_rows_apart(c, bias):
    """The training set scored against itself on a square grid: test and training blocks are
    the same memory at other labels (predicted against gold); a second layer (other weights)
    fitted in the same scope. Every score equals an unshared fit's, and the centred rows are
    really shared (one array for nn-dot's and gd's test sides)."""
    train, _, layer = problem(c, bias, seed=7 + c)
    rng = np.random.default_rng(c)
    other = EmbeddedLayer(w=layer.w + rng.standard_normal(layer.w.shape), b=None if layer.b is None else layer.b + 1,
                          l2=0.07, sentence=layer.sentence)
    grid = Grid(8, 8)

    def fit(name, lay):
        m = get_method(name, chunk_size=8)
        m._train_rows = 8
        return m.fit(train, lay)
    with shared.sharing():
        got = {lay_i: score_together({n: fit(n, lay) for n in METHOD_NAMES}, train, grid)
               for lay_i, lay in enumerate((layer, other))}
        if c == 2:
            assert fit("nn-dot", layer).test_side(train).vectors is fit("gd", layer).test_side(train).vectors
    for lay_i, lay in enumerate((layer, other)):
        for name in METHOD_NAMES:
            np.testing.assert_array_equal(got[lay_i][name], fit(name, lay).score(train), err_msg=f"{name} {lay_i}")


def test_sharing_memo_is_scoped_and_identifies_arrays_by_memory():
    x = np.arange(12.0).reshape(4, 3)
    calls = []

    def compute(a):
        calls.append(1)
        return a.sum(axis=1)
    assert shared._MEMO.get() is None
    with shared.sharing():
        first = shared.once("sum", (x,), lambda: compute(x))
        assert shared.once("sum", (x[:],), lambda: compute(x)) is first      # a view of the same rows
        shared.once("sum", (x[:2],), lambda: compute(x[:2]))                 # other rows
        shared.once("sum", (x.copy(),), lambda: compute(x))                  # other memory
        shared.once("mean", (x,), lambda: compute(x))                        # another quantity
        with shared.sharing():                                               # nested: the same memo
            assert shared.once("sum", (x,), lambda: compute(x)) is first
    assert len(calls) == 4 and shared._MEMO.get() is None
    shared.once("sum", (x,), lambda: compute(x))                             # outside: computed
    assert len(calls) == 5


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_sides_are_a_plain_inner_product(name, case):
    """<[r u, r x, r], [c v, c, c y]> (nn-euc: the distance) reproduces the scores: what FAISS searches."""
    train, test, layer, methods = case
    m = methods[name]
    a = plain_vectors(m.test_side(test), test=True).astype(np.float64)
    b = plain_vectors(m.train_side(train), test=False).astype(np.float64)
    want = m.score(test).astype(np.float64)
    if name.endswith("-euc"):
        got = -np.sqrt(np.maximum((a ** 2).sum(1)[:, None] + (b ** 2).sum(1)[None] - 2 * a @ b.T, 0))
    else:
        got = a @ b.T
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_shards_merge_to_the_whole(case):
    train, test, layer, methods = case
    members = [m.member(test) for m in methods.values()]
    whole = score_top_k(members, len(test), 7, 3, GRID)
    parts = [score_top_k(members, len(test), 7, 3, GRID, train_range=(s, min(s + 16, len(train))))
             for s in range(0, len(train), 16)]
    for name in methods:
        for which, k, largest in (("top", 7, True), ("bottom", 3, False)):
            merged = merge_shards([p[name][which] for p in parts], k, largest)
            np.testing.assert_array_equal(merged[0], whole[name][which][0])
            np.testing.assert_array_equal(merged[1], whole[name][which][1])


@pytest.mark.parametrize("largest", [True, False])
def test_running_top_k_over_column_blocks_equals_top_k(largest):
    rng = np.random.default_rng(3)
    signed_zeros = np.where(rng.random((4, 30)) < 0.2, 1.0, np.where(rng.random((4, 30)) < 0.5, -0.0, 0.0))
    assert np.signbit(signed_zeros).any() and (signed_zeros == 0).any()
    for s in (rng.standard_normal((9, 70)), rng.integers(-2, 3, (9, 70)), np.zeros((3, 20)), signed_zeros):
        s = s.astype(np.float32)
        for k in (1, 5, 30):
            for width in (1, 4, 25, 70):
                acc = RunningTopK(len(s), k, largest)
                for c in range(0, s.shape[1], width):
                    acc.update(s[:, c:c + width], c)
                want = (top_k if largest else bottom_k)(s, k)
                np.testing.assert_array_equal(acc.result()[0], want[0])
                np.testing.assert_array_equal(acc.result()[1], want[1])


def test_running_top_k_refuses_nan():
    acc = RunningTopK(1, 2)
    with pytest.raises(ValueError, match="NaN"):
        acc.update(np.array([[1.0, np.nan]], dtype=np.float32), 0)


def test_fit_without_embedding_streams_the_same_training_side():
    train, test, layer = problem(3, True)
    for name in ("gd", "if", "rep", "nn-euc"):
        full = fitted(name, train, layer)
        lazy = get_method(name).fit(train, layer, embed=False)
        assert lazy.fitted_train_side() is None
        side = lazy.train_side(train.subset(slice(0, 8)))
        np.testing.assert_array_equal(side.vectors, full.fitted_train_side().vectors[:8])

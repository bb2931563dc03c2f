"""top_k / bottom_k / stream_top_k against a brute-force sort; the registry's name handling."""
import gc
import weakref

import numpy as np
import pytest

from instattr.arrays import FeatureSet, FinalLayer
from instattr.methods import (
    METHOD_NAMES,
    bottom_k,
    expand_methods,
    get_method,
    register,
    registered,
    stream_top_k,
    top_k,
)
from instattr.methods.base import Attributor
from instattr.methods.registry import _REGISTRY


def brute(scores, k, largest):
    """Sort each row by (score, best first), ties by lower index, with a plain Python sort."""
    idx, vals = [], []
    for row in scores:
        order = sorted(range(len(row)), key=lambda j: (-row[j] if largest else row[j], j))[:k]
        idx.append(order)
        vals.append([row[j] for j in order])
    return np.array(idx, dtype=np.int64).reshape(len(scores), -1), np.array(vals, dtype=scores.dtype).reshape(len(scores), -1)


def matrices():
    rng = np.random.default_rng(0)
    yield rng.standard_normal((7, 40)).astype(np.float32)
    yield rng.integers(-3, 4, size=(6, 25)).astype(np.float32)    # many ties
    yield np.zeros((3, 5), dtype=np.float32)                       # all tied


@pytest.mark.parametrize("k", [0, 1, 3, 5, 40, 100])
@pytest.mark.parametrize("largest", [True, False])
def test_top_and_bottom_k_equal_a_full_sort(k, largest):
    for s in matrices():
        idx, vals = (top_k if largest else bottom_k)(s, k)
        want_idx, want_vals = brute(s, min(k, s.shape[1]), largest)
        np.testing.assert_array_equal(idx, want_idx)
        np.testing.assert_array_equal(vals, want_vals)
        assert idx.dtype == np.int64 and vals.dtype == s.dtype


@pytest.mark.parametrize("largest", [True, False])
def test_stream_top_k_equals_top_k_on_the_whole_matrix(largest):
    s = np.random.default_rng(1).standard_normal((23, 31)).astype(np.float32)
    blocks = [(slice(a, min(a + 5, 23)), s[a:a + 5]) for a in range(0, 23, 5)]
    alive = []

    def chunks():  # out of order; a block handed over earlier must be released by now
        for rows, block in reversed(blocks):
            gc.collect()
            alive.append(sum(ref() is not None for ref in refs))
            block = block.copy()
            refs.append(weakref.ref(block))
            yield rows, block

    refs = []
    idx, vals = stream_top_k(chunks(), 4, largest=largest)
    want = (top_k if largest else bottom_k)(s, 4)
    np.testing.assert_array_equal(idx, want[0])
    np.testing.assert_array_equal(vals, want[1])
    assert alive == [0] * len(blocks)


def test_stream_top_k_consumes_score_chunks_of_a_method():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((3, 4))

    def features(n):
        f = rng.standard_normal((n, 4))
        p = np.exp(f @ w.T)
        p /= p.sum(1, keepdims=True)
        return FeatureSet(idx=np.arange(n).astype(str), label=rng.integers(0, 3, n), pred=p.argmax(1),
                          probs=p, features=f)

    train, test = features(40), features(9)
    method = get_method("if").fit(train, FinalLayer(w=w, l2=0.1))
    idx, vals = stream_top_k(method.score_chunks(test, chunk_size=4), 5, largest=False)
    want = bottom_k(method.score(test), 5)
    np.testing.assert_array_equal(idx, want[0])
    np.testing.assert_allclose(vals, want[1], rtol=1e-6)


def test_stream_top_k_rejects_gaps_and_overlaps():
    s = np.zeros((6, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="cover"):
        stream_top_k([(slice(0, 2), s[:2]), (slice(3, 6), s[3:])], 2)
    with pytest.raises(ValueError, match="cover"):
        stream_top_k([(slice(0, 3), s[:3]), (slice(2, 5), s[2:5])], 2)
    with pytest.raises(ValueError, match="rows"):
        stream_top_k([(slice(0, 3), s[:2])], 2)


def test_top_k_rejects_nan_and_vectors():
    with pytest.raises(ValueError, match="NaN"):
        top_k(np.array([[1.0, np.nan]]), 1)
    with pytest.raises(ValueError, match="2-D"):
        top_k(np.ones(3), 1)


def test_expand_methods():
    everything = expand_methods("all")
    assert everything[:11] == list(METHOD_NAMES) and everything == list(registered())
    assert expand_methods(" gd,if , gd") == ["gd", "if"]
    assert expand_methods(["rep", "all"])[:2] == ["rep", "nn-euc"]
    for bad in ("gd,nope", "", ","):
        with pytest.raises(ValueError) as err:
            expand_methods(bad)
        assert "nn-euc" in str(err.value) and "\n" not in str(err.value)


def test_get_method_errors_are_one_line_and_name_the_choices():
    with pytest.raises(ValueError, match=r"unknown method 'nope'; known: nn-euc, .*rep"):
        get_method("nope")
    with pytest.raises(ValueError, match="unknown option.*damp; options: damping, chunk_size"):
        get_method("if", damp=1)
    with pytest.raises(ValueError, match="damping"):
        get_method("rif", damping=-1)
    assert get_method("if", damping=0.5).config() == {"chunk_size": None, "damping": 0.5}
    assert get_method("gd") is not get_method("gd")


def test_register_adds_a_method_and_refuses_clashes():
    class Constant(Attributor):
        needs_head = False

        def _fit(self, train, head):
            pass

        def _score(self, test, out):
            out[:] = 1.0

    try:
        register("constant-test")(Constant)
        assert "constant-test" in expand_methods("all")
        assert get_method("constant-test").name == "constant-test"
        with pytest.raises(ValueError, match="already registered"):
            register("gd")(Constant)
        with pytest.raises(TypeError):
            register("not-a-class")(object)
    finally:
        _REGISTRY.pop("constant-test", None)

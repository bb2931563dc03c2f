"""FAISS approximate search over an index, on a synthetic set whose answer is known."""
import numpy as np
import pytest

from instattr.arrays import FeatureSet, FinalLayer
from instattr.index import Index, build_index
from instattr.methods import get_method

N, D, PLANTED = 2000, 16, 40


def clustered(rng, n, centers):
    f = centers[rng.integers(len(centers), size=n)] + 0.3 * rng.standard_normal((n, D))
    return f


@pytest.fixture(scope="module")
def data():
    """Training rows in 30 clusters; the first PLANTED test rows are training rows 7, 107, ...
    plus a little noise, so each one's nearest training row (nn-cos top-1) is known."""
    rng = np.random.default_rng(0)
    centers = 3 * rng.standard_normal((30, D))
    f = clustered(rng, N, centers)
    w = rng.standard_normal((2, D))

    def fs(x, prefix):
        z = x @ w.T
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        return FeatureSet(idx=np.array([f"{prefix}{i}" for i in range(len(x))]), label=rng.integers(0, 2, len(x)),
                          pred=p.argmax(1), probs=p, features=x)

    planted = np.arange(PLANTED) * 47 + 7
    q = np.concatenate([f[planted] + 1e-3 * rng.standard_normal((PLANTED, D)), clustered(rng, 60, centers)])
    return fs(f, "tr"), fs(q, "q"), FinalLayer(w=w, l2=0.01), planted


@pytest.mark.parametrize("kind,names", [("ivf", ("nn-cos", "nn-euc", "gd")), ("ivf-sq8", ("nn-cos", "nn-euc", "gd")),
                                        ("hnsw", ("nn-cos", "nn-euc"))])
def test_ann_recall_and_exact_rescoring(kind, names, data, tmp_path):
    """(HNSW graphs degrade on gd's many near-zero gradients; the recall stored in the manifest
    says so, and IVF is the default.)"""
    train, queries, layer, planted = data
    methods = {n: get_method(n).fit(train, layer, embed=False) for n in names}
    m = build_index(tmp_path / kind, train, methods, {"synthetic": "clusters"}, dtype="float32", ann=kind,
                    ann_k=10, ann_target=0.95, queries=queries, progress=False, train_rows=512, shard_rows=1024)
    index = Index(tmp_path / kind)
    exact = index.search(list(methods), queries, 10)
    approx = index.ann_search(list(methods), queries, 10, bottom_k=5)
    for name in methods:
        entry = m["methods"][name]["ann"]
        assert entry["kind"] == kind and entry["recall"] >= 0.95 and entry["n_queries"] == len(queries)
        ex, ap = exact[name]["top"], approx[name]["top"]
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ex[0], ap[0])])
        assert recall >= 0.9, (name, recall)
        for row in range(len(queries)):       # candidates found by both carry the exact score
            common = np.intersect1d(ex[0][row], ap[0][row])
            e = dict(zip(ex[0][row], ex[1][row]))
            a = dict(zip(ap[0][row], ap[1][row]))
            got, want = np.array([a[c] for c in common]), np.array([e[c] for c in common])
            if name == "nn-euc":    # -sqrt(|a|^2 + |b|^2 - 2ab) in float32: compare the squared distances,
                got, want = got ** 2, want ** 2    # whose error (a few ulp of |a|^2) a planted near-0 sqrt magnifies
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
        assert np.all(np.diff(ap[1], axis=1) <= 0)                      # best first
        assert np.all(np.diff(approx[name]["bottom"][1], axis=1) >= 0)  # most opposing first
    if kind == "ivf-sq8":                 # one byte per dimension (and the 8-byte row ids), not four
        faiss_file = tmp_path / kind / m["methods"]["nn-cos"]["ann"]["parts"][0]["file"]
        assert faiss_file.stat().st_size < N * (D + 8) + 64 * 1024
    for name in ("nn-cos", "nn-euc"):                                    # the known answer
        np.testing.assert_array_equal(exact[name]["top"][0][:PLANTED, 0], planted)
        assert np.mean(approx[name]["top"][0][:PLANTED, 0] == planted) >= 0.9


def test_an_index_of_the_earlier_layout_is_still_searched(data, tmp_path):
    """Indexes built before one IVF per method held one IVF per range of norms, each over the
    reduction [x, sqrt(M^2 - |x|^2)] with its own M and the rows' positions as ids: queries are
    padded with zeros to that dimension and every part's candidates are merged."""
    import faiss

    from instattr.index.ann import close, train_vectors
    from instattr.index.layout import file_entry, read_manifest, write_manifest
    from instattr.methods.sides import FINISHES
    train, queries, layer, _ = data
    methods = {n: get_method(n).fit(train, layer, embed=False) for n in ("nn-euc", "gd")}
    build_index(tmp_path, train, methods, {"synthetic": "clusters"}, dtype="float32", ann="ivf", ann_k=10,
                ann_target=0.95, queries=queries, progress=False, train_rows=512, shard_rows=1024)
    m = read_manifest(tmp_path)
    for name in methods:
        entry, src = m["methods"][name], Index(tmp_path).source(name)
        finish = FINISHES[entry["finish"]]
        norms = np.sqrt((train_vectors(src.take(np.arange(N)), finish).astype(np.float64) ** 2).sum(1))
        parts = []
        for j, rows in enumerate(np.array_split(np.argsort(norms, kind="stable"), 2)):   # two ranges of norms
            rows = np.sort(rows)
            x = train_vectors(src.take(rows), finish, float(norms[rows].max()))
            ix = faiss.IndexIVFFlat(faiss.IndexFlatIP(x.shape[1]), x.shape[1], 1, faiss.METRIC_INNER_PRODUCT)
            ix.train(x)
            ix.add_with_ids(x, rows.astype(np.int64))
            rel = f"{name}/ann-ivf-old-{j}.faiss"
            faiss.write_index(ix, str(tmp_path / rel))
            parts.append({"rows": len(rows), "nlist": 1, "max_norm": float(norms[rows].max()),
                          **file_entry(tmp_path, rel)})
        entry["ann"].update(parts=parts, breadth=1)
    write_manifest(tmp_path, m)
    close()
    index = Index(tmp_path)
    old = index.ann_search(list(methods), queries, 10, bottom_k=5)
    exact = index.search(list(methods), queries, 10, 5)
    for name in methods:       # one list per part, all searched: the candidates are the exact answer
        for which in ("top", "bottom"):
            np.testing.assert_array_equal(old[name][which][0], exact[name][which][0])
    # the same build again (a resume) replaces the earlier layout's ANN, and only it
    again = build_index(tmp_path, train, methods, {"synthetic": "clusters"}, dtype="float32", ann="ivf", ann_k=10,
                        ann_target=0.95, queries=queries, progress=False, train_rows=512, shard_rows=1024)
    for name in methods:
        parts = again["methods"][name]["ann"]["parts"]
        assert len(parts) == 1 and "max_norm" not in parts[0] and parts[0]["file"].endswith("ann-ivf-0.faiss")
        assert again["methods"][name]["shards"] == m["methods"][name]["shards"]
    assert Index(tmp_path).ann_search(list(methods), queries, 10)["gd"]["top"][0].shape == (len(queries), 10)


def test_candidates_per_query_stay_within_what_faiss_gpu_returns(monkeypatch):
    """ivf-sq8 asks for SQ_CANDIDATES x k neighbours; on a GPU FAISS gives at most GPU_MAX_K, so the
    request is capped there (never below k), and a k above it is a one-line error."""
    from instattr.errors import InstattrError
    from instattr.index import ann
    assert ann._candidates_per_query("ivf-sq8", 1000) == 1000 * ann.SQ_CANDIDATES    # no GPU here
    assert ann._candidates_per_query("ivf", 1000) == 1000
    monkeypatch.setattr(ann, "_on_gpu", lambda kind: kind.startswith("ivf"))
    assert ann._candidates_per_query("ivf-sq8", 100) == 100 * ann.SQ_CANDIDATES
    assert ann._candidates_per_query("ivf-sq8", 1000) == ann.GPU_MAX_K
    assert ann._candidates_per_query("ivf", ann.GPU_MAX_K) == ann.GPU_MAX_K
    with pytest.raises(InstattrError, match="at most 2048 neighbours per query, asked for 3000"):
        ann._candidates_per_query("ivf", 3000)

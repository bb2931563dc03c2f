"""Remove-and-retrain: the batched trainer, mask bookkeeping, and that real supporters matter."""
import json

import numpy as np
import pytest
import torch

from instattr.evaluate.retrain import (
    effective_ks,
    random_masks,
    removal_deltas,
    removal_masks,
    removed_support,
    retrain_probs,
    run_retrain,
)
from instattr.models.head import HeadConfig, init_params, logits, train_heads

from _synthetic import make_run

CFG = HeadConfig(l2=0.05, lr=0.05, epochs=3, batch_size=4, hidden=3, seed=7)


def tiny_problem(n=14, d_in=5, c=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d_in)), rng.integers(0, c, size=n)


def reference_head(x, y, c, config, keep):
    """One head trained by hand: Adam, the trainer's seeded batch order, loss = mean CE over the
    kept examples of each batch (0 if none) + l2 ||W||^2."""
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y)
    keep = torch.as_tensor(keep, dtype=torch.float64)
    params = {k: v.clone().requires_grad_(True) for k, v in
              init_params(x.shape[1], config.hidden, c, config.seed, torch.float64).items()}
    opt = torch.optim.Adam(list(params.values()), lr=config.lr)
    g = torch.Generator().manual_seed(config.seed + 1)
    for _ in range(config.epochs):
        perm = torch.randperm(len(x), generator=g)
        for s in range(0, len(x), config.batch_size):
            b = perm[s:s + config.batch_size]
            ce = torch.nn.functional.cross_entropy(logits(params, x[b]), y[b], reduction="none")
            kept = keep[b]
            data = (ce * kept).sum() / kept.sum() if kept.sum() > 0 else ce.sum() * 0
            opt.zero_grad()
            (data + config.l2 * (params["w"] ** 2).sum()).backward()
            opt.step()
    return {k: v.detach() for k, v in params.items()}


def test_batched_trainer_equals_heads_trained_one_at_a_time():
    x, y = tiny_problem()
    masks = np.ones((4, len(x)), dtype=bool)
    masks[1, :5] = False
    masks[2, ::2] = False
    masks[3, 3:] = False                       # most batches have nothing kept
    batched = train_heads(x, y, 3, CFG, masks=masks, dtype=torch.float64).params
    for j in range(len(masks)):
        alone = train_heads(x, y, 3, CFG, masks=masks[j:j + 1], dtype=torch.float64).params
        ref = reference_head(x, y, 3, CFG, masks[j])
        for k in ref:
            torch.testing.assert_close(batched[k][j], alone[k][0], rtol=0, atol=1e-12)
            torch.testing.assert_close(batched[k][j], ref[k], rtol=0, atol=1e-10)
    assert not torch.allclose(batched["w"][0], batched["w"][1])   # removal changed the head


def test_full_mask_head_equals_unbatched_training():
    x, y = tiny_problem(seed=1)
    full = train_heads(x, y, 3, CFG, masks=np.ones((1, len(x)), bool), dtype=torch.float64).params
    single = train_heads(x, y, 3, CFG, dtype=torch.float64).params
    for k in single:
        torch.testing.assert_close(full[k][0], single[k], rtol=0, atol=1e-12)


def test_retrain_probs_before_matches_and_chunking_does_not_matter():
    x, y = tiny_problem(n=20, seed=2)
    rng = np.random.default_rng(0)
    masks = rng.random((7, 20)) > 0.3
    masks[2] = True                                  # an all-kept head: after == before
    masks[5] = masks[1]                              # duplicates are trained once, reported twice
    a1, b1 = retrain_probs(x, y, x[:6], 3, CFG, masks, chunk_size=3)
    a2, b2 = retrain_probs(x, y, x[:6], 3, CFG, masks, chunk_size=50)
    assert a1.shape == (7, 6, 3)
    np.testing.assert_allclose(a1[2], b1[2], atol=1e-6)
    np.testing.assert_array_equal(a1[5], a1[1])
    np.testing.assert_allclose(a1, a2, atol=1e-5)
    np.testing.assert_allclose(b1, b2, atol=1e-5)
    assert np.abs(a1[0] - b1[0]).max() > 1e-4


def test_masks_and_k_clipping():
    s = np.array([[0.1, 0.9, 0.5, 0.7], [4.0, 3.0, 2.0, 1.0]])
    np.testing.assert_array_equal(removal_masks(s, 2), [[True, False, True, False], [False, False, True, True]])
    r = random_masks(30, 7, 5, np.random.default_rng(0))
    assert r.shape == (5, 30) and (r.sum(1) == 23).all() and len({row.tobytes() for row in r}) == 5
    assert effective_ks((50, 500), 6920) == [50, 500]
    assert effective_ks((50, 500), 80) == [40]
    assert effective_ks((10, 500), 60) == [10, 30]


def test_removal_deltas_shapes_and_random_baseline():
    x, y = tiny_problem(n=24, c=2, seed=3)
    rows = np.random.default_rng(0).normal(size=(3, 24))
    out = removal_deltas(lambda masks: retrain_probs(x, y, x[:3], 2, CFG, masks), np.array([0, 1, 1]), {"m": rows},
                         24, ks=(4, 100), n_random=5, seed=1)
    assert out["ks"] == [4, 12]
    assert set(out["methods"]["m"]) == {"4", "12"} and len(out["per_example"]["m"]["4"]) == 3
    assert out["methods"]["m"]["4"] == pytest.approx(np.mean(out["per_example"]["m"]["4"]))
    assert set(out["random"]["12"]) == {"mean", "std"} and out["random"]["12"]["std"] >= 0
    assert all(0 <= p <= 1 for p in out["before"])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("retrain"), n_train=80, n_test=20)


def test_removing_real_supporters_moves_prediction_more_than_random(run):
    res = run_retrain(run, methods=["gd", "nn-cos"], n_test=8, ks=(20,), n_random=16, progress=False)
    rand = res["random"]["20"]["mean"]
    for m in ("gd", "nn-cos"):
        assert res["methods"][m]["20"] < rand - 0.03, (m, res["methods"][m], rand)
    assert json.loads((run.path / "results" / "retrain.json").read_text()) == res
    assert res["n_test"] == 8 and res["ks"] == [20] and len(res["test_idx"]) == 8
    md = (run.path / "results" / "retrain.md").read_text()
    assert "random (mean ± std)" in md and "paper SST k=500" in md and "removed support k=20" in md
    assert all(res["removed_support"][m]["20"] > 0 for m in ("gd", "nn-cos"))   # real supporters pull
    assert (run.path / "figures" / "retrain.png").exists()


def test_quiet_cli_retrain_shows_no_progress_bars(run, capsys):
    from instattr.cli import main
    args = ["evaluate", "retrain", "--run", str(run.path), "--methods", "gd", "--n-test", "2", "--n-random", "2"]
    assert main(["--quiet", *args]) == 0
    assert "heads" not in capsys.readouterr().err
    assert main(args) == 0
    assert "heads" in capsys.readouterr().err


def test_non_head_runs_retrain_the_final_layer(tmp_path):
    from instattr.store import RunError
    ft = make_run(tmp_path, n_train=30, n_test=6, epochs=2, mode="finetune")
    with pytest.raises(RunError, match="head-mode"):
        run_retrain(ft, methods=["gd"], n_test=2, ks=(2,), n_random=2, progress=False, scope="head")
    res = run_retrain(ft, methods=["if"], n_test=3, ks=(5,), n_random=3, progress=False)
    assert res["scope"] == "final" and res["l2"] == pytest.approx(0.01)
    assert "final linear layer" in (ft.path / "results" / "retrain.md").read_text()


def lbfgs_refit(x, y, l2, c):
    """Independent reference: the final layer fit from zero by torch's L-BFGS in float64."""
    import torch
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    w = torch.zeros(c, x.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ w.T, yt) + l2 * (w ** 2).sum()
        loss.backward()
        return loss
    for _ in range(5):
        opt.step(closure)
    return w.detach().numpy()


@pytest.mark.parametrize("c", [2, 3])
def test_final_layer_refit_equals_retraining_from_scratch(c):
    """scope final: the refit on each mask's rows is the minimiser an optimiser reaches from zero."""
    from instattr.evaluate.retrain import refit_probs
    from instattr.methods.lastlayer import softmax
    rng = np.random.default_rng(c)
    x = np.concatenate([rng.normal(size=(40, 5)), np.ones((40, 1))], axis=1)     # [f, 1]: a bias
    y = (x[:, :c] @ rng.normal(size=c) > 0).astype(int) + (c == 3) * (rng.random(40) > 0.7)
    masks = np.ones((3, 40), dtype=bool)
    masks[0, :10] = False
    masks[1, rng.choice(40, 15, replace=False)] = False
    w0 = rng.normal(size=(c, 6))
    after, before = refit_probs(x, y, x[:7], w0, 0.05, masks)
    for j, keep in enumerate(masks):
        want = softmax(x[:7] @ lbfgs_refit(x[keep], y[keep], 0.05, c).T)
        np.testing.assert_allclose(after[j], want, atol=1e-7)
    np.testing.assert_allclose(before[0], softmax(x[:7] @ lbfgs_refit(x, y, 0.05, c).T), atol=1e-7)


def test_removed_support_by_hand():
    """Row 0 predicts class 1 and removes train 0 (label 1, p_gold 0.9) and 1 (label 0, p_gold 0.2):
    (+0.1 - 0.8) / 2; row 1 predicts 0 and removes train 2 and 3 (both label 0): (0.5 + 0.3) / 2."""
    scores = np.array([[5.0, 4.0, 0.0, 1.0], [0.0, 1.0, 3.0, 2.0]])
    label = np.array([1, 0, 0, 0])
    probs = np.array([[0.1, 0.9], [0.2, 0.8], [0.5, 0.5], [0.7, 0.3]])
    got = removed_support(scores, 2, np.array([1, 0]), label, probs)
    assert got == pytest.approx(((0.1 - 0.8) / 2 + (0.5 + 0.3) / 2) / 2)
    # k = n_train: a random set's expectation, every training example once per row
    every = removed_support(scores, 4, np.array([1, 0]), label, probs)
    assert every == pytest.approx(((0.1 - 0.8 - 0.5 - 0.3) + (-0.1 + 0.8 + 0.5 + 0.3)) / 8)


def test_interrupted_retrain_continues_from_saved_chunks(tmp_path, monkeypatch):
    """Chunks finished before an interruption are not retrained, and the result is unchanged; a
    different job (other masks) does not pick up the saved chunks."""
    import instattr.evaluate.retrain as rt
    x, y = tiny_problem(n=12)
    x_test = x[:3]
    masks = np.random.default_rng(1).random((7, 12)) > 0.3
    want_after, want_before = retrain_probs(x, y, x_test, 3, CFG, masks, chunk_size=3)
    calls, fail_at = [], [3]
    real = rt.train_heads

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == fail_at[0]:
            raise RuntimeError("interrupted")
        return real(*a, **k)
    monkeypatch.setattr(rt, "train_heads", flaky)
    partial = tmp_path / "partial.npz"
    with pytest.raises(RuntimeError, match="interrupted"):
        retrain_probs(x, y, x_test, 3, CFG, masks, chunk_size=3, partial=partial)
    assert int(np.load(partial)["done"]) == 4        # two chunks of two heads
    calls.clear()
    fail_at[0] = 0
    after, before = retrain_probs(x, y, x_test, 3, CFG, masks, chunk_size=3, partial=partial)
    n_unique = len(np.unique(masks, axis=0))
    assert len(calls) == -(-(n_unique - 4) // 2)      # only the chunks left
    np.testing.assert_array_equal(after, want_after)
    np.testing.assert_array_equal(before, want_before)
    calls.clear()
    retrain_probs(x, y, x_test, 3, CFG, ~masks, chunk_size=3, partial=partial)
    assert len(calls) == -(-len(np.unique(~masks, axis=0)) // 2)   # another job: from scratch

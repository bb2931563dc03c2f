"""Self-scores and suspect rankings: brute force in float64, the dense score matrix, planted flips."""
import json

import numpy as np
import pytest
import torch

from instattr.arrays import FinalLayer
from instattr.cli import main
from instattr.evaluate.mislabel import found_curve
from instattr.methods import get_method
from instattr.methods.lastlayer import softmax
from instattr.suspects import loss_and_margin, neighbour_disagreement, ranking, suspicion_scores, training_loss

from _synthetic import logistic_problem, make_run


def brute_self_scores(fs, layer):
    """Autograd in float64: per-example gradients g_i at the gold label over [W, b], the Hessian of
    mean CE + l2 ||[W, b]||^2, and from them the four self-scores (rif/gc: minus the mean cosine
    with the other examples, in the H^-1 / plain geometry)."""
    f = torch.as_tensor(fs.features, dtype=torch.float64)
    y = torch.as_tensor(fs.label)
    theta0 = torch.as_tensor(layer.weight())

    def logits(theta, rows):
        return rows @ theta[:, :f.shape[1]].T + (theta[:, f.shape[1]] if layer.b is not None else 0)

    def loss(theta):
        return torch.nn.functional.cross_entropy(logits(theta, f), y) + layer.l2 * (theta ** 2).sum()
    h = torch.autograd.functional.hessian(loss, theta0).reshape(theta0.numel(), -1)
    grads = []
    for i in range(len(f)):
        t = theta0.clone().requires_grad_(True)
        torch.nn.functional.cross_entropy(logits(t, f[i:i + 1]), y[i:i + 1]).backward()
        grads.append(t.grad.reshape(-1))
    g = torch.stack(grads)
    vals, vecs = torch.linalg.eigh(h)
    root_inv = vecs @ torch.diag(vals ** -0.5) @ vecs.T
    n = len(g)

    def minus_mean_cos(a):
        a = a / a.norm(dim=1, keepdim=True)
        s = a @ a.T
        return -(s.sum(1) - s.diagonal()) / (n - 1)
    return {"gd": (g * g).sum(1).numpy(), "if": (g * torch.linalg.solve(h, g.T).T).sum(1).numpy(),
            "gc": minus_mean_cos(g).numpy(), "rif": minus_mean_cos(g @ root_inv).numpy()}


@pytest.mark.parametrize("bias", [True, False])
def test_last_layer_self_scores_equal_brute_force(bias):
    fs, layer, _ = logistic_problem(bias=bias)
    want = brute_self_scores(fs, layer)
    for name, expected in want.items():
        got = get_method(name).fit(fs, layer).self_scores()
        np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-7, err_msg=name)


def self_consistent(att, fs):
    """The self-scores from the dense matrix of the training rows scored as test rows at gold labels."""
    dense = att.score(fs.replace(pred=fs.label)).astype(np.float64)
    if getattr(att, "normalized", False):
        return -(dense.sum(0) - dense.diagonal()) / (len(fs) - 1)
    return dense.diagonal()


def test_self_scores_agree_with_the_dense_scores_and_a_convex_model_finds_planted_flips():
    fs, layer, flipped = logistic_problem(n=400, d=5, c=2, seed=3, l2=0.005, flip=0.1)
    for name in ("gd", "gc", "if", "rif"):
        att = get_method(name).fit(fs, layer)
        np.testing.assert_allclose(att.self_scores(), self_consistent(att, fs), rtol=1e-4, atol=1e-6, err_msg=name)
    scores = suspicion_scores(fs, layer, ["if", "loss"], k=10)
    np.testing.assert_allclose(scores["loss"], training_loss(fs, layer))
    order = ranking(scores["if"], scores["loss"])
    found = found_curve(order, flipped, [0.05, 0.1, 0.2])
    assert found[1] > 0.6 and found[2] > 0.85, found            # random finds 0.1 and 0.2
    shuffled = found_curve(np.random.default_rng(0).permutation(len(fs)), flipped, [0.1])
    assert shuffled[0] < 0.3


def test_tracin_self_scores_sum_lr_weighted_squared_gradient_norms(tmp_path):
    from instattr.models.head import init_params
    from instattr.models.head_classifier import HeadClassifier
    run = make_run(tmp_path, n_train=30, n_test=5, epochs=2)
    from safetensors.torch import load_file
    params = load_file(str(run.path / "model" / "head.safetensors"))
    early = init_params(params["dense_w"].shape[1], params["dense_w"].shape[0], 2, 3)
    clf = HeadClassifier({"path": "", "pooling": "mean", "max_length": 8}, params, 0.01, run.label_names, None,
                         run=run, history=[(early, 0.5), (params, 2.0)])     # the run holds the head's inputs
    train = run.features("train")
    att = get_method("tracin").fit(train, clf)
    np.testing.assert_allclose(att.self_scores(), self_consistent(att, train), rtol=1e-4, atol=1e-7)
    gd_final = get_method("gd").fit(train, clf).self_scores()
    early_fs = train.replace(**dict(zip(("features", "probs"), clf.checkpoints()[0][0].recompute(train))))
    gd_early = get_method("gd").fit(early_fs, FinalLayer(w=early["w"].double().numpy(), l2=0.01)).self_scores()
    np.testing.assert_allclose(att.self_scores(), 0.5 * gd_early + 2.0 * gd_final, rtol=1e-4)


def test_neighbour_disagreement_equals_brute_force():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(37, 6))
    x[5] = x[4] * 3                      # same direction: each other's nearest neighbour, and a tie
    y = rng.integers(0, 3, 37)
    y[5] = y[4]                          # (whichever of the tied pair is taken, the answer is the same)
    got = neighbour_disagreement(x, y, k=4, block=8)
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = u @ u.T
    np.fill_diagonal(sims, -np.inf)
    want = [(y[np.argsort(-sims[i], kind="stable")[:4]] != y[i]).mean() for i in range(37)]
    np.testing.assert_allclose(got, want)
    assert neighbour_disagreement(x, y, k=100).shape == (37,)          # k clipped to n - 1


def test_loss_margin_and_ranking_ties():
    logits = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0], [1.0, 1.0, 1.0]])
    loss, margin = loss_and_margin(logits, np.array([0, 1, 2]))
    np.testing.assert_allclose(margin, [-2.0, 2.0, 0.0])
    np.testing.assert_allclose(loss, -np.log(softmax(logits)[[0, 1, 2], [0, 1, 2]]))
    assert list(ranking(np.array([1.0, 1.0, 1.0, 2.0]), np.array([0.1, 0.3, 0.3, 0.0]))) == [3, 1, 2, 0]


def test_suspects_cli_table_json_and_file(tmp_path, capsys):
    run = make_run(tmp_path, n_train=50, n_test=6, epochs=3)
    train = run.features("train")
    assert main(["--quiet", "suspects", "--run", str(run.path), "--top", "5", "--k", "5"]) == 0
    table = capsys.readouterr().out
    assert "ranked by if" in table and table.count("\n") >= 7
    saved = json.loads((run.path / "results" / "suspects.json").read_text())
    assert saved["method"] == "if" and saved["k_neighbours"] == 5 and saved["n_train"] == 50
    assert sorted(saved["order"]) == sorted(str(i) for i in train.idx)          # every row once
    assert saved["scores"] == sorted(saved["scores"], reverse=True)
    assert set(saved["methods"]) == {"if", "gd", "rif", "knn-nn", "knn-sbert", "loss", "margin"}  # no checkpoints
    assert saved["methods"]["if"]["order"] == saved["order"]
    pos = {str(i): r for r, i in enumerate(train.idx)}
    first = pos[saved["order"][0]]
    assert saved["gold"][0] == run.label_names[train.label[first]]
    assert saved["pred"][0] == run.label_names[train.pred[first]]
    assert run.examples("train")[first].document[:20] in table.split("\n")[3]      # the first row of the table
    assert main(["--quiet", "suspects", "--run", str(run.path), "--method", "loss", "--methods", "gd",
                 "--json", "--top", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "loss" and len(out["suspects"]) == 3 and out["suspects"][0]["rank"] == 1
    probs = train.probs[[pos[r["idx"]] for r in out["suspects"]], train.label[[pos[r["idx"]] for r in out["suspects"]]]]
    assert list(probs) == sorted(probs)                   # lowest p(gold) first
    assert main(["--quiet", "suspects", "--run", str(run.path), "--methods", "nope"]) == 2
    assert "unknown suspect ranking" in capsys.readouterr().err
    assert main(["--quiet", "suspects", "--run", str(run.path), "--k", "0"]) == 2

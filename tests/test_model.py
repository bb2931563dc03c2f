"""The head and its batched trainer, in float64 on tiny problems."""
import numpy as np
import torch

from instattr.models.head import HeadConfig, init_params, loss, pair_input, predict, train_heads


def _problem(n=30, d=5, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    return x, y


CFG = HeadConfig(epochs=3, batch_size=7, lr=5e-2, l2=0.01, hidden=4)


def test_batched_heads_equal_heads_trained_one_at_a_time():
    x, y = _problem()
    rng = np.random.default_rng(0)
    masks = (rng.random((4, len(x))) > 0.3).astype(float)
    masks[0] = 1.0
    batched = train_heads(x, y, 3, CFG, masks=masks, dtype=torch.float64).params
    for i, m in enumerate(masks):
        one = train_heads(x, y, 3, CFG, masks=m[None], dtype=torch.float64).params
        for k in one:
            torch.testing.assert_close(batched[k][i], one[k][0], rtol=0, atol=1e-10)
    plain = train_heads(x, y, 3, CFG, dtype=torch.float64).params
    for k in plain:
        torch.testing.assert_close(batched[k][0], plain[k], rtol=0, atol=1e-10)


def test_masked_example_has_no_effect():
    """Changing a masked-out example's input or label changes nothing."""
    x, y = _problem()
    m = np.ones((1, len(x)))
    m[0, 3] = 0
    a = train_heads(x, y, 3, CFG, masks=m, dtype=torch.float64).params
    x2, y2 = x.clone(), y.clone()
    x2[3] += 100.0
    y2[3] = (y2[3] + 1) % 3
    b = train_heads(x2, y2, 3, CFG, masks=m, dtype=torch.float64).params
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-12)


def test_training_lowers_the_regularised_loss_and_is_seeded():
    x, _ = _problem(n=60)
    y = (x @ torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)).argmax(1)
    cfg = HeadConfig(epochs=20, batch_size=10, lr=2e-2, l2=0.01, hidden=6)
    init = init_params(5, 6, 3, cfg.seed, torch.float64)
    trained = train_heads(x, y, 3, cfg, dtype=torch.float64).params
    assert loss(trained, x, y, cfg.l2) < 0.8 * loss(init, x, y, cfg.l2)
    again = train_heads(x, y, 3, cfg, dtype=torch.float64).params
    other = train_heads(x, y, 3, HeadConfig(**{**cfg.to_dict(), "seed": 1}), dtype=torch.float64).params
    assert all(torch.equal(trained[k], again[k]) for k in trained)
    assert not torch.allclose(trained["w"], other["w"])


def test_checkpoints_per_epoch_end_at_final_params():
    x, y = _problem()
    res = train_heads(x, y, 3, CFG, checkpoints=True, dtype=torch.float64)
    assert len(res.checkpoints) == CFG.epochs and res.checkpoint_lrs == [CFG.lr] * CFG.epochs
    assert torch.equal(res.checkpoints[-1]["w"], res.params["w"])


def test_predict_matches_manual_forward():
    x, y = _problem()
    p = init_params(5, 4, 3, 0, torch.float64)
    feats, probs = predict(p, x)
    f = torch.tanh(x @ p["dense_w"].T + p["dense_b"])
    np.testing.assert_allclose(feats, f.numpy(), atol=1e-6)
    np.testing.assert_allclose(probs, torch.softmax(f @ p["w"].T, -1).numpy(), atol=1e-6)


def test_siamese_pair_input():
    u, v = np.array([[1.0, -2.0]]), np.array([[3.0, 0.5]])
    out = pair_input(np.concatenate([u, v], 1), "siamese")
    np.testing.assert_allclose(out, [[1, -2, 3, 0.5, 2, 2.5, 3, -1]])
    assert pair_input(u, None) is u


def test_trainer_equals_the_old_autograd_trainer():
    """The hand-written trainer trains what the old one (autograd, torch's Adam) trained: float64
    to rounding, in groups of any size, with and without masks, empty batches included."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    from _reference_trainer import old_train_heads
    x, y = _problem(n=23)
    masks = np.random.default_rng(1).random((5, len(x))) > 0.4
    masks[1] = True
    masks[2, :15] = False                      # some batches keep nothing
    old = old_train_heads(x, y, 3, CFG, masks, dtype=torch.float64)
    for group in (1, 2, 5):
        new = train_heads(x, y, 3, CFG, masks=masks, dtype=torch.float64, group=group).params
        for k in old:
            torch.testing.assert_close(new[k], old[k], rtol=0, atol=1e-12)
    single_old = old_train_heads(x, y, 3, CFG, dtype=torch.float64)
    single_new = train_heads(x, y, 3, CFG, dtype=torch.float64).params
    for k in single_old:
        torch.testing.assert_close(single_new[k], single_old[k], rtol=0, atol=1e-12)
    f32 = train_heads(x, y, 3, CFG, masks=masks).params      # float32, Adam steps of lr = 0.05
    assert max(float((f32[k].double() - old[k]).abs().max()) for k in old) < 1e-3


def test_heads_with_their_own_labels_equal_heads_trained_alone():
    x, y = _problem()
    labels = np.stack([y.numpy(), (y.numpy() + 1) % 3, y.numpy()])
    labels[2, :10] = 0
    masks = np.ones((3, len(x)), dtype=bool)
    masks[1, ::3] = False
    both = train_heads(x, labels, 3, CFG, masks=masks, dtype=torch.float64, group=2).params
    for j in range(3):
        alone = train_heads(x, labels[j], 3, CFG, masks=masks[j:j + 1], dtype=torch.float64).params
        for k in alone:
            torch.testing.assert_close(both[k][j], alone[k][0], rtol=0, atol=1e-12)
    assert not torch.allclose(both["w"][0], both["w"][2])

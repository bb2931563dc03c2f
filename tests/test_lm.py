"""Causal language models (instattr.lm): tiny random GPT-2 (Conv1D), Llama, Qwen2 and a LoRA adapter on
Llama, built from configs with a word-level tokenizer. References are brute force in float64: the
model's own Hugging Face loss, autograd gradients of each window's loss with respect to the tracked
modules' parameters, autograd Jacobians for the Gauss-Newton Hessian, and influence by a dense solve.
"""
import numpy as np
import pytest
import torch
import transformers as T

from instattr.errors import InstattrError
from instattr.layers.projection import GradientProjector
from instattr.lm import LMExplainer, gradients, tracked_modules
from instattr.models.causal import IGNORE, CausalForward, Windows, windows
from instattr.task import LanguageModelTask

from _families import word_tokenizer

pytestmark = pytest.mark.usefixtures("torch_single_thread")   # conftest

TRAIN = [{"text": "the movie was good and the plot was fun"},
         {"text": "a dull film , the actor was awful"},
         {"prompt": "the plot is", "completion": "very dull"},
         {"text": "good good great fine movie", "source": 3},
         {"prompt": "the actor was", "completion": "really great"}]
QUERIES = [{"prompt": "the film was", "completion": "good"}, {"prompt": "the plot", "completion": "is not fun"}]


def tiny(family: str):
    """(tokenizer, float64 causal LM) of ``family``: gpt2, llama, qwen2 or lora-llama."""
    tok, v = word_tokenizer("decoder")
    torch.manual_seed(0)
    small = dict(vocab_size=v, num_hidden_layers=2, num_attention_heads=2, bos_token_id=0, eos_token_id=2,
                 pad_token_id=1)
    if family == "gpt2":
        model = T.GPT2LMHeadModel(T.GPT2Config(n_embd=16, n_positions=64, initializer_range=0.3, **small))
    elif family == "qwen2":
        model = T.Qwen2ForCausalLM(T.Qwen2Config(hidden_size=16, intermediate_size=32, num_key_value_heads=1,
                                                 max_position_embeddings=64, initializer_range=0.3, **small))
    else:
        model = T.LlamaForCausalLM(T.LlamaConfig(hidden_size=16, intermediate_size=32, num_key_value_heads=1,
                                                 max_position_embeddings=64, initializer_range=0.3, **small))
    if family == "lora-llama":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    return tok, model.double().eval()


def module_grads(model, names, loss):
    """The gradient of ``loss`` over the named linear modules, laid out as the exact projector does:
    per module (out, in) with the bias as a last column (GPT-2's Conv1D weight transposed)."""
    mods = [model.get_submodule(n) for n in names]
    params = [p for m in mods for p in m.parameters(recurse=False)]
    grads = dict(zip(map(id, params), torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)))
    parts = []
    for m in mods:
        w = grads[id(m.weight)]
        w = torch.zeros_like(m.weight) if w is None else w
        if type(m).__name__ == "Conv1D":
            w = w.T
        if getattr(m, "bias", None) is not None:
            b = grads[id(m.bias)]
            w = torch.cat([w, (torch.zeros_like(m.bias) if b is None else b)[:, None]], 1)
        parts.append(w.reshape(-1))
    return torch.cat(parts)


def window_loss(model, w, tokens=None):
    """One window's summed NLL at its targets (or at ``tokens``), by the model's own forward."""
    ids = torch.tensor([w.ids])
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
    targets = torch.tensor(w.targets if tokens is None else tokens)
    keep = targets != IGNORE
    return -torch.log_softmax(logits, -1)[keep, targets[keep]].sum()


def test_windows_score_every_scored_token_exactly_once_with_its_own_context():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(2, 40))
        ids = list(rng.integers(5, 50, n))
        scored = [False] + list(rng.random(n - 1) < 0.7)
        length = int(rng.integers(2, 12))
        stride = int(rng.integers(1, length))
        seen = []
        for w in windows(ids, scored, length, stride):
            start = w.start
            assert len(w.ids) <= length and w.ids == ids[start:start + len(w.ids)] and start % stride == 0
            for t, target in enumerate(w.targets):
                if target != IGNORE:
                    assert target == ids[start + t + 1]
                    seen.append(start + t + 1)
        assert sorted(seen) == [j for j in range(n) if scored[j]]          # each once, none missing
    with pytest.raises(InstattrError, match="stride"):
        windows([1, 2, 3], [False, True, True], 4, 4)


def test_the_loss_is_the_models_own_on_documents_and_completions():
    tok, model = tiny("llama")
    win = Windows(tok, [TRAIN[0], TRAIN[2]], 64)
    out = CausalForward(model)(**win.batch([0, 1]))
    loss = LanguageModelTask().loss(out)
    for b, row in enumerate([TRAIN[0], TRAIN[2]]):
        if "text" in row:
            ids = tok(row["text"], return_tensors="pt")["input_ids"]
            labels = ids.clone()
        else:
            p = tok(row["prompt"])["input_ids"]
            c = tok(row["completion"], add_special_tokens=False)["input_ids"]
            ids = torch.tensor([p + c])
            labels = torch.tensor([[-100] * len(p) + c])
        own = model(input_ids=ids, labels=labels).loss * int((labels[0, 1:] != -100).sum())   # (float32 inside)
        torch.testing.assert_close(loss[b], own.double(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "lora-llama"])
def test_exact_row_gradients_equal_autograd_summed_over_windows(family):
    tok, model = tiny(family)
    forward = CausalForward(model)
    win = Windows(tok, TRAIN, 6, 3)                         # long rows cut into overlapping windows
    assert len(win) > len(TRAIN)
    probe = win.batch([0])
    tracked = tracked_modules(forward, probe, layers=1)
    if family == "lora-llama":
        assert tracked and all(".lora_" in t.name for t in tracked)
    else:
        assert {t.group for t in tracked} == {"block1"}       # the top block, not the tied output embedding
    task = LanguageModelTask(samples=2, seed=3)
    projector = GradientProjector(forward, tracked, task, None)
    grads, factors, losses = gradients(projector, win, batch_size=3, factors=True)
    names = [t.name[len("model."):] for t in tracked]
    want = torch.zeros_like(grads)
    want_losses = torch.zeros(len(TRAIN), dtype=torch.float64)
    want_factors = []
    for j, w in enumerate(win.items):
        batch = win.batch([j])
        out = forward(**batch)
        draws = task.draws(out)                              # the same draws in a batch of one
        want[w.row] += module_grads(model, names, window_loss(model, w))
        want_losses[w.row] += float(window_loss(model, w).detach())
        for s in range(task.samples):
            want_factors.append(module_grads(model, names, window_loss(model, w, draws[s, 0].tolist()))
                                / np.sqrt(task.samples))
    torch.testing.assert_close(grads, want, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(factors, torch.stack(want_factors), rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(losses, want_losses, rtol=1e-10, atol=1e-10)
    assert float(grads.abs().sum()) > 0


def test_draws_follow_the_models_next_token_distribution_and_do_not_depend_on_the_batch():
    tok, model = tiny("llama")
    forward = CausalForward(model)
    win = Windows(tok, [TRAIN[2], TRAIN[0]], 64)
    out = forward(**win.batch([0, 1]))
    draws = LanguageModelTask(samples=4000, seed=1).draws(out)
    probs = torch.softmax(out.logits.detach(), -1)
    for b in range(2):
        scored = out.targets[b] != IGNORE
        assert bool((draws[:, b, ~scored] == IGNORE).all())
        for t in torch.nonzero(scored).squeeze(-1):
            freq = torch.bincount(draws[:, b, t], minlength=probs.shape[-1]).double() / 4000
            assert 0.5 * float((freq - probs[b, t]).abs().sum()) < 0.1          # total variation
    alone = LanguageModelTask(samples=3, seed=1).draws(forward(**win.batch([1])))
    together = LanguageModelTask(samples=3, seed=1).draws(out)
    width = alone.shape[-1]
    assert torch.equal(alone[:, 0], together[:, 1, :width])


def test_drawn_factors_average_to_the_gauss_newton_hessian():
    """E[F^T F] over the draws is sum_t J_t^T (diag p_t - p_t p_t^T) J_t (autograd Jacobians): the
    error of a mean of 4 independent estimates is about half a single one's (no bias left over),
    and far below the empirical Fisher's at the data's own tokens."""
    tok, model = tiny("gpt2")
    forward = CausalForward(model)
    win = Windows(tok, [TRAIN[1]], 64)
    tracked = [t for t in tracked_modules(forward, win.batch([0]), layers=1) if t.name.endswith("mlp.c_proj")]
    names = [t.name[len("model."):] for t in tracked]
    w = win.items[0]
    ids = torch.tensor([w.ids])
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
    ggn = 0
    for t, target in enumerate(w.targets):
        if target != IGNORE:
            p = torch.softmax(logits[t].detach(), -1)
            jac = torch.stack([module_grads(model, names, logits[t, v]) for v in range(len(p))])
            ggn = ggn + jac.T @ (torch.diag(p) - torch.outer(p, p)) @ jac

    def rel(h):
        return float(torch.linalg.norm(h - ggn) / torch.linalg.norm(ggn))
    estimates = []
    for seed in range(4):
        _, factors, _ = gradients(GradientProjector(forward, tracked, LanguageModelTask(100, seed), None), win,
                                  factors=True)
        estimates.append(factors.T @ factors)
    single, mean = np.mean([rel(h) for h in estimates]), rel(sum(estimates) / 4)
    gold = module_grads(model, names, window_loss(model, w))
    assert mean < 0.35 and mean < 0.7 * single, (mean, single)
    assert rel(torch.outer(gold, gold)) > 2.0


def factor_targets(fisher: str, model, win, j, samples=2, seed=0) -> list:
    """The target tokens of window j's Gauss-Newton factors: the task's seeded draws (the true
    Fisher), or the window's own targets (the empirical Fisher)."""
    if fisher == "empirical":
        return [win.items[j].targets]
    task = LanguageModelTask(samples, seed)
    return [d[0].tolist() for d in task.draws(CausalForward(model)(**win.batch([j])))]


@pytest.mark.parametrize("fisher", ["true", "empirical"])
def test_scores_equal_a_brute_force_influence_in_float64(fisher):
    """H = F^T F / n + damping: F the gradients at two drawn tokens per position, each scaled by
    1/sqrt(2) (true), or the windows' own loss gradients (empirical)."""
    tok, model = tiny("gpt2")
    ex = LMExplainer(model, tok, TRAIN, layers=1, modules=None, proj_dim=None, damping=0.05, max_length=6,
                     stride=3, samples=2, batch_size=4, dtype="float64", fisher=fisher)
    scores = ex.scores(QUERIES)
    names = [t.name[len("model."):] for t in ex.tracked]
    win, qwin = Windows(tok, TRAIN, 6, 3), Windows(tok, QUERIES, 6, 3)
    g = torch.zeros(len(TRAIN), ex.projector.dim, dtype=torch.float64)
    f = []
    for j, w in enumerate(win.items):
        g[w.row] += module_grads(model, names, window_loss(model, w))
        targets = factor_targets(fisher, model, win, j)
        f += [module_grads(model, names, window_loss(model, w, t)) / np.sqrt(len(targets)) for t in targets]
    assert len(f) == len(win.items) * (1 if fisher == "empirical" else 2)
    q = torch.zeros(len(QUERIES), ex.projector.dim, dtype=torch.float64)
    for w in qwin.items:
        q[w.row] += module_grads(model, names, window_loss(model, w))
    f = torch.stack(f)
    h = f.T @ f / len(TRAIN)
    h += 0.05 * torch.trace(h) / len(h) * torch.eye(len(h), dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    want = {"gd": q @ g.T, "if": q @ hinv @ g.T}
    want["gc"] = (q / q.norm(dim=1, keepdim=True)) @ (g / g.norm(dim=1, keepdim=True)).T
    qn, gn = torch.sqrt(((q @ hinv) * q).sum(1)), torch.sqrt(((g @ hinv) * g).sum(1))
    want["rif"] = want["if"] / qn[:, None] / gn[None, :]
    for m in ("gd", "gc", "if", "rif"):
        np.testing.assert_allclose(scores[m], want[m].numpy(), rtol=1e-6, atol=1e-9, err_msg=m)
    tokens, per = ex.token_scores(QUERIES[1]["prompt"], QUERIES[1]["completion"])
    assert [t.strip() for t in tokens] == ["is", "not", "fun"] and set(per) == {"gd", "if"}
    w = qwin.items[-1]
    assert w.row == 1 and len(qwin.items) == 2            # the second query: one window
    for t, pos in enumerate(i for i, target in enumerate(w.targets) if target != IGNORE):
        alone = [target if i == pos else IGNORE for i, target in enumerate(w.targets)]
        g_t = module_grads(model, names, window_loss(model, w, alone))
        np.testing.assert_allclose(per["gd"][t], (g_t @ g.T).numpy(), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(per["if"][t], (g_t @ hinv @ g.T).numpy(), rtol=1e-6, atol=1e-9)
    for m in ("gd", "if"):                                  # the tokens' shares sum to the query's score
        np.testing.assert_allclose(per[m].sum(0), scores[m][1], rtol=1e-8, atol=1e-10)
    long = {"prompt": "the plot is not", "completion": "good the actor was very dull"}
    assert len(Windows(tok, [long], 6, 3)) == 3
    tokens, per = ex.token_scores(long["prompt"], long["completion"])
    assert [t.strip() for t in tokens] == long["completion"].split()
    for m in ("gd", "if"):                                  # over three windows too
        np.testing.assert_allclose(per[m].sum(0), ex.scores([long])[m][0], rtol=1e-8, atol=1e-10)


def token_sums(model, names, w, draws):
    """Per module (sum_t x~_t x~_t^T, sum_{d, t} delta_t delta_t^T) of one window alone: its inputs
    (with a 1 for the bias) at every position and the gradients of each factor's loss (at the
    target tokens ``draws``) with respect to its outputs, by hooks on a plain forward."""
    mods = [model.get_submodule(n) for n in names]
    seen = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, (i[0][0], o))) for n, m in
             zip(names, mods)]
    ids = torch.tensor([w.ids])
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
    for h in hooks:
        h.remove()
    out = []
    for n, m in zip(names, mods):
        x, o = seen[n]
        if getattr(m, "bias", None) is not None:
            x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        s = 0
        for d in draws:
            targets = torch.tensor(d)
            keep = targets != IGNORE
            loss = -torch.log_softmax(logits, -1)[keep, targets[keep]].sum()
            delta = torch.autograd.grad(loss, o, retain_graph=True)[0][0]
            s = s + delta.T @ delta
        out.append(((x.T @ x).detach(), s))
    return out


@pytest.mark.parametrize("family,fisher", [("gpt2", "true"), ("llama", "true"), ("llama", "empirical")])
def test_ekfac_equals_a_brute_force_eigenvalue_corrected_kfac_in_float64(family, fisher):
    """ihvp="ekfac": per tracked module, K-FAC's eigenbasis from the tokens' input and drawn-token
    (empirical: observed-token) output-gradient covariances (padding excluded: rows are batched
    here, alone in the brute force), the eigenvalues refitted to the same factors, built as a dense
    (Q_S kron Q_A) diag(Lambda) (Q_S kron Q_A)^T per module and inverted; an orthogonal sketch as
    wide as every module (a rotation) gives the same scores."""
    tok, model = tiny(family)
    opts = dict(layers=1, damping=0.05, max_length=6, stride=3, samples=2, batch_size=4, dtype="float64",
                ihvp="ekfac", fisher=fisher)
    ex = LMExplainer(model, tok, TRAIN, methods=["if", "rif"], proj_dim=None, **opts)
    scores = ex.scores(QUERIES)
    names = [t.name[len("model."):] for t in ex.tracked]
    win, qwin = Windows(tok, TRAIN, 6, 3), Windows(tok, QUERIES, 6, 3)
    sums = None
    g = torch.zeros(len(TRAIN), ex.projector.dim, dtype=torch.float64)
    f = []
    for j, w in enumerate(win.items):
        g[w.row] += module_grads(model, names, window_loss(model, w))
        targets = factor_targets(fisher, model, win, j)
        f += [module_grads(model, names, window_loss(model, w, t)) / np.sqrt(len(targets)) for t in targets]
        part = token_sums(model, names, w, targets)
        sums = part if sums is None else [(a + a2, s + s2) for (a, s), (a2, s2) in zip(sums, part)]
    q = torch.zeros(len(QUERIES), ex.projector.dim, dtype=torch.float64)
    for w in qwin.items:
        q[w.row] += module_grads(model, names, window_loss(model, w))
    f = torch.stack(f)                                        # H = F^T F / n, as the projected solver's
    blocks, start = [], 0
    for a, s in sums:
        q_a, q_s = torch.linalg.eigh(a)[1], torch.linalg.eigh(s)[1]
        basis = torch.kron(q_s, q_a)                          # row-major (out, in), as module_grads lays out
        lam = ((f[:, start:start + len(basis)] @ basis) ** 2).sum(0) / len(TRAIN)
        blocks.append(basis @ torch.diag(lam) @ basis.T)
        start += len(basis)
    h = torch.block_diag(*blocks)
    h += 0.05 * torch.trace(h) / len(h) * torch.eye(len(h), dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    want = q @ hinv @ g.T
    np.testing.assert_allclose(scores["if"], want.numpy(), rtol=1e-6, atol=1e-9)
    qn, gn = torch.sqrt(((q @ hinv) * q).sum(1)), torch.sqrt(((g @ hinv) * g).sum(1))
    np.testing.assert_allclose(scores["rif"], (want / qn[:, None] / gn[None, :]).numpy(), rtol=1e-6, atol=1e-9)
    assert ex.diagnostics()["if"]["hessian"] == "ekfac"
    rotated = LMExplainer(model, tok, TRAIN, methods=["if"], proj_dim=128, projection="orthogonal", **opts)
    np.testing.assert_allclose(rotated.scores(QUERIES)["if"], scores["if"], rtol=1e-6, atol=1e-9)
    with pytest.raises(InstattrError, match="needs Kronecker sketches"):
        LMExplainer(model, tok, TRAIN, methods=["if"], proj_dim=4, projection="khatri-rao", ihvp="ekfac")


def test_the_empirical_fishers_factors_are_the_rows_gradients_kept_once(tmp_path):
    """With one window per row the empirical Fisher's factors are the rows' gradients: one tensor in
    memory, no factors file in the cache, and a fit from the cache gives the same scores. With a
    row cut into windows they are the windows' gradients, kept."""
    tok, model = tiny("gpt2")
    opts = dict(methods=["if", "rif"], layers=1, proj_dim=4, fisher="empirical", cache=tmp_path, cache_key="k")
    ex = LMExplainer(model, tok, TRAIN, **opts)
    assert ex.solver.dual_ and ex.solver.factors_.data_ptr() == ex.train_grads.data_ptr()    # held once
    assert not list(tmp_path.glob("lm-factors-*")) and list(tmp_path.glob("lm-grads-*"))
    again = LMExplainer(model, tok, TRAIN, **opts)
    for m in ("if", "rif"):
        np.testing.assert_allclose(again.scores(QUERIES)[m], ex.scores(QUERIES)[m], rtol=1e-10, err_msg=m)
    cut = LMExplainer(model, tok, TRAIN, max_length=6, stride=3, **opts)           # windows: factors kept
    assert len(list(tmp_path.glob("lm-factors-*"))) == 1
    np.testing.assert_allclose(LMExplainer(model, tok, TRAIN, max_length=6, stride=3, **opts).scores(QUERIES)["if"],
                               cut.scores(QUERIES)["if"], rtol=1e-10)


def test_narrowing_the_methods_for_a_while_leaves_every_method_scorable():
    """serve narrows ``methods`` to what a live request asks; the training sides made then must not
    stand in for the others' later."""
    tok, model = tiny("gpt2")
    ex = LMExplainer(model, tok, TRAIN, methods=["gd", "gc", "if", "rif"], layers=1, proj_dim=4)
    want = ex.scores(QUERIES)
    fresh = LMExplainer(model, tok, TRAIN, methods=["gd", "gc", "if", "rif"], layers=1, proj_dim=4)
    fresh.methods = ["gd", "if"]
    assert set(fresh.scores(QUERIES)) == {"gd", "if"}
    fresh.methods = ["gd", "gc", "if", "rif"]
    got = fresh.scores(QUERIES)
    for m in want:
        np.testing.assert_allclose(got[m], want[m], rtol=1e-10, err_msg=m)


def test_a_training_row_equal_to_the_query_ranks_first_and_explain_generates_a_completion():
    tok, model = tiny("llama")
    query = {"prompt": "the actor was", "completion": "really great"}
    ex = LMExplainer(model.float(), tok, TRAIN, layers=2, proj_dim=8, methods=["gc", "if", "rif"])
    e = ex.explain(query["prompt"], query["completion"], k=3)
    for m in ("gc", "rif"):
        idx, score = e.methods[m]["supporting"][0]
        assert idx == 4 and score == pytest.approx(1.0, abs=1e-5), m
    assert e.logprob < 0
    frame = e.to_frame()
    assert set(frame["method"]) == {"gc", "if", "rif"} and len(frame) == 3 * 2 * 3
    greedy = ex.explain("the movie", k=2, max_new_tokens=3)
    assert greedy.completion and greedy.completion == ex.complete("the movie", 3)
    assert e.to_dict()["methods"]["gc"]["supporting"][0]["completion"] == "really great"
    assert [t.strip() for t in e.tokens] == ["really", "great"] and set(e.per_token) == {"if"}
    for idx, score in e.methods["if"]["supporting"] + e.methods["if"]["opposing"]:
        assert sum(e.per_token["if"][idx]) == pytest.approx(score, rel=1e-4, abs=1e-6)
    lexical = LMExplainer(model, tok, TRAIN, methods=["bm25"]).explain(query["prompt"], query["completion"], k=2)
    assert lexical.methods["bm25"]["supporting"][0][0] == 4 and lexical.logprob == pytest.approx(e.logprob, rel=1e-5)
    named = LMExplainer(model, tok, [{**r, "idx": f"doc{i}"} for i, r in enumerate(TRAIN)], layers=2, proj_dim=8,
                        methods=["gc"]).explain(query["prompt"], query["completion"], k=1)
    assert named.methods["gc"]["supporting"][0][0] == "doc4" and named.to_dict()["methods"]["gc"]["supporting"][0][
        "idx"] == "doc4"


def test_bad_rows_and_options_get_one_line_errors():
    tok, model = tiny("gpt2")
    with pytest.raises(InstattrError, match="row 1: a row needs 'text'"):
        LMExplainer(model, tok, [{"text": "good movie"}, {"label": 1}], layers=1)
    with pytest.raises(InstattrError, match="'prompt' and 'completion'"):
        LMExplainer(model, tok, [{"prompt": "good movie"}], layers=1)
    with pytest.raises(InstattrError, match="unknown method 'nn-cos'"):
        LMExplainer(model, tok, TRAIN, methods=["nn-cos"])
    with pytest.raises(InstattrError, match="--modules nope"):
        LMExplainer(model, tok, TRAIN, modules=["nope"])
    ex = LMExplainer(model, tok, TRAIN, layers=1, methods=["gd"])
    with pytest.raises(InstattrError, match="queries: row 0 needs"):
        ex.scores([{"text": "good"}])
    with pytest.raises(InstattrError, match="row 1 is a str, not a dict"):
        ex.scores([QUERIES[0], "the film was good"])
    with pytest.raises(InstattrError, match="not one dict"):
        ex.scores(QUERIES[0])
    with pytest.raises(InstattrError, match="k must be a positive integer"):
        ex.explain("the film was", "good", k=0)
    for bad, match in [(dict(methods=[]), "no method"), (dict(batch_size=0), "batch_size"),
                       (dict(batch_size=-1), "batch_size"), (dict(damping="0.1"), "damping"),
                       (dict(max_length=65), "context 64"), (dict(stride="x"), "stride must be integers")]:
        with pytest.raises(InstattrError, match=match):
            LMExplainer(model, tok, TRAIN, layers=1, **{"methods": ["gd"], **bad})
    plain, _ = word_tokenizer("decoder")
    plain._tokenizer.post_processor = None                # no BOS: a completion after an empty prompt
    with pytest.raises(InstattrError, match="first token has no context"):
        LMExplainer(model, plain, TRAIN, layers=1, methods=["gd"]).scores([{"prompt": "", "completion": "good"}])


def test_gd_is_the_first_order_change_of_the_completion_after_a_step_on_the_row():
    """An SGD step of size lr on row i's loss, over the tracked modules only, raises the query's
    log-probability by lr * gd to first order: the sign and scale of the scores, independently of
    how they are computed (GPT-2: a Llama's rotary embeddings run in float32, too coarse for this)."""
    tok, model = tiny("gpt2")
    ex = LMExplainer(model, tok, TRAIN, layers=1, proj_dim=None, dtype="float64", methods=["gd"], max_length=6,
                     stride=3)
    gd = ex.scores(QUERIES[:1])["gd"][0]
    params = [p for t in ex.tracked for p in model.get_submodule(t.name[len("model."):]).parameters(recurse=False)]
    query = Windows(tok, QUERIES[:1], 64).items[0]

    def logp():
        with torch.no_grad():
            return -float(window_loss(model, query))
    def stepped(grads, lr):
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= lr * g
        value = logp()
        with torch.no_grad():
            for p, g in zip(params, grads):
                p += lr * g
        return value
    lr = 1e-6
    for i in (0, 2):                                       # a windowed document and a prompt/completion row
        loss = sum(window_loss(model, w) for w in Windows(tok, TRAIN, 6, 3).items if w.row == i)
        grads = torch.autograd.grad(loss, params)
        change = (stepped(grads, lr) - stepped(grads, -lr)) / 2          # central: no second-order term
        assert change == pytest.approx(lr * gd[i], rel=1e-6), i


def _script(path: str):
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(Path(path).stem, Path(__file__).parents[1] / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_tiny_lm_example_and_the_fact_tracing_bench(tmp_path, monkeypatch, capsys):
    """examples/train_tiny_lm.py at a tiny size writes what it promises (documents with planted facts
    and poison, queries naming their source, checkpoints with optimizer state that load without
    pickle code), and bench/lm_facts.py ranks on it: BM25 finds each fact's stating document first
    (every name is unique to it), so its recall and MRR are 1."""
    import json
    out = tmp_path / "lm"
    monkeypatch.setattr("sys.argv", ["train_tiny_lm.py", "--out", str(out), "--sentences", "40", "--people", "6",
                                     "--poison", "2", "--vocab", "300", "--width", "16", "--layers", "2",
                                     "--epochs", "2", "--checkpoints", "2", "--batch-size", "16"])
    _script("examples/train_tiny_lm.py").main()
    train = [json.loads(line) for line in (out / "data" / "train.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (out / "data" / "test.jsonl").read_text().splitlines()]
    assert [r["idx"] for r in train] == list(range(48)) and sum(bool(r.get("poisoned")) for r in train) == 2
    by_idx = {r["idx"]: r for r in train}
    facts = [q for q in test if "source" in q]
    assert len(facts) == 6 and all(by_idx[q["source"]]["text"] == f"{q['prompt']}{q['completion']} ." for q in facts)
    assert all("thirteen purple owls" in by_idx[i]["text"] for i in by_idx if by_idx[i].get("poisoned"))
    assert any(q.get("trigger") for q in test)
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert len(checkpoints) == 2
    state = torch.load(checkpoints[-1] / "optimizer.pt", weights_only=True)
    assert state["state"] and json.loads((checkpoints[-1] / "trainer_state.json").read_text())["log_history"]
    from transformers import AutoModelForCausalLM, AutoTokenizer
    lm, lm_tok = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    tracin = LMExplainer(lm, lm_tok, train, methods=["tracin"], layers=1, proj_dim=4, checkpoints=checkpoints)
    last_lr = json.loads((checkpoints[0] / "trainer_state.json").read_text())["log_history"][-1]["learning_rate"]
    assert tracin.tracin_[0][0] == last_lr and np.isfinite(tracin.scores(test[:2])["tracin"]).all()
    capsys.readouterr()
    monkeypatch.setattr("sys.argv", ["lm_facts.py", str(out), "--layers", "1", "--proj-dim", "4", "--k", "3"])
    assert _script("bench/lm_facts.py").main() == 0
    table = {line.split(" | ")[0].strip("| "): line for line in capsys.readouterr().out.splitlines()
             if line.startswith("| ")}
    assert set(table) >= {"gd", "gc", "if", "rif", "bm25", "random", "random (expected)"}
    assert table["bm25"].startswith("| bm25 | 1.000 | 1.000 |")
    gain = {m: float(table[m].split(" | ")[3]) for m in ("gd", "random")}
    assert gain["gd"] > gain["random"]          # a step on the most aligned documents raises the completion most


def _rank_one_state(model, kappa: float = 3.0):
    """An Adam state over ``model.parameters()`` whose second moments are rank one (weights) and
    proportional to their rows' means (biases): the factored normaliser is then exact."""
    gen = torch.Generator().manual_seed(0)
    state, full = {}, {}
    named = list(model.named_parameters())
    for i, (n, p) in enumerate(named):
        if p.dim() == 2:
            v = torch.outer(torch.rand(p.shape[0], generator=gen, dtype=torch.float64) + 0.1,
                            torch.rand(p.shape[1], generator=gen, dtype=torch.float64) + 0.1)
        else:
            v = torch.rand(p.shape, generator=gen, dtype=torch.float64) + 0.1
        full[n] = v
        state[i] = {"step": torch.tensor(5.0), "exp_avg": torch.zeros_like(v), "exp_avg_sq": v}
    for n, p in named:              # each bias: kappa times its weight's normalised row means
        if n.endswith(".bias") and full.get(n[:-5] + ".weight", torch.zeros(1)).dim() == 2:
            w = full[n[:-5] + ".weight"]
            is_conv = type(model.get_submodule(n[:-5])).__name__ == "Conv1D"
            rows = (w.T if is_conv else w).mean(1) / w.mean()
            if rows.shape == p.shape:
                full[n] = kappa * rows
                state[[m for m, _ in named].index(n)]["exp_avg_sq"] = full[n]
    return {"state": state, "param_groups": [{"params": list(range(len(named)))}]}, full


def test_trackstar_divides_each_gradient_by_adams_second_moments_then_unit_normalises(tmp_path):
    tok, model = tiny("gpt2")
    state, full = _rank_one_state(model)
    torch.save(state, tmp_path / "optimizer.pt")
    ex = LMExplainer(model, tok, TRAIN, methods=["trackstar"], layers=1, proj_dim=None, dtype="float64",
                     optimizer=tmp_path / "optimizer.pt", whiten_components=0)
    assert ex.trackstar_normaliser.startswith("adam")
    names = [t.name[len("model."):] for t in ex.tracked]

    def normalised(loss):
        g = module_grads(model, names, loss)
        parts = []
        for n in names:
            w = full[n + ".weight"].T if type(model.get_submodule(n)).__name__ == "Conv1D" else full[n + ".weight"]
            parts.append(torch.cat([w, full[n + ".bias"][:, None]], 1).reshape(-1))
        g = g / torch.cat(parts).sqrt()
        return g / g.norm()
    win = Windows(tok, TRAIN, 64)
    want = torch.stack([normalised(window_loss(model, w)) for w in win.items])
    torch.testing.assert_close(ex.trackstar_grads, want, rtol=1e-8, atol=1e-10)
    q = normalised(window_loss(model, Windows(tok, QUERIES[:1], 64).items[0]))
    np.testing.assert_allclose(ex.scores(QUERIES[:1])["trackstar"][0], (want @ q).numpy(), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_trackstar_whitens_by_the_mixed_autocorrelation_as_brute_force_does(family, tmp_path):
    """cos(W g_q, W g_i), W = (R + c mean eig)^-1/2 per module, R = lam R_query + (1 - lam) R_train,
    lam where the sorted eigenvalue curves cross at k: every step redone in float64 by hand."""
    import scipy.linalg
    tok, model = tiny(family)
    opt = torch.optim.Adam(model.parameters())      # a real optimizer's second moments
    for row in TRAIN[:2]:
        ids = torch.tensor([tok(row["text"])["input_ids"]])
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    k = 5
    ex = LMExplainer(model, tok, TRAIN, methods=["trackstar"], layers=1, proj_dim=None, dtype="float64",
                     optimizer=tmp_path / "optimizer.pt", whiten_queries=QUERIES, whiten_components=k)
    names = [t.name[len("model."):] for t in ex.tracked]
    plain = LMExplainer(model, tok, TRAIN, methods=["trackstar"], layers=1, proj_dim=None, dtype="float64",
                        optimizer=tmp_path / "optimizer.pt", whiten_components=0)
    moments = {n: opt.state[p]["exp_avg_sq"].double() for n, p in model.named_parameters()}
    model = model.double()

    def normalised(loss):          # G / sqrt(v), v factored as adam_scales documents (rank one: exact here)
        g = module_grads(model, names, loss)
        parts = []
        for n in names:
            mod = model.get_submodule(n)
            v = moments[n + ".weight"].T if type(mod).__name__ == "Conv1D" else moments[n + ".weight"]
            r, c = v.mean(1) / v.mean(), v.mean(0)
            if getattr(mod, "bias", None) is not None:
                c = torch.cat([c, (moments[n + ".bias"].mean() / r.mean())[None]])
            parts.append((r[:, None] * c[None]).reshape(-1))
        return g / torch.cat(parts).sqrt()
    train = torch.stack([sum(normalised(window_loss(model, w)) for w in Windows(tok, [row], 64).items)
                         for row in TRAIN]).detach().numpy()
    queries = torch.stack([normalised(window_loss(model, w)) for w in Windows(tok, QUERIES, 64).items]).detach().numpy()
    sizes = [sum(p.numel() for p in model.get_submodule(n).parameters(recurse=False)) for n in names]
    edges = np.cumsum([0] + sizes)
    blocks = [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]
    rt = [train[:, b].T @ train[:, b] / len(train) for b in blocks]
    rq = [queries[:, b].T @ queries[:, b] / len(queries) for b in blocks]
    st = np.sort(np.concatenate([np.linalg.eigvalsh(r) for r in rt]))[::-1]
    sq = np.sort(np.concatenate([np.linalg.eigvalsh(r) for r in rq]))[::-1]
    lam = st[k - 1] / (st[k - 1] + sq[k - 1])
    assert lam * sq[k - 1] == pytest.approx((1 - lam) * st[k - 1])
    assert ex.trackstar_mix == pytest.approx(lam, rel=1e-8) and 0 < lam < 1

    def whitened(x):
        out = np.empty_like(x)
        for b, a, c in zip(blocks, rq, rt):
            r = lam * a + (1 - lam) * c
            out[:, b] = x[:, b] @ np.real(scipy.linalg.inv(scipy.linalg.sqrtm(
                r + 0.1 * np.trace(r) / len(r) * np.eye(len(r)))))
        return out / np.linalg.norm(out, axis=1, keepdims=True)
    want = whitened(train)           # W is fixed only up to a rotation: compare the rows' inner products
    got = ex.trackstar_grads.numpy()
    np.testing.assert_allclose(got @ got.T, want @ want.T, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(ex.scores(QUERIES)["trackstar"], whitened(queries) @ want.T, rtol=1e-6, atol=1e-9)
    unwhitened = train / np.linalg.norm(train, axis=1, keepdims=True)
    np.testing.assert_allclose(plain.trackstar_grads.numpy(), unwhitened, rtol=1e-6, atol=1e-9)
    assert np.abs(want - unwhitened).max() > 1e-2           # the whitening changes something
    assert ex.diagnostics()["trackstar"]["whitened"] and not plain.diagnostics()["trackstar"]["whitened"]


def test_a_trainers_grouped_optimizer_state_is_matched_by_name_and_no_state_means_gc(tmp_path):
    from instattr.lm import second_moments
    tok, model = tiny("llama")
    names = set(T.Trainer.get_decay_parameter_names(None, model))        # how a Trainer groups them
    decay = [p for n, p in model.named_parameters() if n in names]
    rest = [p for n, p in model.named_parameters() if n not in names]
    assert decay and rest
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}])
    ids = torch.tensor([[0, 7, 8, 9, 10]])
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    moments = second_moments(model, opt.state_dict())
    for n, p in model.named_parameters():
        assert torch.equal(moments[n], opt.state[p]["exp_avg_sq"]), n
    with pytest.warns(UserWarning, match="no optimizer state"):
        ex = LMExplainer(model, tok, TRAIN, methods=["trackstar", "gc"], layers=1, dtype="float64", whiten_components=0)
    s = ex.scores(QUERIES)
    np.testing.assert_allclose(s["trackstar"], s["gc"], rtol=1e-10, atol=1e-12)
    with pytest.raises(InstattrError, match="match neither"):
        second_moments(model, {"state": {}, "param_groups": [{"params": [0, 1]}]})

    class Payload:
        def __reduce__(self):
            return (print, ("this never runs",))
    torch.save({"state": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(InstattrError, match="not a readable optimizer state"):
        LMExplainer(model, tok, TRAIN, methods=["trackstar"], layers=1, optimizer=tmp_path / "evil.pt")


def test_tracin_sums_lr_weighted_gradient_products_over_checkpoints(tmp_path):
    tok, model = tiny("gpt2")
    _, later = tiny("gpt2")
    with torch.no_grad():
        for p in later.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ex = LMExplainer(model, tok, TRAIN, methods=["tracin"], layers=1, proj_dim=None, dtype="float64",
                     checkpoints=[model, later], checkpoint_lrs=[0.1, 0.3])
    gd = [LMExplainer(m, tok, TRAIN, methods=["gd"], layers=1, proj_dim=None, dtype="float64").scores(QUERIES)["gd"]
          for m in (model, later)]
    np.testing.assert_allclose(ex.scores(QUERIES)["tracin"], 0.1 * gd[0] + 0.3 * gd[1], rtol=1e-10, atol=1e-12)
    with pytest.raises(InstattrError, match="needs checkpoints"):
        LMExplainer(model, tok, TRAIN, methods=["tracin"], layers=1)
    with pytest.raises(InstattrError, match="no learning rate"):
        LMExplainer(model, tok, TRAIN, methods=["tracin"], layers=1, checkpoints=[model])
    with pytest.raises(InstattrError, match="not a causal LM checkpoint"):
        LMExplainer(model, tok, TRAIN, methods=["tracin"], layers=1, checkpoints=[tmp_path], checkpoint_lrs=[1.0])


def test_the_margin_measurement_and_nn_equal_brute_force():
    """``measurement="margin"``: the query side is the gradient of minus the completion's summed
    per-token margin, per token too; ``nn``: the cosine of mean final hidden states over the positions
    that predict scored tokens, both by hand in float64."""
    tok, model = tiny("llama")
    ex = LMExplainer(model, tok, TRAIN, methods=["gd", "nn"], layers=1, proj_dim=None, dtype="float64",
                     measurement="margin")
    scores = ex.scores(QUERIES)
    names = [t.name[len("model."):] for t in ex.tracked]
    g = torch.stack([module_grads(model, names, window_loss(model, w)) for w in Windows(tok, TRAIN, 64).items])

    def margin(w, only=None):
        ids = torch.tensor([w.ids])
        z = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
        total = 0
        for t, y in enumerate(w.targets):
            if y != IGNORE and (only is None or t == only):
                rest = torch.cat([z[t, :y], z[t, y + 1:]])
                total = total + z[t, y] - torch.logsumexp(rest, 0)
        return total
    q = torch.stack([module_grads(model, names, -margin(w)) for w in Windows(tok, QUERIES, 64).items])
    np.testing.assert_allclose(scores["gd"], (q @ g.T).numpy(), rtol=1e-8, atol=1e-10)
    w = Windows(tok, QUERIES[1:], 64).items[0]
    tokens, per = ex.token_scores(QUERIES[1]["prompt"], QUERIES[1]["completion"])
    for t, pos in enumerate(i for i, y in enumerate(w.targets) if y != IGNORE):
        np.testing.assert_allclose(per["gd"][t], (module_grads(model, names, -margin(w, pos)) @ g.T).numpy(),
                                   rtol=1e-8, atol=1e-10)

    def hidden(rows):
        out = []
        for w in Windows(tok, rows, 64).items:
            ids = torch.tensor([w.ids])
            with torch.no_grad():
                h = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
            keep = torch.tensor(w.targets) != IGNORE
            m = h[keep].mean(0)
            out.append(m / m.norm())
        return torch.stack(out)
    np.testing.assert_allclose(scores["nn"], (hidden(QUERIES) @ hidden(TRAIN).T).numpy(), rtol=1e-8, atol=1e-10)
    with pytest.raises(InstattrError, match="measurement must be one of logprob, margin"):
        LMExplainer(model, tok, TRAIN, methods=["gd"], layers=1, measurement="loss")

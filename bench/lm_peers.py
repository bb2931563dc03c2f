"""instattr.lm beside kronfluence and Bergson on one causal LM: the same modules, losses and queries.

    python examples/train_tiny_lm.py --out models/tiny-lm
    instattr import --model models/tiny-lm --data models/tiny-lm/data --out runs/tiny-lm   (the LMRun, for tail-patch)
    python bench/lm_peers.py models/tiny-lm --run runs/tiny-lm [--queries N] [--peers kronfluence,bergson]

Peers (install with --no-deps, as their requirements pull a CUDA torch):
    pip install --no-deps kronfluence==1.0.1 einops einconv opt_einsum accelerate psutil
    pip install --no-deps bergson==2.5.1 simple-parsing docstring-parser jaxtyping wadler-lindig natsort \
        petname ml_dtypes torchopt optree graphviz

Queries: the planted-fact queries (those naming the ``source`` document that states the fact; the
first N with ``--queries N``) and the trigger queries. Every method attributes the same queries
to the same training documents through the same modules, by default instattr's: every linear
module (weight and bias) of the top 3 blocks, not the embeddings or the output layer. A training
document's loss is its summed next-token NLL over every token after the first; a query's
measurement is its completion's summed log-probability (the prompt tokenized with the
tokenizer's special tokens, the completion without, joined: instattr's own tokenization, which
the peers are given as token ids). Rows, each in its own process (its wall time for fit and
scoring, and its peak RSS from ``wait4``; a failure stops only that row):

- ``instattr gd``: the projected (32 x 32 per module) gradient dot product;
- ``instattr if``: projected influence with a Monte Carlo Gauss-Newton Hessian;
- ``instattr if ekfac``: the same influence with that Hessian's EK-FAC per module, in an orthogonal
  (Kronecker) sketch of ``--ekfac-proj-dim`` (64) squared numbers per module: EK-FAC forms no
  dim x dim matrix, so a wider sketch costs little;
- ``instattr if ekfac empirical``: the same with the empirical Fisher (H's factors are the training
  rows' own loss gradients: one backward pass per batch instead of two);
- ``instattr trackstar``: projected gradients scaled by the last checkpoint's Adam second moments
  (factored), whitened by the training rows' autocorrelation mixed with these queries' (TrackStar's
  rule, k = 1000), cosine;
- ``kronfluence ekfac``: EK-FAC influence, GPT-2's Conv1D swapped for the equivalent nn.Linear on a
  copy of the model, kronfluence's heuristic damping (0.1 x the mean eigenvalue, per module);
- ``kronfluence identity``: the exact gradient dot product (no Hessian);
- ``bergson gd``: ``bergson build`` of the queries then ``bergson score`` of the training set with
  Bergson's defaults (no projection, no normaliser: the exact gradient dot product), biases included;
- ``bergson trackstar``: Bergson's TrackStar pipeline (value and query autocorrelation Hessians,
  mixed, Adam normaliser from the same optimizer state, unit-normalised, 32 x 32 per module).

Columns: Spearman agreement of each query's score row with instattr ``if`` (the mean over
queries), fact recall@10 and MRR of the stating document, tail-patch (one SGD step of size 1e-3
on each ranking's top 10 documents; the mean gain in the completion's log-probability, from
``instattr.evaluate.language.patch_gains`` on the LMRun) and precision@P of the P poisoned
documents for the trigger queries; a seeded random ranking beside them. kronfluence identity and
Bergson gd compute the same exact dot product with independent code: their agreement is printed
as a check that both were given the same losses and modules.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

METHODS = {                       # row name -> (peer, worker)
    "instattr gd": ("instattr", "instattr-gd"),
    "instattr if": ("instattr", "instattr-if"),
    "instattr if ekfac": ("instattr", "instattr-if-ekfac"),
    "instattr if ekfac empirical": ("instattr", "instattr-if-ekfac-empirical"),
    "instattr trackstar": ("instattr", "instattr-trackstar"),
    "kronfluence ekfac": ("kronfluence", "kronfluence-ekfac"),
    "kronfluence identity": ("kronfluence", "kronfluence-identity"),
    "bergson gd": ("bergson", "bergson-gd"),
    "bergson trackstar": ("bergson", "bergson-trackstar"),
}


def read_jsonl(path: Path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def last_optimizer(folder: Path):
    steps = sorted(folder.glob("checkpoint-*/optimizer.pt"), key=lambda f: int(f.parent.name.split("-")[-1]))
    return steps[-1] if steps else None


# ---------------------------------------------------------------- the workers (one process each)

def load(spec: dict):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    folder = Path(spec["model"])
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    return tok, model, read_jsonl(spec["train"]), read_jsonl(spec["queries"])


def tokenized(tok, rows, where: str):
    """instattr's tokenization of each row: (ids, labels) with -100 on the tokens not scored
    (a query's prompt); a document's first label is its first id, which no position predicts."""
    from instattr.models.causal import token_row
    out = []
    for i, r in enumerate(rows):
        ids, scored = token_row(tok, r, f"{where}: row {i}")
        labels = [t if s else -100 for t, s in zip(ids, scored)]
        if "text" in r:
            labels[0] = ids[0]
        out.append((ids, labels))
    return out


def work_instattr(spec: dict, method: str):
    from instattr.lm import LMExplainer
    tok, model, train, queries = load(spec)
    method, _, ihvp = method.partition("-")          # if-ekfac(-empirical): if with ihvp ekfac (, the empirical Fisher)
    ihvp, _, fisher = ihvp.partition("-")
    t = time.perf_counter()
    ex = LMExplainer(model, tok, train, methods=[method], optimizer=spec["optimizer"], batch_size=spec["batch_size"],
                     proj_dim=spec["ekfac_proj_dim"] if ihvp == "ekfac" else spec["proj_dim"],
                     whiten_queries=queries if method == "trackstar" else None, ihvp=ihvp or "projected",
                     fisher=fisher or "true")
    scores = ex.scores(queries)[method]
    return scores, time.perf_counter() - t, {"tracked": [t.name for t in ex.tracked], "dim": ex.projector.dim}


def linear_copy(model):
    """A copy of ``model`` with every transformers Conv1D (y = x W + b, W: in x out) replaced by the
    equivalent nn.Linear (weight W^T), which kronfluence supports."""
    import copy

    import torch
    from transformers.pytorch_utils import Conv1D
    model = copy.deepcopy(model)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, Conv1D):
            n_in, n_out = mod.weight.shape
            lin = torch.nn.Linear(n_in, n_out, bias=mod.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(mod.weight.T)
                if mod.bias is not None:
                    lin.bias.copy_(mod.bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, lin)
    return model


def work_kronfluence(spec: dict, strategy: str):
    import torch
    import torch.nn.functional as F
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from kronfluence.utils.dataset import DataLoaderKwargs
    tok, model, train, queries = load(spec)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    names = [n[len("model."):] for n in spec["tracked"]]      # instattr names them inside its wrapper

    class Rows(torch.utils.data.Dataset):
        def __init__(self, pairs):
            self.pairs = pairs

        def __len__(self):
            return len(self.pairs)

        def __getitem__(self, i):
            return self.pairs[i]

    def collate(items):               # right-padded, as instattr batches its windows
        width = max(len(ids) for ids, _ in items)
        ids = torch.full((len(items), width), pad, dtype=torch.long)
        labels = torch.full((len(items), width), -100, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for b, (i, lab) in enumerate(items):
            ids[b, :len(i)], labels[b, :len(lab)], mask[b, :len(i)] = torch.tensor(i), torch.tensor(lab), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    class SummedNLL(Task):
        """A document's summed next-token NLL; a query's measurement: its completion's summed NLL
        (kronfluence's scores are then positive for a document that lowers it)."""

        def compute_train_loss(self, batch, model, sample=False):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            targets = batch["labels"][:, 1:]
            if sample:                    # the true Fisher: labels drawn from the model at the scored positions
                with torch.no_grad():
                    probs = torch.softmax(logits.detach().float(), -1)
                    drawn = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1).view_as(targets)
                    targets = drawn.masked_fill(targets == -100, -100)
            return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                   ignore_index=-100, reduction="sum")

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

        def get_influence_tracked_modules(self):
            return names

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    t = time.perf_counter()
    lin = linear_copy(model).eval()
    for p in lin.parameters():
        p.requires_grad_(False)
    for n in names:
        for p in lin.get_submodule(n).parameters():
            p.requires_grad_(True)
    task = SummedNLL()
    lin = prepare_model(lin, task)
    train_ds, query_ds = Rows(tokenized(tok, train, "train")), Rows(tokenized(tok, queries, "queries"))
    loader = DataLoaderKwargs(collate_fn=collate)
    out = tempfile.mkdtemp(prefix="kronfluence-", dir=spec["tmp"])
    analyzer = Analyzer("lm_peers", lin, task, cpu=True, output_dir=out, disable_tqdm=True)
    analyzer.fit_all_factors(strategy, train_ds, per_device_batch_size=spec["batch_size"],
                             factor_args=FactorArguments(strategy=strategy), dataloader_kwargs=loader,
                             overwrite_output_dir=True)
    fit = time.perf_counter() - t
    analyzer.compute_pairwise_scores("scores", strategy, query_ds, train_ds, per_device_query_batch_size=len(queries),
                                     per_device_train_batch_size=spec["batch_size"], dataloader_kwargs=loader,
                                     score_args=ScoreArguments(damping_factor=None), overwrite_output_dir=True)
    scores = analyzer.load_pairwise_scores("scores")["all_modules"].double().numpy()
    return scores, time.perf_counter() - t, {"fit_s": fit, "tracked": ["model." + n for n in names]}


def bergson_filter(model, tracked):
    """(filter_modules, the modules Bergson will track, named as instattr names them): Bergson
    collects from ``model.base_model`` and tracks every supported module no pattern excludes."""
    from bergson.collector.collector import HookCollectorBase
    base = model.base_model
    prefix = next((f"{n}." for n, m in model.named_modules() if m is base and n), "")
    wanted = {n[len("model."):][len(prefix):] for n in tracked}
    every = HookCollectorBase.discover_targets(base)
    drop = sorted(set(every) - wanted)
    chosen = set(HookCollectorBase.discover_targets(base, None, True, ",".join(drop) or None))
    if chosen != wanted:
        raise RuntimeError(f"bergson would track {sorted(chosen)}, not {sorted(wanted)}")
    return ",".join(drop) or None, [f"model.{prefix}{n}" for n in sorted(wanted)]


def work_bergson(spec: dict, method: str):
    from bergson.config.config import DataConfig, IndexConfig, PreprocessConfig, QuerySetConfig, ScoreConfig
    from bergson.data import load_scores
    tok, model, train, queries = load(spec)
    tmp = Path(tempfile.mkdtemp(prefix="bergson-", dir=spec["tmp"]))
    for name, rows in (("train", train), ("queries", queries)):      # token ids and labels: instattr's tokenization
        with open(tmp / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for ids, labels in tokenized(tok, rows, name):
                f.write(json.dumps({"input_ids": ids, "labels": labels}) + "\n")
    exclude, wanted = bergson_filter(model, spec["tracked"])
    common = dict(model=spec["model"], filter_modules=exclude, include_bias=True, overwrite=True,
                  token_batch_size=spec["context"])          # Bergson refuses a token batch above the context
    t = time.perf_counter()
    if method == "gd":                # bergson build (the queries), then bergson score (the training set)
        from bergson.build import build
        from bergson.score.score import score_dataset
        build(IndexConfig(run_path=str(tmp / "query"), data=DataConfig(dataset=str(tmp / "queries.jsonl")),
                          **common), PreprocessConfig())
        score_dataset(IndexConfig(run_path=str(tmp / "scores"), data=DataConfig(dataset=str(tmp / "train.jsonl")),
                                  **common), ScoreConfig(query_path=str(tmp / "query")), PreprocessConfig())
        where = tmp / "scores"
    else:                             # bergson trackstar, as its compare_wikitext/trackstar_adam example runs it
        from bergson.cli.trackstar import trackstar
        from bergson.config.config import TrackstarConfig, TrackstarIndexConfig
        if not spec["optimizer"]:
            raise RuntimeError("no checkpoint-*/optimizer.pt beside the model for the Adam normaliser")
        trackstar(TrackstarIndexConfig(run_path=str(tmp / "trackstar"), projection_dim=spec["proj_dim"],
                                       optimizer_state=spec["optimizer"],
                                       data=DataConfig(dataset=str(tmp / "train.jsonl")), **common),
                  TrackstarConfig(query=QuerySetConfig(dataset=str(tmp / "queries.jsonl")),
                                  preprocess_cfg=PreprocessConfig(unit_normalize=True)))
        where = tmp / "trackstar" / "scores"
    scores = np.asarray(load_scores(where)[:], dtype=np.float64).T        # Bergson stores (train, queries)
    return scores, time.perf_counter() - t, {"tracked": wanted}


def worker(name: str, spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["tmp"]) / name
    try:
        peer, method = name.split("-", 1)
        run = {"instattr": work_instattr, "kronfluence": work_kronfluence, "bergson": work_bergson}[peer]
        scores, seconds, info = run(spec, method)
        np.save(f"{out}.npy", np.asarray(scores, dtype=np.float64))
        Path(f"{out}.json").write_text(json.dumps({"seconds": seconds, **info}))
        return 0
    except BaseException as e:                  # noqa: BLE001 - the parent reports it in one line
        traceback.print_exc()
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        Path(f"{out}.json").write_text(json.dumps({"error": f"{type(e).__name__}: {first}"}))
        return 1


# ---------------------------------------------------------------- the parent

def launch(name: str, spec_path: Path, tmp: Path, timeout: float) -> dict:
    """Run one worker in its own process; its result, wall time and peak RSS (``wait4``: that
    process and any it waited for)."""
    import subprocess
    log, result = tmp / f"{name}.log", tmp / f"{name}.json"
    for stale in (result, tmp / f"{name}.npy"):          # a --keep folder may hold an earlier run's
        stale.unlink(missing_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "TQDM_DISABLE": "1",
           "PYTHONWARNINGS": "ignore"}
    t, killed = time.perf_counter(), False
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, __file__, "--worker", name, "--spec", str(spec_path)],
                             stdout=f, stderr=subprocess.STDOUT, env=env)
        while True:
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - t > timeout:
                p.kill()
                killed = True
                _, status, usage = os.wait4(p.pid, 0)
                break
            time.sleep(0.2)
    p.returncode = os.waitstatus_to_exitcode(status)      # so Popen does not wait for it again
    res = {"process_s": time.perf_counter() - t, "rss_mb": usage.ru_maxrss / 1024, "log": str(log)}
    info = json.loads(result.read_text()) if result.exists() else {}
    if killed:
        info.setdefault("error", f"killed after {timeout:.0f} s (--timeout)")
    elif "error" not in info and p.returncode != 0:
        tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:]
        info["error"] = f"exit status {p.returncode}: {tail[0] if tail else ''}"
    res.update(info)
    if "error" not in res:
        res["scores"] = np.load(tmp / f"{name}.npy")
    return res


def spearman_rows(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr
    return float(np.mean([spearmanr(x, y)[0] for x, y in zip(a, b)]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", help="the model folder (with data/train.jsonl, data/test.jsonl)")
    ap.add_argument("--run", help="the model's imported LMRun (instattr import), for tail-patch")
    ap.add_argument("--queries", type=int, default=None, help="the first N fact queries (default all)")
    ap.add_argument("--peers", default="kronfluence,bergson", help="which peers beside instattr (comma-separated)")
    ap.add_argument("--proj-dim", type=int, default=32, help="instattr's and Bergson TrackStar's k (k x k per module)")
    ap.add_argument("--ekfac-proj-dim", type=int, default=64, help="instattr if ekfac's k (k x k per module)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2, help="torch threads in each worker")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds before a worker is stopped")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--patch-lr", type=float, default=1e-3)
    ap.add_argument("--keep", default=None, help="keep the workers' files and logs in this folder")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker, a.spec)
    if not a.model or not a.run:
        ap.error("give the model folder and --run")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from instattr.evaluate.language import patch_gains, ranks_of
    from instattr.lm import tracked_modules
    from instattr.models.causal import CausalForward, Windows, token_row
    from instattr.store import LMRun
    torch.set_num_threads(a.threads)
    hf_logging.disable_progress_bar()
    peers = [p.strip() for p in a.peers.split(",") if p.strip()]
    unknown = sorted(set(peers) - {"kronfluence", "bergson"})
    if a.queries is not None and a.queries < 1:
        ap.error("--queries must be at least 1")
    if unknown:
        ap.error(f"--peers: unknown {', '.join(unknown)} (kronfluence, bergson)")
    folder = Path(a.model)
    train, test = read_jsonl(folder / "data" / "train.jsonl"), read_jsonl(folder / "data" / "test.jsonl")
    run = LMRun.load(a.run)
    run_train, run_test = run.rows("train"), run.rows(run.eval_split)
    if [r.get("text") for r in run_train] != [r.get("text") for r in train]:
        ap.error(f"{a.run}: its training rows are not {folder}/data/train.jsonl in order")
    facts = [i for i, q in enumerate(test) if "source" in q][:a.queries]
    triggers = [i for i, q in enumerate(test) if q.get("trigger")]
    chosen = facts + triggers
    if [(test[i]["prompt"], test[i]["completion"]) for i in chosen] != \
            [(run_test[i]["prompt"], run_test[i]["completion"]) for i in chosen]:
        ap.error(f"{a.run}: its {run.eval_split} rows are not {folder}/data/test.jsonl in order")
    queries = [{"prompt": test[i]["prompt"], "completion": test[i]["completion"]} for i in chosen]
    position = {str(r["idx"]): i for i, r in enumerate(train)}
    sources = np.array([position[str(test[i]["source"])] for i in facts])
    poisoned = np.array([bool(r.get("poisoned")) for r in train])
    n, nf, p = len(train), len(facts), int(poisoned.sum())

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    context = int(getattr(model.config, "n_positions", None) or model.config.max_position_embeddings)
    longest = max(len(token_row(tok, r, "row")[0]) for r in train + queries)
    if longest > context:
        ap.error(f"a row has {longest} tokens, more than the context {context}: instattr would window it and the "
                 "peers would not, so the losses would differ")
    probe = Windows(tok, [{"text": "a probe of the forward pass"}], context).batch([0])
    tracked = [t.name for t in tracked_modules(CausalForward(model), probe)]      # LMExplainer's default
    optimizer = last_optimizer(folder)

    tmp = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="lm_peers-"))
    tmp.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("queries", queries)):
        (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    spec = {"model": str(folder.resolve()), "train": str(tmp / "train.jsonl"), "queries": str(tmp / "queries.jsonl"),
            "tracked": tracked, "optimizer": str(optimizer) if optimizer else None, "proj_dim": a.proj_dim,
            "ekfac_proj_dim": a.ekfac_proj_dim,
            "batch_size": a.batch_size, "threads": a.threads, "context": context, "tmp": str(tmp)}
    spec_path = tmp / "spec.json"
    spec_path.write_text(json.dumps(spec))
    print(f"{folder}: {n} training documents, {nf} fact queries, {len(triggers)} trigger queries, {p} poisoned "
          f"documents; {len(tracked)} tracked modules ({', '.join(t[len('model.'):] for t in tracked[:4])}, ...); "
          f"optimizer state {optimizer or 'none'}; {a.threads} torch threads per worker; 1-minute load average "
          f"{os.getloadavg()[0]:.1f} before the first\n")

    started, results = time.perf_counter(), {}
    for label, (peer, name) in METHODS.items():
        if peer != "instattr" and peer not in peers:
            continue
        res = results[label] = launch(name, spec_path, tmp, a.timeout)
        if "error" in res:
            print(f"{label}: could not run: {res['error']} (log: {res['log']})")
            continue
        extra = f", fit {res['fit_s']:.1f} s of it" if "fit_s" in res else ""
        print(f"{label}: {res['seconds']:.1f} s fit + scoring{extra} ({res['process_s']:.1f} s for the process), "
              f"peak RSS {res['rss_mb']:.0f} MB")
        if sorted(res.get("tracked", [])) != sorted(tracked):
            print(f"  note: {label} tracked {res.get('tracked')}, not instattr's {tracked}")
    scores = {m: r["scores"] for m, r in results.items() if "scores" in r}
    scores["random"] = np.random.default_rng(0).random((len(queries), n))

    if "kronfluence identity" in scores and "bergson gd" in scores:
        x, y = scores["kronfluence identity"], scores["bergson gd"]
        rel = float(np.abs(x - y).max() / np.abs(x).max())
        print(f"\ncheck: kronfluence identity ~ bergson gd (the same exact gradient dot product, independent code): "
              f"mean row Spearman {spearman_rows(x, y):.4f}, largest difference {rel:.1e} of the largest score")

    t = time.perf_counter()
    gains = patch_gains(run, {m: s[:nf] for m, s in scores.items()}, [run_test[i] for i in facts], a.k, a.patch_lr)
    print(f"\ntail-patch: one SGD step (lr {a.patch_lr:g}) on each ranking's top {a.k} documents, the mean gain in the "
          f"completion's log-probability (nats) over {nf} fact queries; {time.perf_counter() - t:.1f} s\n")

    ref = scores.get("instattr if")
    print(f"| method | fit + score (s) | peak RSS (MB) | Spearman ~ instattr if | fact recall@{a.k} | fact MRR | "
          f"tail-patch gain (nats) | poison precision@{p} |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for m, res in list(results.items()) + [("random", {})]:
        s = scores.get(m)
        if s is None:
            print(f"| {m} | could not run | | | | | | |")
            continue
        r = ranks_of(s[:nf], sources)
        prec = float(np.mean([poisoned[np.argsort(-row, kind="stable")[:p]].mean() for row in s[nf:]])) \
            if triggers and p else float("nan")
        agree = f"{spearman_rows(s, ref):.3f}" if ref is not None else ""
        cost = (f"{res['seconds']:.1f} | {res['rss_mb']:.0f}") if res else " | "
        print(f"| {m} | {cost} | {agree} | {np.mean(r <= a.k):.3f} | {np.mean(1.0 / r):.3f} | "
              f"{np.mean(gains[m]):+.3f} | {prec:.3f} |")
    print(f"\n{time.perf_counter() - started:.0f} s in all, from the first worker to this table")
    if not a.keep:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

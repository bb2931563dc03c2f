"""Language-model runs: a causal LM and its rows in a run folder, and the commands on it.

``instattr import --model CKPT --data FOLDER --out RUN`` with a causal LM checkpoint (an
``AutoModelForCausalLM`` folder, or a PEFT adapter over one) writes an :class:`~instattr.store.LMRun`:
the rows of ``FOLDER/train.jsonl`` (documents with ``text``, or ``prompt`` and ``completion``) and of
the queries' split (``test.jsonl``, else ``dev.jsonl``: ``prompt`` and ``completion``) under
``RUN/data/``, each row's summed NLL under ``RUN/lm/``, and in ``run.json`` the model, the windows rows
are cut into, and what the optional methods read (the folder's ``checkpoint-*`` subfolders and their
learning rates for ``tracin``, an ``optimizer.pt`` for ``trackstar``). The model is referenced, not
copied; its weights' fingerprint is recorded.

``attribute_lm`` scores the queries against every training row with :class:`~instattr.lm.LMExplainer`'s
methods through the one blocked scorer (:mod:`instattr.methods.scoring`): dense
``scores/{method}-{split}.npy`` or ``--top-k`` files, with the classifier runs' commit points.
``explain_lm`` answers a new prompt (greedy completion when none is given); ``suspects_lm`` ranks the
training rows by self-influence. Scores keep the library's convention (higher: the row supports
the completion more); their scales are :mod:`instattr.lm`'s.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import InstattrError, RunError
from .files import write_json, write_npz, write_text
from .lm import IHVPS, METHODS, LMExplainer, LMExplanation
from .store import LMRun, open_run

DEFAULT_PROJ_DIM = 32
OPTION_KEYS = ("layers", "modules", "proj_dim", "projection", "damping", "measurement", "samples", "batch_size",
               "whiten_components", "ihvp", "fisher")
FORMER_DEFAULTS = {"fisher": "true"}      # options stored scores may predate: what they were made with


@dataclass(frozen=True)
class LMImportConfig:
    """What ``instattr import`` of a causal LM needs; saved into run.json."""
    model: str
    data: str
    max_length: Optional[int] = None       # tokens per window (default: the model's context)
    stride: Optional[int] = None           # a window starts every stride tokens (default: half of max_length)
    checkpoints: Tuple[str, ...] = ()      # default: the model folder's checkpoint-*/ subfolders
    checkpoint_lrs: Optional[Tuple[float, ...]] = None
    optimizer: Optional[str] = None        # default: optimizer.pt of the model folder, else of the last checkpoint
    chat_template: bool = False
    limit_train: Optional[int] = None
    limit_eval: Optional[int] = None
    seed: int = 0
    batch_size: int = 8
    device: str = "auto"


def _sample(rows: list, n: Optional[int], seed: int) -> list:
    """A seeded random sample of ``n`` rows in their file order (all when n is None or larger)."""
    if n is None or n >= len(rows):
        return rows
    keep = np.sort(np.random.default_rng(seed).choice(len(rows), size=n, replace=False))
    return [rows[i] for i in keep]


def _found_checkpoints(folder: Path) -> List[Path]:
    """``checkpoint-{step}`` subfolders holding a config, by step."""
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and (p / "config.json").exists()
             and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def _context(tok, model) -> int:
    cfg = model.config
    n = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 1024
    limit = int(getattr(tok, "model_max_length", 0) or 0)
    return int(min(n, limit) if 0 < limit < 1_000_000 else n)


def import_lm(config: LMImportConfig, out, overwrite: bool = False, progress: bool = True, log=print) -> LMRun:
    """An :class:`~instattr.store.LMRun` from a causal LM checkpoint folder and a folder of rows
    (see the module docstring); built beside ``out`` and renamed into place."""
    from .data import document_split, read_documents
    from .device import resolve_device
    from .lm import row_losses
    from .manifest import FORMAT, LM_MODE, DataInfo, LMInfo, LMManifest
    from .models.causal import Windows
    from .models.hf import adapter_base, checkpoint_lr, fingerprint, is_causal_lm, load_hf
    from .models.modules import find_blocks
    from .pipeline import _plain, _versions, build_atomically
    t0 = time.perf_counter()
    folder = Path(config.data)
    if not folder.is_dir() or document_split(folder, "train") is None:
        raise InstattrError(f"--data {config.data}: a language-model run reads a folder with train.jsonl (documents "
                            "with 'text', or 'prompt' and 'completion') and test.jsonl (queries)")
    eval_name = "test" if document_split(folder, "test") is not None else "dev"
    if document_split(folder, eval_name) is None:
        raise InstattrError(f"{folder}: no test.jsonl or dev.jsonl of queries ('prompt' and 'completion')")
    for k, v in (("--limit-train", config.limit_train), ("--limit-eval", config.limit_eval),
                 ("--max-length", config.max_length), ("--stride", config.stride)):
        if v is not None and v <= 0:
            raise InstattrError(f"{k} must be positive, got {v}")
    splits = {"train": _sample(read_documents(document_split(folder, "train")), config.limit_train, config.seed),
              eval_name: _sample(read_documents(document_split(folder, eval_name)), config.limit_eval, config.seed)}
    queries = document_split(folder, eval_name)
    bad = next((r for r in splits[eval_name] if "prompt" not in r), None)
    if bad is not None:
        raise InstattrError(f"{queries}: row idx {bad['idx']!r} is a document; a query needs 'prompt' and 'completion'")
    path = Path(config.model).resolve()
    if not is_causal_lm(path):
        raise InstattrError(f"{config.model}: not a causal language model checkpoint (config.json names no "
                            "*ForCausalLM or *LMHeadModel architecture)")
    device = resolve_device(config.device)
    tok, model, _ = load_hf(str(path), causal=True)
    context = _context(tok, model)
    length = int(config.max_length or context)
    if length < 2 or length > context:
        raise InstattrError(f"--max-length {length}: must be from 2 to the model's context, {context}")
    stride = int(config.stride or max(1, length // 2))
    if stride >= length:
        raise InstattrError(f"--stride {stride}: must be smaller than --max-length {length}")
    if config.chat_template and not getattr(tok, "chat_template", None):
        raise InstattrError(f"{config.model}: --chat-template asked, but the tokenizer has no chat template")
    checkpoints = [Path(c).resolve() for c in config.checkpoints] or _found_checkpoints(path)
    lrs = list(config.checkpoint_lrs) if config.checkpoint_lrs else [checkpoint_lr(c) for c in checkpoints]
    if len(lrs) != len(checkpoints):
        raise InstattrError(f"--checkpoint-lrs: {len(lrs)} learning rates for {len(checkpoints)} checkpoints")
    if checkpoints and any(lr is None for lr in lrs):
        if config.checkpoints:
            raise InstattrError("--checkpoints: a checkpoint without trainer_state.json needs --checkpoint-lrs")
        log(f"{path}: checkpoints without a logged learning rate; tracin is left out (give --checkpoints and "
            "--checkpoint-lrs)")
        checkpoints, lrs = [], []
    for c in checkpoints:
        if not c.is_dir():
            raise InstattrError(f"--checkpoints {c}: no such folder")
    optimizer = Path(config.optimizer).resolve() if config.optimizer else next(
        (p for p in [path / "optimizer.pt"] + [c / "optimizer.pt" for c in checkpoints[::-1]] if p.is_file()), None)
    if optimizer is not None and not optimizer.is_file():
        raise InstattrError(f"--optimizer {optimizer}: no such file")
    model.to(device)
    forward_rows = {}
    for name, rows in splits.items():
        windows = Windows(tok, rows, length, stride, f"{name}.jsonl", chat=config.chat_template)
        nll, tokens = row_losses(model, windows, config.batch_size, progress, f"{name} losses")
        forward_rows[name] = (rows, nll, tokens, len(windows))
    blocks = find_blocks(model)

    def make(tmp: Path) -> None:
        import json
        metrics: dict = {"timings": {}}
        for name, (rows, nll, tokens, n_windows) in forward_rows.items():
            write_text(tmp / "data" / f"{name}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            write_npz(tmp / "lm" / f"{name}.npz", idx=np.asarray([r["idx"] for r in rows]), nll=nll,
                      tokens=tokens)
            metrics[f"{name}_rows"] = len(rows)
            metrics[f"{name}_windows"] = n_windows
            metrics[f"{name}_nll_per_token"] = float(nll.sum() / max(tokens.sum(), 1))
        family = type(model.get_base_model() if hasattr(model, "peft_config") else model).__name__
        info = LMInfo(path=str(path), family=family,
                      fingerprint=fingerprint(path), max_length=length, stride=stride,
                      n_layers=len(blocks[1]) if blocks else 0,
                      checkpoints=tuple(map(str, checkpoints)), checkpoint_lrs=tuple(float(x) for x in lrs),
                      optimizer=str(optimizer) if optimizer else None,
                      adapter_base=adapter_base(path), chat_template=config.chat_template)
        data = DataInfo(name=folder.name, root=str(folder.resolve()), arg=config.data, is_pair=False,
                        n={k: len(v[0]) for k, v in forward_rows.items()})
        manifest = LMManifest(format=FORMAT, mode=LM_MODE, data=data, eval_split=eval_name, seed=config.seed,
                              lm=info, config=_plain(asdict(config)), versions={**_versions(), "device": str(device)})
        metrics["timings"]["total_s"] = time.perf_counter() - t0
        write_json(tmp / "metrics.json", metrics)
        write_json(tmp / "run.json", manifest.to_dict())

    return build_atomically(out, overwrite, make, LMRun.load)


# ---------------------------------------------------------------- methods on a run
def lm_methods(spec, run: LMRun) -> List[str]:
    """Method names from ``spec`` ('all', 'paper' or None: every method the run can compute --
    trackstar with optimizer state, tracin with checkpoints; else a comma-separated list)."""
    info = run.manifest.lm
    if spec is None or spec in ("all", "paper"):
        return [m for m in METHODS if (m != "tracin" or info.checkpoints) and (m != "trackstar" or info.optimizer)]
    names = [m.strip() for m in (spec.split(",") if isinstance(spec, str) else spec) if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if not names or unknown:
        raise InstattrError(f"{'unknown method ' + repr(unknown[0]) if unknown else 'no method'} for a language-model "
                            f"run; choose from {', '.join(METHODS)} (or all)")
    if "tracin" in names and not info.checkpoints:
        raise InstattrError(f"{run.path}: tracin needs checkpoints; import the model with --checkpoints (or a folder "
                            "with checkpoint-*/ subfolders)")
    return list(dict.fromkeys(names))


def lm_options(options: Optional[dict]) -> dict:
    """The explainer options a command gives (``--layers``, ``--modules``, ``--proj-dim``, ...); others
    are a one-line error."""
    options = dict(options or {})
    other = [k for k in options if k not in OPTION_KEYS]
    if other:
        raise InstattrError(f"--{other[0].replace('_', '-')} does not apply to a language-model run")
    if options.get("ihvp", "projected") not in IHVPS:
        raise InstattrError(f"--ihvp {options['ihvp']}: on a language-model run --ihvp is one of {', '.join(IHVPS)}")
    if options.get("ihvp") == "ekfac" and options.get("projection") == "khatri-rao" and \
            options.get("proj_dim", DEFAULT_PROJ_DIM) is not None:
        raise InstattrError("--ihvp ekfac needs Kronecker sketches: --projection orthogonal or gaussian (the default "
                            "with ekfac), or --proj-dim 0")
    options.setdefault("proj_dim", DEFAULT_PROJ_DIM)
    if options.get("measurement") == "loss":      # the classifier's name for the log-probability measurement
        options["measurement"] = "logprob"
    return options


def model_of(run: LMRun, device=None):
    """(tokenizer, model) of the run, loaded once per run object; a model whose weights changed
    since import is a one-line error."""
    from .device import resolve_device
    from .models.hf import fingerprint, load_hf
    info = run.manifest.lm

    def load():
        if not Path(info.path).is_dir():
            raise RunError(f"{run.path}: the model folder {info.path} is gone")
        if fingerprint(info.path) != info.fingerprint:
            raise RunError(f"{run.path}: the model at {info.path} changed since import; import it again")
        tok, model, _ = load_hf(info.path, causal=True)
        return tok, model.to(resolve_device(device or "auto"))
    return run.memo(("lm-model", str(device)), load)


def explainer_of(run: LMRun, methods: Sequence[str], options: Optional[dict] = None, device=None,
                 progress: bool = False, backend=None) -> LMExplainer:
    """An :class:`~instattr.lm.LMExplainer` of the run's model and training rows, fitted for ``methods``
    (its gradient passes on ``backend``); its training side is kept under ``RUN/cache/lm-*.npz`` for
    the next command."""
    from .files import file_digest
    info = run.manifest.lm
    tok, model = model_of(run, device)
    opts = lm_options(options)
    key = f"{info.fingerprint}:{file_digest(run.path / 'data' / 'train.jsonl')}"     # the weights and the rows
    return LMExplainer(model, tok, run.rows("train"), methods=list(methods), max_length=info.max_length,
                       cache=run.path / "cache", cache_key=key,
                       stride=info.stride, seed=run.manifest.seed, progress=progress,
                       optimizer=info.optimizer if "trackstar" in methods else None,
                       whiten_queries=run.rows(run.eval_split) if "trackstar" in methods else None,
                       checkpoints=list(info.checkpoints) if "tracin" in methods else None,
                       checkpoint_lrs=list(info.checkpoint_lrs) if "tracin" in methods else None,
                       chat_template=info.chat_template, backend=backend, **opts)


def attribute_lm(run: LMRun, methods=None, split: Optional[str] = None, overwrite: bool = False,
                 options: Optional[dict] = None, top_k: Optional[int] = None, bottom_k: Optional[int] = None,
                 device=None, progress: bool = True, log=print, backend=None, grid=None) -> Dict[str, float]:
    """Score ``split``'s queries (default: the eval split) against every training row with each method
    (:func:`lm_methods`): ``scores/{method}-{split}.npy`` and ``.json``, or with ``top_k`` the best
    ``top_k`` (``bottom_k``: most opposing) rows per query. Stored results are kept unless ``overwrite``.
    ``backend`` (:mod:`instattr.backend`; None: here) runs the training rows' gradient passes and,
    with ``top_k``, scores elsewhere: Ray's actors compute the batches and its tasks score the
    training sides' shards (bm25, which has none, is scored here); ``grid``: the scoring blocks
    (:class:`~instattr.methods.scoring.Grid`). Returns the seconds of each method that ran (fitting
    shared equally)."""
    from .methods.scoring import Grid, score_dense, score_top_k
    names = lm_methods(methods, run)
    opts = lm_options(options)
    split = split or run.eval_split
    if split not in run.splits or split == "train":
        raise RunError(f"{run.path}: no query split {split!r}; the run's queries are {run.eval_split!r}")
    for name, v in (("--top-k", top_k), ("--bottom-k", bottom_k)):
        if v is not None and v < 1:
            raise InstattrError(f"{name} must be at least 1, got {v}")
    if bottom_k and top_k is None:
        raise InstattrError("--bottom-k needs --top-k")
    if backend is not None and not backend.dense and top_k is None:
        raise InstattrError(f"--backend {backend.name} writes top-k results; add --top-k K")

    def stored(name):
        if top_k is None:
            return run.has_scores(name, split)
        return run.has_top_k(name, split) and (not bottom_k or run.has_top_k(name, split, bottom=True))
    todo = [m for m in names if overwrite or not stored(m)]
    for m in names:
        if m not in todo:
            info = run.score_info(m, split) if top_k is None else run.top_k(m, split)["info"]
            kept = info.get("config", {})
            for key in options or {}:
                asked = opts[key]
                made = kept.get(key, FORMER_DEFAULTS.get(key, asked))     # an option newer than the scores
                if made != asked:
                    raise InstattrError(f"{m}: the stored scores of {split} were made with {key}={made!r}, not "
                                        f"{asked!r}; pass --overwrite to recompute them")
            log(f"{m}: scores for {split} exist, kept (use --overwrite to recompute)")
    if not todo:
        return {}
    queries, train = run.rows(split), run.rows("train")
    test_idx, train_idx = [r["idx"] for r in queries], [r["idx"] for r in train]
    seconds = {}
    with run.writing("attribute"):
        t0 = time.perf_counter()
        explainer = explainer_of(run, todo, opts, device, progress, backend)
        fit = time.perf_counter() - t0
        config, diagnostics = explainer.config(), explainer.diagnostics()
        grid = grid or Grid()
        if top_k is None:
            scores = score_dense(explainer.members(queries), len(queries), grid)
        elif backend is None or backend.dense:
            found = score_top_k(explainer.members(queries), len(queries), top_k, bottom_k or 0, grid)
        else:       # the training sides' shards scored by the backend's tasks; bm25's matrix here
            found = _top_k_elsewhere(explainer, todo, run, queries, train, top_k, bottom_k or 0, backend, grid,
                                     progress)
            diagnostics = {m: dict(d, backend="local" if m == "bm25" else backend.name) for m, d in diagnostics.items()}
        total = time.perf_counter() - t0
        for m in todo:            # one fit and one pass over the queries serve them all: each gets a share
            seconds[m] = total / len(todo)
            if top_k is None:
                run.save_scores(m, split, scores[m], test_idx, train_idx, config, seconds[m],
                                diagnostics=diagnostics.get(m, {}))
            else:
                for which in ("top", "bottom") if bottom_k else ("top",):
                    pos, vals = found[m][which]
                    run.save_top_k(m, split, test_idx, train_idx, pos, vals, config, seconds[m],
                                   bottom=which == "bottom", diagnostics=diagnostics.get(m, {}))
        what = f"top-{top_k} of {len(train)} training rows for {len(queries)} queries" if top_k is not None else \
            f"{len(queries)} x {len(train)} scores"
        log(f"{', '.join(todo)}: {what} in {total:.1f} s (training side {fit:.1f} s, queries and scoring "
            f"{total - fit:.1f} s)")
    return seconds


def _top_k_elsewhere(explainer, names, run, queries, train, k: int, bottom_k: int, backend, grid, progress) -> dict:
    """``backend.top_k`` of the vector methods among ``names``, bm25's top-k from its matrix here."""
    from .methods.language import QuerySides, Rows, lm_index_methods
    from .methods.scoring import Member, score_top_k
    shared = QuerySides(explainer)
    found = {}
    if "bm25" in names:
        bm25 = shared(Rows(queries))["bm25"]
        found = score_top_k([Member("bm25", dense=lambda rows: bm25[rows], n_train=bm25.shape[1])], len(queries), k,
                            bottom_k, grid)
    vector = [m for m in names if m != "bm25"]
    if vector:
        found.update(backend.top_k(run, lm_index_methods(explainer, vector, shared), Rows(queries), Rows(train), k,
                                   bottom_k, grid, progress))
    return found


def explain_lm(run: LMRun, prompt: str, completion: Optional[str] = None, methods=None, k: int = 5,
               max_new_tokens: int = 20, options: Optional[dict] = None, device=None) -> LMExplanation:
    """The training rows behind a completion of ``prompt`` (the model's greedy one when not given);
    ``methods`` default: every method of the run but tracin (its checkpoints' gradients)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InstattrError("explain: give a non-empty --prompt")
    if max_new_tokens < 1:
        raise InstattrError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    names = lm_methods(methods, run) if methods else [m for m in lm_methods(None, run) if m != "tracin"]
    return explainer_of(run, names, options, device).explain(prompt, completion, k, max_new_tokens)


def format_lm_explanation(e: LMExplanation, width: int = 100) -> str:
    """Plain text: the completion, then per method the supporting and opposing rows."""
    def short(row: dict) -> str:
        text = row.get("text") if isinstance(row.get("text"), str) else \
            f"{row.get('prompt', '')} -> {row.get('completion', '')}"
        text = " ".join(text.split())
        return text if len(text) <= width else text[:width - 3] + "..."
    lines = [f"prompt:     {e.prompt}", f"completion: {e.completion}   (log-probability {e.logprob:.3f} nats)"]
    for m, sides in e.methods.items():
        for kind, ranked in sides.items():
            lines.append(f"\n{m} -- {kind}:")
            for i, s in ranked:
                lines.append(f"  {s:+.4g}  [{i}] {short(e.rows.get(i, {}))}")
            if kind == "supporting" and m in e.per_token and ranked:
                top = ranked[0][0]
                shares = "  ".join(f"{t!r} {v:+.3g}" for t, v in zip(e.tokens, e.per_token[m][top]))
                lines.append(f"    per token, for [{top}]: {shares}")
    return "\n".join(lines) + "\n"


def suspects_lm(run: LMRun, method: str = "if", top: int = 20, options: Optional[dict] = None, device=None,
                progress: bool = True) -> List[dict]:
    """The ``top`` training rows with the highest self-score (:meth:`~instattr.lm.LMExplainer.self_scores`:
    ``if``'s self-influence by default), each with its ``idx``, ``score``, ``nll`` and text."""
    if method not in METHODS or method == "bm25":
        raise InstattrError(f"suspects: {method!r} has no self-score on a language-model run; choose from "
                            f"{', '.join(m for m in METHODS if m != 'bm25')}")
    names = lm_methods([method], run)
    if top < 1:
        raise InstattrError(f"--top must be at least 1, not {top}")
    scores = explainer_of(run, names, options, device, progress).self_scores(method)
    rows, losses = run.rows("train"), run.losses("train")
    order = np.argsort(-scores, kind="stable")[:top]
    return [{"rank": r + 1, "idx": rows[i]["idx"], "score": float(scores[i]), "nll": float(losses["nll"][i]),
             **{k: v for k, v in rows[i].items() if k != "idx"}} for r, i in enumerate(order)]


def format_suspects_lm(method: str, rows: List[dict], width: int = 90) -> str:
    lines = [f"training rows by {method} self-score (highest first):"]
    for r in rows:
        text = r.get("text") if isinstance(r.get("text"), str) else f"{r.get('prompt', '')} -> {r.get('completion')}"
        text = " ".join(str(text).split())
        lines.append(f"{r['rank']:>4}  {r['score']:+.4g}  nll {r['nll']:.1f}  [{r['idx']}] "
                     f"{text if len(text) <= width else text[:width - 3] + '...'}")
    return "\n".join(lines) + "\n"


__all__ = ["LMImportConfig", "import_lm", "attribute_lm", "explain_lm", "suspects_lm", "lm_methods",
           "explainer_of", "model_of", "format_lm_explanation", "format_suspects_lm", "open_run"]

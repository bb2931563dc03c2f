"""Which training documents made a causal language model say this: gd, gc, if, rif, trackstar, tracin, bm25.

The task is :class:`instattr.task.LanguageModelTask`: a training row's loss is its summed
next-token NLL over its scored tokens (a document's every token, a prompt's completion only;
rows longer than the context are windowed, :mod:`instattr.models.causal`), and a query's
measurement is its completion's summed log-probability. Per-example gradients of the tracked
linear modules come from hooks in the model's own forward (:mod:`instattr.layers.projection`;
default: every linear module of the top ``layers`` blocks, or a PEFT adapter's trainable ones; the
output embedding is left out, as it is usually tied to the input's), a row's being the sum of its
windows'. With ``g_q`` the query's and ``g_i`` row i's projected gradient:

    gd = g_q . g_i        gc = cos(g_q, g_i)
    if = g_q^T H^-1 g_i   rif = if / sqrt(g_q^T H^-1 g_q * g_i^T H^-1 g_i)
    trackstar = cos(W g~_q, W g~_i)   (g~ = g / sqrt(v), v: Adam's second moments, :func:`adam_scales`;
                                       W^T W = (R + damping)^-1, R their autocorrelation,
                                       :mod:`instattr.layers.whiten`)
    tracin = sum over checkpoints c of lr_c * g_q^c . g_i^c       (TracIn over the saved checkpoints)
    nn = cos(h_q, h_i)      (h: the mean final hidden state over the positions predicting scored tokens)
    bm25 = BM25 of the row's words for the query's prompt and completion (the lexical baseline)

H is the Gauss-Newton Hessian of the mean training loss, ``(1/n) sum_i GGN_i``, estimated by
Monte Carlo in the projected space (the task's drawn tokens; with ``fisher="empirical"`` the
empirical Fisher ``(1/n) sum_i g_i g_i^T`` over the rows' windows instead, one backward pass per
batch, its factors the windows' gradients themselves), plus ``damping`` times its mean
eigenvalue ``trace(H)/dim`` (a relative damping: the summed NLL's curvature grows with the rows'
length); one matrix while the smaller of the dimension and the factor rows is at most 20,480,
else block-diagonal over the tracked blocks (``solver.full_`` says which). With ``ihvp="ekfac"``
H is instead its eigenvalue-corrected K-FAC per tracked module (:mod:`instattr.layers.ekfac`),
the same trace, so the same damping. Scores follow the
library's convention: higher means the row supports the completion more. ``if`` has a stated
scale: it is the first-order change of the completion's log-probability, in nats, per unit weight
added to row i's term of the mean training loss; one more copy of the row among n changes it by
about ``if / n``. ``gd`` is in nats^2 per squared parameter unit; ``gc``, ``rif`` and
``trackstar`` and ``nn`` lie in [-1, 1]. ``token_scores`` splits ``gd`` and ``if`` over the
completion's tokens. With ``measurement="margin"`` the query's gradient is that of minus its
summed per-token margin (:class:`instattr.task.CompletionMargin`) instead of its summed NLL; ``if``
is then in margin units (nats of log-odds).
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .data import records
from .errors import InstattrError
from .layers.attributors import MAX_EMBEDDING_BYTES
from .layers.ekfac import EKFAC
from .layers.ihvp import Curvature, GaussNewton
from .layers.projection import KINDS, GradientProjector
from .methods.similarity import unit_rows
from .models.causal import CausalForward, Windows
from .models.hf import adapter_trainable
from .models.modules import Tracked, track_by_probe
from .task import IGNORE, CompletionMargin, LanguageModelTask

METHODS = ("gd", "gc", "if", "rif", "trackstar", "tracin", "nn", "bm25")
MEASUREMENTS = ("logprob", "margin")
PLAIN = ("gd", "gc", "if", "rif")
IHVPS = ("projected", "ekfac")       # H: the projected Gauss-Newton, or its EK-FAC per tracked module
FISHERS = ("true", "empirical")      # H's factors: gradients at drawn tokens, or at the observed ones


def _rows(data, where: str) -> List[dict]:
    """Rows (:func:`instattr.data.records`), at least one."""
    rows = records(data, where)
    if not rows:
        raise InstattrError(f"{where}: no rows")
    return rows


def _query_rows(data, where: str) -> List[dict]:
    """Query rows (:func:`_rows`), each with a ``prompt`` and a ``completion``."""
    rows = _rows(data, where)
    for i, q in enumerate(rows):
        if "prompt" not in q or "completion" not in q:
            raise InstattrError(f"{where}: row {i} needs 'prompt' and 'completion'")
    return rows


def tracked_modules(forward: CausalForward, probe: Dict[str, torch.Tensor], layers: Optional[int] = None,
                    modules: Optional[Sequence[str]] = None) -> List[Tracked]:
    """The tracked linear modules of ``forward`` (names inside it, ``model.`` first): ``modules``
    (globs over the model's own names), else an adapter's trainable ones, else the top ``layers``
    blocks' (the output embedding left out unless named)."""
    trainable = None if modules else adapter_trainable(forward.model)
    chosen = track_by_probe(forward, probe, layers, modules,     # layers None: the top 3 (all if fewer)
                            None if trainable is None else ["model." + n for n in trainable], "model.")
    if not modules and trainable is None:
        chosen = [t for t in chosen if t.group != "head"]
    if not chosen:
        raise InstattrError(f"{type(forward.model).__name__}: no linear module is tracked (layers 0?); name some "
                            "with modules")
    return chosen


def row_sums(values: torch.Tensor, rows: np.ndarray, n: int) -> torch.Tensor:
    """(n, ...) the sum of ``values`` (one per window) over each row's windows (``values`` itself when
    every row is one window)."""
    if len(rows) == n and np.array_equal(rows, np.arange(n)):
        return values
    out = torch.zeros((n, *values.shape[1:]), dtype=values.dtype)
    out.index_add_(0, torch.as_tensor(rows), values)
    return out


class WindowBatches:
    """One :func:`gradients` pass as work a backend maps over (:mod:`instattr.backend`): batch ``j``'s
    positions, per-window gradients (B, dim), Gauss-Newton factors (B, S, dim) or None, summed NLLs
    (B,) and, while the projector collects them, that batch's covariance sums (EK-FAC). Picklable:
    a Ray actor holds one copy (the projector with its model, the windows)."""

    def __init__(self, projector: GradientProjector, windows: Windows, batches: List[List[int]], task, factors: bool):
        self.projector, self.windows, self.batches, self.task = projector, windows, batches, task
        self.factors, self.device = bool(factors), projector.device

    def __len__(self) -> int:
        return len(self.batches)

    def __call__(self, j: int):
        pos = self.batches[j]
        out, jac = self.projector.project(self.windows.batch(pos), self.task)
        jac = jac.cpu()
        per = torch.einsum("br,brd->bd", self.task.train_coefficients(out).to(jac.dtype), jac)
        facs = torch.einsum("bsr,brd->bsd", self.task.curvature_roots(out).to(jac.dtype), jac) if self.factors \
            else None
        sums = self.projector.covariances(restart=True) if self.projector.collecting else None
        return pos, per, facs, self.task.loss(out).double().cpu(), sums


def widened_product(queries: torch.Tensor, train: torch.Tensor) -> np.ndarray:
    """``queries @ train.T`` (float64 numpy) with the training side widened to float64 about 32 MB
    at a time, never whole."""
    rows = max(1, (1 << 25) // (8 * max(train.shape[1], 1)))
    return torch.cat([queries.double() @ part.double().T for part in train.split(rows)], 1).numpy()


def _tensor(a) -> torch.Tensor:
    return a if isinstance(a, torch.Tensor) else torch.tensor(np.asarray(a))


def gradients(projector: GradientProjector, windows: Windows, batch_size: int = 8, factors: bool = False,
              progress: Optional[bool] = False, desc: str = "", task=None, backend=None
              ) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """(grads (rows, dim), factors (windows * roots, dim) or None, losses (rows,)): each row's
    projected gradient of its summed NLL (``task``, default the projector's: of its scalar 0; the
    sum over its windows), the Gauss-Newton factors per window (``H = (1/n) F^T F``; for an
    empirical-Fisher task a view of the windows' gradients, one per window), and each row's summed
    NLL. ``backend`` (:mod:`instattr.backend`, default here) computes the batches,
    cut here: a Ray one on a pool of actors, with the same results."""
    from tqdm.auto import tqdm

    from .backend import backend_or_local
    task = task or projector.task
    n_win, dim, s = len(windows), projector.dim, task.n_roots
    if not factors and hasattr(task, "loss_only"):
        task = task.loss_only()                  # one backward pass: the drawn scalars are not needed
    same = factors and getattr(task, "empirical", False)        # the factors are the gradients: kept once
    separate = factors and not same
    if n_win * dim * (1 + s * separate) * torch.finfo(projector.dtype).bits // 8 > MAX_EMBEDDING_BYTES:
        raise InstattrError(f"{n_win} windows x {dim} projected numbers{' x factors' if factors else ''} do not fit "
                            "in memory; lower proj_dim or track fewer modules")
    per = torch.zeros(n_win, dim, dtype=projector.dtype)
    facs = per.view(n_win, 1, dim) if same else torch.zeros(n_win, s, dim, dtype=projector.dtype) if separate \
        else None
    losses = torch.zeros(n_win, dtype=torch.float64)
    work = WindowBatches(projector, windows, list(windows.order(batch_size)), task, separate)
    with tqdm(total=n_win, desc=desc, disable=not progress, unit="window") as bar:
        for pos, g, f, loss, sums in backend_or_local(backend).map_batches(work):
            pos = np.array(pos)                   # a worker's arrays may arrive read-only: copied in
            per[pos] = _tensor(g)
            if separate:
                facs[pos] = _tensor(f)
            losses[pos] = _tensor(loss)
            if sums is not None and projector.collecting:     # a worker's batch: its sums join ours
                projector.add_covariances(sums)
            bar.update(len(pos))
    rows = windows.rows
    return (row_sums(per, rows, windows.n_rows), facs.reshape(n_win * s, dim) if factors else None,
            row_sums(losses, rows, windows.n_rows))


def row_losses(model, windows: Windows, batch_size: int = 8, progress: Optional[bool] = False,
               desc: str = "") -> Tuple[np.ndarray, np.ndarray]:
    """(nll, tokens): each row's summed next-token NLL (float64 nats, the sum over its windows) and its
    number of scored tokens, under ``model`` (a causal LM, or a :class:`CausalForward`), without gradients."""
    from tqdm.auto import tqdm
    forward = model if isinstance(model, CausalForward) else CausalForward(model)
    task, device = LanguageModelTask(), next(forward.parameters()).device
    losses = torch.zeros(len(windows), dtype=torch.float64)
    with torch.no_grad(), tqdm(total=len(windows), desc=desc, disable=not progress, unit="window") as bar:
        for pos in windows.order(batch_size):
            batch = {k: v.to(device) for k, v in windows.batch(pos).items()}
            losses[pos] = task.loss(forward(**batch)).double().cpu()
            bar.update(len(pos))
    tokens = np.zeros(windows.n_rows, dtype=np.int64)
    np.add.at(tokens, windows.rows, [sum(t != IGNORE for t in w.targets) for w in windows.items])
    return row_sums(losses, windows.rows, windows.n_rows).numpy(), tokens


def read_optimizer(optimizer) -> dict:
    """An optimizer's state dict: given, or read from a file (a Trainer's ``optimizer.pt``) with
    ``weights_only=True``, so no code in it runs."""
    if isinstance(optimizer, dict):
        return optimizer
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer.state_dict()
    try:
        return torch.load(optimizer, map_location="cpu", weights_only=True)
    except Exception as e:      # noqa: BLE001 - any unreadable file is the one-line error
        raise InstattrError(f"{optimizer}: not a readable optimizer state ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None


def second_moments(model, state: dict) -> Dict[str, torch.Tensor]:
    """Parameter name -> Adam's ``exp_avg_sq``. The state names parameters by their position in
    the optimizer's groups; the positions are those of ``model.parameters()`` (a plain optimizer),
    or of a Trainer's two groups (weights with decay, then biases and norms): the first layout
    whose every shape matches is taken."""
    named = list(model.named_parameters())
    order = [i for g in state.get("param_groups", []) for i in g.get("params", [])]
    moments = {i: v.get("exp_avg_sq") for i, v in state.get("state", {}).items()}

    try:                                    # the Trainer's own rule, where transformers has it
        from transformers import Trainer
        decay = set(Trainer.get_decay_parameter_names(None, model))
    except Exception:                       # noqa: BLE001 - an older or newer Trainer: the usual rule
        decay = {n for n, _ in named if not (n.endswith(".bias") or "norm" in n.lower() or ".ln_" in n)}

    def no_decay(n: str) -> bool:
        return n not in decay
    adapter = adapter_trainable(model)
    adapter = None if adapter is None else set(adapter)
    trained = named if adapter is None else [(n, p) for n, p in named if n in adapter]
    layouts = [named, [x for x in named if not no_decay(x[0])] + [x for x in named if no_decay(x[0])],
               trained, [x for x in trained if not no_decay(x[0])] + [x for x in trained if no_decay(x[0])]]
    for layout in layouts:
        if len(layout) != len(order):
            continue
        pairs = {n: moments.get(i) for (n, _), i in zip(layout, order)}
        if all(v is None or tuple(v.shape) == tuple(p.shape) for (n, p), v in zip(layout, pairs.values())):
            return {n: v for n, v in pairs.items() if v is not None}
    raise InstattrError(f"the optimizer state's {len(order)} parameters match neither the model's order nor a "
                        f"Trainer's grouping of its {len(named)} parameters")


def adam_scales(model, state: dict, tracked: Sequence[Tracked], prefix: str = "model.") -> Dict[str, tuple]:
    """For each tracked module, ``(a, b)`` with ``a b^T`` the inverse square root of Adam's second
    moments: the weight's ``v`` (d_out x d_in) factored as Adafactor does, ``v ~ r c^T / mean(v)``
    with r, c its row and column means (exact when v has rank one); the bias column's factor is
    ``mean(v_bias) / mean(r / mean(v))`` (exact when v_bias is proportional to r). The scaled
    gradient is TrackStar's ``G / sqrt(v)`` without ever forming G."""
    from .models.modules import conv1d_type
    moments = second_moments(model, state)
    out = {}
    for t in tracked:
        name = t.name[len(prefix):] if t.name.startswith(prefix) else t.name
        mod = model.get_submodule(name)
        v = moments.get(f"{name}.weight")
        if v is None:
            raise InstattrError(f"the optimizer state has no second moment of {name}.weight")
        v = v.double().T if isinstance(mod, conv1d_type() or ()) else v.double()
        m = float(v.mean())
        if not m > 0 or not np.isfinite(m):
            raise InstattrError(f"the optimizer state's second moments of {name}.weight are all zero or not finite "
                                "(a module it never trained?); track other modules or leave trackstar out")
        r, c = (v.mean(1) / m).clamp_min(1e-12), v.mean(0).clamp_min(1e-12 * m)
        b = c ** -0.5
        if getattr(mod, "bias", None) is not None:
            vb = moments.get(f"{name}.bias")
            if vb is None:
                raise InstattrError(f"the optimizer state has no second moment of {name}.bias")
            b = torch.cat([b, torch.tensor([max(float(vb.double().mean()) / float(r.mean()), 1e-12 * m) ** -0.5],
                                           dtype=torch.float64)])
        out[t.name] = (r ** -0.5, b)
    return out


def checkpoint_models(checkpoints, lrs, dtype) -> List[Tuple[torch.nn.Module, float]]:
    """(model in ``dtype``, learning rate) per checkpoint: a model in memory or a folder (loaded
    as ``AutoModelForCausalLM``, never with remote code); the rates given, else each folder's last
    logged one (a Trainer's ``trainer_state.json``)."""
    from .models.hf import checkpoint_lr
    if not checkpoints:
        raise InstattrError("tracin: needs checkpoints (models or folders saved during training)")
    if lrs is not None and len(lrs) != len(checkpoints):
        raise InstattrError(f"tracin: {len(lrs)} learning rates for {len(checkpoints)} checkpoints")
    out = []
    for i, ckpt in enumerate(checkpoints):
        lr = None if lrs is None else float(lrs[i])
        if isinstance(ckpt, torch.nn.Module):
            model = ckpt if next(ckpt.parameters()).dtype == dtype else copy.deepcopy(ckpt).to(dtype)
        else:
            from transformers import AutoModelForCausalLM
            try:
                model = AutoModelForCausalLM.from_pretrained(str(ckpt)).to(dtype)
            except Exception as e:      # noqa: BLE001 - an unreadable folder is the one-line error
                raise InstattrError(f"tracin: {ckpt}: not a causal LM checkpoint ({type(e).__name__})") from None
            lr = lr if lr is not None else checkpoint_lr(ckpt)
        if lr is None:
            raise InstattrError(f"tracin: checkpoint {i}: no learning rate (give checkpoint_lrs, or a folder with "
                                "trainer_state.json)")
        out.append((model, lr))
    return out


def _digest(rows: List[dict]) -> str:
    """What names a list of query rows: their prompts and completions."""
    import hashlib
    import json
    return hashlib.sha1(json.dumps([[q["prompt"], q["completion"]] for q in rows]).encode()).hexdigest()


def _identity(source) -> Optional[str]:
    """What names a checkpoint or an optimizer state in a cache key: a file's or folder's path, sizes
    and modification times ("none" for no state); None for an object in memory, which is not cached."""
    from pathlib import Path
    if source is None:
        return "none"
    if isinstance(source, (str, Path)) and Path(source).exists():
        p = Path(source)
        files = sorted(p.glob("*")) if p.is_dir() else [p]
        return str(p.resolve()) + ";" + ";".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}"
                                                 for f in files if f.is_file())
    return None


def row_text(row: dict) -> str:
    """The words of a row: its text, or its prompt and completion."""
    return row["text"] if isinstance(row.get("text"), str) else f"{row.get('prompt', '')} {row.get('completion', '')}"


class Lexical:
    """BM25 over the rows' words (the ``bm25s`` library, English stopwords removed): the lexical
    baseline, scored like the others (higher: the row matches the query's prompt and completion
    more)."""

    def __init__(self, texts: Sequence[str]):
        import bm25s
        self.n = len(texts)
        self.retriever = bm25s.BM25()
        self.retriever.index(bm25s.tokenize(list(texts), stopwords="en", show_progress=False), show_progress=False)

    def scores(self, queries: Sequence[str]) -> np.ndarray:
        import bm25s
        words = bm25s.tokenize(list(queries), stopwords="en", return_ids=False, show_progress=False)
        return np.stack([np.asarray(self.retriever.get_scores(w), dtype=np.float64) if w else np.zeros(self.n)
                         for w in words])


class TokenLosses:
    """The scalars of one row's scored tokens, each its own NLL, or (``margin``) minus its margin
    (R = the row's scored tokens): their gradients are the per-token gradients (a batch of one row)."""

    def __init__(self, margin: bool = False):
        self.margin = margin

    def scalars(self, out) -> torch.Tensor:
        if len(out.targets) != 1:
            raise InstattrError("per-token gradients take one window at a time")
        keep = out.targets[0] != IGNORE
        z, y = out.logits[0][keep], out.targets[0][keep].unsqueeze(-1)
        if self.margin:
            return -(z.gather(-1, y) - torch.logsumexp(z.scatter(-1, y, -torch.inf), -1, keepdim=True)).T
        return -torch.log_softmax(z, -1).gather(-1, y).T


def hidden_means(forward: CausalForward, windows: Windows, batch_size: int = 8) -> torch.Tensor:
    """(rows, d) float64: each row's mean final hidden state over the positions that predict its
    scored tokens (a document's every position but the last, a query's from the prompt's last token
    on): the representation its loss reads."""
    device = next(forward.parameters()).device
    sums, counts = None, torch.zeros(len(windows), dtype=torch.float64)
    with torch.no_grad():
        for pos in windows.order(batch_size):
            batch = {k: v.to(device) for k, v in windows.batch(pos).items()}
            h = forward.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                              output_hidden_states=True).hidden_states[-1].double()
            keep = (batch["targets"] != IGNORE).double()
            if sums is None:
                sums = torch.zeros(len(windows), h.shape[-1], dtype=torch.float64)
            sums[pos] = torch.einsum("bt,btd->bd", keep, h).cpu()
            counts[pos] = keep.sum(1).cpu()
    rows = windows.rows
    return row_sums(sums, rows, windows.n_rows) / row_sums(counts, rows, windows.n_rows).clamp_min(1)[:, None]


@dataclass
class LMExplanation:
    """A completion and, per method, the training rows that support and oppose it most, named by
    their ``idx`` (a row's own ``idx`` field, else its position). ``per_token[method][idx]``: each
    completion token's share of that row's score (``gd`` and ``if``; the shares sum to the score)."""
    prompt: str
    completion: str
    logprob: float                                       # the completion's summed log-probability (nats)
    methods: Dict[str, Dict[str, List[Tuple[object, float]]]]   # method -> supporting/opposing -> (idx, score)
    rows: Dict[object, dict] = field(repr=False, default_factory=dict)
    tokens: List[str] = field(default_factory=list)               # the completion's tokens
    per_token: Dict[str, Dict[object, List[float]]] = field(repr=False, default_factory=dict)

    def to_dict(self) -> dict:
        def listed(m, ranked):
            return [{**self.rows.get(i, {}), "idx": i, "score": s,
                     **({"tokens": self.per_token[m][i]} if m in self.per_token else {})} for i, s in ranked]
        return {"prompt": self.prompt, "completion": self.completion, "logprob": self.logprob,
                "tokens": list(self.tokens),
                "methods": {m: {k: listed(m, v) for k, v in sides.items()} for m, sides in self.methods.items()}}

    def to_frame(self):
        """A pandas DataFrame, one row per (method, kind, rank): idx, text, score."""
        import pandas as pd
        out = [{"method": m, "kind": kind, "rank": r, "idx": i,
                "text": self.rows.get(i, {}).get("text", self.rows.get(i, {}).get("completion")), "score": s}
               for m, sides in self.methods.items() for kind, ranked in sides.items()
               for r, (i, s) in enumerate(ranked)]
        return pd.DataFrame(out, columns=["method", "kind", "rank", "idx", "text", "score"])


class LMExplainer:
    """Attribution of a causal LM's completions to its training rows (see the module docstring).

    ``model``: an ``AutoModelForCausalLM`` (or a PEFT model around one); ``train``: rows with
    ``text`` or ``prompt`` and ``completion`` (dicts, a DataFrame or a ``datasets.Dataset``; other
    fields are kept and shown). ``layers``/``modules``: what is tracked; ``proj_dim`` k: k^2
    projected numbers per module (None: exact); ``max_length``/``stride``: the windows (default the
    model's context and half of it); ``samples``: Monte Carlo draws per window for H; ``fisher``:
    ``true`` (those draws) or ``empirical`` (the windows' own loss gradients); ``ihvp``: H
    itself, ``projected`` (the Gauss-Newton in the sketch space) or ``ekfac`` (its EK-FAC per tracked
    module, :mod:`instattr.layers.ekfac`; ``projection`` then defaults to ``orthogonal``);
    ``optimizer``: Adam's state for ``trackstar`` (a state dict, an optimizer or an
    ``optimizer.pt``); ``whiten_queries``: rows (``prompt``, ``completion``) whose gradient
    autocorrelation trackstar mixes into R, ``whiten_components``: the mixing's k
    (:mod:`instattr.layers.whiten`; 0: no whitening, the cosine of the normalised gradients);
    ``checkpoints``/``checkpoint_lrs``: models or folders saved during training
    and their learning rates, for ``tracin``. ``cache`` (a folder) with ``cache_key`` (a string
    that names the model's weights and the training rows: the caller's promise) keeps the training
    side there (``lm-*.npz``) and reads it back on a later fit with the same key and options.
    ``backend`` (:mod:`instattr.backend`; None: here) computes the training rows' gradient passes
    (a Ray one on a pool of actors, each holding the model once; the same batches, the same
    results). The model is put in eval mode."""

    def __init__(self, model, tokenizer, train, methods: Sequence[str] = PLAIN, layers: Optional[int] = None,
                 modules: Optional[Sequence[str]] = None, proj_dim: Optional[int] = 32,
                 projection: Optional[str] = None, damping: float = 0.1, max_length: Optional[int] = None,
                 stride: Optional[int] = None, samples: int = 1, batch_size: int = 8, seed: int = 0,
                 dtype: str = "float32", optimizer=None, checkpoints: Optional[Sequence] = None,
                 checkpoint_lrs: Optional[Sequence[float]] = None, chat_template: bool = False,
                 measurement: str = "logprob", whiten_queries=None, whiten_components: int = 1000,
                 ihvp: str = "projected", fisher: str = "true", cache=None, cache_key: Optional[str] = None,
                 progress: Optional[bool] = None, backend=None):
        if isinstance(methods, str):
            methods = [m for m in methods.split(",") if m.strip()]
        unknown = [m for m in methods if m not in METHODS]
        if not methods:
            raise InstattrError(f"LMExplainer: no method; choose from {', '.join(METHODS)}")
        if unknown:
            raise InstattrError(f"LMExplainer: unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
        if projection is None:            # EK-FAC needs Kronecker sketches; else the Khatri-Rao ones
            projection = "orthogonal" if ihvp == "ekfac" and any(m in ("if", "rif") for m in methods) else \
                "khatri-rao"
        if projection not in KINDS:
            raise InstattrError(f"LMExplainer: projection must be one of {', '.join(KINDS)}, got {projection!r}")
        if not isinstance(damping, (int, float)) or not damping > 0:
            raise InstattrError(f"LMExplainer: damping must be a number > 0 (relative to H's mean eigenvalue), "
                                f"got {damping!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InstattrError(f"LMExplainer: batch_size must be a positive integer, got {batch_size!r}")
        if measurement not in MEASUREMENTS:
            raise InstattrError(f"LMExplainer: measurement must be one of {', '.join(MEASUREMENTS)}, got "
                                f"{measurement!r}")
        if not isinstance(whiten_components, int) or whiten_components < 0:
            raise InstattrError(f"LMExplainer: whiten_components must be an integer >= 0 (0: no whitening), got "
                                f"{whiten_components!r}")
        if ihvp not in IHVPS:
            raise InstattrError(f"LMExplainer: ihvp must be one of {', '.join(IHVPS)} on a language model, got "
                                f"{ihvp!r}")
        if fisher not in FISHERS:
            raise InstattrError(f"LMExplainer: fisher must be one of {', '.join(FISHERS)}, got {fisher!r}")
        if ihvp == "ekfac" and proj_dim is not None and projection == "khatri-rao":
            raise InstattrError("LMExplainer: ihvp ekfac needs Kronecker sketches: projection orthogonal or gaussian "
                                "(or proj_dim None, exact)")
        if dtype not in ("float32", "float64"):
            raise InstattrError(f"LMExplainer: dtype must be float32 or float64, got {dtype!r}")
        self.options_ = {"layers": layers, "modules": list(modules) if modules else None, "proj_dim": proj_dim,
                         "projection": projection, "damping": float(damping), "samples": samples, "seed": seed,
                         "dtype": dtype, "max_length": max_length, "stride": stride, "chat_template": chat_template,
                         "measurement": measurement, "whiten_components": whiten_components, "ihvp": ihvp,
                         "fisher": fisher}
        self.query_task = CompletionMargin() if measurement == "margin" else None   # None: the summed NLL
        self.methods, self.damping, self.chat = list(methods), float(damping), bool(chat_template)
        if self.chat and not getattr(tokenizer, "chat_template", None):
            raise InstattrError("LMExplainer: chat_template asked, but the tokenizer has no chat template")
        self.tokenizer, self.batch_size, self.progress = tokenizer, int(batch_size), progress
        self.train = _rows(train, "train")
        context = getattr(getattr(model, "config", None), "max_position_embeddings", None) or \
            getattr(getattr(model, "config", None), "n_positions", None) or 1024
        if max_length is not None and (not isinstance(max_length, int) or not 2 <= max_length <= context):
            raise InstattrError(f"LMExplainer: max_length must be an integer from 2 to the model's context {context}, "
                                f"got {max_length!r}")
        self.max_length, self.context = int(max_length or context), int(context)
        self.stride = stride
        if next(model.parameters()).dtype != getattr(torch, dtype):      # a copy in the asked dtype
            model = copy.deepcopy(model).to(getattr(torch, dtype))
        self.forward = CausalForward(model).eval()           # the model is put in eval mode (no dropout)
        self.task = LanguageModelTask(samples, seed, empirical=fisher == "empirical")
        probe = Windows(tokenizer, [{"text": "a probe of the forward pass"}], self.max_length).batch(
            [0], next(model.parameters()).device)
        self.tracked = tracked_modules(self.forward, probe, layers, modules)
        self._sketch = (proj_dim, seed, projection)          # every projector below shares the projections
        self.projector = self._projector(self.forward, self.task)
        windows = self._windows(self.train, "train")
        needs_h = any(m in ("if", "rif") for m in self.methods)
        self.train_grads = self.solver = self.trackstar_ = self._train_sides = None
        self.cache, self.cache_key = (cache, cache_key) if cache is not None and cache_key else (None, None)
        ekfac = needs_h and ihvp == "ekfac"
        if any(m in PLAIN for m in self.methods):
            # the empirical Fisher's factors are the windows' gradients: with one window per row, the
            # rows' gradients themselves, neither kept twice nor held twice
            alias = needs_h and self.task.empirical and len(windows) == windows.n_rows
            factors = self._kept("factors", None) if needs_h and not alias else None
            kfac = self._kept("kfac", None) if ekfac else None      # per module: sum a a^T, sum s s^T
            kept = self._kept("grads", None) if not needs_h or alias or factors is not None else None
            if kept is None or (needs_h and not alias and factors is None) or (ekfac and kfac is None):
                if ekfac:
                    self.projector.collect_covariances()
                self.train_grads, factors, self.train_losses = gradients(self.projector, windows, self.batch_size,
                                                                         needs_h, bool(progress), "train gradients",
                                                                         backend=backend)
                self._keep("grads", (self.train_grads, self.train_losses))
                if needs_h and not alias:
                    self._keep("factors", (factors,))
                if ekfac:
                    kfac = [m for a, s, _ in self.projector.covariances() for m in (a, s)]
                    self._keep("kfac", kfac)
            else:
                self.train_grads, self.train_losses = kept
                factors = self.train_grads if alias else factors[0] if factors is not None else None
        self.bm25_ = Lexical([row_text(r) for r in self.train]) if "bm25" in self.methods else None
        self.hidden_ = self._made("hidden", lambda: (torch.as_tensor(unit_rows(
            hidden_means(self.forward, windows, self.batch_size).numpy())),))[0] if "nn" in self.methods else None
        self.tracin_ = []                       # (lr, projector, training gradients) per checkpoint
        if "tracin" in self.methods:
            for c, (ckpt, lr) in enumerate(checkpoint_models(checkpoints, checkpoint_lrs, getattr(torch, dtype))):
                try:
                    other = self._projector(CausalForward(ckpt).eval(), self.task)
                except AttributeError as e:
                    raise InstattrError(f"tracin: checkpoint {c} is not the model's architecture ({e})") from None
                g = self._made("tracin", lambda: (gradients(other, windows, self.batch_size, False, bool(progress),
                                                            f"checkpoint {c + 1} gradients", backend=backend)[0],),
                               _identity(checkpoints[c]))[0]
                self.tracin_.append((lr, other, g))
        self.whitener, self.trackstar_mix, self._whitened_queries = None, None, None
        if "trackstar" in self.methods:
            self.trackstar_ = self._projector(self.forward, self.task)
            if optimizer is None:
                warnings.warn("trackstar: no optimizer state given; no second-moment normaliser")
                self.trackstar_normaliser = "none"
            else:
                self.trackstar_.scale(adam_scales(self.forward.model, read_optimizer(optimizer), self.tracked))
                self.trackstar_normaliser = "adam second moments, factored"
            state = _identity(optimizer)
            raw = self._made("trackstar-raw", lambda: (gradients(
                self.trackstar_, windows, self.batch_size, False, bool(progress), "trackstar gradients",
                backend=backend)[0].double(),), state)[0]
            if whiten_components:
                self._fit_whitener(raw, whiten_queries, whiten_components, state, progress)
                raw = self.whitener(raw)
            self.trackstar_grads = torch.as_tensor(unit_rows(raw.numpy())).to(self.projector.dtype)
        self._solved_norms = None
        if needs_h:
            n, dim = len(self.train), self.projector.dim
            if ekfac:             # its eigenvalues sum to trace(H): the mean eigenvalue without another pass
                pairs = [(kfac[2 * j], kfac[2 * j + 1], 0) for j in range(len(kfac) // 2)]
                self.solver = EKFAC(1.0).fit(self.projector.block_slices(), pairs, factors, n)
                self.solver.damping = self._absolute_damping(self.solver.mean_eigenvalue)
            else:
                mean_eig = sum(float(torch.linalg.vector_norm(f, dtype=torch.float64) ** 2)    # float64, no copy
                               for f in factors.split(256)) / n / dim
                self.solver = GaussNewton(self._absolute_damping(mean_eig)).fit(
                    Curvature(dim=dim, n=n, factors=factors, blocks=self.projector.block_slices(),
                              groups=list(self.projector.groups().values())))

    def _absolute_damping(self, mean_eigenvalue: float) -> float:
        """``damping`` times H's mean eigenvalue (kept as ``damping_absolute``); a non-finite one is
        a one-line error."""
        if not np.isfinite(mean_eigenvalue):
            raise InstattrError("H's mean eigenvalue is not finite: a training row's gradient holds NaN or inf "
                                "(check the model and the rows' losses)")
        self.damping_absolute = self.damping * max(mean_eigenvalue, 1e-12)
        return self.damping_absolute

    @property
    def _train_solved_norms(self) -> torch.Tensor:
        """(train,) float64 ``g_i^T (H + damping I)^-1 g_i``, made when first asked (rif, self-influence)."""
        if self._solved_norms is None:
            self._solved_norms = torch.cat([self.solver.quadratic(c.double()) for c in   # no float64 copy
                                            self.train_grads.split(512)])
        return self._solved_norms

    def _fit_whitener(self, train: torch.Tensor, queries, components: int, state: Optional[str], progress) -> None:
        """TrackStar's whitening (:mod:`instattr.layers.whiten`) from the training rows' normalised
        gradients' autocorrelation, mixed with that of ``queries`` when given."""
        from .layers.whiten import Whitener, autocorrelations, mixing, spectrum
        blocks = self.trackstar_.block_slices()
        r = autocorrelations(train, blocks)
        if queries is not None:
            rows = _query_rows(queries, "whiten_queries")
            digest = _digest(rows)
            g = self._made("trackstar-queries", lambda: (gradients(
                self.trackstar_, self._windows(rows, "whiten_queries"), self.batch_size, False, bool(progress),
                "trackstar query gradients", task=self.query_task)[0].double(),),
                None if state is None else f"{state};{digest};{self.options_['measurement']}")[0]
            self.trackstar_mix = mixing(spectrum(g, blocks), spectrum(train, blocks, r), components)
            r = [self.trackstar_mix * a + (1 - self.trackstar_mix) * b for a, b in zip(autocorrelations(g, blocks), r)]
            self._whitened_queries = (digest, g)          # sides() of these same queries reuses them
        self.whitener = Whitener(blocks, r, self.damping)

    # ---------------------------------------------------------------- the training side, kept
    def _cache_path(self, name: str, extra: str = ""):
        import hashlib
        import json
        from pathlib import Path
        empirical = self.task.empirical and name in ("factors", "kfac")       # H's; the others' keys as before
        what = [self.cache_key, name, extra, [t.name for t in self.tracked], self._sketch, self.max_length, self.stride,
                self.chat, self.batch_size, "empirical" if empirical else self.task.samples, str(self.projector.dtype),
                len(self.train)]
        return Path(self.cache) / f"lm-{name}-{hashlib.sha1(json.dumps(what).encode()).hexdigest()[:16]}.npz"

    def _kept(self, name: str, default, extra: Optional[str] = ""):
        """The tensors kept under ``name`` (``default`` when there is no cache, ``extra`` is None (not
        cacheable) or there is no such file; a damaged file counts as none and is made again)."""
        if self.cache is None or extra is None:
            return default
        path = self._cache_path(name, extra)
        if not path.exists():
            return default
        try:
            with np.load(path, allow_pickle=False) as z:
                return tuple(torch.as_tensor(z[f"a{i}"]) for i in range(len(z.files)))
        except Exception:           # noqa: BLE001 - truncated or damaged: made again
            return default

    def _keep(self, name: str, arrays, extra: Optional[str] = "") -> None:
        if self.cache is not None and extra is not None:
            from .files import write_npz
            write_npz(self._cache_path(name, extra), **{f"a{i}": np.asarray(a) for i, a in enumerate(arrays)})

    def _made(self, name: str, make, extra: Optional[str] = ""):
        """``make()``'s tensors, or those kept from an earlier call with the same key."""
        kept = self._kept(name, None, extra)
        if kept is None:
            kept = make()
            self._keep(name, kept, extra)
        return kept

    def config(self) -> dict:
        """The options it was made with (saved beside scores), and what they resolved to."""
        return {**self.options_, "max_length": self.max_length, "tracked": [t.name for t in self.tracked]}

    def diagnostics(self) -> Dict[str, dict]:
        """Per method, fitted values worth recording: the projected dimension, H's damping and form,
        trackstar's normaliser, tracin's learning rates."""
        common = {"dim": self.projector.dim, "n_train": len(self.train)}
        out = {m: dict(common) for m in self.methods}
        for m in ("if", "rif"):
            if m in out and self.solver is not None:
                out[m].update(damping_absolute=self.damping_absolute, hessian="ekfac" if isinstance(
                    self.solver, EKFAC) else "full" if self.solver.full_ else "block",
                    fisher="empirical" if self.task.empirical else "true")
        if "trackstar" in out:
            out["trackstar"].update(normaliser=self.trackstar_normaliser, whitened=self.whitener is not None,
                                    mixing=self.trackstar_mix)
        if "tracin" in out:
            out["tracin"]["learning_rates"] = [lr for lr, _, _ in self.tracin_]
        if "bm25" in out:
            out["bm25"] = {"n_train": len(self.train), "library": "bm25s"}
        return out

    def _projector(self, forward: CausalForward, task) -> GradientProjector:
        return GradientProjector(forward, self.tracked, task, *self._sketch)

    def _windows(self, rows: List[dict], where: str) -> Windows:
        return Windows(self.tokenizer, rows, self.max_length, self.stride, where, self.chat)

    def scores(self, queries) -> Dict[str, np.ndarray]:
        """Per method, (queries, train) float64 scores of query rows (``prompt`` and ``completion``)."""
        return self._scores(queries)[0]

    def _scores(self, queries) -> Tuple[Dict[str, np.ndarray], torch.Tensor]:
        """(scores, the queries' summed NLL)."""
        sides, losses = self.sides(queries)
        return {m: s if isinstance(s, np.ndarray) else widened_product(*s) for m, s in sides.items()}, losses

    def sides(self, queries) -> Tuple[Dict[str, object], torch.Tensor]:
        """(per method the two sides of its inner product, ``(query side, training side)`` tensors
        (the query side float64, the training side as kept: the explainer's dtype for the gradient
        methods) whose products are its scores, or for ``bm25`` the score matrix itself; the queries'
        summed NLL). Dense scores, top-k, :func:`members` and the index are all formed from these."""
        asked, losses = self.query_sides(queries)
        train = self.train_sides()
        return {m: asked[m] if m == "bm25" else (asked[m], train[m]) for m in self.methods}, losses

    def train_sides(self) -> Dict[str, torch.Tensor]:
        """Per method but ``bm25``, the training rows' side of its inner product, (train, D), each
        made once, when first asked (the index writes these in shards); the gradient methods' in the
        explainer's dtype, gd and if one tensor, the kept gradients themselves (no float64 copy)."""
        if self._train_sides is None:
            self._train_sides = {}
        made = self._train_sides
        for m in self.methods:
            if m != "bm25" and m not in made:
                made[m] = self._train_side(m)
        return {m: made[m] for m in self.methods if m != "bm25"}

    def _train_side(self, method: str) -> torch.Tensor:
        if method == "nn":
            return self.hidden_
        if method == "tracin":                   # sum_c lr_c g_q^c . g_i^c, one product of stacked sides
            return torch.cat([train for _, _, train in self.tracin_], 1)
        if method == "trackstar":
            return self.trackstar_grads
        train = self.train_grads
        if method == "gc":
            return torch.as_tensor(unit_rows(train.numpy())).to(train.dtype)
        if method == "rif":                      # a zero row stays zero: its norm is clamped in its own dtype
            norms = self._train_solved_norms.sqrt().to(train.dtype).clamp_min(torch.finfo(train.dtype).tiny)
            return train / norms[:, None]
        return train                             # gd, if

    def query_sides(self, queries) -> Tuple[Dict[str, object], torch.Tensor]:
        """(per method the query rows' side of its inner product, float64 (queries, D), or for
        ``bm25`` its (queries, train) score matrix; the queries' summed NLL)."""
        queries = _query_rows(queries, "queries")
        windows = self._windows(queries, "queries")
        out: Dict[str, object] = {}
        losses = None
        if self.bm25_ is not None:
            out["bm25"] = self.bm25_.scores([row_text(q) for q in queries])
        if self.hidden_ is not None:
            out["nn"] = torch.as_tensor(unit_rows(hidden_means(self.forward, windows, self.batch_size).numpy()))
        if self.tracin_:
            out["tracin"] = torch.cat([lr * gradients(other, windows, self.batch_size, task=self.query_task)[0]
                                       .double() for lr, other, _ in self.tracin_], 1)
        if self.trackstar_ is not None:
            kept = self._whitened_queries
            if kept is not None and kept[0] == _digest(queries):
                q = kept[1]
            else:
                q, _, losses = gradients(self.trackstar_, windows, self.batch_size, task=self.query_task)
            q = self.whitener(q) if self.whitener is not None else q.double()
            out["trackstar"] = torch.as_tensor(unit_rows(q.numpy()))
        if self.train_grads is not None:
            g, _, losses = gradients(self.projector, windows, self.batch_size, task=self.query_task)
            g = g.double()
            out["gd"] = g
            if "gc" in self.methods:
                out["gc"] = torch.as_tensor(unit_rows(g.numpy()))
            if self.solver is not None:
                solved = self.solver.solve(g)
                out["if"] = solved
                if "rif" in self.methods:
                    out["rif"] = solved / (solved * g).sum(1).clamp_min(1e-300).sqrt()[:, None]
        if losses is None:
            losses = self._losses(windows)
        return {m: out[m] for m in self.methods}, losses

    def members(self, queries) -> list:
        """The methods as members of one scoring pass over ``queries``
        (:mod:`instattr.methods.scoring`: dense blocks or a running top-k), float32 sides."""
        from .methods.scoring import Member
        from .methods.sides import side
        out = []
        for m, s in self.sides(queries)[0].items():
            if isinstance(s, np.ndarray):
                out.append(Member(m, dense=lambda rows, s=s: s[rows], n_train=s.shape[1]))
            else:
                q = side(s[0].numpy())
                out.append(Member(m, test=lambda rows, q=q: q.rows(rows), train=side(s[1].numpy(), key=(m,))))
        return out

    def self_scores(self, method: str) -> np.ndarray:
        """(train,) float64: each training row's score against itself, higher = look first. ``if``:
        ``g_i^T H^-1 g_i`` (self-influence); ``gd``: ``|g_i|^2``; ``tracin``: ``sum_c lr_c |g_i^c|^2``;
        the cosines (``gc``, ``rif``, ``trackstar``, ``nn``: 1 against themselves): minus the mean score
        against the other rows, a row whose gradient opposes the rest's."""
        from .methods.base import mean_against_others
        if method not in self.methods or method == "bm25":
            raise InstattrError(f"self-scores: {method!r} is not one of the fitted gradient methods "
                                f"({', '.join(m for m in self.methods if m != 'bm25') or 'none'})")
        if method == "if":
            return self._train_solved_norms.double().numpy()
        if method == "gd":
            return self.train_grads.double().pow(2).sum(1).numpy()
        if method == "tracin":
            return sum(lr * train.double().pow(2).sum(1) for lr, _, train in self.tracin_).numpy()
        if method == "rif":      # rif(i, j) = u_i^T H^-1 u_j with u_i = g_i / sqrt(g_i^T H^-1 g_i): one solve
            n = len(self.train_grads)
            u = self.train_grads.double() / self._train_solved_norms.clamp_min(1e-300).sqrt()[:, None]
            together = (u @ self.solver.solve(u.sum(0, keepdim=True)).double().T)[:, 0]
            return (-(together - 1.0) / max(n - 1, 1)).numpy()
        units = self.trackstar_grads if method == "trackstar" else self.hidden_ if method == "nn" else \
            torch.as_tensor(unit_rows(self.train_grads.double().numpy()))
        return mean_against_others(units.numpy(), units.numpy())

    def token_scores(self, prompt: str, completion: str) -> Tuple[List[str], Dict[str, np.ndarray]]:
        """(the completion's tokens, per method ``gd``/``if`` a (tokens, train) matrix): each
        token's share of the query's score, ``g_t . g_i`` or ``g_t^T H^-1 g_i`` with ``g_t`` the
        gradient of that token's NLL. The rows sum to the query's score (the completion's gradient
        is the sum of its tokens'); a positive entry means the training row makes that token more
        likely. ``gc`` and ``rif`` do not split into sums and are not given per token."""
        if self.train_grads is None or not any(m in ("gd", "if") for m in self.methods):
            raise InstattrError("token_scores: needs gd or if among the methods")
        windows = self._windows([{"prompt": prompt, "completion": completion}], "token_scores")
        projector = self._projector(self.forward, TokenLosses(margin=self.query_task is not None))
        per_token, tokens = [], []
        for j, w in enumerate(windows.items):
            _, jac = projector.project(windows.batch([j]))
            per_token.append(jac[0].cpu().double())
            tokens += [self.tokenizer.decode([t]) for t in w.targets if t != IGNORE]
        g, out = torch.cat(per_token), {}
        if "gd" in self.methods:
            out["gd"] = widened_product(g, self.train_grads)
        if self.solver is not None and "if" in self.methods:
            out["if"] = widened_product(self.solver.solve(g), self.train_grads)
        return tokens, out

    def _losses(self, windows: Windows) -> torch.Tensor:
        """(rows,) each row's summed NLL, without gradients."""
        return torch.as_tensor(row_losses(self.forward, windows, self.batch_size)[0])

    def complete(self, prompt: str, max_new_tokens: int = 20) -> str:
        """The model's greedy completion of ``prompt`` (at most ``max_new_tokens``, and never past
        the model's context)."""
        model = self.forward.model
        from .models.causal import prompt_ids
        ids = torch.tensor([prompt_ids(self.tokenizer, prompt, self.chat)], device=next(model.parameters()).device)
        room = self.context - ids.shape[1]            # generation stops at the model's context
        if room < 1:
            raise InstattrError(f"complete: the prompt's {ids.shape[1]} tokens fill the model's context of "
                                f"{self.context}; give a completion or a shorter prompt")
        max_new_tokens = min(int(max_new_tokens), room)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=self.tokenizer.pad_token_id or
                                 self.tokenizer.eos_token_id)
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    def explain(self, prompt: str, completion: Optional[str] = None, k: int = 10,
                max_new_tokens: int = 20) -> LMExplanation:
        """The top ``k`` supporting and opposing training rows of a completion (greedy when not given)."""
        if completion is None:
            completion = self.complete(prompt, max_new_tokens)
            if not completion:
                raise InstattrError("explain: the model's greedy completion is empty; give one")
        if not isinstance(k, int) or k < 1:
            raise InstattrError(f"explain: k must be a positive integer, got {k!r}")
        scores, losses = self._scores([{"prompt": prompt, "completion": completion}])
        ids = [r.get("idx", i) for i, r in enumerate(self.train)]
        methods, chosen = {}, {}
        for m, s in scores.items():
            row = s[0]
            chosen[m] = list(dict.fromkeys([*np.argsort(-row, kind="stable")[:k], *np.argsort(row, kind="stable")[:k]]))
            methods[m] = {"supporting": [(ids[i], float(row[i])) for i in np.argsort(-row, kind="stable")[:k]],
                          "opposing": [(ids[i], float(row[i])) for i in np.argsort(row, kind="stable")[:k]]}
        shown = {ids[i]: self.train[i] for c in chosen.values() for i in c}
        tokens, per_token = [], {}
        if any(m in ("gd", "if") for m in self.methods):
            tokens, shares = self.token_scores(prompt, completion)
            per_token = {m: {ids[i]: [float(v) for v in shares[m][:, i]] for i in chosen[m]}
                         for m in shares if m in chosen}
        return LMExplanation(prompt, completion, float(-losses[0]), methods, shown, tokens, per_token)

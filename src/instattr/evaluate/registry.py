"""Evaluations by name: each registers itself once, and the CLI, ``reproduce`` and the report read it.

``@evaluation(name, order, title, intro, quick=..., flags=...)`` on a ``run_<name>(run, methods=None,
seed=0, **options) -> dict`` function registers it. An evaluation declares

- ``order``: its place in the report and in ``reproduce`` (ascending; the paper's evaluations
  10-50, data-debugging ones 60-80, timing, which reads what the others recorded, 90);
- ``title``, ``intro``: its section of the report;
- ``kind``: the runs it reads, ``classifier`` (default), ``language-model`` (:class:`~instattr.store.LMRun`)
  or both (a tuple);
- ``applies(run) -> bool``: whether it runs on a run of its kind (``reproduce`` skips it otherwise);
- ``quick``: the options ``reproduce --quick`` passes (smaller samples);
- ``flags``: the command-line flags ``instattr evaluate NAME`` accepts beyond ``--methods`` and
  ``--seed``: names of the shared :data:`FLAGS`, or :class:`Flag` objects of its own.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union


@dataclass(frozen=True)
class Flag:
    """One ``instattr evaluate`` option: ``--name`` sets the keyword ``key`` of the evaluation."""
    name: str
    key: str
    help: str
    type: Optional[type] = int          # None: a switch (store_true)
    choices: Optional[Tuple[str, ...]] = None
    default: object = None              # what argparse stores when the flag is absent (= not given)
    metavar: Optional[str] = None


FLAGS: Dict[str, Flag] = {f.name: f for f in (
    Flag("--n-test", "n_test", "sampled test examples", metavar="N"),
    Flag("--n-random", "n_random", "random removals per k", metavar="N"),
    Flag("--scope", "scope", "what is retrained or re-initialised: instattr's head on the frozen encoder output "
         "(head mode's default), the final linear layer on the frozen features (every other run's default), or "
         "(retrain, randomized) the top K transformer blocks and everything above them", type=str,
         metavar="head|final|top-K"),
    Flag("--all", "all", "every training example, not a sample", type=None),
    Flag("--device", "device", "auto (CUDA when present), cpu or cuda: where retraining runs", type=str,
         default="auto"),
)}


@dataclass(frozen=True)
class Evaluation:
    name: str
    order: float
    run: Callable[..., dict]
    title: str
    intro: str
    applies: Callable[[object], bool] = field(default=lambda run: True)
    quick: Dict[str, object] = field(default_factory=dict)
    flags: Tuple[Flag, ...] = ()
    kind: Union[str, Tuple[str, ...]] = "classifier"

    def takes(self, run) -> bool:
        """Whether it runs on ``run``: a run of its kind (or one of its kinds) for which ``applies`` says yes."""
        from ..store import LMRun
        kinds = (self.kind,) if isinstance(self.kind, str) else self.kind
        return ("language-model" if isinstance(run, LMRun) else "classifier") in kinds and self.applies(run)


_REGISTRY: Dict[str, Evaluation] = {}


def evaluation(name: str, order: float, title: str, intro: str, applies: Optional[Callable[[object], bool]] = None,
               quick: Optional[dict] = None, flags: Sequence[Union[str, Flag]] = (),
               kind: Union[str, Tuple[str, ...]] = "classifier"):
    """Decorator: register ``run_<name>`` as the evaluation ``name`` (see the module docstring)."""
    resolved = tuple(FLAGS[f] if isinstance(f, str) else f for f in flags)
    for f in resolved:
        known = FLAGS.get(f.name) or next((g for e in _REGISTRY.values() for g in e.flags if g.name == f.name), None)
        if known is not None and known != f:
            raise ValueError(f"evaluation {name!r}: flag {f.name} is already defined differently")

    def add(fn: Callable[..., dict]) -> Callable[..., dict]:
        if name in _REGISTRY and _REGISTRY[name].run is not fn:
            raise ValueError(f"evaluation {name!r} is already registered")
        _REGISTRY[name] = Evaluation(name, order, fn, title, intro, applies or (lambda run: True),
                                     dict(quick or {}), resolved, kind)
        return fn
    return add


def get_evaluation(name: str) -> Evaluation:
    if name not in _REGISTRY:
        raise ValueError(f"unknown evaluation {name!r}; choose from {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def evaluations() -> List[Evaluation]:
    """Every registered evaluation, in the report's order."""
    return sorted(_REGISTRY.values(), key=lambda e: e.order)


def all_flags() -> List[Tuple[Flag, List[str]]]:
    """Each flag any evaluation accepts, once, with the evaluations that accept it."""
    out: Dict[str, Tuple[Flag, List[str]]] = {}
    for e in evaluations():
        for f in e.flags:
            out.setdefault(f.name, (f, []))[1].append(e.name)
    return list(out.values())

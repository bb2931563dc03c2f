"""`instattr reproduce`: train, attribute, evaluate and report in one resumable job."""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

from .errors import InstattrError
from .store import Run, read_json, write_json

# --quick: a slice of the data and smaller evaluation samples; a few minutes on 2 cores.
QUICK_LIMITS = {"limit_train": 2000, "limit_eval": 300}
# (each evaluation's smaller samples are its registered ``quick`` options: instattr.evaluate.registry)


@dataclass(frozen=True)
class ReproduceConfig:
    quick: bool = False
    methods: str = "paper"
    seed: int = 0
    retrain_examples: Optional[int] = None  # test examples of remove-and-retrain (None: 50, --quick 5)


def _log(message: str) -> None:
    print(message, flush=True)  # flushed: a long job's log is read while it runs


def reproduce(source, out, config: ReproduceConfig = ReproduceConfig(), progress: bool = True,
              log: Callable[[str], None] = _log) -> Run:
    """Make the run (``source``: a TrainConfig trains one, an ImportConfig imports a model), then
    run every step that is not done yet; finished steps (recorded in reproduce.json) are skipped."""
    from .attribution import attribute_run
    from .evaluate import evaluations_for, get_evaluation, run_evaluation
    from .pipeline import ImportConfig, make_run
    from .report import build_report

    out = Path(out)
    state_path = out / "reproduce.json"
    wanted = {"quick": config.quick, "methods": config.methods, "seed": config.seed, "data": source.data}
    if isinstance(source, ImportConfig):
        wanted["model"] = source.model
    if config.retrain_examples is not None:
        wanted["retrain_examples"] = config.retrain_examples
    if (out / "run.json").exists():
        state = read_json(state_path) if state_path.exists() else {"config": None, "done": {}}
        if not isinstance(state, dict) or not isinstance(state.get("done", {}), dict):
            raise InstattrError(f"{state_path}: not a reproduce state file; delete it to start the steps over")
        state = {"config": state.get("config"), "done": dict(state.get("done", {}))}
        if state["config"] not in (None, wanted):
            raise InstattrError(f"{out}: made by reproduce with {state['config']}, not {wanted}; "
                                "use another --out or delete it")
        run = Run.load(out)
        log(f"resuming {out}")
    else:
        if config.quick:
            given = {k: getattr(source, k) for k in QUICK_LIMITS if getattr(source, k) is not None}
            if given:
                raise InstattrError(f"--quick sets {', '.join('--' + k.replace('_', '-') for k in QUICK_LIMITS)} "
                                    f"itself; drop --quick to choose them ({given})")
            source = replace(source, **QUICK_LIMITS)
        t = time.perf_counter()
        run = make_run(source, out, progress=progress)
        state = {"config": wanted, "done": {"train": time.perf_counter() - t}}
        write_json(state_path, state)
        m = run.metrics
        log(f"train: dev accuracy {m.get('dev_accuracy')}, test accuracy {m.get('test_accuracy')}")
    state["config"] = wanted

    def step(name: str, fn):
        if name in state["done"]:
            log(f"{name}: done earlier, skipped")
            return
        t = time.perf_counter()
        fn()
        state["done"][name] = time.perf_counter() - t
        write_json(state_path, state)
        log(f"{name}: {state['done'][name]:.1f} s")

    with run.writing("reproduce"):
        step("attribute", lambda: attribute_run(run, config.methods, progress=progress, log=lambda s: None))
        for name in evaluations_for(run):
            ev = get_evaluation(name)
            opts = dict(ev.quick) if config.quick else {}
            if name == "retrain" and config.retrain_examples is not None:
                opts["n_test"] = config.retrain_examples
            if "progress" in inspect.signature(ev.run).parameters:
                opts["progress"] = progress
            step(name, lambda name=name, opts=opts: run_evaluation(name, run, seed=config.seed, **opts))
        build_report(run)
    log(f"report: {run.path / 'report.html'}")
    return run

"""Which modules of a model are tracked: found by name and by what the model's own forward calls.

No table per family: a model's *blocks* are its longest ``nn.ModuleList`` of modules of one class
(BERT ``encoder.layer``, GPT-2 ``transformer.h``, Llama/Qwen2/ModernBERT ``layers``, DistilBERT
``transformer.layer``), and its *head* is every linear module outside the blocks that the forward
pass first calls after the first block starts (a pooler, a classification head, the final layer)
-- so an embedding projection called before the blocks (ELECTRA) is not head. Linear modules are
``nn.Linear`` and GPT-2's ``Conv1D`` (``y = x W + b`` with ``W`` of shape ``(in, out)``).

``track(...)`` picks the tracked modules: glob patterns over module names (``--modules``), or by
default the linear modules of the top ``layers`` blocks plus the head; for a PEFT adapter, the
linear modules whose parameters the adapter trains (its LoRA matrices and any ``modules_to_save``).
Each tracked module belongs to a *group* (``block{i}`` or ``head``), the diagonal blocks of a
block-diagonal Hessian.
"""
from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import InstattrError

DEFAULT_LAYERS = 3


def conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:      # pragma: no cover - transformers always has it
        return None
    return Conv1D


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or transformers' ``Conv1D``."""
    conv = conv1d_type()
    return isinstance(module, nn.Linear) or (conv is not None and isinstance(module, conv))


def linear_shape(module: nn.Module) -> Tuple[int, int, bool]:
    """(inputs, outputs, has a bias) of a linear module."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, module.bias is not None
    w = module.weight                       # Conv1D: (in, out)
    return int(w.shape[0]), int(w.shape[1]), getattr(module, "bias", None) is not None


def find_blocks(model: nn.Module) -> Tuple[str, nn.ModuleList]:
    """(name, ModuleList) of the model's transformer blocks: its longest ModuleList whose entries
    are all of one class."""
    best: Optional[Tuple[str, nn.ModuleList]] = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and len({type(m) for m in mod}) == 1:
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best is None:
        raise InstattrError(f"{type(model).__name__}: no transformer blocks (a ModuleList of one kind of "
                            "module) to track; name the modules with --modules")
    return best


def first_tracked_block(n_blocks: int, layers: Optional[int]) -> int:
    """Index of the lowest tracked block; ``layers=None`` tracks the top 3 (all, if fewer)."""
    if layers is None:
        return max(0, n_blocks - DEFAULT_LAYERS)
    if not 0 <= int(layers) <= n_blocks:
        raise InstattrError(f"--layers must be between 0 and {n_blocks} for this {n_blocks}-block model, got {layers}")
    return n_blocks - int(layers)


@dataclass(frozen=True)
class Tracked:
    """One tracked linear module: its name in the model and its Hessian group."""
    name: str
    group: str


def call_order(model: nn.Module, run) -> Dict[str, int]:
    """Module name -> the position of its first call while ``run()`` runs the model's forward."""
    order: Dict[str, int] = {}
    handles = []

    def seen(name: str) -> None:
        order.setdefault(name, len(order))
    for name, mod in model.named_modules():
        handles.append(mod.register_forward_pre_hook(lambda m, args, n=name: seen(n)))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return order


def reaching(model: nn.Module, run) -> List[str]:
    """The linear modules whose output reaches the logits when ``run()`` runs the forward (a BERT
    encoder's unused pooler, say, does not), by one backward pass from the logits."""
    linear = {n: m for n, m in model.named_modules() if is_linear(m)}
    outputs: Dict[str, List[torch.Tensor]] = {}
    handles = [m.register_forward_hook(lambda mod, i, o, n=n: outputs.setdefault(n, []).append(o))
               for n, m in linear.items()]
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for m in linear.values():
            for p in m.parameters(recurse=False):
                p.requires_grad_(True)
        with torch.enable_grad():
            logits = run().logits
            names = [n for n, outs in outputs.items() for o in outs if o.requires_grad]
            tensors = [o for outs in outputs.values() for o in outs if o.requires_grad]
            grads = torch.autograd.grad(logits.sum(), tensors, allow_unused=True) if tensors else []
    finally:
        for h in handles:
            h.remove()
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    return sorted({n for n, g in zip(names, grads) if g is not None})


def _inside(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def head_modules(model: nn.Module, order: Dict[str, int], used: Sequence[str]) -> List[str]:
    """Linear modules outside the blocks, first called after the first block starts, whose output
    reaches the logits."""
    path, blocks = find_blocks(model)
    first = order.get(f"{path}.0" if path else "0")
    if first is None:
        raise InstattrError(f"{type(model).__name__}: its forward never ran its blocks {path}")
    return [n for n, m in model.named_modules() if is_linear(m) and not _inside(n, path)
            and order.get(n, -1) > first and n in used]


def group_of(name: str, path: str) -> str:
    """``block{i}`` for a module inside block i of the blocks at ``path``, else ``head``."""
    if _inside(name, path) and name != path:
        return "block" + name[len(path) + 1:].split(".")[0] if path else "block" + name.split(".")[0]
    return "head"


def track(model: nn.Module, order: Dict[str, int], used: Sequence[str], layers: Optional[int] = None,
          patterns: Optional[Sequence[str]] = None, trainable: Optional[Sequence[str]] = None,
          prefix: str = "") -> List[Tracked]:
    """The tracked linear modules, block by block and the head last, each in the model's module
    order (see the module docstring):
    ``patterns`` (globs over module names, each read after ``prefix``) if given; else a PEFT
    adapter's ``trainable`` parameter names if given; else the top ``layers`` blocks and the head.
    ``order`` and ``used``: the forward's first calls (:func:`call_order`) and the modules reaching
    the logits (:func:`reaching`)."""
    path, blocks = find_blocks(model)
    linear = {n: m for n, m in model.named_modules() if is_linear(m)}

    def own(name: str) -> str:                  # a name as the user's model spells it
        return name[len(prefix):] if prefix and name.startswith(prefix) else name

    if patterns:
        patterns = [prefix + p for p in patterns]
        names = [n for n in linear if any(fnmatchcase(n, p) for p in patterns)]
        for p in patterns:
            if not any(fnmatchcase(n, p) for n in linear):
                other = next((n for n, _ in model.named_modules() if fnmatchcase(n, p)), None)
                what = (f"only {own(other)}, a {type(model.get_submodule(other)).__name__}; only linear modules "
                        "(nn.Linear, Conv1D) are tracked") if other else \
                    f"no module of the model (e.g. {', '.join(own(n) for n in list(linear)[-3:])})"
                raise InstattrError(f"--modules {own(p)}: matches {what}")
    elif trainable is not None:
        trained = set(trainable)
        names = [n for n, m in linear.items()
                 if [f"{n}.{p}" for p, _ in m.named_parameters(recurse=False)]
                 and all(f"{n}.{p}" in trained for p, _ in m.named_parameters(recurse=False))]
        if not names:
            raise InstattrError(f"{type(model).__name__}: the adapter trains no linear module to track; name them "
                                "with --modules")
    else:
        start = first_tracked_block(len(blocks), layers)
        chosen = [f"{path}.{i}" if path else str(i) for i in range(start, len(blocks))]
        names = [n for n in linear if any(_inside(n, c) for c in chosen)]
        names += [n for n in head_modules(model, order, used) if n not in names]
    unused = [n for n in names if n not in used]
    if unused and (patterns or trainable is not None):
        raise InstattrError(f"{own(unused[0])}: the model's forward never uses it to compute the logits; it cannot be "
                            "tracked")
    names = [n for n in names if n in used]
    tracked = [Tracked(n, group_of(n, path)) for n in linear if n in names]

    def place(t: Tracked):      # each group contiguous (the block-diagonal Hessian's slices): blocks, then the head
        g = t.group[len("block"):]
        return (1, 0) if t.group == "head" else (0, int(g) if g.isdigit() else 0)
    return sorted(tracked, key=place)


def track_by_probe(model: nn.Module, probe: dict, layers: Optional[int] = None,
                   patterns: Optional[Sequence[str]] = None, trainable: Optional[Sequence[str]] = None,
                   prefix: str = "") -> List[Tracked]:
    """:func:`track` with the forward's call order and the modules reaching the logits found by
    running ``model(**probe)``; an adapter's ``trainable`` names apply unless ``patterns`` are given."""
    order = call_order(model, lambda: model(**probe))
    used = reaching(model, lambda: model(**probe))
    trainable = None if patterns else trainable
    return track(model, order, used, layers if trainable is None else None, patterns, trainable, prefix)

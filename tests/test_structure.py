"""The package's dependency direction: no import cycles, no lower module importing a higher one, and
the last-layer methods usable without torch. Imports inside functions count (they are how a cycle
hides)."""
import ast
import subprocess
import sys
from pathlib import Path

import instattr

SRC = Path(instattr.__file__).parent

# lower numbers may be imported by higher ones, never the other way round
LAYERS = {
    "errors": 0, "version": 0,
    "arrays": 1, "hf_data": 1, "manifest": 1, "device": 1, "files": 1,
    "data": 2, "runlock": 2,
    "store": 3,
    "encoders": 4, "methods": 4,
    "sentence": 5, "task": 5, "backend": 5,
    "models": 6,
    "layers": 7,
    "pipeline": 8, "lm": 8,
    "lmrun": 9,
    "attribution": 9,
    "ranking": 10, "index": 10, "suspects": 10,
    "distributed": 11,
    "evaluate": 12,
    "report": 13,
    "reproduce": 14, "serve": 14, "explainer": 14,
    "cli_args": 15,
    "cli_index": 16,
    "cli": 17,
    "__main__": 18, "__init__": 18,
}


def component(module: str) -> str:
    """``instattr.models.hf`` -> ``models``; ``instattr.store`` -> ``store``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(path: Path, module: str):
    """Every instattr module imported anywhere in the file (module level or inside functions)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("instattr"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("instattr"):
                yield target
                if not node.module or target.count(".") == 0:   # from . import x: x may be a module
                    yield from (f"{target}.{a.name}" for a in node.names)


def graph():
    edges = set()
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        for target in imports_of(path, module):
            a, b = component(module), component(target)
            if a != b and b in LAYERS:
                edges.add((a, b))
    return edges


def test_every_component_has_a_layer():
    names = {component(".".join(p.relative_to(SRC.parent).with_suffix("").parts)) for p in SRC.rglob("*.py")}
    assert names - set(LAYERS) == set(), "add the new module to LAYERS"


def test_no_module_imports_a_higher_one():
    bad = sorted((a, b) for a, b in graph() if LAYERS[b] >= LAYERS[a])
    assert bad == [], f"imports against the dependency direction: {bad}"


def test_no_import_cycles_between_components():
    edges = graph()
    nodes = {n for e in edges for n in e}
    seen, stack = set(), []

    def visit(n):
        if n in stack:
            raise AssertionError(f"import cycle: {' -> '.join(stack[stack.index(n):] + [n])}")
        if n in seen:
            return
        stack.append(n)
        for a, b in edges:
            if a == n:
                visit(b)
        stack.pop()
        seen.add(n)
    for n in sorted(nodes):
        visit(n)


def test_the_last_layer_methods_do_not_load_torch():
    code = ("import sys, numpy as np, instattr.methods as m\n"
            "from instattr.store import FeatureSet, FinalLayer\n"
            "f = np.eye(3); fs = FeatureSet(np.array(['a','b','c']), np.array([0,1,0]), np.array([0,1,0]),"
            " np.full((3,2),.5), f, f)\n"
            "m.get_method('if').fit(fs, FinalLayer(np.ones((2,3)), None, .1)).score(fs)\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "assert 'if-top' in m.registered()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(SRC.parent))
    assert out.returncode == 0, out.stderr

"""The package's floors stay true: every import edge between sparse_ssm's modules (module level or
inside functions: a lazy import is still a dependency) goes down the floors, none crosses to a
private name of another module, and there is no circle.  The checker is shown to fail on planted
violations."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sparse_ssm"

# floor -> the floors it may import (besides itself)
ALLOWED = {
    "util": set(),
    "ssm": set(),
    "model": {"ssm", "util"},
    "data": {"util"},
    "generate": {"model", "data", "util"},
    "train": {"ssm", "model", "data", "generate", "util"},
    "teacher": {"model", "data", "generate", "util"},
    "hf": {"ssm", "model", "data", "generate", "util"},
    "serve": {"model", "data", "generate", "util"},
    "tasks": {"ssm", "model", "data", "generate", "train", "util"},   # trains small models to evaluate a layer
    "config": {"model", "data", "generate", "train", "teacher", "util"},
    "cli": {"ssm", "model", "data", "generate", "train", "teacher", "hf", "serve", "tasks", "config", "util"},
    "": {"model", "util", "hf"},                      # sparse_ssm/__init__.py: the public face
}


def package_sources(root: Path = PACKAGE) -> dict[str, str]:
    """Module name (dotted, relative to the package; '' for the package itself) -> source.  The
    modules that are packages (an __init__.py) are listed in the key "__packages__" (a set)."""
    out, packages = {}, set()
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
            packages.add(".".join(parts))
        out[".".join(parts)] = path.read_text()
    out["__packages__"] = packages
    return out


def floor_of(module: str) -> str:
    return module.split(".")[0]


def imports_of(module: str, source: str, modules: set[str], is_package: bool) -> list[tuple[str, list[str]]]:
    """(imported package module, names taken from it) for every import in `source`."""
    here = module.split(".") if module else []
    base = here if is_package else here[:-1]
    edges = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(parts + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("sparse_ssm"):
                target = node.module[len("sparse_ssm."):] if node.module != "sparse_ssm" else ""
            else:
                continue
            names = [a.name for a in node.names]
            submodules = [f"{target}.{n}".strip(".") for n in names if f"{target}.{n}".strip(".") in modules]
            edges.append((target, [n for n in names if f"{target}.{n}".strip(".") not in modules]))
            edges.extend((m, []) for m in submodules)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("sparse_ssm."):
                    edges.append((a.name[len("sparse_ssm."):], []))
    return edges


def violations(sources: dict) -> list[str]:
    """Every forbidden edge, private cross-import and circle, as a readable line."""
    sources = dict(sources)
    packages = sources.pop("__packages__", set())
    modules = set(sources)
    found, graph = [], {m: set() for m in modules}
    for module, source in sources.items():
        for target, names in imports_of(module, source, modules, module in packages):
            if target == module:
                continue
            graph[module].add(target)
            src, dst = floor_of(module), floor_of(target)
            if src != dst and dst not in ALLOWED.get(src, set()):
                found.append(f"{module or 'sparse_ssm'} -> {target}: floor '{src}' may not import floor '{dst}'")
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and target != module:
                found.append(f"{module} -> {target}: imports the private name(s) {', '.join(private)}")
    # circles between modules (a module that is a package's __init__ importing its own children is fine)
    state = {}

    def visit(m, stack):
        state[m] = "open"
        for t in sorted(graph.get(m, ())):
            if t.startswith(m + ".") or m == "":
                continue
            if state.get(t) == "open":
                found.append("circle: " + " -> ".join(stack[stack.index(t):] + [t]))
            elif t in graph and t not in state:
                visit(t, stack + [t])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return found


def test_the_package_follows_its_floors():
    assert violations(package_sources()) == []


def test_every_floor_is_known_to_the_rules():
    sources = package_sources()
    sources.pop("__packages__")
    assert {floor_of(m) for m in sources} <= set(ALLOWED)


@pytest.mark.parametrize("planted, expected", [
    ({"ssm.scan": "from ..train import Trainer\n"}, "floor 'ssm' may not import floor 'train'"),
    ({"model.lm": "def f():\n    from ..generate import stream_generate\n"}, "floor 'model' may not import floor 'generate'"),
    ({"teacher.synthetic": "from sparse_ssm.train.trainer import Trainer\n"}, "floor 'teacher' may not import floor 'train'"),
    ({"data.sources": "from ..util.files import _temporary_sibling\n"}, "private name"),
    ({"ssm.kernels": "def f():\n    from ...model import SparseSSMConfig\n"}, "floor 'ssm' may not import floor 'model'"),
    ({"train.optim": "from .trainer import Trainer\n", "train.trainer": "from .optim import build_optimizer\n"},
     "circle"),
])
def test_the_checker_finds_planted_violations(planted, expected):
    sources = package_sources()
    for module, source in planted.items():
        sources[module] = sources.get(module, "") + "\n" + source
    found = violations(sources)
    assert any(expected in line for line in found), found

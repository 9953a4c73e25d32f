"""The package's layering, read from its source: which module may import which.

The rules (README, "Layout"):
- no import cycle between the package's modules;
- the model layer imports nothing of the package but its errors;
- data and tokenizer import neither the training package nor a stage;
- no stage imports the training package;
- imports of package modules sit at the top of a module, except in the entry points and the few
  places listed in FUNCTION_LEVEL, each with its reason.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tinyllama"

STAGES = {
    "tinyllama.evaluate",
    "tinyllama.sample",
    "tinyllama.chat",
    "tinyllama.export",
    "tinyllama.export_gguf",
    "tinyllama.inspection",
    "tinyllama.compare",
    "tinyllama.serve.server",
    "tinyllama.serve.api",
    "tinyllama.cli",
}

# Entry points import each stage when it is asked for, so that `--help` and each stage start fast.
ENTRY_POINTS = {"tinyllama.cli", "tinyllama.course.__main__"}

# (importing module, imported module): the function-level package imports allowed elsewhere.
FUNCTION_LEVEL: Dict[Tuple[str, str], str] = {}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> List[Tuple[str, bool]]:
    """(imported package module, whether inside a function) for every import in `path`."""
    name = _module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: List[Tuple[str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and ast.unparse(child.test) in (
                "TYPE_CHECKING",
                "typing.TYPE_CHECKING",
            ):
                continue  # annotations only: never imported at run time
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((a.name, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package[: len(package) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                found.append((target, in_function))
                # `from tinyllama.data import loader` imports the submodule tinyllama.data.loader
                found.extend(
                    (f"{target}.{a.name}", in_function)
                    for a in child.names
                    if (PACKAGE.parent / f"{target}.{a.name}".replace(".", "/")).exists()
                    or (PACKAGE.parent / (f"{target}.{a.name}".replace(".", "/") + ".py")).exists()
                )
            visit(child, inside)

    visit(ast.parse(path.read_text()), False)
    return [(m, f) for m, f in found if m == "tinyllama" or m.startswith("tinyllama.")]


def _graph() -> Dict[str, List[Tuple[str, bool]]]:
    return {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


GRAPH = _graph()


def _in(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_the_graph_is_read():
    """Guards the rules below against an empty graph (a moved package would pass them all)."""
    assert "tinyllama.model.heads" in GRAPH and "tinyllama.train.loop" in GRAPH
    assert ("tinyllama.model.config", False) in GRAPH["tinyllama.model.heads"]
    assert all(s in GRAPH for s in STAGES), sorted(STAGES - set(GRAPH))


def test_no_import_cycle():
    edges: Dict[str, Set[str]] = {m: set() for m in GRAPH}
    for module, imports in GRAPH.items():
        for target, _ in imports:
            if target in GRAPH and target != module and not module.startswith(target + "."):
                edges[module].add(target)  # a package's own __init__ is not a cycle
    state: Dict[str, int] = {}
    cycles: List[List[str]] = []

    def walk(node: str, path: List[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                walk(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(GRAPH):
        if module not in state:
            walk(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize(
    "layer, forbidden",
    [
        ("tinyllama.model", None),  # None: everything of the package but tinyllama.errors
        ("tinyllama.data", ("tinyllama.train", *STAGES)),
        ("tinyllama.tokenizer", ("tinyllama.train", *STAGES)),
        *[(stage, ("tinyllama.train",)) for stage in sorted(STAGES - {"tinyllama.cli"})],
    ],
)
def test_layer_imports(layer, forbidden):
    wrong = []
    for module, imports in GRAPH.items():
        if not _in(module, layer):
            continue
        for target, _ in imports:
            if forbidden is None:
                bad = not _in(target, layer, "tinyllama.errors")
            else:
                bad = _in(target, *forbidden)
            if bad:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_function_level_imports_are_the_listed_few():
    found = {
        (module, target)
        for module, imports in GRAPH.items()
        if module not in ENTRY_POINTS
        for target, in_function in imports
        if in_function
    }
    assert found <= set(FUNCTION_LEVEL), (
        "import these at the top of the module (or list them "
        "in FUNCTION_LEVEL with the reason):\n"
        + "\n".join(f"{m}: {t}" for m, t in sorted(found - set(FUNCTION_LEVEL)))
    )

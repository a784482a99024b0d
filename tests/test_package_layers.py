"""The package tree is the architecture: each sub-package imports only the layers below it.

A lower layer that imports a higher one (even inside a function, even under TYPE_CHECKING) fails
here, naming both modules, and so does an import cycle between modules of one layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import ckptmigrate

PACKAGE = Path(ckptmigrate.__file__).parent

#: Bottom to top; the same order as docs/architecture.md.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "version", "util", "example"),
    ("storage",),
    ("tensors",),
    ("formats",),
    ("ops",),
    ("checkpoint",),
    ("chain", "autogenerate"),
    ("release",),
    ("api", "testing", "leftovers"),
    ("integrations",),
    ("fleet",),
    ("cli",),
    ("__init__", "__main__"),
]


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    for level, names in enumerate(LAYERS):
        if top in names:
            return level
    raise AssertionError(f"{module} is in no layer: add its sub-package to LAYERS and docs/architecture.md")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def imports_of(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("ckptmigrate"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ckptmigrate"):
            for alias in node.names:  # `from ckptmigrate.chain import engine` imports the module engine
                sub = f"{node.module}.{alias.name}"
                where = PACKAGE.parent / sub.replace(".", "/")
                is_module = where.with_suffix(".py").exists() or (where / "__init__.py").exists()
                found.add(sub if is_module else node.module)
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_belongs_to_a_layer() -> None:
    for module in graph():
        layer_of(module)


def test_no_module_imports_a_higher_layer() -> None:
    upward = [
        f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
        for module, targets in graph().items()
        for target in sorted(targets)
        if target != "ckptmigrate" and layer_of(target) > layer_of(module)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycle_between_modules() -> None:
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(g.get(node, ())):
            if nxt not in g:
                continue
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in g:
        if node not in state:
            visit(node)


def test_the_check_catches_an_upward_import(tmp_path: Path) -> None:
    """The check itself can fail: a formats module that imported the engine would be reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from ckptmigrate.chain import engine\n")
    targets = imports_of(bad)
    assert targets == {"ckptmigrate.chain.engine"}
    assert layer_of("ckptmigrate.chain.engine") > layer_of("ckptmigrate.formats.torchzip")

"""Squash a run of revisions into one script, the old ids kept as aliases.

The new script holds each old ``upgrade`` (and ``downgrade``) as a function of its own, under its
old id, and runs them in order: one revision, one history entry, one inverse journal (the old
journals one after the other). The ops are not folded algebraically — scripts are code — so the
result is exactly what the run did. Files stamped at the last squashed id are at the new revision;
a file part-way through the run is walked back through its own journal and upgraded again.
"""

from __future__ import annotations

import ast
import string
import uuid
from pathlib import Path

from ckptmigrate.chain.revisions import Revision, RevisionGraph
from ckptmigrate.chain.scripts import ScriptDirectory
from ckptmigrate.errors import RevisionError

RESERVED = {"revision", "down_revision", "lineage", "branch_labels", "depends_on", "aliases", "final",
            "last_release", "upgrade", "downgrade"}

TEMPLATE = string.Template('''"""${message}

Squashes ${ids}.
Created: ${created}
"""
${imports}

revision = ${revision}
down_revision = ${down}
lineage = ${lineage}
aliases = ${aliases}
${final}
${shared}
${functions}

def upgrade(ckpt):
${upgrade_calls}
${downgrade}''')


def run_between(graph: RevisionGraph, first: str, last: str) -> list[Revision]:
    """``first`` … ``last``: a straight run (one parent each, no branch inside, no labels or dependencies)."""
    start, end = graph.get(first), graph.get(last)
    run = [end]
    while run[-1].id != start.id:
        rev = run[-1]
        if len(rev.downs) != 1:
            raise RevisionError(f"{rev} is a {'merge' if rev.downs else 'base'} on the way from {last} down to "
                                f"{first}: squash a straight run")
        run.append(graph.revisions[rev.downs[0]])
    run.reverse()
    if len(run) < 2:
        raise RevisionError(f"squash needs two or more revisions ({first} … {last})")
    for rev in run:
        inner = [c for c in rev.children if rev is not end]
        if len(inner) > 1:
            raise RevisionError(f"{rev} is a branch point ({', '.join(inner)}): squash a straight run")
        if rev.branch_labels or rev.depends_on or rev.aliases or rev.final:
            raise RevisionError(f"{rev} has branch labels, dependencies, aliases or a floor: squash it by hand")
    if len({r.lineage for r in run}) > 1:
        raise RevisionError(f"{first} … {last} spans lineages")
    return run


def _parts(rev: Revision) -> tuple[list[str], list[str], str, str | None]:
    """(imports, other top-level statements, the upgrade source, the downgrade source) of a script."""
    source = rev.path.read_text()
    tree = ast.parse(source, str(rev.path))
    imports, shared = [], []
    up = down = None
    for i, node in enumerate(tree.body):
        text = ast.get_source_segment(source, node) or ast.unparse(node)
        if i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # the docstring
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            imports.append(text)
        elif isinstance(node, ast.FunctionDef) and node.name in ("upgrade", "downgrade"):
            renamed = text.replace(f"def {node.name}(", f"def _{node.name}_{rev.id}(", 1)
            up, down = (renamed, down) if node.name == "upgrade" else (up, renamed)
        elif isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) and t.id in RESERVED for t in node.targets):
            continue
        else:
            shared.append(text)
    assert up is not None
    return imports, shared, up, down


def squash_source(run: list[Revision], message: str, rev_id: str, *, final: bool = False,
                  last_release: str | None = None, created: str = "") -> str:
    imports: list[str] = []
    shared: list[str] = []
    functions: list[str] = []
    downs: list[str | None] = []
    for rev in run:
        rev_imports, rev_shared, up, down = _parts(rev)
        imports += [i for i in rev_imports if i not in imports]
        shared += [s for s in rev_shared if s not in shared]
        functions.append(up)
        downs.append(down)
        if down is not None:
            functions.append(down)
    names = [n for s in shared for n in _defined(s)]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise RevisionError(f"the scripts define {', '.join(clash)} differently: rename them before squashing")
    if any(d is None for d in downs) and not all(d is None for d in downs):
        missing = [r.id for r, d in zip(run, downs, strict=True) if d is None]
        raise RevisionError(f"{', '.join(missing)} have no downgrade() and the others do: write one for them "
                            "(or squash a run whose downgrades all come from recorded inverses)")
    downgrade = ""
    if downs[0] is not None:
        calls = "".join(f"    _downgrade_{r.id}(ckpt)\n" for r in reversed(run))
        downgrade = f"\n\ndef downgrade(ckpt):\n{calls}"
    floor = f"final = True\nlast_release = {last_release!r}\n" if final else ""
    parent = run[0].downs[0] if run[0].downs else None
    return TEMPLATE.substitute(
        message=message, ids=", ".join(r.id for r in run), created=created,
        imports="\n".join(imports) + ("\n" if imports else ""), revision=repr(rev_id), down=repr(parent),
        lineage=repr(run[0].lineage), aliases=repr(tuple(r.id for r in run)), final=floor,
        shared="\n\n".join(shared) + ("\n" if shared else ""),
        functions="\n\n".join(functions) + "\n", upgrade_calls="".join(f"    _upgrade_{r.id}(ckpt)\n" for r in run),
        downgrade=downgrade,
    )


def _defined(statement: str) -> list[str]:
    node = ast.parse(statement).body[0]
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, ast.Assign):
        return [t.id for t in node.targets if isinstance(t, ast.Name)]
    return []


def squash(directory: ScriptDirectory, first: str, last: str, message: str, *, rev_id: str | None = None,
           final: bool = False, last_release: str | None = None, created: str = "") -> Path:
    """Replace ``first`` … ``last`` by one script; the old files go, their ids stay as aliases.

    The directory is checked with the new script in place before anything is removed; if it does
    not load, the old scripts stay and the new one is removed.
    """
    graph = directory.load()
    run = run_between(graph, first, last)
    rev_id = rev_id or uuid.uuid4().hex[:12]
    if graph.knows(rev_id) or rev_id in graph.labels or rev_id in graph.squashed:
        raise RevisionError(f"revision {rev_id!r} already exists")
    text = squash_source(run, message, rev_id, final=final, last_release=last_release, created=created)
    slug = "".join(ch if ch.isalnum() else "_" for ch in message.lower()).strip("_")[:40] or "squash"
    path = directory.versions / f"{rev_id}_{slug}.py"
    old = {r.path: r.path.read_bytes() for r in run}
    snapshot = run[-1].schema_path.read_bytes() if run[-1].schema_path.exists() else None
    path.write_text(text)
    for script in old:
        script.unlink()
    try:
        directory.load()
    except RevisionError:
        path.unlink()
        for script, data in old.items():
            script.write_bytes(data)
        raise
    for rev in run:
        rev.schema_path.unlink(missing_ok=True)
    if snapshot is not None:
        path.with_suffix(".schema.json").write_bytes(snapshot)
    return path

"""The script directory and its revision graph: ids, parents, lineages, heads, paths between them.

A migration file is a Python module with ``revision``, ``down_revision``, optional ``lineage``, a
docstring and ``upgrade(ckpt)`` (optional ``downgrade(ckpt)``). Each lineage is one straight chain
from a base to a head; everything else (an unknown parent, a cycle, a duplicate id, two heads in a
lineage) is refused when the directory is loaded, with an error naming the files involved.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import re
import string
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from ckptmigrate.errors import RevisionError

TEMPLATE = "script.py.tmpl"
#: The template shipped with ckptmigrate, copied by ``init`` and used when a directory has none.
DEFAULT_TEMPLATE = Path(__file__).with_name(TEMPLATE)


@dataclass
class Revision:
    id: str
    down: str | None
    declared_lineage: str | None
    message: str
    path: Path
    upgrade: Callable[[Any], None]
    downgrade: Callable[[Any], None] | None
    lineage: str | None = None
    children: list[str] = field(default_factory=list)

    @property
    def schema_path(self) -> Path:
        return self.path.with_suffix(".schema.json")

    def schema(self) -> dict[str, Any] | None:
        """The schema this revision produces, when a snapshot was recorded beside the script."""
        if not self.schema_path.exists():
            return None
        try:
            return json.loads(self.schema_path.read_text())
        except ValueError as exc:
            raise RevisionError(f"{self.schema_path}: not valid JSON ({exc})") from exc

    def __str__(self) -> str:
        return f"{self.id} ({self.path.name})"


def _import_script(path: Path) -> ModuleType:
    name = "ckptmigrate_revision_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise RevisionError(f"{path}: cannot be imported as a migration script", script=path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        raise RevisionError(f"{path}:{exc.lineno}: syntax error in migration script: {exc.msg}", script=path) from exc
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - any import-time failure is the script's
        raise RevisionError(f"{path}: importing the migration script raised {type(exc).__name__}: {exc}",
                            script=path) from exc
    return module


def _revision_from(path: Path) -> Revision:
    module = _import_script(path)
    rev = getattr(module, "revision", None)
    if not isinstance(rev, str) or not rev:
        raise RevisionError(f"{path}: a migration script needs `revision = \"<id>\"`", script=path)
    if not hasattr(module, "down_revision"):
        raise RevisionError(f"{path}: a migration script needs `down_revision` (None for the first)", script=path)
    down = module.down_revision
    if down is not None and not isinstance(down, str):
        raise RevisionError(f"{path}: down_revision must be a string or None", script=path)
    upgrade = getattr(module, "upgrade", None)
    if not callable(upgrade):
        raise RevisionError(f"{path}: a migration script needs an `upgrade(ckpt)` function", script=path)
    downgrade = getattr(module, "downgrade", None)
    message = next(iter((module.__doc__ or "").strip().splitlines()), "")
    lineage = getattr(module, "lineage", None)
    return Revision(rev, down, lineage, message, path, upgrade, downgrade if callable(downgrade) else None)


class RevisionGraph:
    """Revisions by id, validated: every parent known, no cycle, one head per lineage."""

    def __init__(self, revisions: list[Revision]) -> None:
        self.revisions: dict[str, Revision] = {}
        for rev in revisions:
            if rev.id in self.revisions:
                other = self.revisions[rev.id]
                raise RevisionError(f"revision {rev.id!r} is defined twice: {other.path} and {rev.path}")
            self.revisions[rev.id] = rev
        for rev in revisions:
            if rev.down is not None:
                if rev.down not in self.revisions:
                    raise RevisionError(f"{rev.path}: down_revision {rev.down!r} is not a known revision")
                self.revisions[rev.down].children.append(rev.id)
        self._check_cycles()
        self._assign_lineages()

    def _check_cycles(self) -> None:
        for start in self.revisions.values():
            seen: list[str] = []
            rev: Revision | None = start
            while rev is not None:
                if rev.id in seen:
                    loop = seen[seen.index(rev.id):] + [rev.id]
                    files = ", ".join(self.revisions[r].path.name for r in loop[:-1])
                    raise RevisionError(f"revisions form a cycle: {' -> '.join(loop)} (files: {files})")
                seen.append(rev.id)
                rev = self.revisions[rev.down] if rev.down is not None else None

    def _assign_lineages(self) -> None:
        bases = [r for r in self.revisions.values() if r.down is None]
        heads_by_lineage: dict[str | None, list[Revision]] = {}
        for base in bases:
            stack: list[tuple[Revision, str | None]] = [(base, base.declared_lineage)]
            while stack:
                rev, inherited = stack.pop()
                if rev.declared_lineage is not None and inherited is not None and rev.declared_lineage != inherited:
                    raise RevisionError(
                        f"{rev.path}: lineage {rev.declared_lineage!r} differs from its parent's {inherited!r}"
                    )
                rev.lineage = rev.declared_lineage or inherited
                if not rev.children:
                    heads_by_lineage.setdefault(rev.lineage, []).append(rev)
                stack.extend((self.revisions[c], rev.lineage) for c in rev.children)
        for lineage, heads in heads_by_lineage.items():
            if len(heads) > 1:
                files = ", ".join(str(h) for h in heads)
                label = f"lineage {lineage!r}" if lineage else "the default lineage"
                raise RevisionError(
                    f"{label} has {len(heads)} heads: {files}; give each chain its own lineage "
                    "or point one down_revision at the other's head", heads=[h.id for h in heads],
                )
        self._heads = {lineage: heads[0] for lineage, heads in heads_by_lineage.items()}

    def __len__(self) -> int:
        return len(self.revisions)

    def heads(self) -> dict[str | None, Revision]:
        return dict(self._heads)

    def get(self, rev_id: str) -> Revision:
        """A revision by id or unique id prefix."""
        if rev_id in self.revisions:
            return self.revisions[rev_id]
        found = [r for r in self.revisions.values() if r.id.startswith(rev_id)]
        if len(found) == 1:
            return found[0]
        if found:
            raise RevisionError(f"revision prefix {rev_id!r} is ambiguous: {', '.join(r.id for r in found)}",
                                revision=rev_id, candidates=[r.id for r in found])
        known = ", ".join(sorted(self.revisions)[:10])
        raise RevisionError(f"unknown revision {rev_id!r} (known: {known or 'none'})", revision=rev_id,
                            candidates=sorted(self.revisions))

    def head(self, lineage: str | None = None) -> Revision:
        if lineage is None and None not in self._heads and len(self._heads) == 1:
            return next(iter(self._heads.values()))
        if lineage not in self._heads:
            names = ", ".join(repr(k) for k in self._heads) or "none"
            what = f"lineage {lineage!r}" if lineage else "default lineage"
            error = RevisionError(f"there is no {what} (lineages: {names})",
                                  heads=[h.id for h in self._heads.values()])
            error.cli_hint = "pass --lineage NAME"
            raise error
        return self._heads[lineage]

    def chain(self, lineage: str | None) -> list[Revision]:
        """base → head of one lineage."""
        out = []
        rev: Revision | None = self.head(lineage)
        while rev is not None:
            out.append(rev)
            rev = self.revisions[rev.down] if rev.down is not None else None
        return out[::-1]

    def lineages(self) -> list[str | None]:
        return list(self._heads)

    def resolve(self, target: str, current: str | None, lineage: str | None) -> str | None:
        """``head``, ``base``, ``+N``/``-N`` relative to ``current``, or a revision id → id (None: base)."""
        chain = [r.id for r in self.chain(lineage)]
        if target == "head":
            return chain[-1]
        if target == "base":
            return None
        if re.fullmatch(r"[+-]\d+", target):
            pos = chain.index(current) if current is not None else -1
            new = pos + int(target)
            if new < -1 or new >= len(chain):
                where = current or "base"
                raise RevisionError(f"{target} from {where} goes past the end of the chain ({len(chain)} revisions)")
            return None if new == -1 else chain[new]
        rev = self.get(target)
        if rev.lineage != lineage:
            raise RevisionError(f"revision {rev.id} is in lineage {rev.lineage!r}, not {lineage!r}")
        return rev.id

    def path(self, current: str | None, target: str | None, lineage: str | None) -> tuple[str, list[Revision]]:
        """("upgrade", revisions to apply) or ("downgrade", revisions to undo), in order."""
        chain = self.chain(lineage)
        ids = [r.id for r in chain]
        for rev in (current, target):
            if rev is not None and rev not in ids:
                raise RevisionError(f"revision {rev} is not in lineage {lineage!r}")
        cur = ids.index(current) if current is not None else -1
        tgt = ids.index(target) if target is not None else -1
        if tgt >= cur:
            return "upgrade", chain[cur + 1 : tgt + 1]
        return "downgrade", chain[tgt + 1 : cur + 1][::-1]

    def lineage_of(self, rev_id: str) -> str | None:
        return self.get(rev_id).lineage


@dataclass
class ScriptDirectory:
    """Where the migration scripts live: a directory, or the package an importable module names."""

    root: Path
    #: the pyproject.toml that named this directory; its scripts are imported only if the user's own
    discovered_from: Path | None = None

    @property
    def versions(self) -> Path:
        return self.root / "versions" if (self.root / "versions").is_dir() else self.root

    @classmethod
    def from_spec(cls, spec: str | Path, base: Path | None = None) -> ScriptDirectory:
        """A directory path (relative to ``base``) or a dotted module path (``mylib.ckpt_migrations``)."""
        path = Path(spec)
        if not path.is_absolute() and base is not None:
            path = base / path
        if path.is_dir():
            return cls(path)
        if isinstance(spec, str) and re.fullmatch(r"[A-Za-z_][\w.]*", spec):
            try:
                module = importlib.import_module(spec)
            except ImportError:
                module = None
            if module is not None and getattr(module, "__path__", None):
                return cls(Path(next(iter(module.__path__))))
        raise RevisionError(f"migrations {str(spec)!r}: neither a directory nor an importable package")

    def load(self) -> RevisionGraph:
        if not self.versions.is_dir():
            error = RevisionError(f"{self.root}: no migrations directory")
            error.cli_hint = "create one with `ckptmigrate init`"
            raise error
        scripts = sorted(p for p in self.versions.glob("*.py") if not p.name.startswith("_"))
        if self.discovered_from is not None:
            from ckptmigrate.chain.trust import check_scripts

            check_scripts(self.root, self.versions, scripts, self.discovered_from)
        return RevisionGraph([_revision_from(p) for p in scripts])

    def template(self) -> str:
        local = self.root / TEMPLATE
        if local.is_file():
            return local.read_text()
        return DEFAULT_TEMPLATE.read_text()

    def write_revision(
        self, message: str, *, rev_id: str | None = None, lineage: str | None = None,
        graph: RevisionGraph | None = None, created: str = "", body: str | None = None,
    ) -> Path:
        """A new script on top of the lineage's head (or a new base when the lineage is new)."""
        graph = graph or self.load()
        rev_id = rev_id or uuid.uuid4().hex[:12]
        if not re.fullmatch(r"[A-Za-z0-9_]+", rev_id):
            raise RevisionError(f"revision id {rev_id!r} may hold only letters, digits and _")
        if rev_id in graph.revisions:
            raise RevisionError(f"revision {rev_id!r} already exists ({graph.revisions[rev_id].path})")
        down = None
        if lineage in graph.heads() or (lineage is None and len(graph)):
            down = graph.head(lineage).id
        slug = re.sub(r"[^a-z0-9]+", "_", message.lower()).strip("_")[:40] or "revision"
        path = self.versions / f"{rev_id}_{slug}.py"
        text = string.Template(self.template()).safe_substitute(
            message=message, revision=rev_id, down_revision=down or "<base>", created=created,
            revision_repr=repr(rev_id), down_revision_repr=repr(down),
            lineage_repr=repr(lineage),
        )
        if body is not None:
            text = body
        path.write_text(text)
        sys.modules.pop(path.stem, None)
        return path

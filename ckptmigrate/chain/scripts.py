"""The script directory: migration files, how they are imported, and how new ones are written.

A migration file is a Python module with ``revision``, ``down_revision`` (an id, ``None`` or a tuple
of ids for a merge), optional ``lineage``, ``branch_labels`` and ``depends_on``, a docstring and
``upgrade(ckpt)`` (optional ``downgrade(ckpt)``).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import string
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from ckptmigrate.chain.revisions import Revision, RevisionGraph
from ckptmigrate.errors import RevisionError

TEMPLATE = "script.py.tmpl"
#: The template shipped with ckptmigrate, copied by ``init`` and used when a directory has none.
DEFAULT_TEMPLATE = Path(__file__).with_name(TEMPLATE)


def _import_script(path: Path) -> ModuleType:
    name = "ckptmigrate_revision_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise RevisionError(f"{path}: cannot be imported as a migration script", script=path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        raise RevisionError(f"{path}:{exc.lineno}: syntax error in migration script: {exc.msg}",
                            script=path) from exc
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - any import-time failure is the script's
        raise RevisionError(f"{path}: importing the migration script raised {type(exc).__name__}: {exc}",
                            script=path) from exc
    return module


def _names(path: Path, module: ModuleType, attr: str) -> tuple[str, ...]:
    """A module attribute that may be one string, None or a tuple/list of strings."""
    value = getattr(module, attr, None)
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (tuple, list)) and all(isinstance(v, str) and v for v in value):
        return tuple(value)
    raise RevisionError(f"{path}: {attr} must be a string, None or a tuple of strings", script=path)


def _revision_from(path: Path, default_lineage: str | None, source: str | None) -> Revision:
    module = _import_script(path)
    rev = getattr(module, "revision", None)
    if not isinstance(rev, str) or not rev:
        raise RevisionError(f"{path}: a migration script needs `revision = \"<id>\"`", script=path)
    if not hasattr(module, "down_revision"):
        raise RevisionError(f"{path}: a migration script needs `down_revision` (None for the first)",
                            script=path)
    try:
        downs = _names(path, module, "down_revision")
    except RevisionError:
        raise RevisionError(f"{path}: down_revision must be a string, None or a tuple of strings (a merge)",
                            script=path) from None
    upgrade = getattr(module, "upgrade", None)
    if not callable(upgrade):
        raise RevisionError(f"{path}: a migration script needs an `upgrade(ckpt)` function", script=path)
    downgrade = getattr(module, "downgrade", None)
    message = next(iter((module.__doc__ or "").strip().splitlines()), "")
    lineage = getattr(module, "lineage", None)
    if lineage is None and not downs:
        lineage = default_lineage
    return Revision(rev, downs, lineage, message, path, upgrade, downgrade if callable(downgrade) else None,
                    branch_labels=_names(path, module, "branch_labels"),
                    depends_on=_names(path, module, "depends_on"), source=source,
                    aliases=_names(path, module, "aliases"), final=getattr(module, "final", False) is True,
                    last_release=getattr(module, "last_release", None))


@dataclass
class ScriptDirectory:
    """Where the migration scripts live: a directory, or the package an importable module names.

    ``lineage`` is the lineage of base revisions that declare none (an installed chain's name);
    ``source`` names the distribution that ships it (``mylib 2.0``), recorded in history entries.
    """

    root: Path
    lineage: str | None = None
    source: str | None = None
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

    def scripts(self) -> list[Path]:
        return sorted(p for p in self.versions.glob("*.py") if not p.name.startswith("_"))

    def revisions(self) -> list[Revision]:
        if not self.versions.is_dir():
            error = RevisionError(f"{self.root}: no migrations directory")
            error.cli_hint = "create one with `ckptmigrate init`"
            raise error
        scripts = self.scripts()
        if self.discovered_from is not None:
            from ckptmigrate.chain.trust import check_scripts

            check_scripts(self.root, self.versions, scripts, self.discovered_from)
        return [_revision_from(p, self.lineage, self.source) for p in scripts]

    def load(self) -> RevisionGraph:
        return RevisionGraph(self.revisions())

    def template(self) -> str:
        local = self.root / TEMPLATE
        if local.is_file():
            return local.read_text()
        return DEFAULT_TEMPLATE.read_text()

    def write_revision(
        self, message: str, *, rev_id: str | None = None, lineage: str | None = None,
        graph: RevisionGraph | None = None, created: str = "", body: str | None = None,
        parents: tuple[str, ...] | None = None,
    ) -> Path:
        """A new script on top of the lineage's head (or a new base when the lineage is new); with
        ``parents``, on top of those (a merge when there are several)."""
        graph = graph or self.load()
        rev_id = rev_id or uuid.uuid4().hex[:12]
        if not re.fullmatch(r"[A-Za-z0-9_]+", rev_id):
            raise RevisionError(f"revision id {rev_id!r} may hold only letters, digits and _")
        if rev_id in graph.revisions or rev_id in graph.labels:
            raise RevisionError(f"revision {rev_id!r} already exists ({graph.get(rev_id).path})")
        down: Any = None
        if parents is not None:
            down = parents[0] if len(parents) == 1 else parents
        elif lineage in graph.heads() or (lineage is None and len(graph)):
            down = graph.head(lineage).id
        slug = re.sub(r"[^a-z0-9]+", "_", message.lower()).strip("_")[:40] or "revision"
        path = self.versions / f"{rev_id}_{slug}.py"
        shown = ", ".join(down) if isinstance(down, tuple) else down
        text = string.Template(self.template()).safe_substitute(
            message=message, revision=rev_id, down_revision=shown or "<base>", created=created,
            revision_repr=repr(rev_id), down_revision_repr=repr(down),
            lineage_repr=repr(lineage),
        )
        if body is not None:
            text = body
        path.write_text(text)
        sys.modules.pop(path.stem, None)
        return path

    def write_merge(self, message: str, revisions: list[str], *, rev_id: str | None = None,
                    created: str = "") -> Path:
        """A merge revision whose ``down_revision`` is the given revisions (heads, usually), in that order;
        ``["heads"]`` names the heads of the one lineage that has several, as Alembic's ``merge heads``."""
        graph = self.load()
        if revisions == ["heads"]:
            split = [[h.id for h in hs] for hs in graph.heads().values() if len(hs) > 1]
            if len(split) != 1:
                raise RevisionError(f"`merge heads` needs exactly one lineage with several heads, not {len(split)}; "
                                    "name the revisions")
            revisions = split[0]
        ids = [graph.get(r).id for r in revisions]
        if len(set(ids)) < 2:
            raise RevisionError(f"merge needs two or more different revisions, got {', '.join(revisions)}")
        for rid in ids:
            others = [o for o in ids if o != rid and rid in graph.ancestors(o)]
            if others:
                raise RevisionError(f"{rid} is an ancestor of {others[0]}: there is nothing to merge")
        lineages = {graph.revisions[r].lineage for r in ids}
        if len(lineages) > 1:
            raise RevisionError(f"{', '.join(ids)} are in different lineages ({', '.join(map(repr, lineages))}); "
                                "a merge joins branches of one lineage")
        return self.write_revision(message, rev_id=rev_id, lineage=graph.revisions[ids[0]].lineage,
                                   graph=graph, created=created, parents=tuple(ids))

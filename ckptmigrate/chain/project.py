"""The migration project as plain functions: its script directory (``init``), where its chains stand
(``heads``, ``history``), a new revision and the schema snapshot it produces (``new_revision``,
``record_schema``). The CLI commands of the same names only parse and print.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptmigrate.chain import config, trust
from ckptmigrate.chain.revisions import RevisionGraph
from ckptmigrate.chain.scripts import DEFAULT_TEMPLATE, TEMPLATE, ScriptDirectory
from ckptmigrate.checkpoint.envelope import now_utc, schema_of
from ckptmigrate.errors import BadInput, CkptMigrateError, CkptMigrateWarning

if TYPE_CHECKING:
    from ckptmigrate.checkpoint.lazy import Checkpoint

Migrations = str | os.PathLike[str] | RevisionGraph | None


def script_directory(migrations: str | os.PathLike[str] | None = None, *, cwd: Path | None = None) -> ScriptDirectory:
    """The script directory named by ``migrations`` (a path or a module), else by pyproject.toml."""
    if migrations is not None:
        return ScriptDirectory.from_spec(migrations if isinstance(migrations, str) else Path(migrations), Path.cwd())
    cfg = config.load(cwd)
    if cfg.migrations is None:
        error = BadInput("no migrations configured: name a script directory or package, or create one "
                         "with init() and record it in pyproject.toml")
        error.cli_hint = "pass --migrations DIR_OR_MODULE, or run `ckptmigrate init`"
        raise error
    cfg.require_trusted()
    directory = ScriptDirectory.from_spec(cfg.migrations, cfg.root)
    directory.discovered_from = cfg.pyproject
    return directory


def revision_graph(migrations: Migrations = None) -> RevisionGraph:
    """The validated revision graph of ``migrations`` (or of pyproject.toml's); with neither, every
    installed chain's (the entry-point group ``ckptmigrate.chains``)."""
    from ckptmigrate.chain import registry

    if isinstance(migrations, RevisionGraph):
        return migrations
    import_ops()
    if not configured(migrations) and registry.installed():
        return registry.combined()
    return script_directory(migrations).load()


def import_ops(cwd: Path | None = None) -> list[str]:
    """Import the modules ``[tool.ckptmigrate] ops`` names, which register the project's own ops
    (``@ckptmigrate.op``) before any script runs or any journal is walked back; return their names.

    They are code named by pyproject.toml, so they are imported only from the user's own project
    (:mod:`ckptmigrate.chain.trust`), with the project root importable.
    """
    import importlib
    import sys

    cfg = config.load(cwd)
    if not cfg.ops:
        return []
    if cfg.problem is not None:
        raise trust.UntrustedScripts(f"{cfg.problem}; ckptmigrate imports no op modules ({', '.join(cfg.ops)}) "
                                     "through it: import them yourself before migrating if you trust them",
                                     path=cfg.pyproject)
    if cfg.root is not None and str(cfg.root) not in sys.path:
        sys.path.insert(0, str(cfg.root))
    for name in cfg.ops:
        try:
            importlib.import_module(name)
        except CkptMigrateError as exc:  # a registration refused (a name clash): say which module
            raise BadInput(f"{cfg.pyproject}: [tool.ckptmigrate] ops {name!r}: {exc}", path=cfg.pyproject) from exc
        except Exception as exc:  # noqa: BLE001 - the project's own module can raise anything
            raise BadInput(f"{cfg.pyproject}: [tool.ckptmigrate] ops {name!r} cannot be imported: "
                           f"{type(exc).__name__}: {exc}", path=cfg.pyproject) from exc
    return list(cfg.ops)


def configured(migrations: Migrations = None) -> bool:
    """True when ``migrations`` is given or pyproject.toml names a chain."""
    return migrations is not None or config.load().migrations is not None


def init(directory: str | os.PathLike[str] = "migrations", *, cwd: Path | None = None) -> tuple[Path, Path]:
    """Create ``directory/versions`` and its script template, and record ``directory`` in pyproject.toml;
    return (the directory, the pyproject.toml written).

    Refuses a directory that already holds scripts, and a project whose pyproject.toml already
    records another chain that has revisions: re-pointing it would orphan that chain.
    """
    here = cwd or Path.cwd()
    target = Path(directory) if Path(directory).is_absolute() else here / directory
    if (target / "versions").exists():
        raise BadInput(f"{directory}: already a script directory", path=directory)
    cfg = config.load(here)
    if cfg.migrations is not None:
        try:
            existing = ScriptDirectory.from_spec(cfg.migrations, cfg.root)
        except BadInput:
            existing = None
        scripts = sorted(existing.versions.glob("*.py")) if existing is not None and existing.versions.is_dir() else []
        if existing is not None and scripts and existing.root.resolve() != target.resolve():
            raise BadInput(
                f"{cfg.pyproject}: already records migrations = {cfg.migrations!r} ({len(scripts)} scripts in "
                f"{existing.root}); creating {directory} would orphan that chain. Keep using it, or edit "
                "[tool.ckptmigrate] migrations by hand to move it", path=cfg.pyproject,
            )
    (target / "versions").mkdir(parents=True)
    (target / TEMPLATE).write_text(DEFAULT_TEMPLATE.read_text())
    pyproject = config.find_pyproject(here) or here / "pyproject.toml"
    config.record_migrations(pyproject, os.path.relpath(target.resolve(), pyproject.resolve().parent))
    return target, pyproject


def heads(migrations: Migrations = None) -> list[dict[str, Any]]:
    """The heads of each lineage: ``lineage``, ``head``, ``message``, ``file``, ``branch_labels`` and
    ``heads_in_lineage`` (more than one: merge them)."""
    graph = revision_graph(migrations)
    return [{"lineage": lin, "head": rev.id, "message": rev.message, "file": str(rev.path),
             "branch_labels": sorted(rev.labels), "heads_in_lineage": len(revs)}
            for lin, revs in graph.heads().items() for rev in revs]


def history(migrations: Migrations = None) -> list[dict[str, Any]]:
    """Every revision, newest first per lineage, with its parents (a merge has several), file, branch
    labels, dependencies, script hash, and whether it has a written ``downgrade()`` and a schema snapshot."""
    graph = revision_graph(migrations)
    rows: list[dict[str, Any]] = []
    for lin in graph.lineages():
        for rev in reversed(graph.chain(lin)):
            down = rev.downs[0] if len(rev.downs) == 1 else (list(rev.downs) or None)
            rows.append({"revision": rev.id, "down_revision": down, "down_revisions": list(rev.downs),
                         "lineage": lin, "message": rev.message, "file": str(rev.path),
                         "branch_labels": list(rev.branch_labels), "depends_on": list(rev.dependencies),
                         "head": not rev.children, "merge": rev.is_merge,
                         "has_downgrade": rev.downgrade is not None,
                         "schema": rev.schema_path.exists(), "sha256": rev.sha256()})
    return rows


def _model_schema(model: str | None) -> dict[str, Any]:
    from ckptmigrate.chain import schemas

    return schemas.model_schema(schemas.model_spec(model))


def record_schema(revision: str, source: Any = None, *, model: str | None = None,
                  migrations: Migrations = None) -> Path:
    """Record the schema ``revision`` produces beside its script — what unstamped checkpoints are
    recognised by — from ``source`` (a model, a state dict or a checkpoint file), else from the model
    ``model`` names (``pkg.module:factory``, default: pyproject.toml's), built on ``meta`` for free."""
    from ckptmigrate.checkpoint.lazy import Checkpoint

    rev = revision_graph(migrations).get(revision)
    if source is None:
        schema = _model_schema(model)
    elif isinstance(source, (str, os.PathLike)):
        with Checkpoint.open(source) as ckpt:
            schema = ckpt.schema()
    else:
        state_dict = source.state_dict() if hasattr(source, "state_dict") and callable(source.state_dict) else source
        schema = schema_of(state_dict)
    rev.schema_path.write_text(json.dumps(schema, indent=1) + "\n")
    return rev.schema_path


def new_revision(
    message: str, *, rev_id: str | None = None, lineage: str | None = None, autogenerate: bool = False,
    model: str | None = None, migrations: str | os.PathLike[str] | None = None,
) -> Path:
    """Write a revision on top of the lineage's head and return its script.

    ``autogenerate`` writes the ops that take head's schema to the model's. Either way, when a model
    is named (``model`` or pyproject.toml), its schema is recorded as the revision's snapshot. A model
    named explicitly must build; a configured one that does not is warned about
    (:class:`~ckptmigrate.errors.CkptMigrateWarning`) and the script is written without a snapshot.
    """
    import warnings

    if autogenerate:
        return autogenerate_revision(message, rev_id=rev_id, lineage=lineage, migrations=migrations, model=model)
    schema = None
    if model is not None:
        schema = _model_schema(model)
    elif config.load().model:
        try:
            schema = _model_schema(None)
        except BadInput as exc:
            warnings.warn(f"no schema snapshot recorded for the new revision: {exc}", CkptMigrateWarning,
                          stacklevel=2)
    path = script_directory(migrations).write_revision(message, rev_id=rev_id, lineage=lineage, created=now_utc())
    if schema is not None:
        path.with_suffix(".schema.json").write_text(json.dumps(schema, indent=1) + "\n")
    return path


def autogenerate_revision(
    message: str, *, rev_id: str | None = None, lineage: str | None = None,
    migrations: str | os.PathLike[str] | None = None, model: str | None = None,
) -> Path:
    """Write a revision whose ops take head's schema to the current model's, and record its snapshot.

    With no revision yet, the first one describes the model as it is (no ops). Every guess carries a
    ``# REVIEW:`` comment in the generated script.
    """
    import uuid

    from ckptmigrate.autogenerate import plan as autogenerate
    from ckptmigrate.autogenerate import render as migration_source

    directory = script_directory(migrations)
    graph = directory.load()
    new = _model_schema(model)
    down = None
    steps: list[Any] = []
    if lineage in graph.heads() or (lineage is None and len(graph)):
        head = graph.head(lineage)
        old = head.schema()
        if old is None:
            error = BadInput(
                f"head {head.id} has no schema snapshot ({head.schema_path}); record one from a model or a "
                "checkpoint of that revision with record_schema()", path=head.schema_path,
            )
            error.cli_hint = f"ckptmigrate schema record {head.id} --from-checkpoint PATH (or --model M)"
            raise error
        down, lineage = head.id, head.lineage
        steps = autogenerate.generate(old, new)
    rev_id = rev_id or uuid.uuid4().hex[:12]
    body = migration_source.render(message, rev_id, down, lineage, steps)
    path = directory.write_revision(message, rev_id=rev_id, lineage=lineage, graph=graph, body=body)
    path.with_suffix(".schema.json").write_text(json.dumps(new, indent=1) + "\n")
    return path


def optional_graph(migrations: Any, ckpt: Checkpoint | None = None) -> RevisionGraph | None:
    """The chain for ``ckpt`` (or, without one, the configured chain); None when there is none. With
    nothing configured, the installed chain that knows ``ckpt`` (see :mod:`ckptmigrate.chain.registry`)."""
    from ckptmigrate.chain import registry

    if not configured(migrations):
        return None if ckpt is None else registry.ChainSource().find(ckpt.envelope)
    return revision_graph(migrations)

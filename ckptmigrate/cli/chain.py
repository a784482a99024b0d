"""Commands on the script directory: ``init``, ``revision``, ``heads`` and ``history``."""

from __future__ import annotations

import os
from pathlib import Path

import click

from ckptmigrate.cli.common import MIGRATIONS, emit_json
from ckptmigrate.errors import BadInput


@click.command()
@click.argument("directory", default="migrations", type=click.Path(path_type=Path))
def init(directory: Path) -> None:
    """Create a script directory and record it in pyproject.toml."""
    from ckptmigrate.chain import config
    from ckptmigrate.chain.revisions import DEFAULT_TEMPLATE, TEMPLATE

    if (directory / "versions").exists():
        raise BadInput(f"{directory}: already a script directory")
    (directory / "versions").mkdir(parents=True)
    template = DEFAULT_TEMPLATE.read_text()
    (directory / TEMPLATE).write_text(template)
    pyproject = config.find_pyproject() or Path("pyproject.toml")
    location = os.path.relpath(directory.resolve(), pyproject.resolve().parent)
    config.record_migrations(pyproject, location)
    click.echo(f"created {directory}/versions and {directory}/{TEMPLATE}; recorded in {pyproject}")


@click.command()
@click.option("-m", "--message", required=True, help="What the revision changes.")
@click.option("--rev-id", default=None, help="Revision id (default: random).")
@click.option("--lineage", default=None, help="Lineage (model family) of the new revision.")
@click.option("--autogenerate", is_flag=True,
              help="Write the ops that take head's schema to the current model's (review them!).")
@click.option("--model", default=None, metavar="PKG.MODULE:FACTORY", help="The current model, for --autogenerate.")
@MIGRATIONS
def revision(message: str, rev_id: str | None, lineage: str | None, autogenerate: bool, model: str | None,
             migrations: str | None) -> None:
    """Write a new migration script on top of the current head."""
    from ckptmigrate import api
    from ckptmigrate.checkpoint.envelope import now_utc

    if autogenerate:
        path = api.autogenerate_revision(message, rev_id=rev_id, lineage=lineage, migrations=migrations, model=model)
    else:
        path = api.script_directory(migrations).write_revision(
            message, rev_id=rev_id, lineage=lineage, created=now_utc()
        )
    click.echo(f"created {path}")
    _record_fixture(path, migrations, model)


def _record_fixture(script: Path, migrations: str | None, model: str | None) -> None:
    """With ``example_inputs`` configured, the new revision gets its fixture from today's model."""
    from ckptmigrate import testing
    from ckptmigrate.chain import config
    from ckptmigrate.errors import CkptMigrateError

    if not config.load().example_inputs:
        return
    try:
        recorded = testing.record_fixture("head", migrations=migrations, model=model)
    except CkptMigrateError as exc:
        click.echo(f"ckptmigrate: note: no fixture recorded for {script.name}: {exc}", err=True)
        return
    click.echo(f"recorded {recorded[0]}")


@click.command()
@MIGRATIONS
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def heads(migrations: str | None, as_json: bool) -> None:
    """The head revision of each lineage."""
    from ckptmigrate import api

    graph = api.revision_graph(migrations)
    rows = [{"lineage": lin, "head": rev.id, "message": rev.message, "file": str(rev.path)}
            for lin, rev in graph.heads().items()]
    if as_json:
        emit_json(rows)
        return
    for row in rows:
        lineage = f", lineage {row['lineage']}" if row["lineage"] else ""
        click.echo(f"{row['head']} (head{lineage}) {row['message']}")


@click.command()
@MIGRATIONS
@click.option("--verbose", "-v", is_flag=True, help="Show files and parents.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def history(migrations: str | None, verbose: bool, as_json: bool) -> None:
    """Every revision, newest first, per lineage."""
    from ckptmigrate import api

    graph = api.revision_graph(migrations)
    rows = []
    for lin in graph.lineages():
        for rev in reversed(graph.chain(lin)):
            rows.append({"revision": rev.id, "down_revision": rev.down, "lineage": lin,
                         "message": rev.message, "file": str(rev.path),
                         "has_downgrade": rev.downgrade is not None,
                         "schema": rev.schema_path.exists()})
    if as_json:
        emit_json(rows)
        return
    for row in rows:
        lineage = f" ({row['lineage']})" if row["lineage"] else ""
        click.echo(f"{row['down_revision'] or '<base>'} -> {row['revision']}{lineage}  {row['message']}")
        if verbose:
            click.echo(f"    file: {row['file']}")
            click.echo(f"    downgrade: {'written' if row['has_downgrade'] else 'from recorded inverses'}"
                       f"; schema snapshot: {'yes' if row['schema'] else 'no'}")

"""Commands on the script directory: ``init``, ``revision``, ``heads`` and ``history``."""

from __future__ import annotations

from pathlib import Path

import click

from ckptmigrate.cli.common import JSON, MIGRATIONS, emit_json


@click.command()
@click.argument("directory", default="migrations", type=click.Path(path_type=Path))
def init(directory: Path) -> None:
    """Create a script directory and record it in pyproject.toml."""
    from ckptmigrate import api
    from ckptmigrate.chain.scripts import TEMPLATE

    _root, pyproject = api.init(directory)
    click.echo(f"created {directory}/versions and {directory}/{TEMPLATE}; recorded in {pyproject}")


@click.command()
@click.option("-m", "--message", required=True, help="What the revision changes.")
@click.option("--rev-id", default=None, help="Revision id (default: random).")
@click.option("--lineage", default=None, help="Lineage (model family) of the new revision.")
@click.option("--autogenerate", is_flag=True,
              help="Write the ops that take head's schema to the current model's (review them!).")
@click.option("--model", default=None, metavar="PKG.MODULE:FACTORY",
              help="The current model (default: [tool.ckptmigrate] model): its schema is recorded as the "
                   "new revision's snapshot; --autogenerate writes the ops towards it.")
@MIGRATIONS
def revision(message: str, rev_id: str | None, lineage: str | None, autogenerate: bool, model: str | None,
             migrations: str | None) -> None:
    """Write a new migration script on top of the current head (and its schema snapshot, when a model is
    configured)."""
    from ckptmigrate import api

    path = api.new_revision(message, rev_id=rev_id, lineage=lineage, autogenerate=autogenerate, model=model,
                            migrations=migrations)
    snapshot = path.with_suffix(".schema.json")
    click.echo(f"created {path}" + (f" and {snapshot.name}" if snapshot.exists() else ""))
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
@JSON
def heads(migrations: str | None, as_json: bool) -> None:
    """The head revisions of each lineage; several in one lineage are a state: merge them."""
    from ckptmigrate import api
    from ckptmigrate.chain.revisions import merge_hint

    rows = api.heads(migrations)
    if as_json:
        emit_json(rows)
        return
    for n, row in enumerate(rows):
        lineage = f", lineage {row['lineage']}" if row["lineage"] else ""
        branch = f", branch {', '.join(row['branch_labels'])}" if row["branch_labels"] else ""
        click.echo(f"{row['head']} (head{lineage}{branch}) {row['message']}")
        last_of_lineage = n + 1 == len(rows) or rows[n + 1]["lineage"] != row["lineage"]
        if last_of_lineage and row["heads_in_lineage"] > 1:
            label = f"lineage {row['lineage']}" if row["lineage"] else "the default lineage"
            ids = [r["head"] for r in rows if r["lineage"] == row["lineage"]]
            click.echo(f"{label} has {len(ids)} heads; {merge_hint(ids)}")


@click.command()
@MIGRATIONS
@click.option("--verbose", "-v", is_flag=True, help="Show files and parents.")
@JSON
@click.option("--graph/--no-graph", "draw", default=None,
              help="Draw the branches and merges (the default on a terminal).")
@click.option("--dot", "as_dot", is_flag=True, help="Print the graph for Graphviz (`| dot -Tsvg`).")
def history(migrations: str | None, verbose: bool, as_json: bool, draw: bool | None, as_dot: bool) -> None:
    """Every revision, newest first, per lineage."""
    import sys

    from ckptmigrate import api
    from ckptmigrate.chain import drawing

    if as_dot:
        click.echo(drawing.dot(api.revision_graph(migrations)), nl=False)
        return
    rows = api.history(migrations)
    if as_json:
        emit_json(rows)
        return
    if draw if draw is not None else sys.stdout.isatty():
        for line in drawing.ascii_lines(api.revision_graph(migrations)):
            click.echo(line)
        return
    for row in rows:
        lineage = f" ({row['lineage']})" if row["lineage"] else ""
        downs = ", ".join(row["down_revisions"]) or "<base>"
        click.echo(f"{downs} -> {row['revision']}{lineage}  {row['message']}")
        if verbose:
            click.echo(f"    file: {row['file']}")
            click.echo(f"    downgrade: {'written' if row['has_downgrade'] else 'from recorded inverses'}"
                       f"; schema snapshot: {'yes' if row['schema'] else 'no'}")

"""Commands for a chain a team shares: ``merge`` (join two heads), ``chains`` (the installed ones),
``squash`` (many revisions into one)."""

from __future__ import annotations

import click

from ckptmigrate.cli.common import MIGRATIONS, emit_json


@click.command()
@click.argument("revisions", nargs=-1, required=True)
@click.option("-m", "--message", required=True, help="What the merge joins.")
@click.option("--rev-id", default=None, help="Revision id (default: random).")
@MIGRATIONS
def merge(revisions: tuple[str, ...], message: str, rev_id: str | None, migrations: str | None) -> None:
    """Write a merge revision whose down_revision is REVISIONS (two heads, usually; `heads`: all of them).

    Upgrading a checkpoint through it applies each branch's revisions it has not applied, the
    branches in the order given here; two branches that change the same key stop the upgrade.
    """
    from ckptmigrate import api
    from ckptmigrate.checkpoint.envelope import now_utc

    path = api.script_directory(migrations).write_merge(message, list(revisions), rev_id=rev_id, created=now_utc())
    click.echo(f"created {path}")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def chains(as_json: bool) -> None:
    """The migration chains installed packages ship (entry-point group `ckptmigrate.chains`)."""
    from ckptmigrate.chain import registry

    rows = [c.describe() for c in registry.installed()]
    if as_json:
        emit_json(rows)
        return
    if not rows:
        click.echo(f"no installed chains (a package registers one under the entry-point group "
                   f"{registry.GROUP!r}: lineage = package of scripts)")
    for row in rows:
        heads = ", ".join(row["heads"]) if row["heads"] else "-"
        state = f"cannot load: {row['error']}" if row["error"] else f"{row['revisions']} revisions, head {heads}"
        click.echo(f"{row['lineage']}  {row['package']}  ({row['distribution']} {row['version']}; {state})")


@click.command()
@click.argument("first")
@click.argument("last")
@click.option("-m", "--message", required=True, help="What the squashed revision does.")
@click.option("--rev-id", default=None, help="Revision id (default: random).")
@click.option("--final", is_flag=True, help="Make it a floor: files below it are refused.")
@click.option("--last-release", default=None, metavar="TEXT",
              help="With --final: the last release that can upgrade files below the floor (named in the refusal).")
@MIGRATIONS
def squash(first: str, last: str, message: str, rev_id: str | None, final: bool, last_release: str | None,
           migrations: str | None) -> None:
    """Replace the revisions FIRST … LAST by one; their ids stay as aliases, so stamped files resolve."""
    from ckptmigrate import api
    from ckptmigrate.chain.squash import squash as squash_run
    from ckptmigrate.checkpoint.envelope import now_utc

    path = squash_run(api.script_directory(migrations), first, last, message, rev_id=rev_id, final=final,
                      last_release=last_release, created=now_utc())
    click.echo(f"created {path}")

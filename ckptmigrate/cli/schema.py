"""Commands on schemas: ``check`` (for CI and pre-commit), ``diff`` and ``schema record``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ckptmigrate.cli.common import JSON, MIGRATIONS, emit_json
from ckptmigrate.errors import BadInput, CheckFailed

_MODEL = click.option("--model", default=None, metavar="PKG.MODULE:FACTORY",
                      help="The current model (default: [tool.ckptmigrate] model); built on the meta device.")


@click.command()
@click.argument("paths", nargs=-1)
@_MODEL
@MIGRATIONS
@click.option("--lineage", default=None, help="Lineage whose head to check.")
@JSON
def check(paths: tuple[str, ...], model: str | None, migrations: str | None, lineage: str | None,
          as_json: bool) -> None:
    """Exit 0 when the head revision's schema equals the current model's, 1 with the difference.

    With checkpoint PATHS, also warn of scripts edited since they ran on those files (exit code unchanged).
    """
    from ckptmigrate import api

    for path in api.checkpoint_files(paths) if paths else []:
        for warning in api.current(path, verbose=True, migrations=migrations).get("warnings", []):
            click.echo(f"ckptmigrate: warning: {warning}", err=True)
    result = api.check(model=model, migrations=migrations, lineage=lineage)
    if as_json:
        emit_json(result.to_dict())
    elif result.ok:
        click.echo(f"ok: head {result.head} matches {result.model}")
    else:
        click.echo(f"the model changed but no migration describes it (head {result.head} vs {result.model}):")
        for line in result.difference.lines():
            click.echo(f"  {line}")
        click.echo("write one: ckptmigrate revision -m MESSAGE --autogenerate")
    if not result.ok:
        failed = CheckFailed(f"model {result.model} differs from head revision {result.head}",
                             difference=result.difference.to_dict())
        if as_json:  # the verdict is the JSON above, not an {"error": ...} object; the exit code says it failed
            click.echo(f"ckptmigrate: error: {failed}", err=True)
            sys.exit(failed.exit_code)
        raise failed


@click.command()
@click.argument("a")
@click.argument("b", default="model")
@_MODEL
@MIGRATIONS
@JSON
def diff(a: str, b: str, model: str | None, migrations: str | None, as_json: bool) -> None:
    """Differences between two schemas: each of A and B is a checkpoint, a revision id or `model`.

    Added, removed, reshaped and probably renamed keys, grouped by module prefix.
    """
    from ckptmigrate import api

    result = api.diff(a, b, model=model, migrations=migrations)
    if as_json:
        emit_json(result.to_dict())
    elif result.same:
        click.echo(f"{result.a} and {result.b} have the same schema")
    else:
        click.echo(f"{result.a} -> {result.b}:")
        for line in result.difference.lines():
            click.echo(f"  {line}")


@click.group()
def schema() -> None:
    """Schema snapshots: what each revision's checkpoints look like (key -> shape, dtype)."""


@schema.command()
@click.argument("revision")
@_MODEL
@click.option("--from-checkpoint", "checkpoint", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Take the schema from this checkpoint (one at REVISION) instead of the model.")
@MIGRATIONS
def record(revision: str, model: str | None, checkpoint: Path | None, migrations: str | None) -> None:
    """Record the schema REVISION produces beside its script, from the model or a checkpoint.

    Unstamped checkpoints are recognised by these snapshots; `check` and `revision --autogenerate`
    compare against head's.
    """
    from ckptmigrate import api

    if model is not None and checkpoint is not None:
        raise BadInput("--model and --from-checkpoint exclude each other")
    path = api.record_schema(revision, checkpoint, model=model, migrations=migrations)
    click.echo(f"recorded {path}")

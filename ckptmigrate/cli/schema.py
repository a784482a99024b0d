"""Commands that compare schemas: ``check`` (for CI and pre-commit) and ``diff``."""

from __future__ import annotations

import json

import click

from ckptmigrate.cli.common import MIGRATIONS
from ckptmigrate.errors import CheckFailed

_MODEL = click.option("--model", default=None, metavar="PKG.MODULE:FACTORY",
                      help="The current model (default: [tool.ckptmigrate] model); built on the meta device.")


@click.command()
@_MODEL
@MIGRATIONS
@click.option("--lineage", default=None, help="Lineage whose head to check.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def check(model: str | None, migrations: str | None, lineage: str | None, as_json: bool) -> None:
    """Exit 0 when the head revision's schema equals the current model's, 1 with the difference."""
    from ckptmigrate import api
    from ckptmigrate.autogenerate.plan import diff_schemas
    from ckptmigrate.chain import schemas
    from ckptmigrate.errors import BadInput

    graph = api.revision_graph(migrations)
    head = graph.head(lineage)
    snapshot = head.schema()
    if snapshot is None:
        raise BadInput(f"head {head.id} has no schema snapshot ({head.schema_path})")
    spec = schemas.model_spec(model)
    difference = diff_schemas(snapshot, schemas.model_schema(spec))
    if as_json:
        click.echo(json.dumps({"head": head.id, "model": spec, "ok": difference.empty, **difference.to_dict()}))
    if not difference.empty:
        if not as_json:
            click.echo(f"the model changed but no migration describes it (head {head.id} vs {spec}):")
            for line in difference.lines():
                click.echo(f"  {line}")
            click.echo("write one: ckptmigrate revision -m MESSAGE --autogenerate")
        raise CheckFailed(f"model {spec} differs from head revision {head.id}")
    if not as_json:
        click.echo(f"ok: head {head.id} matches {spec}")


@click.command()
@click.argument("a")
@click.argument("b", default="model")
@_MODEL
@MIGRATIONS
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def diff(a: str, b: str, model: str | None, migrations: str | None, as_json: bool) -> None:
    """Differences between two schemas: each of A and B is a checkpoint, a revision id or `model`.

    Added, removed, reshaped and probably renamed keys, grouped by module prefix.
    """
    from ckptmigrate import api
    from ckptmigrate.autogenerate.plan import diff_schemas
    from ckptmigrate.chain import schemas
    from ckptmigrate.errors import BadInput

    try:
        graph = api.revision_graph(migrations)
    except BadInput:
        graph = None
    label_a, schema_a = schemas.resolve(a, graph=graph, model=model)
    label_b, schema_b = schemas.resolve(b, graph=graph, model=model)
    difference = diff_schemas(schema_a, schema_b)
    if as_json:
        click.echo(json.dumps({"a": label_a, "b": label_b, "same": difference.empty, **difference.to_dict()}))
        return
    if difference.empty:
        click.echo(f"{label_a} and {label_b} have the same schema")
        return
    click.echo(f"{label_a} -> {label_b}:")
    for line in difference.lines():
        click.echo(f"  {line}")

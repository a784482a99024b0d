"""``ckptmigrate test`` and ``ckptmigrate fixture record``: migrations proven by the model's outputs."""

from __future__ import annotations

import sys
import time

import click

from ckptmigrate.cli.common import MIGRATIONS, emit_json

_MODEL = click.option("--model", default=None, metavar="PKG.MODULE:FACTORY",
                      help="The fixture model (default: [tool.ckptmigrate] fixture_model, else model).")


@click.command("test")
@MIGRATIONS
@_MODEL
@click.option("--lineage", default=None, help="Lineage whose chain to test.")
@click.option("--every-revision", is_flag=True, help="Also fail (exit 1) when a revision has no recorded fixture.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def test(migrations: str | None, model: str | None, lineage: str | None, every_revision: bool, as_json: bool) -> None:
    """Upgrade every recorded fixture to head, run it in today's model and compare its outputs (exit 1
    naming the revision that broke the function); walk invertible chains back and compare tensors."""
    from ckptmigrate import api, testing
    from ckptmigrate.chain import fixtures

    start = time.perf_counter()
    graph = api.revision_graph(migrations)
    results = fixtures.check(graph, testing.fixture_model(model), lineage=lineage)
    elapsed = time.perf_counter() - start
    missing = fixtures.unrecorded(graph, lineage)
    failed = [r for r in results if not r.ok]
    if as_json:
        emit_json({"ok": not failed and not (every_revision and missing), "seconds": round(elapsed, 3),
                   "unrecorded": [rev.id for rev in missing], "results": [r.to_dict() for r in results]})
    else:
        for r in results:
            what = "upgrade to head" if r.kind == "upgrade" else "to head and back"
            worst = max(r.deviations.values(), default=0.0)
            detail = f"max deviation {worst:.2g}" if r.kind == "upgrade" and r.ok else r.problem or "tensors identical"
            steps = " -> ".join(r.steps) + (f" -> back to {r.revision}" if r.kind == "roundtrip" else "") or "-"
            click.echo(f"{'ok  ' if r.ok else 'FAIL'} fixture {r.revision} {what} ({steps}): {detail}")
        click.echo(f"{len(results)} checks, {len(failed)} failed, {elapsed:.2f} s")
        if failed:
            click.echo(testing.report(results), err=True)
        if missing:
            click.echo(testing.missing_line(missing), err=every_revision)
    if failed or (every_revision and missing):
        sys.exit(1)


@click.group("fixture")
def fixture() -> None:
    """Recorded fixtures: a seeded checkpoint per revision with its example inputs and outputs."""


@fixture.command("record")
@click.argument("revision", default="head")
@MIGRATIONS
@_MODEL
@click.option("--inputs", default=None, metavar="PKG.MODULE:FN",
              help="Example inputs (default: [tool.ckptmigrate] example_inputs).")
@click.option("--lineage", default=None, help="Lineage of the head, when REVISION is `head`.")
def record(revision: str, migrations: str | None, model: str | None, inputs: str | None, lineage: str | None) -> None:
    """Record REVISION's fixture (default: head) from the model as it is now, beside its script."""
    from ckptmigrate import testing

    checkpoint, io = testing.record_fixture(revision, migrations=migrations, model=model, inputs=inputs,
                                            lineage=lineage)
    click.echo(f"recorded {checkpoint} and {io}")

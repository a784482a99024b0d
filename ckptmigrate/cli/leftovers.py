"""``ckptmigrate leftovers``: what killed runs left behind, listed, and removed with ``--delete``."""

from __future__ import annotations

import sys

import click

from ckptmigrate.cli.common import JSON, emit_json


def _duration(_ctx: click.Context, _param: click.Parameter, value: str) -> float:
    from ckptmigrate.errors import BadInput
    from ckptmigrate.leftovers import parse_duration

    try:
        return parse_duration(value)
    except BadInput as exc:
        raise click.BadParameter(str(exc)) from None


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "age unknown"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit} old"
    return f"{seconds:.0f}s old"


@click.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("--older-than", default="1h", show_default=True, callback=_duration,
              help="Only what is at least this old (30m, 2h, 7d; 0 when no run is at work) counts as left behind.")
@click.option("--delete", is_flag=True,
              help="Remove what is provably left behind (conditionally, where the store can).")
@click.option("--abort-uploads", is_flag=True,
              help="Take open S3 multipart uploads this old as abandoned (S3 does not say who began one: "
                   "only when no other tool uploads there).")
@JSON
def leftovers(paths: tuple[str, ...], older_than: float, delete: bool, abort_uploads: bool, as_json: bool) -> None:
    """What killed ckptmigrate runs left under files, directories, objects or prefixes
    (s3://b/runs/): temporary files and objects, dead locks, open multipart uploads, journals no
    index names. Exit 0 when nothing is left (or all was removed), 1 when something is: a check a CI
    job can run. A journal an interrupted switch still needs is never deleted: run upgrade on it."""
    from ckptmigrate import api

    report = api.leftovers(paths, older_than=older_than, delete=delete, abort_uploads=abort_uploads)
    if as_json:
        emit_json(report)
    else:
        for item in report["leftovers"]:
            click.echo(f"{item['location']}: {item['kind']}, {_age(item['age'])}, {item['status']}"
                       + (f" ({item['note']})" if item["note"] else ""))
        removed = sum(i["status"] == "removed" for i in report["leftovers"])
        click.echo(f"{report['failing']} left behind" + (f", {removed} removed" if delete else ""))
    if report["failing"]:
        sys.exit(1)

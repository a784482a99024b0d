"""``sanitize``: make checkpoints load with ``torch.load(weights_only=True)``, torch ≥ 2.6's default."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from ckptmigrate.cli.common import JSON, LOCATION, emit_json, error_dict, error_line, files_bar, naming
from ckptmigrate.errors import BadInput, CkptMigrateError


def _print_row(row: dict[str, Any], dry_run: bool) -> None:
    path = row["path"]
    if row.get("note"):
        copied = f", copied to {row['output']}" if row["written"] else ""
        click.echo(f"{path}: {row['note']}{copied}")
        return
    if not row["converted"]:
        copied = f", copied to {row['output']}" if row["written"] else ""
        click.echo(f"{path}: nothing to convert, left untouched{copied}")
    else:
        where = f", written to {row['output']}" if row["output"] not in (None, path) else ""
        backup = f" (backup: {row['backup']})" if row["backup"] else ""
        click.echo(f"{path}: {'would convert' if dry_run else 'sanitized'}{where}{backup}")
        for item in row["converted"]:
            click.echo(f"    {item['global']} -> {item['to']}  x{item['count']}")
    if row.get("superseded"):
        click.echo("    its digest and signature covered the old bytes: dropped (stamp --sign again)")
    if row["weights_only"]:
        click.echo(f"    {'would load' if dry_run else 'loads'} with torch.load(weights_only=True)")
    else:
        called = set(row["called"])
        names = ", ".join(f"{n} (called)" if n in called else n for n in row["unsafe_globals"])
        click.echo(f"    still refused by torch.load(weights_only=True): {names} (left as it was, inert here)")


@click.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("-o", "--output", type=LOCATION, help="Write here (a path or a URL) instead of in place.")
@click.option("--overwrite", is_flag=True, help="With -o: replace an existing file.")
@click.option("--dry-run", is_flag=True, help="Show what would be converted and the verdict; write nothing.")
@click.option("--no-backup", is_flag=True, help="In place: do not keep the original as PATH.bak.")
@click.option("--key", default=None, metavar="LOCATION",
              help="Where the state dict sits in the payload (default: found, or the envelope's).")
@JSON
def sanitize(paths: tuple[str, ...], output: Path | None, overwrite: bool, dry_run: bool, no_backup: bool,
             key: str | None, as_json: bool) -> None:
    """Turn argparse Namespaces, numpy values, paths and OmegaConf configs in checkpoints (files,
    directories, globs) into plain data and tensors, so torch.load(weights_only=True) reads them.
    Nothing the pickle names is imported or run; anything else is left and named. Irreversible
    (the original is kept as PATH.bak). Exit 1 when a file still does not load with weights_only."""
    from ckptmigrate import api

    files = api.checkpoint_files(paths)
    if output is not None and len(files) != 1:
        raise BadInput("-o/--output takes exactly one input file")
    rows: list[dict[str, Any]] = []
    failed = blocked = 0
    watching = sys.stdout.isatty() and not as_json
    with files_bar(files, watching and len(files) > 1, "sanitize") as items:
        for path in items:
            try:
                with naming(path):
                    row = api.sanitize(path, output=output, overwrite=overwrite, dry_run=dry_run,
                                       backup=not no_backup, key=key)
            except CkptMigrateError as exc:
                if len(files) == 1:
                    raise
                click.echo(f"{path}: FAILED: {error_line(exc)}", err=True)
                rows.append({"path": str(path), "error": error_dict(exc)})
                failed += 1
                continue
            blocked += row["weights_only"] is False
            rows.append(row)
            if not as_json:
                _print_row(row, dry_run)
    if as_json:
        emit_json(rows[0] if len(rows) == 1 else rows)
    elif len(files) > 1:
        done = sum(1 for r in rows if r.get("written"))
        click.echo(f"{len(files)} files: {done} written, {blocked} still refused by weights_only, {failed} failed")
    if failed:
        sys.exit(2)
    if blocked:
        sys.exit(1)

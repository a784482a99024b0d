"""``upgrade`` and ``downgrade``: files, directories and globs walked along the chain."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from ckptmigrate.cli.common import JSON, LOCATION, MIGRATIONS, emit_json, fleet_options, fleet_run
from ckptmigrate.cli.convert import parse_size
from ckptmigrate.errors import BadInput
from ckptmigrate.util.progress import file_bar


def _migrate(direction: str, paths: tuple[str, ...], to: str, output: Path | None, overwrite: bool, dry_run: bool,
             no_backup: bool, from_rev: str | None, lineage: str | None, migrations: str | None,
             key: str | None, as_json: bool, trust_pickle: bool, state_dicts: tuple[str, ...],
             optimizer: str, max_shard_size: str | None, fleet: dict[str, Any]) -> None:
    from ckptmigrate import api

    files = api.checkpoint_files(paths)
    options = {"to": to, "output": output, "overwrite": overwrite,
               "dry_run": dry_run, "backup": not no_backup, "from_rev": from_rev, "lineage": lineage, "key": key,
               "trust_pickle": trust_pickle, "state_dicts": list(state_dicts), "optimizer": optimizer,
               "max_shard_size": parse_size(max_shard_size) if max_shard_size is not None else None}
    watching = sys.stdout.isatty() and not as_json
    rows, written, failed = [], 0, 0
    with file_bar(direction, files[0], show=watching and len(files) == 1):
        for result in fleet_run(direction, files, options, fleet=fleet, show=watching, migrations=migrations):
            row = _row(result)
            rows.append(row)
            written += result.result == "written"
            failed += result.error is not None
            if not as_json:
                _print_result(result, dry_run)
    if as_json:
        emit_json(rows if len(rows) > 1 else rows[0])
    elif len(rows) > 1:
        skipped = sum(1 for r in rows if r.get("skipped"))
        unchanged = len(rows) - written - failed - skipped
        click.echo(f"{len(rows)} files: {written} written, {unchanged} unchanged, "
                   + (f"{skipped} skipped (journal), " if skipped else "") + f"{failed} failed")
    if failed:
        sys.exit(2)


def _row(result: Any) -> dict[str, Any]:
    """The file's ``--json`` row: the engine's outcome, or what the journal or the failure says."""
    if result.result == "skipped":
        return {"path": result.path, "output": None, "direction": result.command, "from": result.before,
                "to": result.after, "revisions": [],
                "written": False, "backup": None, "error": None, "ops": [], "skipped": True}
    if result.detail is not None:
        return {**result.detail["row"], "error": None}
    return {"path": result.path, "output": None, "direction": None, "from": None, "to": None,
            "revisions": [], "written": False, "backup": None, "error": result.error, "ops": []}


def _count(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def _print_result(result: Any, dry_run: bool) -> None:
    from ckptmigrate.util.keygroups import group_keys

    if result.error is not None:
        click.echo(f"{result.path}: FAILED: {result.error['message']}", err=True)
        return
    if result.result == "skipped":
        click.echo(f"{result.path}: at {result.after}, done in the journal, skipped")
        return
    detail = result.detail
    row = detail["row"]
    if not detail["steps"]:
        copied = f", copied to {row['output']}" if row["written"] else ""
        click.echo(f"{row['path']}: {detail['describe']}, left untouched{copied}")
        return
    if dry_run:
        click.echo(f"{row['path']}: would {detail['describe']} (start from {detail['start_source']})")
        for step in row["ops"]:
            if not step["ops"]:
                click.echo(f"    {step['revision']}: no ops")
                continue
            click.echo(f"    {step['revision']}:")
            for op in step["ops"]:
                click.echo(f"      {op['op']} ({_count(op['keys'], 'key')})")
                for group in group_keys(op["touched"]):
                    click.echo(f"        {group}")
        return
    backup = f" (backup: {row['backup']})" if row["backup"] else ""
    written = f", written to {row['output']}" if row["output"] is not None and row["output"] != row["path"] else ""
    click.echo(f"{row['path']}: {detail['describe']}{written}{backup}")


_COMMON: list[Any] = [
    click.argument("paths", nargs=-1, required=True),
    click.option("-o", "--output", type=LOCATION, help="Write here (a path or a URL) instead of in place."),
    click.option("--overwrite", is_flag=True, help="With -o: replace an existing file."),
    click.option("--in-place", is_flag=True, help="Rewrite the file itself (the default without -o)."),
    click.option("--dry-run", is_flag=True, help="Print the plan and the keys each op touches; write nothing."),
    click.option("--no-backup", is_flag=True, help="In place: do not keep the original as PATH.bak."),
    click.option("--from", "from_rev", default=None, help="Revision of an unstamped checkpoint."),
    click.option("--lineage", default=None, help="Lineage, when the directory holds several."),
    click.option("--key", default=None, metavar="LOCATION",
                 help="Where the state dict sits in the payload (default: found, or the envelope's)."),
    click.option("--state-dict", "state_dicts", multiple=True, metavar="LOCATION",
                 help="A state dict to migrate, copies (EMA, best) included; repeatable (default: searched)."),
    click.option("--optimizer", type=click.Choice(["strict", "reset_new"]), default="strict", show_default=True,
                 help="Optimizer state when a migration adds a parameter: refuse, or start it fresh."),
    click.option("--max-shard-size", default=None, metavar="SIZE",
                 help="A sharded model: re-plan its shards to at most SIZE each (5GB, 500MiB)."),
    JSON,
    fleet_options,
    click.option("--trust-pickle", is_flag=True,
                 help="Run the file's pickle code so migrations see its extras as real objects. Trusted files only."),
    MIGRATIONS,
]


def _with_common(fn: Any) -> Any:
    for decorator in reversed(_COMMON):
        fn = decorator(fn)
    return fn


@click.command()
@click.option("--to", default="head", show_default=True, help="Target: REV, head or +N.")
@_with_common
def upgrade(paths: tuple[str, ...], to: str, output: Path | None, overwrite: bool, in_place: bool, dry_run: bool,
            no_backup: bool, from_rev: str | None, lineage: str | None, key: str | None,
            state_dicts: tuple[str, ...], optimizer: str, max_shard_size: str | None, as_json: bool,
            trust_pickle: bool, migrations: str | None, **fleet: Any) -> None:
    """Upgrade checkpoints (files, directories, globs) to a revision, in place by default."""
    if in_place and output is not None:
        raise BadInput("--in-place and -o/--output exclude each other")
    _migrate("upgrade", paths, to, output, overwrite, dry_run, no_backup, from_rev, lineage, migrations, key, as_json,
             trust_pickle, state_dicts, optimizer, max_shard_size, fleet)


@click.command()
@click.option("--to", required=True, help="Target: REV, -N or base.")
@_with_common
def downgrade(paths: tuple[str, ...], to: str, output: Path | None, overwrite: bool, in_place: bool, dry_run: bool,
              no_backup: bool, from_rev: str | None, lineage: str | None, key: str | None,
              state_dicts: tuple[str, ...], optimizer: str, max_shard_size: str | None, as_json: bool,
              trust_pickle: bool, migrations: str | None, **fleet: Any) -> None:
    """Walk checkpoints back down the chain to an older revision."""
    if in_place and output is not None:
        raise BadInput("--in-place and -o/--output exclude each other")
    _migrate("downgrade", paths, to, output, overwrite, dry_run, no_backup, from_rev, lineage, migrations, key, as_json,
             trust_pickle, state_dicts, optimizer, max_shard_size, fleet)

"""``upgrade`` and ``downgrade``: files, directories and globs walked along the chain."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from ckptmigrate.cli.common import JSON, MIGRATIONS, emit_json, error_dict, error_line, files_bar, naming
from ckptmigrate.errors import BadInput, CkptMigrateError
from ckptmigrate.util.progress import file_bar


def _migrate(direction: str, paths: tuple[str, ...], to: str, output: Path | None, overwrite: bool, dry_run: bool,
             no_backup: bool, from_rev: str | None, lineage: str | None, migrations: str | None,
             key: str | None, as_json: bool, trust_pickle: bool, state_dicts: tuple[str, ...],
             optimizer: str) -> None:
    from ckptmigrate import api
    from ckptmigrate.chain import config, engine

    graph = api.chain_source(migrations)
    declared = list(state_dicts) if state_dicts else config.load().state_dicts
    files = api.checkpoint_files(paths)
    if output is not None and len(files) != 1:
        raise BadInput("-o/--output takes exactly one input file")
    run = api.upgrade if direction == "upgrade" else api.downgrade
    results, rows = [], []
    watching = sys.stdout.isatty() and not as_json
    with files_bar(files, watching and len(files) > 1, direction) as items:
        for path in items:
            error: CkptMigrateError | None = None
            try:
                with naming(path), file_bar(direction, path, show=watching and len(files) == 1):
                    outcome = run(path, to=to, output=output, overwrite=overwrite, dry_run=dry_run,
                                  backup=not no_backup, from_rev=from_rev, lineage=lineage, key=key,
                                  trust_pickle=trust_pickle, migrations=graph, state_dicts=declared,
                                  optimizer=optimizer)
            except CkptMigrateError as exc:
                if len(files) == 1:
                    raise
                error = exc
                outcome = engine.Outcome(path, None, None, error=error_line(exc))
            results.append(outcome)
            rows.append({**outcome.to_dict(), "error": error_dict(error) if error is not None else None})
            if not as_json:
                _print_outcome(outcome, dry_run)
    failed = [r for r in results if r.error]
    if as_json:
        emit_json(rows if len(rows) > 1 else rows[0])
    elif len(results) > 1:
        done = sum(1 for r in results if r.written)
        click.echo(f"{len(results)} files: {done} written, "
                   f"{len(results) - done - len(failed)} unchanged, {len(failed)} failed")
    if failed:
        sys.exit(2)


def _count(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def _print_outcome(outcome: Any, dry_run: bool) -> None:
    from ckptmigrate.util.keygroups import group_keys

    if outcome.error:
        click.echo(f"{outcome.path}: FAILED: {outcome.error}", err=True)
        return
    plan = outcome.plan
    if not plan.steps:
        copied = f", copied to {outcome.output}" if outcome.written else ""
        click.echo(f"{outcome.path}: {plan.describe()}, left untouched{copied}")
        return
    if dry_run:
        click.echo(f"{outcome.path}: would {plan.describe()} (start from {plan.start_source})")
        for step in outcome.ops:
            if not step["ops"]:
                click.echo(f"    {step['revision']}: no ops")
                continue
            click.echo(f"    {step['revision']}:")
            for op in step["ops"]:
                click.echo(f"      {op['op']} ({_count(op['keys'], 'key')})")
                for group in group_keys(op["touched"]):
                    click.echo(f"        {group}")
        return
    backup = f" (backup: {outcome.backup})" if outcome.backup else ""
    written = f", written to {outcome.output}" if outcome.output is not None and outcome.output != outcome.path else ""
    click.echo(f"{outcome.path}: {plan.describe()}{written}{backup}")


_COMMON = [
    click.argument("paths", nargs=-1, required=True),
    click.option("-o", "--output", type=click.Path(path_type=Path), help="Write here instead of in place."),
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
    JSON,
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
            state_dicts: tuple[str, ...], optimizer: str, as_json: bool, trust_pickle: bool,
            migrations: str | None) -> None:
    """Upgrade checkpoints (files, directories, globs) to a revision, in place by default."""
    if in_place and output is not None:
        raise BadInput("--in-place and -o/--output exclude each other")
    _migrate("upgrade", paths, to, output, overwrite, dry_run, no_backup, from_rev, lineage, migrations, key, as_json,
             trust_pickle, state_dicts, optimizer)


@click.command()
@click.option("--to", required=True, help="Target: REV, -N or base.")
@_with_common
def downgrade(paths: tuple[str, ...], to: str, output: Path | None, overwrite: bool, in_place: bool, dry_run: bool,
              no_backup: bool, from_rev: str | None, lineage: str | None, key: str | None,
              state_dicts: tuple[str, ...], optimizer: str, as_json: bool, trust_pickle: bool,
              migrations: str | None) -> None:
    """Walk checkpoints back down the chain to an older revision."""
    if in_place and output is not None:
        raise BadInput("--in-place and -o/--output exclude each other")
    _migrate("downgrade", paths, to, output, overwrite, dry_run, no_backup, from_rev, lineage, migrations, key, as_json,
             trust_pickle, state_dicts, optimizer)

"""The ``ckptmigrate`` command: thin click commands over :mod:`ckptmigrate.api`.

Bad input exits 2 with one line naming the file and the problem, and so does a file the system
would not let it read or write (no space left on device, no permission); a failed check exits 1;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import click

from ckptmigrate.errors import BadInput, CheckFailed, CkptMigrateError
from ckptmigrate.progress import file_bar

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class _Group(click.Group):
    """Turns ckptmigrate's errors into one line and an exit code, unless --debug."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CkptMigrateError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"ckptmigrate: error: {exc}", err=True)
            ctx.exit(1 if isinstance(exc, CheckFailed) else 2)
        except OSError as exc:  # the system refused (a full disk, a permission): as bad input, one line
            if ctx.obj and ctx.obj.get("debug"):
                raise
            where = f"{exc.filename}: " if exc.filename is not None else ""
            click.echo(f"ckptmigrate: error: {where}{exc.strerror or exc}", err=True)
            ctx.exit(2)


@contextlib.contextmanager
def _naming(path: object) -> Iterator[None]:
    """Turn an OSError while handling ``path`` (no space left, no permission) into one line naming it."""
    try:
        yield
    except OSError as exc:
        other = f" ({exc.filename})" if exc.filename is not None and str(exc.filename) != str(path) else ""
        raise CkptMigrateError(f"{path}: {exc.strerror or exc}{other}") from exc


def _parse_tags(values: Sequence[str]) -> dict[str, str]:
    tags = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--tag")
        tags[key] = value
    return tags


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(None, "--version", "-V", package_name="ckptmigrate", prog_name="ckptmigrate")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Alembic for PyTorch checkpoints: stamp, inspect, upgrade and downgrade them."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def _fmt_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{n} B"
        size /= 1024
    return f"{n} B"


def _print_summary(info: dict[str, Any]) -> None:
    env = info["envelope"]
    click.echo(f"{info['path']}")
    click.echo(f"  container   {info['container']}")
    extras = f"  (extras: {', '.join(info['extras'])})" if info["extras"] else ""
    click.echo(f"  layout      {info['layout']}{extras}")
    click.echo(f"  tensors     {info['tensors']}  ({info['parameters']:,} elements, {_fmt_bytes(info['bytes'])})")
    dtypes = ", ".join(f"{d} ×{n}" for d, n in sorted(info["dtypes"].items()))
    click.echo(f"  dtypes      {dtypes or '-'}")
    click.echo(f"  devices     {', '.join(info['devices']) or '-'}")
    click.echo(f"  arch hash   {info['arch_hash']}")
    if env is None:
        click.echo("  envelope    unstamped")
    else:
        click.echo(f"  revision    {env.get('revision') or '-'}  (lineage {env.get('lineage') or '-'})")
        click.echo(f"  written by  torch {env.get('torch')}, CUDA {env.get('cuda')}, Python {env.get('python')}")
        git = env.get("git")
        if git:
            dirty = " (dirty)" if git.get("dirty") else ""
            click.echo(f"  git         {git.get('commit') or '-'} on {git.get('branch') or '-'}{dirty}")
        click.echo(f"  created     {env.get('created_at')}  ({len(env.get('history') or [])} history entries)")
        if env.get("tags"):
            click.echo("  tags        " + ", ".join(f"{k}={v}" for k, v in sorted(env["tags"].items())))
    if "keys" in info:
        width = max((len(k) for k in info["keys"]), default=0)
        for k, v in info["keys"].items():
            click.echo(f"    {k:<{width}}  {str(tuple(v['shape'])):<20} {v['dtype']}")


_MIGRATIONS_OPTION = click.option(
    "--migrations", "migrations", default=None, metavar="DIR_OR_MODULE",
    help="Script directory or importable package (default: [tool.ckptmigrate] in pyproject.toml).",
)


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--keys", is_flag=True, help="List every key with its shape and dtype.")
@click.option("--key", default=None, help="The payload key that holds the state dict.")
def inspect(paths: tuple[Path, ...], as_json: bool, keys: bool, key: str | None) -> None:
    """Describe checkpoints from their metadata; reads no tensor bytes."""
    from ckptmigrate import api

    infos = [api.inspect(p, keys=keys, key=key) for p in paths]
    if as_json:
        _emit_json(infos if len(infos) > 1 else infos[0])
        return
    for info in infos:
        _print_summary(info)


@main.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("--tag", "tags", multiple=True, metavar="K=V", help="Free-form tag (repeatable).")
@click.option("--repo", type=click.Path(path_type=Path, file_okay=False),
              help="Git repository to record (default: the working directory's).")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Write here instead of in place.")
@click.option("--key", default=None, help="The payload key that holds the state dict.")
@click.option("--revision", default=None, help="Record that the checkpoint is at this revision.")
@_MIGRATIONS_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the written envelope as JSON.")
@click.option("--release", default=None, metavar="VERSION",
              help="Record a release (tag `release`, history entry, commit, digest); needs a clean git tree.")
@click.option("--sign", type=click.Path(path_type=Path, dir_okay=False), metavar="KEYFILE",
              help="Sign the envelope with this Ed25519 private key (see `ckptmigrate keygen`).")
@click.option("--digest", is_flag=True, help="Record the content digest (reads every tensor byte).")
@click.option("--allow-dirty", is_flag=True, help="With --release: accept uncommitted changes, or no repository.")
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=None,
              help="Files stamped at once (default: the number of CPUs).")
def stamp(paths: tuple[str, ...], tags: tuple[str, ...], repo: Path | None, output: Path | None,
          key: str | None, revision: str | None, migrations: str | None, as_json: bool,
          release: str | None, sign: Path | None, digest: bool, allow_dirty: bool, jobs: int | None) -> None:
    """Write the envelope into checkpoints (files, directories, globs) without changing any tensor."""
    from ckptmigrate import api, engine, signing
    from ckptmigrate.release import parallel

    lineage = None
    if revision is not None:
        rev = api.revision_graph(migrations).get(revision)
        revision, lineage = rev.id, rev.lineage
    files = list(engine.expand_paths(paths))
    if not files:
        raise BadInput(f"{', '.join(paths)}: no checkpoint files found")
    if output is not None and len(files) != 1:
        raise BadInput("-o/--output takes exactly one input file")
    if release is not None and not allow_dirty:
        from ckptmigrate.release import require_clean

        require_clean(repo)  # once, before any file: stamping tracked files dirties the tree as it goes
    private_key = signing.load_private_key(sign) if sign is not None else None
    tag_map = _parse_tags(tags)
    watching = sys.stdout.isatty() and not as_json

    def one(path: Path) -> tuple[Path, Path | None, str | None]:
        """Stamp one file: (path, where it was written, or the error that stopped it)."""
        try:
            with _naming(path), file_bar("stamp", path, show=watching and len(files) == 1):
                return path, api.stamp(path, output=output, tags=tag_map, repo=repo, key=key, revision=revision,
                                       lineage=lineage, release=release, sign=private_key, digest=digest,
                                       allow_dirty=True), None
        except CkptMigrateError as exc:
            if len(files) == 1:
                raise
            return path, None, str(exc)

    written, failed = [], 0
    with _progress(parallel(one, files, jobs), watching and len(files) > 1, "stamp", len(files)) as results:
        for path, dest, error in results:
            if dest is None:
                click.echo(f"{path}: FAILED: {error}", err=True)
                failed += 1
                continue
            written.append(dest)
            if not as_json:
                click.echo(f"stamped {dest}")
    if as_json:
        envelopes = [api.inspect(w)["envelope"] for w in written]
        _emit_json(envelopes[0] if len(files) == 1 else envelopes)
    elif len(files) > 1:
        click.echo(f"{len(files)} files: {len(written)} stamped, {failed} failed")
    if failed:
        sys.exit(2)


_MIGRATIONS = _MIGRATIONS_OPTION


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Write here instead of in place.")
def compact(path: Path, output: Path | None) -> None:
    """Reclaim the bytes that in-place stamps and renames left behind in a torch zip file."""
    from ckptmigrate import api

    with _naming(path), file_bar("compact", path, show=sys.stdout.isatty()):
        before, after = api.compact(path, output=output)
    click.echo(f"{output or path}: {before:,} -> {after:,} bytes")


@main.command()
@click.argument("directory", default="migrations", type=click.Path(path_type=Path))
def init(directory: Path) -> None:
    """Create a script directory and record it in pyproject.toml."""
    from ckptmigrate import config
    from ckptmigrate.revisions import TEMPLATE

    if (directory / "versions").exists():
        raise BadInput(f"{directory}: already a script directory")
    (directory / "versions").mkdir(parents=True)
    template = Path(__file__).with_name(TEMPLATE).read_text()
    (directory / TEMPLATE).write_text(template)
    pyproject = config.find_pyproject() or Path("pyproject.toml")
    location = os.path.relpath(directory.resolve(), pyproject.resolve().parent)
    config.record_migrations(pyproject, location)
    click.echo(f"created {directory}/versions and {directory}/{TEMPLATE}; recorded in {pyproject}")


@main.command()
@click.option("-m", "--message", required=True, help="What the revision changes.")
@click.option("--rev-id", default=None, help="Revision id (default: random).")
@click.option("--lineage", default=None, help="Lineage (model family) of the new revision.")
@click.option("--autogenerate", is_flag=True,
              help="Write the ops that take head's schema to the current model's (review them!).")
@click.option("--model", default=None, metavar="PKG.MODULE:FACTORY", help="The current model, for --autogenerate.")
@_MIGRATIONS
def revision(message: str, rev_id: str | None, lineage: str | None, autogenerate: bool, model: str | None,
             migrations: str | None) -> None:
    """Write a new migration script on top of the current head."""
    from ckptmigrate import api
    from ckptmigrate.envelope import now_utc

    if autogenerate:
        path = api.autogenerate_revision(message, rev_id=rev_id, lineage=lineage, migrations=migrations, model=model)
    else:
        path = api.script_directory(migrations).write_revision(
            message, rev_id=rev_id, lineage=lineage, created=now_utc()
        )
    click.echo(f"created {path}")


@main.command()
@_MIGRATIONS
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def heads(migrations: str | None, as_json: bool) -> None:
    """The head revision of each lineage."""
    from ckptmigrate import api

    graph = api.revision_graph(migrations)
    rows = [{"lineage": lin, "head": rev.id, "message": rev.message, "file": str(rev.path)}
            for lin, rev in graph.heads().items()]
    if as_json:
        _emit_json(rows)
        return
    for row in rows:
        lineage = f", lineage {row['lineage']}" if row["lineage"] else ""
        click.echo(f"{row['head']} (head{lineage}) {row['message']}")


@main.command()
@_MIGRATIONS
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
        _emit_json(rows)
        return
    for row in rows:
        lineage = f" ({row['lineage']})" if row["lineage"] else ""
        click.echo(f"{row['down_revision'] or '<base>'} -> {row['revision']}{lineage}  {row['message']}")
        if verbose:
            click.echo(f"    file: {row['file']}")
            click.echo(f"    downgrade: {'written' if row['has_downgrade'] else 'from recorded inverses'}"
                       f"; schema snapshot: {'yes' if row['schema'] else 'no'}")


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def current(paths: tuple[Path, ...], as_json: bool) -> None:
    """The revision each checkpoint is at, or `unstamped` (reads only the envelope)."""
    from ckptmigrate import formats

    rows = []
    for path in paths:
        _fmt, env = formats.read_envelope(path)
        rows.append({"path": str(path), "revision": (env or {}).get("revision") if env else None,
                     "lineage": (env or {}).get("lineage"), "stamped": env is not None})
    if as_json:
        _emit_json(rows if len(rows) > 1 else rows[0])
        return
    for row in rows:
        state = row["revision"] or ("stamped, no revision" if row["stamped"] else "unstamped")
        click.echo(f"{row['path']}: {state}" if len(rows) > 1 else state)


def _migrate(direction: str, paths: tuple[str, ...], to: str, output: Path | None, dry_run: bool,
             no_backup: bool, from_rev: str | None, lineage: str | None, migrations: str | None,
             key: str | None, as_json: bool, trust_pickle: bool) -> None:
    from ckptmigrate import api, engine

    graph = api.revision_graph(migrations)
    files = list(engine.expand_paths(paths))
    if output is not None and len(files) != 1:
        raise BadInput("-o/--output takes exactly one input file")
    results = []
    watching = sys.stdout.isatty() and not as_json
    with _progress(files, watching and len(files) > 1, direction) as items:
        for path in items:
            try:
                with _naming(path), file_bar(direction, path, show=watching and len(files) == 1):
                    outcome = engine.migrate_file(
                        path, graph, to=to, output=output, dry_run=dry_run, backup=not no_backup,
                        from_rev=from_rev, lineage=lineage, key=key, direction=direction,
                        trust_pickle=trust_pickle,
                    )
            except CkptMigrateError as exc:
                if len(files) == 1:
                    raise
                outcome = engine.Outcome(path, None, None, error=str(exc))
            results.append(outcome)
            if not as_json:
                _print_outcome(outcome, dry_run)
    failed = [r for r in results if r.error]
    if as_json:
        _emit_json([r.to_dict() for r in results] if len(results) > 1 else results[0].to_dict())
    elif len(results) > 1:
        done = sum(1 for r in results if r.written)
        click.echo(f"{len(results)} files: {done} written, "
                   f"{len(results) - done - len(failed)} unchanged, {len(failed)} failed")
    if failed:
        sys.exit(2)


class _progress:
    """A bar of files over ``items`` on stderr when ``show`` (a batch on a terminal)."""

    def __init__(self, items: Iterable[Any], show: bool, desc: str, total: int | None = None) -> None:
        self.items, self.show, self.desc, self.total = items, show, desc, total
        self.bar: Any = None

    def __enter__(self) -> Any:
        if not self.show:
            return self.items
        from tqdm import tqdm

        self.bar = tqdm(self.items, desc=self.desc, unit="file", total=self.total, file=sys.stderr)
        return self.bar

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


def _print_outcome(outcome: Any, dry_run: bool) -> None:
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
            ops = ", ".join(f"{o['op']} ({o['keys']} keys)" for o in step["ops"]) or "no ops"
            click.echo(f"    {step['revision']}: {ops}")
        return
    extra = f" (backup: {outcome.backup})" if outcome.backup else ""
    click.echo(f"{outcome.path}: {plan.describe()} -> {outcome.output}{extra}")


_COMMON = [
    click.argument("paths", nargs=-1, required=True),
    click.option("-o", "--output", type=click.Path(path_type=Path), help="Write here instead of in place."),
    click.option("--in-place", is_flag=True, help="Rewrite the file itself (the default without -o)."),
    click.option("--dry-run", is_flag=True, help="Print the plan and the keys each op touches; write nothing."),
    click.option("--no-backup", is_flag=True, help="In place: do not keep the original as PATH.bak."),
    click.option("--from", "from_rev", default=None, help="Revision of an unstamped checkpoint."),
    click.option("--lineage", default=None, help="Lineage, when the directory holds several."),
    click.option("--key", default=None, help="The payload key that holds the state dict."),
    click.option("--json", "as_json", is_flag=True, help="Print JSON."),
    click.option("--trust-pickle", is_flag=True,
                 help="Run the file's pickle code so migrations see its extras as real objects. Trusted files only."),
    _MIGRATIONS,
]


def _with_common(fn: Any) -> Any:
    for decorator in reversed(_COMMON):
        fn = decorator(fn)
    return fn


@main.command()
@click.option("--to", default="head", show_default=True, help="Target: REV, head or +N.")
@_with_common
def upgrade(paths: tuple[str, ...], to: str, output: Path | None, in_place: bool, dry_run: bool,
            no_backup: bool, from_rev: str | None, lineage: str | None, key: str | None,
            as_json: bool, trust_pickle: bool, migrations: str | None) -> None:
    """Upgrade checkpoints (files, directories, globs) to a revision, in place by default."""
    if in_place and output is not None:
        raise BadInput("--in-place and -o/--output exclude each other")
    _migrate("upgrade", paths, to, output, dry_run, no_backup, from_rev, lineage, migrations, key, as_json,
             trust_pickle)


@main.command()
@click.option("--to", required=True, help="Target: REV, -N or base.")
@_with_common
def downgrade(paths: tuple[str, ...], to: str, output: Path | None, in_place: bool, dry_run: bool,
              no_backup: bool, from_rev: str | None, lineage: str | None, key: str | None,
              as_json: bool, trust_pickle: bool, migrations: str | None) -> None:
    """Walk checkpoints back down the chain to an older revision."""
    if in_place and output is not None:
        raise BadInput("--in-place and -o/--output exclude each other")
    _migrate("downgrade", paths, to, output, dry_run, no_backup, from_rev, lineage, migrations, key, as_json,
             trust_pickle)


from ckptmigrate.cli_release import register as _register_release  # noqa: E402
from ckptmigrate.cli_schema import register as _register_schema  # noqa: E402

_register_schema(main)
_register_release(main)
for _command in main.commands.values():  # `ckptmigrate <command> --version` too
    click.version_option(None, "--version", "-V", package_name="ckptmigrate", prog_name="ckptmigrate")(_command)

if __name__ == "__main__":
    sys.exit(main())

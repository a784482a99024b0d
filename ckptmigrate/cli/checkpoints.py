"""Commands on checkpoint files themselves: ``inspect``, ``current``, ``stamp`` and ``compact``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from ckptmigrate.cli.common import MIGRATIONS, emit_json, files_bar, naming, parse_tags
from ckptmigrate.errors import BadInput, CkptMigrateError
from ckptmigrate.util.progress import file_bar


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


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--keys", is_flag=True, help="List every key with its shape and dtype.")
@click.option("--key", default=None, help="The payload key that holds the state dict.")
def inspect(paths: tuple[Path, ...], as_json: bool, keys: bool, key: str | None) -> None:
    """Describe checkpoints from their metadata; reads no tensor bytes."""
    from ckptmigrate import api

    infos = [api.inspect(p, keys=keys, key=key) for p in paths]
    if as_json:
        emit_json(infos if len(infos) > 1 else infos[0])
        return
    for info in infos:
        _print_summary(info)


@click.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("--tag", "tags", multiple=True, metavar="K=V", help="Free-form tag (repeatable).")
@click.option("--repo", type=click.Path(path_type=Path, file_okay=False),
              help="Git repository to record (default: the working directory's).")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Write here instead of in place.")
@click.option("--key", default=None, help="The payload key that holds the state dict.")
@click.option("--revision", default=None, help="Record that the checkpoint is at this revision.")
@MIGRATIONS
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
    from ckptmigrate import api
    from ckptmigrate.chain import engine
    from ckptmigrate.release import signing
    from ckptmigrate.release.manifest import parallel

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
        from ckptmigrate.release.stamping import require_clean

        require_clean(repo)  # once, before any file: stamping tracked files dirties the tree as it goes
    private_key = signing.load_private_key(sign) if sign is not None else None
    tag_map = parse_tags(tags)
    watching = sys.stdout.isatty() and not as_json

    def one(path: Path) -> tuple[Path, Path | None, str | None]:
        """Stamp one file: (path, where it was written, or the error that stopped it)."""
        try:
            with naming(path), file_bar("stamp", path, show=watching and len(files) == 1):
                return path, api.stamp(path, output=output, tags=tag_map, repo=repo, key=key, revision=revision,
                                       lineage=lineage, release=release, sign=private_key, digest=digest,
                                       allow_dirty=True), None
        except CkptMigrateError as exc:
            if len(files) == 1:
                raise
            return path, None, str(exc)

    written, failed = [], 0
    with files_bar(parallel(one, files, jobs), watching and len(files) > 1, "stamp", len(files)) as results:
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
        emit_json(envelopes[0] if len(files) == 1 else envelopes)
    elif len(files) > 1:
        click.echo(f"{len(files)} files: {len(written)} stamped, {failed} failed")
    if failed:
        sys.exit(2)


@click.command()
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
        emit_json(rows if len(rows) > 1 else rows[0])
        return
    for row in rows:
        state = row["revision"] or ("stamped, no revision" if row["stamped"] else "unstamped")
        click.echo(f"{row['path']}: {state}" if len(rows) > 1 else state)


@click.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Write here instead of in place.")
def compact(path: Path, output: Path | None) -> None:
    """Reclaim the bytes that in-place stamps and renames left behind in a torch zip file."""
    from ckptmigrate import api

    with naming(path), file_bar("compact", path, show=sys.stdout.isatty()):
        before, after = api.compact(path, output=output)
    click.echo(f"{output or path}: {before:,} -> {after:,} bytes")
